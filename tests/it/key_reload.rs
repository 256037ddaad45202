//! Key hot reload through the real Envoy: each way a key file gets replaced
//! is seen by a request made one second after the change, with requests
//! running throughout and none failing.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::{
    chat, kubelet_swap, rename_key, write_in_place, FakeUpstream, Gateway, KeyLayout,
};

/// The contract: a new key applies within one second of the file change.
const APPLY_WITHIN: Duration = Duration::from_secs(1);

/// Sends requests back to back until stopped; returns their statuses.
fn background_traffic(gw: &Gateway) -> (Arc<AtomicBool>, tokio::task::JoinHandle<Vec<u16>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("{}/v1/chat/completions", gw.url);
    let flag = Arc::clone(&stop);
    let task = tokio::spawn(async move {
        let client = crate::support::client();
        let mut statuses = Vec::new();
        while !flag.load(Ordering::Relaxed) {
            let r = client
                .post(&url)
                .header("content-type", "application/json")
                .body(chat("gpt-4o-mini").to_string())
                .send()
                .await;
            statuses.push(r.map(|r| r.status().as_u16()).unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        statuses
    });
    (stop, task)
}

/// Rotates the key with `replace`, under traffic, and checks the contract.
async fn rotate(layout: KeyLayout, replace: fn(&Path, &str)) {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::builder()
        .backend("tars", &up.url(), Some("sk-old"))
        .model("*", "tars")
        .key_layout(layout)
        .start()
        .await;
    let key_file = gw.key_file("tars");

    let (stop, traffic) = background_traffic(&gw);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (i, key) in ["sk-new-1", "sk-new-2"].into_iter().enumerate() {
        replace(&key_file, key);
        tokio::time::sleep(APPLY_WITHIN).await;
        let reply = gw
            .post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let expected = format!("Bearer {key}");
        assert_eq!(
            up.last().header("authorization"),
            Some(expected.as_str()),
            "rotation {i} not applied within {APPLY_WITHIN:?}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let statuses = traffic.await.unwrap();
    assert!(
        statuses.len() > 20,
        "too little traffic to prove anything: {}",
        statuses.len()
    );
    assert!(
        statuses.iter().all(|s| *s == 200),
        "failed requests during rotation: {statuses:?}"
    );
    let allowed = ["Bearer sk-old", "Bearer sk-new-1", "Bearer sk-new-2"];
    for r in up.requests() {
        let auth = r.header("authorization").unwrap_or("");
        assert!(
            allowed.contains(&auth),
            "unexpected authorization upstream: {auth:?}"
        );
    }
    let logs = gw.extproc_logs();
    for secret in allowed {
        let key = secret.trim_start_matches("Bearer ");
        assert!(!logs.contains(key), "{key} appears in the logs");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_by_kubelet_data_swap() {
    rotate(KeyLayout::Kubelet, kubelet_swap).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_by_atomic_rename() {
    rotate(KeyLayout::File, rename_key).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_by_in_place_write() {
    rotate(KeyLayout::File, write_in_place).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn emptied_or_deleted_key_file_keeps_the_last_good_key() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::catch_all(&up, Some("sk-good")).await;
    let key_file = gw.key_file("tars");

    write_in_place(&key_file, "  \n");
    tokio::time::sleep(APPLY_WITHIN).await;
    let reply = gw.post_json("/v1/chat/completions", &chat("m")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(up.last().header("authorization"), Some("Bearer sk-good"));
    let line = gw.wait_for_log(&["the key file is empty"]);
    assert!(
        line.contains("ERROR") && line.contains("keeping the last good key"),
        "{line}"
    );

    std::fs::remove_file(&key_file).unwrap();
    tokio::time::sleep(APPLY_WITHIN).await;
    let reply = gw.post_json("/v1/chat/completions", &chat("m")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(up.last().header("authorization"), Some("Bearer sk-good"));
    assert_eq!(gw.admin_get("/readyz").await.status, 200);

    let metrics = gw.admin_get("/metrics").await.text();
    assert!(
        metrics.contains(r#"ai_gateway_key_reloads_total{backend="tars",result="failure"} 2"#),
        "{metrics}"
    );
    assert!(!gw.extproc_logs().contains("sk-good"), "the key was logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn key_appearing_later_makes_the_gateway_ready() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::catch_all(&up, None).await;

    let ready = gw.admin_get("/readyz").await;
    assert_eq!(ready.status, 503);
    assert!(ready.text().contains("tars"), "{}", ready.text());
    let m = gw
        .post_json("/v1/chat/completions", &chat("m"))
        .await
        .assert_error(503, "backend_key_unavailable");
    assert!(m.contains("`tars`"), "{m}");
    gw.wait_for_log(&["no key loaded"]);

    std::fs::write(gw.key_file("tars"), "sk-late\n").unwrap();
    tokio::time::sleep(APPLY_WITHIN).await;
    assert_eq!(gw.admin_get("/readyz").await.status, 200);
    let reply = gw.post_json("/v1/chat/completions", &chat("m")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(up.last().header("authorization"), Some("Bearer sk-late"));
    assert_eq!(gw.admin_get("/healthz").await.status, 200);
}
