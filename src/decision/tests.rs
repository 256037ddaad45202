//! The decision, table by table: every error, every rule kind, spoofed
//! headers and the client-key cases.

use std::path::Path;

use super::*;
use crate::config::Config;

const CONFIG: &str = r#"
limits: {max_request_body_bytes: 2048}
backends:
  - {name: tars, url: "https://api.router.tetrate.ai", api_key_file: /k/tars}
  - {name: local, url: "http://127.0.0.1:8000", api_key_file: /k/local}
  - {name: keyless, url: "http://127.0.0.1:8001", api_key_file: /k/none}
models:
  - {name: "claude-*", backend: tars}
  - {name: "claude-special", backend: local, upstream_model: "special-v2"}
  - {name: "same-name", backend: local, upstream_model: "same-name"}
  - {name: "vendor/*", backend: local}
  - {name: "gpt-4o-mini", backend: tars}
  - {name: "orphan", backend: keyless}
"#;

fn snapshot(extra: &str) -> Snapshot {
    Snapshot::new(Config::from_text(&format!("{CONFIG}{extra}"), Path::new("t.yaml")).unwrap())
}

fn keys() -> ProviderKeys {
    ProviderKeys::from_keys([("tars", "sk-tars"), ("local", "sk-local")])
}

fn client_keys() -> ClientKeySet {
    ClientKeySet::parse(
        Path::new("keys.yaml"),
        "keys:\n  - {name: all, key: gw-all-0123456789abcdef}\n  - {name: mini, key: gw-mini-0123456789abcdef, models: [gpt-4o-mini, 'vendor/*']}\n",
    )
    .unwrap()
}

fn head(method: &str, path: &str, extra: &[(&str, &str)], bodiless: bool) -> RequestHead {
    let mut h = RequestHead::default();
    h.add(b":method", method.as_bytes());
    h.add(b":path", path.as_bytes());
    for (k, v) in extra {
        h.add(k.as_bytes(), v.as_bytes());
    }
    h.bodiless = bodiless;
    h
}

/// Request headers, as a table writes them.
type Headers<'a> = &'a [(&'a str, &'a str)];

