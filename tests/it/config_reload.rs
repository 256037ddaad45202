//! Configuration hot reload: a valid new file applies to new requests, an
//! invalid one is refused with a clear log line and the old one stays.

use std::time::Duration;

use crate::support::{chat, rename_key, FakeUpstream, Gateway};

#[tokio::test(flavor = "multi_thread")]
async fn valid_config_applies_and_invalid_config_is_refused() {
    let a = FakeUpstream::start("a").await;
    let b = FakeUpstream::start("b").await;
    let gw = Gateway::builder()
        .backend("a", &a.url(), Some("key-a"))
        .backend("b", &b.url(), Some("key-b"))
        .model("m", "a")
        .start()
        .await;
    let original = std::fs::read_to_string(&gw.config_path).unwrap();
    let rule = r#"  - {name: "m", backend: "a"}"#;
    assert!(original.contains(rule), "{original}");

    assert_eq!(
        gw.post_json("/v1/chat/completions", &chat("m"))
            .await
            .status,
        200
    );
    assert_eq!(a.requests().len(), 1);

    // Send `m` to b and add a new model, with an atomic replace.
    let moved = original.replace(
        rule,
        &format!(
            "{}\n  - {{name: \"n\", backend: \"a\"}}",
            rule.replace("\"a\"", "\"b\"")
        ),
    );
    rename_key(&gw.config_path, &moved);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(served_by(&gw, "m").await, "b");
    assert_eq!(b.last().header("authorization"), Some("Bearer key-b"));
    assert_eq!(
        gw.post_json("/v1/chat/completions", &chat("n"))
            .await
            .status,
        200
    );
    assert!(gw.extproc_logs().contains("configuration reloaded"));

    // Garbage, then a file that parses but references a missing backend.
    for bad in [
        "backends: [oops",
        &moved.replace("backend: \"b\"", "backend: \"ghost\""),
    ] {
        rename_key(&gw.config_path, bad);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            served_by(&gw, "m").await,
            "b",
            "a refused config took effect"
        );
    }
    let logs = gw.extproc_logs();
    let refusals: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("configuration reload refused"))
        .collect();
    assert_eq!(refusals.len(), 2, "{logs}");
    assert!(refusals[1].contains("models[0].backend"), "{}", refusals[1]);
    assert!(logs.contains("ghost"), "{logs}");
    let metrics = gw.admin_get("/metrics").await.text();
    assert!(
        metrics.contains(r#"ai_gateway_config_reloads_total{result="failure"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"ai_gateway_config_reloads_total{result="success"} 1"#),
        "{metrics}"
    );
}

/// Which fake provider answered a chat completion for `model`.
async fn served_by(gw: &Gateway, model: &str) -> String {
    let reply = gw.post_json("/v1/chat/completions", &chat(model)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply
        .header("x-fake-upstream")
        .unwrap_or("none")
        .to_string()
}
