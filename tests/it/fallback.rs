//! Fallback chains with the real Envoy: each attempt carries its own
//! backend's key and model name, only the statuses in `retry.retry_on` move
//! on, and no response byte is sent twice.

use crate::support::fake_upstream::{Canned, FakeUpstream};
use crate::support::{chat, Gateway};

fn throttled() -> Canned {
    Canned {
        status: 429,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("retry-after".into(), "7".into()),
        ],
        body: r#"{"error":{"message":"quota spent","type":"rate_limit_exceeded","code":"rate_limit_exceeded"}}"#.into(),
    }
}

/// The primary throttles: the fallback answers, with its own key and its
/// own name for the model; the primary saw only its own key.
#[tokio::test]
async fn a_throttled_primary_hands_over_to_the_fallback_with_its_own_key() {
    let primary = FakeUpstream::start("primary").await;
    let other = FakeUpstream::start("other").await;
    primary.set_canned(Some(throttled()));
    let gw = Gateway::builder()
        .backend("tars", &primary.url(), Some("sk-primary-key"))
        .backend("other", &format!("{}/", other.url()), Some("sk-other-key"))
        .model_yaml("{name: gpt-4o-mini, backend: tars, fallbacks: [{backend: other, upstream_model: gpt-4o-mini-2024-07-18}]}")
        .start()
        .await;
    let reply = gw.post_json("/v1/chat/completions", &chat("gpt-4o-mini")).await;
    assert_eq!(reply.status, 200, "{}\n{}", reply.text(), gw.envoy_logs());
    assert_eq!(reply.json()["choices"][0]["message"]["content"], "Hello from other.");

    let tried = primary.requests();
    assert_eq!(tried.len(), 1);
    assert_eq!(tried[0].header("authorization"), Some("Bearer sk-primary-key"));
    assert_eq!(tried[0].json()["model"], "gpt-4o-mini");
    let answered = other.requests();
    assert_eq!(answered.len(), 1);
    assert_eq!(answered[0].header("authorization"), Some("Bearer sk-other-key"));
    assert_eq!(answered[0].json()["model"], "gpt-4o-mini-2024-07-18");
    assert_eq!(answered[0].path, "/v1/chat/completions");
    assert_eq!(
        answered[0].header("content-length").map(str::to_owned),
        Some(answered[0].body.len().to_string())
    );
    let line = gw.wait_for_log(&["attempts=\"tars:429 other:200\""]);
    assert!(line.contains("backend=\"other\""), "{line}");
}
