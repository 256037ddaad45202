//! Process lifecycle: a SIGTERM'd processor (as Kubernetes stops a pod)
//! exits 0 promptly, even with Envoy holding its connection open.

use std::time::Duration;

use crate::support::{chat, FakeUpstream, Gateway};

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_cleanly() {
    let up = FakeUpstream::start("tars").await;
    let mut gw = Gateway::catch_all(&up, Some("k")).await;
    // Envoy now holds an HTTP/2 connection to the processor.
    assert_eq!(
        gw.post_json("/v1/chat/completions", &chat("m"))
            .await
            .status,
        200
    );

    let status = gw
        .extproc()
        .terminate(Duration::from_secs(10))
        .expect("the processor did not exit within 10 s of SIGTERM");
    assert!(status.success(), "exit status {status}");
    let logs = gw.extproc_logs();
    assert!(
        logs.contains("shutting down") && logs.contains("stopped"),
        "{logs}"
    );

    // Fail closed: with the processor gone, Envoy refuses, OpenAI-shaped.
    let reply = gw.post_json("/v1/chat/completions", &chat("m")).await;
    reply.assert_error(500, "gateway_processor_failure");
    assert_eq!(
        up.requests().len(),
        1,
        "a request reached the provider without the processor"
    );
}
