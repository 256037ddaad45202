//! The path every real user takes: HTTPS to the provider. A fake provider
//! behind TLS, its certificate signed by a CA made here, and the backend's
//! `ca_file` pointing at that CA: Envoy sends SNI, checks the name, and
//! refuses a certificate made for another name.

use crate::support::certs::TestCa;
use crate::support::fake_upstream::FakeUpstream;
use crate::support::{chat, Gateway};

#[tokio::test]
async fn https_backends_by_name_and_by_address_are_checked_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test provider CA");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let by_name_cert = ca.issue(dir.path(), "by-name", &["localhost"]);
    let by_ip_cert = ca.issue(dir.path(), "by-ip", &["127.0.0.1"]);
    // One offers HTTP/2 by ALPN, the other only HTTP/1.1: Envoy speaks
    // what each offers.
    let by_name = FakeUpstream::start_tls(
        "by-name",
        &by_name_cert.cert,
        &by_name_cert.key,
        &["h2", "http/1.1"],
    )
    .await;
    let by_ip =
        FakeUpstream::start_tls("by-ip", &by_ip_cert.cert, &by_ip_cert.key, &["http/1.1"]).await;
    let ca_option = format!("ca_file: {:?}", ca_file.display().to_string());
    let gw = Gateway::builder()
        .backend(
            "named",
            &format!("https://localhost:{}", by_name.addr.port()),
            Some("sk-named"),
        )
        .backend_option(&ca_option)
        .backend(
            "addressed",
            &format!("https://127.0.0.1:{}", by_ip.addr.port()),
            Some("sk-addressed"),
        )
        .backend_option(&ca_option)
        .model("m-named", "named")
        .model("m-addressed", "addressed")
        .start()
        .await;

    let reply = gw.post_json("/v1/chat/completions", &chat("m-named")).await;
    assert_eq!(reply.status, 200, "{}\n{}", reply.text(), gw.envoy_logs());
    assert_eq!(
        reply.json()["choices"][0]["message"]["content"],
        "Hello from by-name."
    );
    let seen = by_name.last();
    assert_eq!(seen.header("authorization"), Some("Bearer sk-named"));
    assert_eq!(
        seen.authority.as_deref(),
        Some(format!("localhost:{}", by_name.addr.port()).as_str())
    );
    assert_eq!(
        by_name.server_names(),
        ["localhost"],
        "Envoy sends the host as SNI"
    );

    let reply = gw
        .post_json("/v1/chat/completions", &chat("m-addressed"))
        .await;
    assert_eq!(reply.status, 200, "{}\n{}", reply.text(), gw.envoy_logs());
    let seen = by_ip.last();
    assert_eq!(seen.header("authorization"), Some("Bearer sk-addressed"));
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(
        seen.version, "HTTP/1.1",
        "HTTP/1.1 where only it is offered"
    );
    // No SNI for an address (RFC 6066); the certificate's IP is checked.
    assert_eq!(by_ip.server_names(), [""]);
}

/// A provider whose certificate is for another name gets no request; the
/// client gets an OpenAI-shaped 503 that says why, and Envoy's log line
/// names the TLS failure.
#[tokio::test]
async fn a_certificate_for_another_name_is_refused_before_any_request() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test provider CA");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let wrong = ca.issue(dir.path(), "wrong", &["api.elsewhere.example"]);
    let up = FakeUpstream::start_tls("impostor", &wrong.cert, &wrong.key, &["http/1.1"]).await;
    let gw = Gateway::builder()
        .backend(
            "tars",
            &format!("https://localhost:{}", up.addr.port()),
            Some("sk-never-sent"),
        )
        .backend_option(&format!("ca_file: {:?}", ca_file.display().to_string()))
        .model("*", "tars")
        .start()
        .await;
    let reply = gw
        .post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
        .await;
    let message = reply.assert_error(503, "upstream_unavailable");
    assert!(
        message.contains("CERTIFICATE_VERIFY_FAILED") && message.contains("api.elsewhere.example"),
        "the client is told why: {message}"
    );
    assert!(
        up.requests().is_empty(),
        "a request reached a provider whose certificate failed"
    );
    // Envoy's log line names the TLS failure and the certificate's names.
    let entry = gw.access_log_line("TLS_error").await;
    let details = entry["details"].as_str().unwrap_or_default();
    assert!(details.contains("api.elsewhere.example"), "{entry}");
    let access = gw.envoy_logs();
    assert!(!access.contains("sk-never-sent") && !message.contains("sk-never-sent"));
}
