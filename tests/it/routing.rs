//! Routing and key injection through the real Envoy: the gateway's key goes
//! upstream, never the client's; models reach their own backends.

use crate::support::{chat, FakeUpstream, Gateway};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn gateway_key_replaces_client_credentials() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::builder()
        .backend("tars", &up.url(), Some("sk-gateway-key"))
        .model("gpt-4o-mini", "tars")
        .start()
        .await;

    let reply = gw
        .request(
            reqwest::Method::POST,
            "/v1/chat/completions",
            chat("gpt-4o-mini").to_string(),
            &[
                ("authorization", "Bearer sk-client-key"),
                ("x-api-key", "sk-client-key"),
                ("api-key", "sk-client-key"),
                ("x-goog-api-key", "sk-client-key"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let answer = reply.json();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Hello from tars."
    );
    assert_eq!(answer["model"], "gpt-4o-mini");

    let seen = up.last();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.header_all("authorization"), ["Bearer sk-gateway-key"]);
    for h in ["x-api-key", "api-key", "x-goog-api-key"] {
        assert_eq!(seen.header(h), None, "{h} reached the upstream");
    }
    // The routing headers have routed; the provider does not get them.
    assert_eq!(seen.header("x-ai-eg-model"), None);
    assert_eq!(seen.header("x-ai-eg-backend"), None);
    assert_eq!(seen.json(), chat("gpt-4o-mini"), "body changed on the way");
    // Host is the backend's, as the provider's TLS/virtual hosting needs.
    assert_eq!(seen.header("host"), Some(up.addr.to_string().as_str()));

    // And with no client key at all.
    let reply = gw
        .post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        up.last().header("authorization"),
        Some("Bearer sk-gateway-key")
    );
    assert!(
        !gw.extproc_logs().contains("sk-gateway-key"),
        "key in the logs"
    );
    assert!(
        !gw.extproc_logs().contains("sk-client-key"),
        "client key in the logs"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_models_reach_two_backends_with_their_own_keys() {
    let a = FakeUpstream::start("a").await;
    let b = FakeUpstream::start("b").await;
    let gw = Gateway::builder()
        .backend("a", &a.url(), Some("key-a"))
        .backend("b", &b.url(), Some("key-b"))
        .model("gpt-4o-mini", "a")
        .model("claude-*", "b")
        .model("xai/grok-4.5", "b")
        .start()
        .await;

    for (model, upstream, name) in [
        ("gpt-4o-mini", &a, "a"),
        ("claude-sonnet-4-20250514", &b, "b"),
        ("xai/grok-4.5", &b, "b"),
    ] {
        upstream.clear();
        let reply = gw.post_json("/v1/chat/completions", &chat(model)).await;
        assert_eq!(reply.status, 200, "{model}: {}", reply.text());
        assert_eq!(reply.header("x-fake-upstream"), Some(name), "{model}");
        let seen = upstream.last();
        let key = format!("Bearer key-{name}");
        assert_eq!(seen.header("authorization"), Some(key.as_str()), "{model}");
        assert_eq!(seen.json()["model"], model);
    }
    assert_eq!(a.requests().len(), 1, "a received requests meant for b");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_model_rewrites_only_the_model() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::builder()
        .backend("tars", &up.url(), Some("k"))
        .model_renamed("fast", "tars", "gpt-4o-mini-2024-07-18")
        .model("gpt-4o-mini", "tars")
        .start()
        .await;

    // Unusual spacing and a nested `model` key must survive byte for byte.
    let body = r#"{ "messages" : [{"role":"user","content":"Hi \"there\" é"}], "model" : "fast", "metadata": {"model": "keep"} }"#;
    let reply = gw.post("/v1/chat/completions", body.to_string()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = up.last();
    let expected = body.replace(
        r#""model" : "fast""#,
        r#""model" : "gpt-4o-mini-2024-07-18""#,
    );
    assert_ne!(expected, body);
    assert_eq!(String::from_utf8_lossy(&seen.body), expected);
    let length = expected.len().to_string();
    assert_eq!(seen.header_all("content-length"), [length]);
    assert_eq!(seen.header("x-ai-eg-model"), None);

    // A model without upstream_model is sent unchanged, with its length.
    let body = chat("gpt-4o-mini").to_string();
    gw.post("/v1/chat/completions", body.clone()).await;
    let seen = up.last();
    assert_eq!(seen.body, body.as_bytes());
    assert_eq!(seen.header_all("content-length"), [body.len().to_string()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_endpoint_is_routed_with_its_path() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::catch_all(&up, Some("k")).await;
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
    ] {
        let body = json!({"model": "m", "input": "x", "prompt": "x"});
        let reply = gw.post_json(&format!("{path}?trace=1"), &body).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
        let seen = up.last();
        assert_eq!(seen.path, path);
        assert_eq!(seen.header("authorization"), Some("Bearer k"));
        assert_eq!(seen.json(), body);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_mebibyte_body_passes_intact() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::builder()
        .backend("tars", &up.url(), Some("k"))
        .model_renamed("big", "tars", "big-upstream")
        .model("*", "tars")
        .start()
        .await;
    let filler = "x".repeat(1024 * 1024);
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": filler}]})
        .to_string();
    assert!(body.len() > 1024 * 1024);
    let reply = gw.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(up.last().body, body.as_bytes());

    // Rewritten, the large body goes back to Envoy in one gRPC message.
    let body = body.replacen("gpt-4o-mini", "big", 1);
    let reply = gw.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = up.last();
    assert_eq!(seen.json()["model"], "big-upstream");
    assert_eq!(
        seen.json()["messages"][0]["content"].as_str().map(str::len),
        Some(1024 * 1024)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_cannot_pick_the_backend_or_fake_internal_headers() {
    let a = FakeUpstream::start("a").await;
    let b = FakeUpstream::start("b").await;
    let gw = Gateway::builder()
        .backend("a", &a.url(), Some("key-a"))
        .backend("b", &b.url(), Some("key-b"))
        .model("model-a", "a")
        .model("model-b", "b")
        .start()
        .await;

    // The client asks for backend b while naming a model of a.
    let spoof = [
        ("x-ai-eg-backend", "b"),
        ("x-ai-eg-model", "model-b"),
        ("x-ai-eg-other", "1"),
        ("authorization", "Bearer key-client"),
    ];
    let post = reqwest::Method::POST;
    let reply = gw
        .request(
            post.clone(),
            "/v1/chat/completions",
            chat("model-a").to_string(),
            &spoof,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        b.requests().is_empty(),
        "the client steered a request to backend b"
    );
    let seen = a.last();
    assert_eq!(seen.header_all("authorization"), ["Bearer key-a"]);
    for internal in ["x-ai-eg-backend", "x-ai-eg-model", "x-ai-eg-other"] {
        assert_eq!(
            seen.header_all(internal),
            Vec::<String>::new(),
            "{internal}"
        );
    }

    // An unknown model with a spoofed routing header is refused, not routed.
    let reply = gw
        .request(
            post,
            "/v1/chat/completions",
            chat("nope").to_string(),
            &spoof,
        )
        .await;
    reply.assert_error(404, "model_not_found");
    // Nor is a request the gateway answers itself.
    let reply = gw
        .request(reqwest::Method::GET, "/v1/models", "", &spoof)
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(a.requests().len() + b.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_transport_and_backend_path_prefix() {
    let up = FakeUpstream::start("prefixed").await;
    let gw = Gateway::builder()
        .tcp_extproc()
        .backend("p", &format!("{}/openai", up.url()), Some("k"))
        .model("*", "p")
        .start()
        .await;
    let reply = gw.post_json("/v1/chat/completions", &chat("m")).await;
    // The fake serves /v1/... only, so the prefixed path gets its 404, which
    // shows where the request went.
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert_eq!(up.last().path, "/openai/v1/chat/completions");
    assert_eq!(up.last().header("authorization"), Some("Bearer k"));
}
