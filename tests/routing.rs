//! Routing and key injection through the real Envoy: the gateway's key goes
//! upstream, never the client's; models reach their own backends.

mod support;

use serde_json::json;
use support::{chat, FakeUpstream, Gateway};

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
    assert_eq!(seen.header("x-ai-eg-model"), Some("gpt-4o-mini"));
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
    let _ = json!({});
}
