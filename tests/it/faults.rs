//! Faults, through the real Envoy: the processor killed under traffic
//! (Envoy fails closed, nothing reaches the provider unrouted or without the
//! key), the processor restarted (traffic recovers, Envoy untouched), and a
//! slow provider (a 504 as an OpenAI-style error, after the configured
//! timeout).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{chat, client, FakeUpstream, Gateway};

#[tokio::test(flavor = "multi_thread")]
async fn killed_processor_fails_closed_and_a_restart_recovers() {
    let up = FakeUpstream::start("tars").await;
    let mut gw = Gateway::catch_all(&up, Some("sk-gateway")).await;

    // Traffic throughout: every answer is either the provider's 200 or
    // Envoy's fail-closed 500, never anything else.
    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("{}/v1/chat/completions", gw.url);
    let traffic = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let c = client();
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = c
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("authorization", "Bearer sk-client")
                    .body(chat("m").to_string())
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let body = r.text().await.unwrap_or_default();
                seen.push((status, body));
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.kill_extproc();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let reply = gw.post_json("/v1/chat/completions", &chat("m")).await;
    let m = reply.assert_error(500, "gateway_processor_failure");
    assert!(m.contains("external processor"), "{m}");

    gw.restart_extproc();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if gw
            .post_json("/v1/chat/completions", &chat("m"))
            .await
            .status
            == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "traffic did not recover after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = traffic.await.unwrap();

    let ok = seen.iter().filter(|(s, _)| *s == 200).count();
    let failed_closed = seen
        .iter()
        .filter(|(s, b)| *s == 500 && b.contains("gateway_processor_failure"))
        .count();
    assert_eq!(
        ok + failed_closed,
        seen.len(),
        "other answers: {:?}",
        seen.iter()
            .filter(|(s, _)| *s != 200 && *s != 500)
            .collect::<Vec<_>>()
    );
    assert!(
        ok > 0 && failed_closed > 0,
        "ok {ok}, failed closed {failed_closed}"
    );
    // The provider saw only routed requests with the gateway's key.
    for r in up.requests() {
        assert_eq!(r.header_all("authorization"), ["Bearer sk-gateway"]);
        // Internal headers never reach a provider; only a routed request
        // reaches one at all (the unrouted route answers 404 itself).
        assert_eq!(r.header("x-ai-eg-backend"), None);
    }
    // Every 200 (and the recovery probe) reached the provider; a request
    // routed just before the kill may have reached it too, routed and keyed.
    let total = up.requests().len();
    assert!(total > ok, "{total} provider requests for {ok} answers");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_provider_gets_a_504_after_the_configured_timeout() {
    let up = FakeUpstream::start("slow").await;
    let gw = Gateway::builder()
        .backend("slow", &up.url(), Some("k"))
        .backend_option("request_timeout: 1s")
        .model("*", "slow")
        .start()
        .await;
    up.set_delay(Duration::from_secs(5));
    let reply = gw.post_json("/v1/chat/completions", &chat("m")).await;
    let m = reply.assert_error(504, "upstream_unavailable");
    assert!(m.contains("did not answer in time"), "{m}");
    // The exchange is reported, and the processor is fine.
    gw.wait_for_log(&["request", "status=504"]);
    up.set_delay(Duration::ZERO);
    assert_eq!(
        gw.post_json("/v1/chat/completions", &chat("m"))
            .await
            .status,
        200
    );
}
