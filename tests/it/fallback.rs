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
        .envoy_option("usage_metadata: true")
        .start()
        .await;
    // The client's own credentials reach no attempt.
    let reply = gw
        .request(
            reqwest::Method::POST,
            "/v1/chat/completions",
            chat("gpt-4o-mini").to_string(),
            &[
                ("authorization", "Bearer client-secret"),
                ("x-api-key", "client-secret"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200, "{}\n{}", reply.text(), gw.envoy_logs());
    assert_eq!(
        reply.json()["choices"][0]["message"]["content"],
        "Hello from other."
    );

    let tried = primary.requests();
    assert_eq!(tried.len(), 1);
    assert_eq!(
        tried[0].header("authorization"),
        Some("Bearer sk-primary-key")
    );
    assert_eq!(tried[0].json()["model"], "gpt-4o-mini");
    let answered = other.requests();
    assert_eq!(answered.len(), 1);
    assert_eq!(
        answered[0].header("authorization"),
        Some("Bearer sk-other-key")
    );
    assert_eq!(answered[0].json()["model"], "gpt-4o-mini-2024-07-18");
    assert_eq!(answered[0].path, "/v1/chat/completions");
    for r in tried.iter().chain(&answered) {
        assert!(r.header("x-api-key").is_none());
        assert!(!format!("{:?}", r.headers).contains("client-secret"));
    }
    assert_eq!(
        answered[0].header("content-length").map(str::to_owned),
        Some(answered[0].body.len().to_string())
    );
    let line = gw.wait_for_log(&["attempts=\"tars:429 other:200\""]);
    assert!(line.contains("backend=\"other\""), "{line}");
    // Envoy's access log names the chain, counts the attempts, and (from
    // the processor's metadata) the backend that answered.
    let entry = gw.access_log_line("\"upstream_attempts\"").await;
    assert_eq!(entry["backend"], "chain~tars~other", "{entry}");
    assert_eq!(entry["upstream_attempts"], 2, "{entry}");
    assert_eq!(entry["ai_gateway"]["backend"], "other", "{entry}");
}

fn status(code: u16, retry_after: Option<&str>) -> Canned {
    Canned {
        status: code,
        headers: [("content-type".to_string(), "application/json".to_string())]
            .into_iter()
            .chain(retry_after.map(|r| ("retry-after".to_string(), r.to_string())))
            .collect(),
        body: format!(
            r#"{{"error":{{"message":"from the fake: {code}","type":"server_error","code":"fake_{code}"}}}}"#
        ),
    }
}

/// Two fake providers answering as `primary` and `other` would (or
/// `canned`), and a gateway chaining them (see `chained`).
async fn chain_of_two(
    primary_answer: Option<Canned>,
    other_answer: Option<Canned>,
    extra: &str,
) -> (FakeUpstream, FakeUpstream, Gateway) {
    let primary = FakeUpstream::start("primary").await;
    let other = FakeUpstream::start("other").await;
    primary.set_canned(primary_answer);
    other.set_canned(other_answer);
    let gw = chained(&primary.url(), &other, extra).await;
    (primary, other, gw)
}

/// A gateway with `gpt-4o-mini` on `tars` (at `primary`) falling back to
/// `other`, keys `sk-primary-key` and `sk-other-key`.
async fn chained(primary_url: &str, other: &FakeUpstream, extra: &str) -> Gateway {
    Gateway::builder()
        .backend("tars", primary_url, Some("sk-primary-key"))
        .backend("other", &other.url(), Some("sk-other-key"))
        .model_yaml("{name: gpt-4o-mini, backend: tars, fallbacks: [{backend: other}]}")
        .model("solo", "tars")
        .extra_yaml(extra)
        .start()
        .await
}

#[tokio::test]
async fn a_primary_that_refuses_connections_hands_over() {
    let other = FakeUpstream::start("other").await;
    let closed = format!("http://127.0.0.1:{}", crate::support::free_port());
    let gw = chained(&closed, &other, "").await;
    let reply = gw
        .post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        other.last().header("authorization"),
        Some("Bearer sk-other-key")
    );
    // Envoy's upstream filters, the attempt pass among them, run once a
    // connection is made: a refused connection is an attempt only Envoy
    // sees, and its access log counts it.
    gw.wait_for_log(&["attempts=\"other:200\""]);
    let entry = gw.access_log_line("\"upstream_attempts\"").await;
    assert_eq!(entry["upstream_attempts"], 2, "{entry}");
}