/// What a head decision came to, in a form a table can name.
#[derive(Debug, PartialEq)]
enum Head {
    Error(u16, &'static str),
    Models,
    /// Forward now, to this backend.
    Forward(&'static str),
    AwaitBody,
}

fn summarize_head(d: &HeadDecision) -> Head {
    match d {
        HeadDecision::Answer(Answer::Error(e)) => Head::Error(e.status, e.code),
        HeadDecision::Answer(Answer::Models(_)) => Head::Models,
        HeadDecision::Forward(_, _, f) => Head::Forward(match &*f.route.backend.name {
            "tars" => "tars",
            "local" => "local",
            other => panic!("unexpected backend {other}"),
        }),
        HeadDecision::AwaitBody(..) => Head::AwaitBody,
    }
}

#[test]
fn heads() {
    let catch_all = "  - {name: '*', backend: tars}\n";
    let keyless_catch_all = "  - {name: '*', backend: keyless}\n";
    let post = "POST";
    let get = "GET";
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str, Headers<'_>, bool, &str, Head)] = &[
        // (what, method, path, headers, bodiless, extra rules, expected)
        ("chat", post, "/v1/chat/completions", &[], false, "", Head::AwaitBody),
        ("every model endpoint", post, "/v1/embeddings", &[], false, "", Head::AwaitBody),
        ("messages", post, "/v1/messages", &[], false, "", Head::AwaitBody),
        ("unknown path", post, "/v1/nope", &[], false, "", Head::Error(404, "unknown_url")),
        ("trailing slash", post, "/v1/chat/completions/", &[], false, "", Head::Error(404, "unknown_url")),
        ("wrong method", get, "/v1/chat/completions", &[], true, "", Head::Error(405, "method_not_allowed")),
        ("POST on the list", post, "/v1/models", &[], false, "", Head::Error(405, "method_not_allowed")),
        ("no body", post, "/v1/chat/completions", &[], true, "", Head::Error(400, "invalid_body")),
        ("declared too large", post, "/v1/chat/completions", &[("content-length", "2049")], false, "", Head::Error(413, "request_too_large")),
        ("declared at the limit", post, "/v1/chat/completions", &[("content-length", "2048")], false, "", Head::AwaitBody),
        ("list without catch-all", get, "/v1/models", &[], true, "", Head::Models),
        ("listed model", get, "/v1/models/gpt-4o-mini", &[], true, "", Head::Models),
        ("glob names no model", get, "/v1/models/claude-x", &[], true, "", Head::Error(404, "model_not_found")),
        ("list with catch-all", get, "/v1/models", &[], true, catch_all, Head::Forward("tars")),
        ("model with catch-all", get, "/v1/models/xai/grok-4.5", &[], true, catch_all, Head::Forward("tars")),
        ("encoded slash", get, "/v1/models/xai%2Fgrok", &[], true, catch_all, Head::Error(400, "invalid_model")),
        ("control character id", get, "/v1/models/a\tb", &[], true, "", Head::Error(400, "invalid_model")),
        ("catch-all without key", get, "/v1/models", &[], true, keyless_catch_all, Head::Error(503, "backend_key_unavailable")),
        ("GET with a body", get, "/v1/models", &[], false, catch_all, Head::Forward("tars")),
        ("spoofed routing header", post, "/v1/chat/completions", &[("x-ai-eg-backend", "local")], false, "", Head::AwaitBody),
        ("spoofed on a GET", get, "/v1/models", &[("x-ai-eg-backend", "local")], true, catch_all, Head::Forward("tars")),
    ];
    for (what, method, path, extra, bodiless, rules, want) in cases {
        let s = snapshot(rules);
        let h = head(method, path, extra, *bodiless);
        let got = decide_head(&h, &s, None, &keys());
        assert_eq!(summarize_head(&got), *want, "{what}");
    }
}

#[test]
fn client_keys_come_first() {
    let s = snapshot("");
    let keys = client_keys();
    #[rustfmt::skip]
    let cases: &[(&str, &str, Headers<'_>, Head)] = &[
        ("no credential", "/v1/chat/completions", &[], Head::Error(401, "invalid_api_key")),
        ("wrong key", "/v1/chat/completions", &[("authorization", "Bearer nope")], Head::Error(401, "invalid_api_key")),
        ("basic auth", "/v1/chat/completions", &[("authorization", "Basic gw-all-0123456789abcdef")], Head::Error(401, "invalid_api_key")),
        ("empty bearer", "/v1/chat/completions", &[("authorization", "Bearer ")], Head::Error(401, "invalid_api_key")),
        ("empty x-api-key", "/v1/chat/completions", &[("x-api-key", "")], Head::Error(401, "invalid_api_key")),
        ("unknown path, no key: says nothing", "/v1/nope", &[], Head::Error(401, "invalid_api_key")),
        ("bearer", "/v1/chat/completions", &[("authorization", "Bearer gw-all-0123456789abcdef")], Head::AwaitBody),
        ("x-api-key", "/v1/chat/completions", &[("x-api-key", "gw-mini-0123456789abcdef")], Head::AwaitBody),
        ("bearer wins over x-api-key", "/v1/chat/completions", &[("x-api-key", "nope"), ("authorization", "Bearer gw-all-0123456789abcdef")], Head::AwaitBody),
    ];
    for (what, path, extra, want) in cases {
        let h = head("POST", path, extra, false);
        let got = decide_head(&h, &s, Some(&keys), &self::keys());
        assert_eq!(summarize_head(&got), *want, "{what}");
        if let HeadDecision::AwaitBody(admitted, hygiene) = got {
            assert!(admitted.client.is_some(), "{what}");
            // The gateway key never leaves: it is among the removed headers.
            assert!(
                hygiene
                    .remove
                    .iter()
                    .any(|h| h == "authorization" || h == "x-api-key"),
                "{what}: {hygiene:?}"
            );
        }
    }
}

#[test]
fn hygiene_strips_credentials_and_spoofed_headers() {
    let h = head(
        "POST",
        "/v1/chat/completions?key=sk-q&api-version=1",
        &[
            ("authorization", "Bearer sk-client"),
            ("x-goog-api-key", "k"),
            ("x-ai-eg-backend", "local"),
            ("x-ai-eg-model", "x"),
        ],
        false,
    );
    let HeadDecision::AwaitBody(_, hygiene) = decide_head(&h, &snapshot(""), None, &keys()) else {
        panic!("not awaiting the body");
    };
    assert_eq!(
        hygiene.remove,
        [
            "authorization",
            "x-goog-api-key",
            "x-ai-eg-backend",
            "x-ai-eg-model"
        ]
    );
    assert_eq!(
        hygiene.path.as_deref(),
        Some("/v1/chat/completions?api-version=1")
    );
}

/// What a body decision came to.
#[derive(Debug, PartialEq)]
enum Body {
    Error(u16, &'static str),
    /// Backend, model sent upstream, stream.
    Forward(&'static str, &'static str, bool),
}

#[test]
fn bodies() {
    let s = snapshot("  - {name: '*', backend: tars}\n");
    let big = format!(r#"{{"model":"gpt-4o-mini","x":"{}"}}"#, "a".repeat(2048));
    #[rustfmt::skip]
    let cases: Vec<(&str, Option<&str>, String, Body)> = vec![
        // (what, client key, body, expected)
        ("exact rule", None, r#"{"model":"gpt-4o-mini"}"#.into(), Body::Forward("tars", "gpt-4o-mini", false)),
        ("exact wins over an earlier glob", None, r#"{"model":"claude-special"}"#.into(), Body::Forward("local", "special-v2", false)),
        ("glob in file order", None, r#"{"model":"claude-sonnet-4"}"#.into(), Body::Forward("tars", "claude-sonnet-4", false)),
        ("slash glob", None, r#"{"model":"vendor/m:v1.2"}"#.into(), Body::Forward("local", "vendor/m:v1.2", false)),
        ("catch-all", None, r#"{"model":"xai/grok-4.5","stream":true}"#.into(), Body::Forward("tars", "xai/grok-4.5", true)),
        ("upstream name equal to the client's", None, r#"{"model":"same-name"}"#.into(), Body::Forward("local", "same-name", false)),
        ("not JSON", None, "model=gpt".into(), Body::Error(400, "invalid_body")),
        ("not an object", None, "[1]".into(), Body::Error(400, "invalid_body")),
        ("trailing garbage", None, r#"{"model":"m"} x"#.into(), Body::Error(400, "invalid_body")),
        ("empty", None, "".into(), Body::Error(400, "invalid_body")),
        ("no model", None, r#"{"messages":[]}"#.into(), Body::Error(400, "invalid_model")),
        ("model not a string", None, r#"{"model":1}"#.into(), Body::Error(400, "invalid_model")),
        ("duplicate model", None, r#"{"model":"a","model":"b"}"#.into(), Body::Error(400, "invalid_model")),
        ("model spelled otherwise", None, r#"{"model":"a","MODEL":"b"}"#.into(), Body::Error(400, "invalid_model")),
        ("stream spelled otherwise", None, r#"{"model":"a","Stream":true}"#.into(), Body::Error(400, "invalid_body")),
        ("header injection", None, r#"{"model":"a\r\nx: 1"}"#.into(), Body::Error(400, "invalid_model")),
        ("over the limit", None, big, Body::Error(413, "request_too_large")),
        ("backend without key", None, r#"{"model":"orphan"}"#.into(), Body::Error(503, "backend_key_unavailable")),
        ("key allows the model", Some("gw-mini-0123456789abcdef"), r#"{"model":"gpt-4o-mini"}"#.into(), Body::Forward("tars", "gpt-4o-mini", false)),
        ("key allows the glob", Some("gw-mini-0123456789abcdef"), r#"{"model":"vendor/x"}"#.into(), Body::Forward("local", "vendor/x", false)),
        ("key forbids the model", Some("gw-mini-0123456789abcdef"), r#"{"model":"claude-special"}"#.into(), Body::Error(403, "model_not_allowed")),
        ("unlimited key", Some("gw-all-0123456789abcdef"), r#"{"model":"claude-special"}"#.into(), Body::Forward("local", "special-v2", false)),
    ];
    let client_keys = client_keys();
    for (what, client, body, want) in cases {
        let admitted = Admitted {
            endpoint: Endpoint::ChatCompletions,
            client: client.and_then(|k| client_keys.authorize(k.as_bytes())),
        };
        let got = match decide_body(&admitted, body.as_bytes(), &s, &keys()) {
            Err(e) => Body::Error(e.status, e.code),
            Ok(f) => {
                let Target::Backend { key, body: renamed } = &f.target else {
                    panic!("{what}: no chain in this table")
                };
                let sent = renamed.as_deref().unwrap_or(body.as_bytes());
                let sent: serde_json::Value = serde_json::from_slice(sent).unwrap();
                let backend: &'static str = if &*f.route.backend.name == "tars" {
                    "tars"
                } else {
                    "local"
                };
                let model: &'static str = String::leak(sent["model"].as_str().unwrap().to_string());
                assert_eq!(
                    key.authorization(),
                    format!("Bearer sk-{backend}"),
                    "{what}: the backend's own key"
                );
                Body::Forward(backend, model, f.stream)
            }
        };
        assert_eq!(got, want, "{what}");
    }
}

#[test]
fn no_catch_all_means_model_not_found_and_rewrites_keep_the_rest() {
    let s = snapshot("");
    let admitted = Admitted {
        endpoint: Endpoint::ChatCompletions,
        client: None,
    };
    let err = decide_body(&admitted, br#"{"model":"nope"}"#, &s, &keys()).unwrap_err();
    assert_eq!((err.status, err.code), (404, "model_not_found"));
    assert!(err.message.contains("`nope`"));

    let body =
        br#"{ "model" : "claude-special", "max_tokens": 64, "metadata": {"model": "keep"} }"#;
    let f = decide_body(&admitted, body, &s, &keys()).unwrap();
    assert_eq!(
        backend_body(&f),
        Some(
            &br#"{ "model" : "special-v2", "max_tokens": 64, "metadata": {"model": "keep"} }"#[..]
        )
    );
    assert_eq!(f.model.as_deref(), Some("claude-special"));
    assert_eq!(f.max_output_tokens, Some(64));
    // No rewrite when the upstream name is the client's.
    let f = decide_body(&admitted, br#"{"model":"gpt-4o-mini"}"#, &s, &keys()).unwrap();
    assert!(backend_body(&f).is_none());
}

fn backend_body(f: &Forward) -> Option<&[u8]> {
    match &f.target {
        Target::Backend { body, .. } => body.as_deref(),
        Target::Chain { .. } => panic!("not a chain"),
    }
}

/// A model with fallbacks goes to its chain: no key and no rewrite here
/// (each attempt gets its own), and a primary without a key does not stop
/// it.
#[test]
fn a_chain_is_forwarded_as_a_chain() {
    let s = snapshot(
        "  - {name: 'chained', backend: keyless, fallbacks: [{backend: local, upstream_model: other-name}, {backend: tars}]}\n",
    );
    let admitted = Admitted {
        endpoint: Endpoint::ChatCompletions,
        client: None,
    };
    let f = decide_body(&admitted, br#"{"model":"chained"}"#, &s, &keys()).unwrap();
    assert!(matches!(f.target, Target::Chain { .. }));
    assert_eq!(f.route.chain.as_deref(), Some("chain~keyless~local~tars"));
    let hops: Vec<(String, Option<String>)> = f
        .route
        .hops()
        .map(|h| {
            (
                h.backend.name.to_string(),
                h.upstream_model.map(|m| m.to_string()),
            )
        })
        .collect();
    assert_eq!(
        hops,
        [
            ("keyless".into(), None),
            ("local".into(), Some("other-name".into())),
            ("tars".into(), None)
        ]
    );
}
