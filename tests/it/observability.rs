//! What an operator sees, through the real Envoy: token counts in the
//! metrics, the request log line and Envoy's access log; JSON logs; the
//! gRPC health service; a drain on SIGTERM that lets streams finish; and no
//! key in any log line at trace level.

use std::time::{Duration, Instant};

use crate::support::extproc_client::{
    body, chat_headers, exchange, response_body, response_headers, unix_channel,
};
use crate::support::{chat, metric, rename_key, Canned, FakeUpstream, Gateway};
use serde_json::{json, Value};
use tokio_stream::StreamExt;

fn streamed(model: &str) -> Value {
    let mut body = chat(model);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_chat_shows_up_in_metrics_logs_and_access_log() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::builder()
        .backend("tars", &up.url(), Some("sk-secret-tars"))
        .model("*", "tars")
        .envoy_option("usage_metadata: true")
        .start()
        .await;

    let reply = gw
        .request(
            reqwest::Method::POST,
            "/v1/chat/completions",
            streamed("gpt-4o-mini").to_string(),
            &[("x-request-id", "req-stream-1")],
        )
        .await;
    assert_eq!(reply.status, 200);

    let m = gw.metrics_after(1).await;
    let genai = [
        r#"gen_ai_request_model="gpt-4o-mini""#,
        r#"gen_ai_response_model="gpt-4o-mini""#,
        r#"gen_ai_provider_name="tars""#,
        r#"gen_ai_operation_name="chat""#,
        r#"outcome="success""#,
    ];
    for (kind, count) in [
        ("input", 9.0),
        ("output", 4.0),
        ("cached_input", 2.0),
        ("reasoning", 1.0),
    ] {
        let token_type = format!(r#"gen_ai_token_type="{kind}""#);
        let labels: Vec<&str> = genai.iter().copied().chain([token_type.as_str()]).collect();
        assert_eq!(
            metric(&m, "gen_ai_client_token_usage_sum", &labels),
            Some(count),
            "{kind}:\n{m}"
        );
    }
    for name in [
        "gen_ai_server_request_duration_seconds_count",
        "gen_ai_server_time_to_first_token_seconds_count",
        "gen_ai_server_time_per_output_token_seconds_count",
    ] {
        assert_eq!(metric(&m, name, &genai), Some(1.0), "{name}:\n{m}");
    }
    for phase in [
        "request_headers",
        "request_body",
        "response_headers",
        "response_body",
    ] {
        let label = format!(r#"phase="{phase}""#);
        assert!(
            metric(
                &m,
                "ai_gateway_extproc_phase_duration_seconds_count",
                &[&label]
            )
            .unwrap_or(0.0)
                >= 1.0,
            "{phase}:\n{m}"
        );
    }
    assert_eq!(
        metric(
            &m,
            "ai_gateway_requests_total",
            &[r#"endpoint="chat_completions""#, r#"outcome="success""#]
        ),
        Some(1.0)
    );

    // One request line in the processor's log, with the counts.
    let line = gw.wait_for_log(&["req-stream-1", " request "]);
    for field in [
        r#"model="gpt-4o-mini""#,
        r#"backend="tars""#,
        "status=200",
        r#"outcome="success""#,
        "stream=true",
        "input_tokens=9",
        "output_tokens=4",
        "cached_input_tokens=2",
        "reasoning_tokens=1",
        "duration_ms=",
        "ttfb_ms=",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }

    // Envoy's access log carries the counts too (dynamic metadata, as one
    // object), as `envoy.usage_metadata` asks.
    let entry = gw.access_log_line("req-stream-1").await;
    assert_eq!(entry["backend"], "tars");
    let reported = &entry["ai_gateway"];
    assert_eq!(reported["backend"], "tars", "{entry}");
    assert_eq!(reported["model"], "gpt-4o-mini");
    assert_eq!(reported["input_tokens"], 9);
    assert_eq!(reported["output_tokens"], 4);
    assert_eq!(reported["total_tokens"], 13);
    assert_eq!(reported["cached_input_tokens"], 2);
    assert_eq!(reported["reasoning_tokens"], 1);
    assert_eq!(reported["response_model"], "gpt-4o-mini");
}

/// By default the processor writes no metadata and Envoy's access log has
/// no field for it: the request line in the processor's log is the record
/// of the counts, joined to Envoy's line by the request id. Switched on by
/// a live config edit, the next request carries them in both.
#[tokio::test(flavor = "multi_thread")]
async fn usage_reaches_envoys_access_log_only_when_asked() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::catch_all(&up, Some("sk-secret-tars")).await;
    let gw = &gw;
    let send = |id: String| async move {
        let reply = gw
            .request(
                reqwest::Method::POST,
                "/v1/chat/completions",
                chat("gpt-4o-mini").to_string(),
                &[("x-request-id", &id)],
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        // Quoted: `req-2` is not found in `req-20`'s line.
        gw.access_log_line(&format!("{id:?}")).await
    };
    let entry = send("req-plain".into()).await;
    assert_eq!(entry["backend"], "tars", "{entry}");
    assert!(entry.get("ai_gateway").is_none(), "{entry}");
    assert_eq!(metadata_written(gw).await, None);
    let line = gw.wait_for_log(&["req-plain", " request "]);
    assert!(line.contains("input_tokens=9"), "{line}");

    let config = std::fs::read_to_string(&gw.config_path).unwrap();
    let edited = config.replacen(
        "admin_listen: \"127.0.0.1:0\"",
        "admin_listen: \"127.0.0.1:0\", usage_metadata: true",
        1,
    );
    assert_ne!(edited, config, "the envoy section moved: {config}");
    rename_key(&gw.config_path, &edited);
    // The processor's half applies once Envoy has the new listener (make
    // before break); then Envoy's workers serve on it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let written = loop {
        if let Some(written) = metadata_written(gw).await {
            break written;
        }
        assert!(Instant::now() < deadline, "the edit never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(written.contains("io.envoy.ai_gateway"), "{written}");
    assert!(written.contains("input_tokens"), "{written}");
    let entry = send("req-asked".into()).await;
    assert_eq!(entry["ai_gateway"]["backend"], "tars", "{entry}");
    assert_eq!(entry["ai_gateway"]["input_tokens"], 9, "{entry}");
}

/// Plays Envoy for one chat on the processor's socket and returns the
/// dynamic metadata of the answer to the response's last body chunk.
async fn metadata_written(gw: &Gateway) -> Option<String> {
    let channel = unix_channel(&gw.extproc_socket()).await.unwrap();
    let usage = r#"{"id":"c1","object":"chat.completion","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}}"#;
    let answers = exchange(
        channel,
        None,
        vec![
            chat_headers(&[]),
            body(&chat("gpt-4o-mini").to_string(), true),
            response_headers(
                &[(":status", "200"), ("content-type", "application/json")],
                false,
            ),
            response_body(usage, true),
        ],
    )
    .await;
    assert_eq!(answers.len(), 4, "{answers:?}");
    let last = answers[3].as_ref().expect("the last answer");
    last.dynamic_metadata.as_ref().map(|m| format!("{m:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_have_one_line_per_request_and_no_key_at_trace_level() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::builder()
        .backend("tars", &up.url(), Some("sk-first-secret"))
        .model("*", "tars")
        .extproc_args(&["--log-level", "trace", "--log-format", "json"])
        .start()
        .await;

    let ids = ["req-a", "req-b", "req-c", "req-d"];
    gw.request(
        reqwest::Method::POST,
        "/v1/chat/completions",
        chat("m").to_string(),
        &[("x-request-id", ids[0])],
    )
    .await;
    gw.request(
        reqwest::Method::POST,
        "/v1/chat/completions",
        streamed("m").to_string(),
        &[("x-request-id", ids[1])],
    )
    .await;
    gw.request(
        reqwest::Method::POST,
        "/v1/nope",
        "{}",
        &[("x-request-id", ids[2])],
    )
    .await;
    rename_key(&gw.key_file("tars"), "sk-second-secret");
    tokio::time::sleep(Duration::from_secs(1)).await;
    up.set_canned(Some(Canned {
        status: 401,
        headers: vec![],
        body: "{}".into(),
    }));
    gw.request(
        reqwest::Method::POST,
        "/v1/chat/completions",
        chat("m").to_string(),
        &[
            ("x-request-id", ids[3]),
            ("authorization", "Bearer sk-client-secret"),
        ],
    )
    .await;
    gw.wait_for_log(&["req-d", r#""message":"request""#]);

    let logs = gw.extproc_logs();
    let mut request_lines = Vec::new();
    for line in logs.lines().filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if v["message"] == "request" {
            request_lines.push(v);
        }
    }
    for id in ids {
        let n = request_lines
            .iter()
            .filter(|v| v["request_id"] == id)
            .count();
        assert_eq!(n, 1, "{id} has {n} request lines:\n{logs}");
    }
    let refused = request_lines
        .iter()
        .find(|v| v["request_id"] == "req-c")
        .unwrap();
    assert_eq!(
        (refused["status"].as_u64(), refused["error"].as_str()),
        (Some(404), Some("unknown_url"))
    );
    let rejected = request_lines
        .iter()
        .find(|v| v["request_id"] == "req-d")
        .unwrap();
    assert_eq!(rejected["outcome"], "upstream_error");

    let envoy = gw.envoy_logs();
    for secret in ["sk-first-secret", "sk-second-secret", "sk-client-secret"] {
        assert!(!logs.contains(secret), "{secret} in the processor's logs");
        assert!(!envoy.contains(secret), "{secret} in Envoy's logs");
    }
    assert!(
        logs.lines().filter(|l| l.contains("\"TRACE\"")).count() > 10,
        "trace logging was not on"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_health_service_reports_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::builder()
        .tcp_extproc()
        .backend("tars", &up.url(), Some("k"))
        .model("*", "tars")
        .start()
        .await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", gw.extproc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "envoy.service.ext_proc.v3.ExternalProcessor"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_an_open_stream_finish() {
    let up = FakeUpstream::start("tars").await;
    let mut gw = Gateway::catch_all(&up, Some("k")).await;
    let gate = up.hold_streams_after_first_event();

    let mut body = std::pin::pin!(gw.open_stream(&streamed("gpt-4o-mini"), &[]).await);
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));

    // The stream is open through the processor: stop it now.
    let pid = gw.extproc().pid() as i32;
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.extproc_logs().contains("shutting down") {
        assert!(Instant::now() < deadline, "no shutdown log line");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        gw.extproc().try_status().is_none(),
        "exited with a stream still open"
    );

    gate.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.expect("the stream was cut"));
    }
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
    let status = gw
        .extproc()
        .terminate(Duration::from_secs(10))
        .expect("did not exit after the drain");
    assert!(status.success(), "{status}");
    // Exited: everything it logged has been flushed.
    assert!(gw.extproc_logs().contains(r#"outcome="success""#));
}

#[tokio::test(flavor = "multi_thread")]
async fn client_leaving_mid_stream_is_logged_as_cancelled() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::catch_all(&up, Some("k")).await;
    let _gate = up.hold_streams_after_first_event();

    let mut body = Box::pin(
        gw.open_stream(&streamed("gpt-4o-mini"), &[("x-request-id", "req-leaves")])
            .await,
    );
    body.next().await.unwrap().unwrap();
    drop(body); // the client goes away with the stream open

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = gw.extproc_logs();
        if let Some(line) = logs
            .lines()
            .find(|l| l.contains("req-leaves") && l.contains(" request "))
        {
            assert!(line.contains(r#"outcome="cancelled""#), "{line}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no request line for the cancelled stream:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = gw.admin_get("/metrics").await.text();
    assert_eq!(
        metric(
            &m,
            "gen_ai_server_request_duration_seconds_count",
            &[r#"outcome="cancelled""#]
        ),
        Some(1.0),
        "{m}"
    );
}

/// One name per outcome: a request the gateway refuses, one it answers
/// itself and one a provider fails are named the same way in the request
/// log line and in `ai_gateway_requests_total`.
#[tokio::test(flavor = "multi_thread")]
async fn outcomes_have_one_name_in_logs_and_metrics() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::builder()
        .backend("tars", &up.url(), Some("k"))
        .model("gpt-4o-mini", "tars")
        .start()
        .await;
    let refused = gw
        .request(
            reqwest::Method::POST,
            "/v1/chat/completions",
            "{}",
            &[("x-request-id", "req-refused")],
        )
        .await;
    refused.assert_error(400, "invalid_model");
    let listed = gw
        .request(
            reqwest::Method::GET,
            "/v1/models",
            "",
            &[("x-request-id", "req-listed")],
        )
        .await;
    assert_eq!(listed.status, 200);
    up.set_canned(Some(Canned {
        status: 503,
        headers: vec![],
        body: r#"{"error":{"message":"down","type":"server_error"}}"#.into(),
    }));
    let failed = gw
        .request(
            reqwest::Method::POST,
            "/v1/chat/completions",
            chat("gpt-4o-mini").to_string(),
            &[("x-request-id", "req-failed")],
        )
        .await;
    assert_eq!(failed.status, 503);

    let cases = [
        (
            "req-refused",
            "chat_completions",
            "rejected",
            "invalid_model",
        ),
        ("req-listed", "models", "answered", ""),
        ("req-failed", "chat_completions", "upstream_error", ""),
    ];
    // The line is written when the exchange ends; the metric with it.
    for (id, _, outcome, _) in cases {
        let line = gw.wait_for_log(&[id, " request "]);
        assert!(line.contains(&format!(r#"outcome="{outcome}""#)), "{line}");
    }
    let m = gw.admin_get("/metrics").await.text();
    for (_, endpoint, outcome, error) in cases {
        let labels = [
            format!(r#"endpoint="{endpoint}""#),
            format!(r#"outcome="{outcome}""#),
            format!(r#"error="{error}""#),
        ];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        assert_eq!(
            metric(&m, "ai_gateway_requests_total", &labels),
            Some(1.0),
            "{outcome}:\n{m}"
        );
    }
}