/// A streamed request whose primary answers 503 before any event: the
/// fallback's stream reaches the client whole, and only it.
#[tokio::test]
async fn a_stream_whose_primary_fails_first_arrives_whole_from_the_fallback() {
    let (_primary, _other, gw) = chain_of_two(Some(status(503, None)), None, "").await;
    let mut body = chat("gpt-4o-mini");
    body["stream"] = true.into();
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let reply = gw.post_json("/v1/chat/completions", &body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    let text = reply.text();
    let content: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(content, "Hello from other.", "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("fake_503"), "{text}");
    let line = gw.wait_for_log(&["attempts=\"tars:503 other:200\""]);
    assert!(
        line.contains("output_tokens=4"),
        "usage read from the fallback: {line}"
    );
}

/// Every backend fails: the client gets the last answer as it was, its
/// `Retry-After` included.
#[tokio::test]
async fn when_every_backend_fails_the_last_answer_reaches_the_client() {
    let (primary, other, gw) = chain_of_two(Some(status(503, None)), Some(throttled()), "").await;
    let reply = gw
        .post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
        .await;
    assert_eq!(reply.status, 429, "{}", reply.text());
    assert_eq!(reply.header("retry-after"), Some("7"));
    assert_eq!(reply.json()["error"]["message"], "quota spent");
    assert_eq!((primary.requests().len(), other.requests().len()), (1, 1));
    gw.wait_for_log(&["attempts=\"tars:503 other:429\""]);
}

/// A bad request is the client's: another provider will not fix it. And
/// a rejected key is not retried either, by default (the next backend's
/// key may be fine, but a dead key must be seen, not hidden).
#[tokio::test]
async fn a_400_and_a_401_are_not_retried() {
    let (primary, other, gw) = chain_of_two(None, None, "").await;
    for code in [400, 401] {
        primary.set_canned(Some(status(code, None)));
        let reply = gw
            .post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
            .await;
        assert_eq!(reply.status, code, "{}", reply.text());
        assert_eq!(reply.json()["error"]["code"], format!("fake_{code}"));
    }
    assert_eq!(primary.requests().len(), 2);
    assert!(other.requests().is_empty(), "the fallback was tried");
}

/// 401 moves on when the operator says so (`retry.retry_on`).
#[tokio::test]
async fn a_401_moves_on_when_retry_on_names_it() {
    let (_primary, other, gw) = chain_of_two(
        Some(status(401, None)),
        None,
        "retry: {retry_on: [401, 429, 503]}\n",
    )
    .await;
    let reply = gw
        .post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        other.last().header("authorization"),
        Some("Bearer sk-other-key")
    );
}

/// A 1 MiB body reaches the fallback byte for byte, with its length.
#[tokio::test]
async fn a_large_body_arrives_intact_at_the_fallback() {
    let (_primary, other, gw) = chain_of_two(Some(throttled()), None, "").await;
    let filler = "x".repeat(1024 * 1024);
    let body = serde_json::to_vec(&serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": filler}],
    }))
    .unwrap();
    let reply = gw.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let got = other.last();
    assert!(
        got.body == body[..],
        "the body changed on its way to the fallback"
    );
    assert_eq!(
        got.header("content-length"),
        Some(body.len().to_string().as_str())
    );
}

/// A new key for the fallback applies to its next attempts, without a
/// restart.
#[tokio::test]
async fn the_fallbacks_new_key_applies_to_its_attempts() {
    let (primary, other, gw) = chain_of_two(Some(throttled()), None, "").await;
    // A chat through the chain; the key the fallback received.
    let key_seen_by_fallback = || async {
        let reply = gw
            .post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        other.last().header("authorization").map(str::to_owned)
    };
    assert_eq!(
        key_seen_by_fallback().await.as_deref(),
        Some("Bearer sk-other-key")
    );
    crate::support::rename_key(&gw.key_file("other"), "sk-other-rotated");
    gw.wait_for_log(&["API key loaded", "backend=\"other\"", "generation=2"]);
    assert_eq!(
        key_seen_by_fallback().await.as_deref(),
        Some("Bearer sk-other-rotated")
    );
    // The primary never sees the fallback's key, old or new.
    for r in primary.requests() {
        assert_eq!(r.header("authorization"), Some("Bearer sk-primary-key"));
    }
}

/// A model without fallbacks makes one attempt: a 429 goes to the client.
#[tokio::test]
async fn a_model_without_fallbacks_makes_exactly_one_attempt() {
    let (primary, other, gw) = chain_of_two(Some(throttled()), None, "").await;
    let reply = gw.post_json("/v1/chat/completions", &chat("solo")).await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.header("retry-after"), Some("7"));
    assert_eq!(primary.requests().len(), 1);
    assert!(other.requests().is_empty());
    let line = gw.wait_for_log(&["model=\"solo\"", "attempts="]);
    assert!(line.contains("attempts=\"-\""), "{line}");
}

