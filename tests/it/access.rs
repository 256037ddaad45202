//! Gateway keys through the real Envoy: without a valid key nothing reaches
//! a provider (401); a key limited to some models gets 403 for others; the
//! provider only ever sees the gateway's own key; the keys file reloads live.

use std::time::Duration;

use crate::support::{chat, extproc_bin, rename_key, FakeUpstream, Gateway};

fn keys_file(extra: &str) -> String {
    format!(
        "keys:\n  - name: alice\n    key: gw-alice-0123456789\n  - name: limited\n    key: gw-limited-0123456789\n    models: [\"gpt-4o-mini\", \"claude-*\"]\n{extra}"
    )
}

async fn gateway(up: &FakeUpstream) -> Gateway {
    Gateway::builder()
        .backend("tars", &up.url(), Some("sk-provider"))
        .model("*", "tars")
        .client_keys(&keys_file(""))
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn only_gateway_keys_spend_the_provider_key() {
    let up = FakeUpstream::start("tars").await;
    let gw = gateway(&up).await;
    let post = |headers: Vec<(&'static str, &'static str)>, model: &'static str| {
        let gw = &gw;
        async move {
            gw.request(
                reqwest::Method::POST,
                "/v1/chat/completions",
                chat(model).to_string(),
                &headers,
            )
            .await
        }
    };

    post(vec![], "gpt-4o-mini")
        .await
        .assert_error(401, "invalid_api_key");
    post(vec![("authorization", "Bearer wrong")], "gpt-4o-mini")
        .await
        .assert_error(401, "invalid_api_key");
    post(
        vec![("authorization", "Basic gw-alice-0123456789")],
        "gpt-4o-mini",
    )
    .await
    .assert_error(401, "invalid_api_key");
    // Even an unknown path says nothing without a key.
    gw.get("/v1/nope")
        .await
        .assert_error(401, "invalid_api_key");
    assert!(
        up.requests().is_empty(),
        "an unauthenticated request reached the provider"
    );

    let ok = post(
        vec![("authorization", "Bearer gw-alice-0123456789")],
        "any-model",
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(
        up.last().header_all("authorization"),
        ["Bearer sk-provider"]
    );
    let ok = post(
        vec![("x-api-key", "gw-limited-0123456789")],
        "claude-sonnet-4",
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(
        up.last().header("x-api-key"),
        None,
        "the gateway key reached the provider"
    );

    let m = post(
        vec![("authorization", "Bearer gw-limited-0123456789")],
        "gpt-5",
    )
    .await
    .assert_error(403, "model_not_allowed");
    assert!(m.contains("`gpt-5`"), "{m}");
    assert_eq!(up.requests().len(), 2);

    let line = gw.wait_for_log(&["request", r#"client="limited""#, "status=403"]);
    assert!(!line.contains("gw-limited-0123456789"), "{line}");
    assert!(
        !gw.extproc_logs().contains("gw-alice-0123456789"),
        "a gateway key was logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_file_reloads_live_and_bad_files_are_refused() {
    let up = FakeUpstream::start("tars").await;
    let gw = gateway(&up).await;
    let file = gw.client_keys_file();
    let with = |key: &'static str| {
        let gw = &gw;
        async move {
            gw.request(
                reqwest::Method::POST,
                "/v1/chat/completions",
                chat("gpt-4o-mini").to_string(),
                &[("authorization", key)],
            )
            .await
            .status
        }
    };
    assert_eq!(with("Bearer ci-secret-0123456789").await, 401);

    // A key added by digest, and alice removed.
    let text = format!(
        "keys:\n  - name: ci\n    sha256: {}\n",
        sha256_hex("ci-secret-0123456789")
    );
    rename_key(&file, &text);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(with("Bearer ci-secret-0123456789").await, 200);
    assert_eq!(with("Bearer gw-alice-0123456789").await, 401);

    // A broken file keeps the keys in force.
    rename_key(&file, "keys: [{name: broken}]\n");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(with("Bearer ci-secret-0123456789").await, 200);
    gw.wait_for_log(&["client keys reload refused"]);
}

#[test]
fn missing_keys_file_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        "backends: [{name: t, url: 'http://127.0.0.1:9', api_key_file: k}]\nmodels: [{name: '*', backend: t}]\n\
         client_keys: {file: /nonexistent/client-keys.yaml}\nadmin: {listen: '127.0.0.1:0'}\n\
         extproc: {listen: 'unix:/tmp/unused.sock'}\n",
    )
    .unwrap();
    let out = std::process::Command::new(extproc_bin())
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read client keys file /nonexistent/client-keys.yaml"),
        "{stderr}"
    );
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
