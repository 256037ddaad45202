//! The decision, with arbitrary request heads and bodies against a fixed
//! configuration: it never panics, and whatever it forwards obeys the
//! rules: only with a valid client key, only to the backend the model's
//! rule names, only with that backend's own key, only a model the client
//! key may use, never with a client credential left on the request.
#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use ai_gateway_extproc::client_keys::ClientKeySet;
use ai_gateway_extproc::config::Config;
use ai_gateway_extproc::decision::head::CREDENTIAL_HEADERS;
use ai_gateway_extproc::decision::{
    decide_body, decide_head, Forward, HeadDecision, RequestHead, Target,
};
use ai_gateway_extproc::provider_keys::ProviderKeys;
use ai_gateway_extproc::state::Snapshot;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"
backends:
  - {name: a, url: "http://127.0.0.1:1", api_key_file: /k/a}
  - {name: b, url: "http://127.0.0.1:2", api_key_file: /k/b}
models:
  - {name: "gpt-*", backend: a}
  - {name: "gpt-x", backend: b, upstream_model: "gpt-x-2"}
  - {name: "*", backend: a}
limits: {max_request_body_bytes: 4096}
"#;

const KEYS: &str = "keys:\n  - {name: all, key: gw-all-0123456789abcdef}\n  - {name: mini, key: gw-mini-0123456789abcdef, models: ['gpt-*']}\n";

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    access: bool,
    method: u8,
    path: &'a str,
    headers: Vec<(u8, &'a [u8])>,
    bodiless: bool,
    body: &'a [u8],
}

const NAMES: &[&str] = &[
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "proxy-authorization",
    "x-ai-eg-backend",
    "x-ai-eg-model",
    "content-length",
    "x-request-id",
    ":path",
];

/// Built once: the target runs the decision, not the config parser.
static FIXED: LazyLock<(Snapshot, ProviderKeys, ClientKeySet)> = LazyLock::new(|| {
    let config = Config::from_text(CONFIG, Path::new("fuzz.yaml")).expect("fixed config");
    (
        Snapshot::new(config),
        ProviderKeys::from_keys([("a", "sk-a"), ("b", "sk-b")]),
        ClientKeySet::parse(Path::new("keys.yaml"), KEYS).expect("fixed keys"),
    )
});

fuzz_target!(|input: Input<'_>| {
    let (snapshot, keys, client_keys) = &*FIXED;
    let mut head = RequestHead::default();
    head.add(b":method", if input.method % 2 == 0 { b"POST" } else { b"GET" });
    head.add(b":path", input.path.as_bytes());
    for (name, value) in &input.headers {
        head.add(NAMES[*name as usize % NAMES.len()].as_bytes(), value);
    }
    head.bodiless = input.bodiless;
    let access = input.access.then_some(client_keys);
    let valid_key = head
        .credential
        .as_deref()
        .and_then(|c| client_keys.authorize(c));

    let check = |f: &Forward, allowed: &dyn Fn(&str) -> bool| {
        let backend = &*f.route.backend.name;
        // The fuzzed config has no chains: every forward names its key.
        let Target::Backend { key, body: renamed } = &f.target else {
            panic!("a chain in a config without fallbacks")
        };
        assert_eq!(key.authorization(), format!("Bearer sk-{backend}"));
        if let Some(model) = &f.model {
            let rule = snapshot.routes.resolve(model).expect("forwarded a model without a rule");
            assert_eq!(&*rule.backend.name, backend);
            assert!(allowed(model), "forwarded {model} the client key may not use");
            if let Some(body) = renamed {
                let v: serde_json::Value = serde_json::from_slice(body).expect("rewrite broke JSON");
                assert_eq!(v["model"].as_str(), rule.upstream_model.as_deref());
            }
        }
    };
    match decide_head(&head, snapshot, access, keys) {
        HeadDecision::Answer(_) => {}
        HeadDecision::Forward(admitted, hygiene, forward) => {
            if input.access {
                assert!(valid_key.is_some(), "forwarded without a valid client key");
            }
            for h in CREDENTIAL_HEADERS {
                if input.headers.iter().any(|(n, _)| NAMES[*n as usize % NAMES.len()] == *h) {
                    assert!(hygiene.remove.iter().any(|r| r == h), "{h} left on");
                }
            }
            let client = admitted.client.clone();
            check(&forward, &|m| client.as_ref().is_none_or(|c| c.allows(m)));
        }
        HeadDecision::AwaitBody(admitted, hygiene) => {
            if input.access {
                assert!(valid_key.is_some(), "admitted without a valid client key");
            }
            for h in CREDENTIAL_HEADERS {
                if input.headers.iter().any(|(n, _)| NAMES[*n as usize % NAMES.len()] == *h) {
                    assert!(hygiene.remove.iter().any(|r| r == h), "{h} left on");
                }
            }
            if let Ok(forward) = decide_body(&admitted, input.body, snapshot, keys) {
                let client = admitted.client.clone();
                check(&forward, &|m| client.as_ref().is_none_or(|c| c.allows(m)));
            }
        }
    }
});