/// A backend that keeps failing is left out for a while: after
/// `eject_after` failures in a row, requests go straight to the fallback.
#[tokio::test]
async fn a_failing_backend_is_ejected_then_skipped() {
    let (primary, other, gw) = chain_of_two(
        Some(status(503, None)),
        None,
        "retry: {eject_after: 2, ejection_time: 30s}\n",
    )
    .await;
    for _ in 0..5 {
        let reply = gw
            .post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(primary.requests().len(), 2, "tried after it was ejected");
    assert_eq!(other.requests().len(), 5);
    let stats = crate::support::client()
        .get(format!(
            "{}/stats?filter=outlier_detection",
            gw.envoy_admin_url
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        stats.contains("cluster.tars.outlier_detection.ejections_enforced_total: 1"),
        "{stats}"
    );
}

/// Tokens, dollars and the GenAI metrics go to the backend that answered.
#[tokio::test]
async fn usage_and_spend_are_counted_for_the_backend_that_answered() {
    let (_primary, _other, gw) = chain_of_two(
        Some(throttled()),
        None,
        "spend: {limits: {usd_per_day: 100}, prices: [{model: '*', input: 1.0, output: 2.0}]}\n",
    )
    .await;
    let reply = gw
        .post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let metrics = gw.metrics_after(1).await;
    let spent = crate::support::metric(
        &metrics,
        "ai_gateway_spend_usd_total{",
        &["backend=\"other\"", "model=\"gpt-4o-mini\""],
    );
    assert!(spent.is_some_and(|usd| usd > 0.0), "{metrics}");
    assert!(
        !metrics.lines().any(|l| l.starts_with("ai_gateway_spend_usd_total{") && l.contains("backend=\"tars\"")),
        "{metrics}"
    );
    for (backend, outcome) in [("tars", "429"), ("other", "200")] {
        assert_eq!(
            crate::support::metric(
                &metrics,
                "ai_gateway_attempts_total{",
                &[
                    &format!("backend=\"{backend}\""),
                    &format!("outcome=\"{outcome}\"")
                ],
            ),
            Some(1.0),
            "{metrics}"
        );
    }
    let token_series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("gen_ai_client_token_usage_count{"))
        .collect();
    assert!(!token_series.is_empty(), "{metrics}");
    assert!(
        token_series
            .iter()
            .all(|l| l.contains("gen_ai_provider_name=\"other\"")),
        "{token_series:?}"
    );
}

/// A burst on a throttled primary: every request moves on, not only the
/// first few (Envoy's default allows 3 retries in flight per cluster).
#[tokio::test]
async fn a_burst_on_a_throttled_primary_all_moves_on() {
    let (primary, other, gw) = chain_of_two(Some(throttled()), None, "").await;
    let body = chat("gpt-4o-mini");
    let replies = futures_util::future::join_all(
        (0..64).map(|_| gw.post_json("/v1/chat/completions", &body)),
    )
    .await;
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    let stats = crate::support::client()
        .get(format!("{}/stats?filter=retry", gw.envoy_admin_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?} {stats}");
    assert_eq!((primary.requests().len(), other.requests().len()), (64, 64));
}

/// A provider that starts a stream, sends one event, then drops the
/// connection: a failure after the response has begun.
async fn cut_after_first_event() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = std::sync::Arc::new(AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&served);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                // Read the request head and body (small: one read suffices
                // for the test's body, but read until the blank line).
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let event = "data: {\"id\":\"cut\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"first \"},\"finish_reason\":null}]}\n\n";
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n",
                    event.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.flush().await;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                // Dropped without the last chunk: a reset mid-stream.
            });
        }
    });
    (url, served)
}

/// A stream that fails after its first event is not retried: the client
/// sees the cut, and no byte comes twice or from another backend.
#[tokio::test]
async fn a_stream_cut_after_its_first_event_is_not_retried() {
    let (primary_url, primary_served) = cut_after_first_event().await;
    let other = FakeUpstream::start("other").await;
    let gw = chained(&primary_url, &other, "").await;
    let mut body = chat("gpt-4o-mini");
    body["stream"] = true.into();
    let resp = crate::support::client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut received = Vec::new();
    let mut stream = resp.bytes_stream();
    use futures_util::StreamExt;
    let mut cut = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => received.extend_from_slice(&bytes),
            Err(_) => {
                cut = true;
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&received);
    assert!(cut, "the client must see the cut, got a clean end: {text}");
    assert_eq!(text.matches("first ").count(), 1, "{text}");
    assert!(!text.contains("Hello from other"), "{text}");
    assert!(
        other.requests().is_empty(),
        "the fallback was tried after the response began"
    );
    assert_eq!(primary_served.load(std::sync::atomic::Ordering::SeqCst), 1);
}
