//! Streaming through the real Envoy: SSE events reach the client as the
//! provider sends them, compressed streams included, the client gets
//! exactly the stream it asked for, and more streams than Envoy's defaults
//! allow are served at once.

use std::io::Read;
use std::time::Duration;

use crate::support::{chat, client, h2_connection, raise_fd_limit, FakeUpstream, Gateway};
use serde_json::{json, Value};
use tokio_stream::StreamExt;

fn stream_request(model: &str, include_usage: bool) -> Value {
    let mut body = chat(model);
    body["stream"] = json!(true);
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// The data of each SSE event in a complete stream.
fn events(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_events_reach_the_client_as_they_are_sent() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::catch_all(&up, Some("k")).await;
    let gate = up.hold_streams_after_first_event();

    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .header("content-type", "application/json")
        .body(stream_request("gpt-4o-mini", true).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    let mut received = Vec::new();
    // The provider sends its first event and then waits for us: if anything
    // on the way buffered, that event would never arrive.
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        while !received.windows(2).any(|w| w == b"\n\n") {
            let chunk = body.next().await.expect("stream ended early").unwrap();
            received.extend_from_slice(&chunk);
        }
    })
    .await;
    assert!(
        first.is_ok(),
        "the first event was held back: the gateway buffers the stream"
    );
    assert_eq!(events(&received).len(), 1);

    gate.notify_one();
    while let Some(chunk) = body.next().await {
        received.extend_from_slice(&chunk.unwrap());
    }
    let all = events(&received);
    assert_eq!(all.len(), 6, "{all:?}");
    assert_eq!(all.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&all[4]).unwrap();
    assert_eq!(usage["usage"]["total_tokens"], 13);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_gets_exactly_the_stream_it_asked_for() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::catch_all(&up, Some("k")).await;

    // No include_usage asked: the gateway does not add it (documented), so
    // the provider sees the client's body and the client gets no usage.
    let body = stream_request("gpt-4o-mini", false);
    let reply = gw.post_json("/v1/chat/completions", &body).await;
    assert_eq!(reply.status, 200);
    assert_eq!(up.last().json(), body, "the request body was changed");
    let all = events(&reply.body);
    assert_eq!(all.len(), 5, "{all:?}");
    assert!(all.iter().all(|e| !e.contains("usage")), "{all:?}");

    // The usage the provider cannot report is counted as missing.
    let metrics = gw.metrics_after(1).await;
    assert!(
        metrics.contains(
            r#"ai_gateway_usage_unavailable_total{backend="tars",reason="not_reported"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gzip_streams_and_bodies_pass_intact_and_are_metered() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::catch_all(&up, Some("k")).await;
    up.set_gzip(true);

    let gunzip = |bytes: &[u8]| {
        let mut out = String::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_string(&mut out)
            .unwrap();
        out
    };
    let reply = gw
        .post_json("/v1/chat/completions", &stream_request("gpt-4o-mini", true))
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-encoding"), Some("gzip"));
    let plain = gunzip(&reply.body);
    assert!(plain.ends_with("data: [DONE]\n\n"), "{plain}");

    let reply = gw
        .post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
        .await;
    assert_eq!(reply.status, 200);
    let answer: Value = serde_json::from_str(&gunzip(&reply.body)).unwrap();
    assert_eq!(answer["usage"]["total_tokens"], 13);

    let metrics = gw.metrics_after(2).await;
    let input_sum = metrics
        .lines()
        .find(|l| {
            l.starts_with("gen_ai_client_token_usage_sum{")
                && l.contains(r#"gen_ai_token_type="input""#)
        })
        .unwrap_or_else(|| panic!("no input token metric:\n{metrics}"));
    assert!(
        input_sum.ends_with(" 18"),
        "two requests of 9 input tokens: {input_sum}"
    );
    assert!(
        !metrics.contains("ai_gateway_usage_unavailable_total{"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn content_length_responses_are_streamed_whole() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::catch_all(&up, Some("k")).await;
    // Large enough for several body chunks through the processor.
    let long = "y".repeat(300_000);
    up.set_canned(Some(crate::support::Canned {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: json!({"model": "m", "choices": [{"message": {"content": long}}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
        .to_string(),
    }));
    let reply = gw.post_json("/v1/chat/completions", &chat("m")).await;
    assert_eq!(reply.status, 200);
    // Switched to streamed processing, the response loses its length.
    assert_eq!(reply.header("content-length"), None, "{:?}", reply.headers);
    assert_eq!(
        reply.json()["choices"][0]["message"]["content"]
            .as_str()
            .map(str::len),
        Some(300_000)
    );
    let metrics = gw.metrics_after(1).await;
    assert!(
        metrics.contains(r#"gen_ai_token_type="output""#),
        "{metrics}"
    );
}

/// More streams at once than Envoy's default circuit breakers allow (1,024
/// per cluster): the generated config opens the provider's cluster to
/// `limits.max_concurrent_requests` and the processor's to twice that, and
/// the processor serves every stream Envoy opens to it. The provider holds
/// each stream after its first event, so all of them are open at the same
/// moment.
///
/// The client uses two HTTP/2 connections: Envoy itself lets a client open
/// at most 1,024 streams on one connection (`max_concurrent_streams`, its
/// default for safety); past that the client's own HTTP/2 layer queues the
/// rest until one ends (this test, on one connection, saw 1,024 of 1,200
/// arrive at Envoy and none refused).
#[tokio::test(flavor = "multi_thread")]
async fn more_than_1024_streams_in_flight_at_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;

    const STREAMS: usize = 1_200;
    // Envoy opens one provider connection per held stream.
    raise_fd_limit();
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::catch_all(&up, Some("k")).await;
    let gate = up.hold_streams_after_first_event();
    let connections = [
        h2_connection::<Full<Bytes>>(&gw.url).await,
        h2_connection::<Full<Bytes>>(&gw.url).await,
    ];
    let body = Bytes::from(stream_request("gpt-4o-mini", true).to_string());

    let first_events = Arc::new(AtomicUsize::new(0));
    let mut streams = tokio::task::JoinSet::new();
    for i in 0..STREAMS {
        let mut sender = connections[i % connections.len()].clone();
        let first_events = Arc::clone(&first_events);
        let request = hyper::Request::post(format!("{}/v1/chat/completions", gw.url))
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))
            .unwrap();
        streams.spawn(async move {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("stream {i}: {e}"))?;
            let status = response.status().as_u16();
            let mut body = response.into_body();
            let (mut received, mut first) = (Vec::new(), false);
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("stream {i}: {e}"))?;
                if let Some(data) = frame.data_ref() {
                    received.extend_from_slice(data);
                }
                if !first && received.windows(2).any(|w| w == b"\n\n") {
                    first = true;
                    first_events.fetch_add(1, Ordering::SeqCst);
                }
            }
            Ok::<_, String>((status, received))
        });
    }

    // Every stream has its first event while none has ended: all are in
    // flight at once. One that ends early was refused on the way.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while first_events.load(Ordering::SeqCst) < STREAMS {
        if let Some(ended) = streams.try_join_next() {
            let ended = ended.unwrap().map(|(status, body)| {
                (
                    status,
                    String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
                )
            });
            panic!(
                "a stream ended while the provider held them all, after {} first events: {ended:?}",
                first_events.load(Ordering::SeqCst)
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {STREAMS} streams got their first event",
            first_events.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(up.requests().len(), STREAMS, "provider requests");

    // A stream waits on the gate only once it has sent its first event, so
    // the gate is opened until every stream has ended.
    let release = tokio::spawn(async move {
        loop {
            gate.notify_waiters();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let all = tokio::time::timeout(Duration::from_secs(120), streams.join_all()).await;
    release.abort();
    let all = all.expect("the released streams did not all end");
    assert_eq!(all.len(), STREAMS);
    for result in all {
        let (status, received) = result.unwrap();
        assert_eq!(status, 200);
        let events = events(&received);
        assert_eq!(events.len(), 6, "{events:?}");
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    }
}
