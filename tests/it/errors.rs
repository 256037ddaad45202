//! Every error the gateway answers itself is OpenAI-shaped and sent without
//! calling a provider; provider errors reach the client unchanged and are
//! logged once, clearly.

use crate::support::{chat, free_port, Canned, FakeUpstream, Gateway};
use serde_json::json;

const LIMIT: usize = 4096;

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_openai_errors_and_never_reach_the_provider() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::builder()
        .backend("tars", &up.url(), Some("k"))
        .backend("keyless", &up.url(), None)
        .model("gpt-4o-mini", "tars")
        .model("needs-key", "keyless")
        .extra_yaml(&format!("limits: {{max_request_body_bytes: {LIMIT}}}\n"))
        .start()
        .await;
    let chat_path = "/v1/chat/completions";

    gw.post(chat_path, "not json")
        .await
        .assert_error(400, "invalid_body");
    gw.post(
        chat_path,
        b"{\"model\":\"gpt-4o-mini\",\"x\":\"\xff\"}".to_vec(),
    )
    .await
    .assert_error(400, "invalid_body");
    gw.post(chat_path, "[1,2]")
        .await
        .assert_error(400, "invalid_body");
    gw.post(chat_path, "")
        .await
        .assert_error(400, "invalid_body");
    gw.post(chat_path, r#"{"model":"gpt-4o-mini"}trailing"#)
        .await
        .assert_error(400, "invalid_body");

    let m = gw
        .post_json(chat_path, &json!({"messages": []}))
        .await
        .assert_error(400, "invalid_model");
    assert!(m.contains("no `model`"), "{m}");
    gw.post_json(chat_path, &json!({"model": 4}))
        .await
        .assert_error(400, "invalid_model");
    gw.post_json(chat_path, &json!({"model": null}))
        .await
        .assert_error(400, "invalid_model");
    gw.post(chat_path, r#"{"model":"gpt-4o-mini","model":"other"}"#)
        .await
        .assert_error(400, "invalid_model");
    // CR/LF in the model would split a header: refused, never injected.
    let m = gw
        .post_json(chat_path, &chat("gpt-4o-mini\r\nx-ai-eg-backend: keyless"))
        .await
        .assert_error(400, "invalid_model");
    assert!(m.contains("control characters"), "{m}");
    gw.post_json(chat_path, &chat(""))
        .await
        .assert_error(400, "invalid_model");

    let m = gw
        .post_json(chat_path, &chat("no-such-model"))
        .await
        .assert_error(404, "model_not_found");
    assert!(m.contains("`no-such-model`"), "{m}");

    let m = gw
        .post_json(chat_path, &chat("needs-key"))
        .await
        .assert_error(503, "backend_key_unavailable");
    assert!(m.contains("`keyless`"), "{m}");

    let m = gw
        .post_json("/v1/nope", &chat("gpt-4o-mini"))
        .await
        .assert_error(404, "unknown_url");
    assert!(m.contains("POST /v1/nope"), "{m}");
    gw.get("/").await.assert_error(404, "unknown_url");
    gw.get(chat_path)
        .await
        .assert_error(405, "method_not_allowed");
    gw.post_json("/v1/models", &json!({}))
        .await
        .assert_error(405, "method_not_allowed");

    // Bodies over the limit: announced by content-length (the processor
    // answers) or streamed in chunks (Envoy's buffer answers); same error.
    let padded = |len: usize| {
        let mut body = r#"{"model":"gpt-4o-mini","pad":""}"#.to_string();
        body.insert_str(body.len() - 2, &"p".repeat(len - body.len()));
        assert_eq!(body.len(), len);
        body
    };
    let m = gw
        .post(chat_path, padded(LIMIT + 1))
        .await
        .assert_error(413, "request_too_large");
    assert!(m.contains(&LIMIT.to_string()), "{m}");
    let chunks: Vec<Result<String, std::io::Error>> = vec![
        Ok(padded(LIMIT + 1000)[..LIMIT].to_string()),
        Ok("x".repeat(1000)),
    ];
    let streamed = reqwest::Body::wrap_stream(tokio_stream::iter(chunks));
    gw.post(chat_path, streamed)
        .await
        .assert_error(413, "request_too_large");

    assert!(
        up.requests().is_empty(),
        "a bad request reached the provider: {:?}",
        up.requests()
    );

    // Exactly at the limit is accepted.
    let reply = gw.post(chat_path, padded(LIMIT)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(up.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn provider_errors_pass_through_unchanged_and_are_logged() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::catch_all(&up, Some("sk-bad-key")).await;
    let key_file = gw.key_file("tars");

    let cases = [
        (
            401,
            vec![],
            "Invalid API key",
            "rejected the API key read from",
        ),
        (
            429,
            vec![("retry-after".to_string(), "7".to_string())],
            "Rate limited",
            "rate-limited the request",
        ),
        (503, vec![], "Service unavailable", "answered 503"),
    ];
    for (status, headers, message, log) in cases {
        let body = json!({"error": {"message": message, "type": "provider_error", "code": status}})
            .to_string();
        up.set_canned(Some(Canned {
            status,
            headers: headers.clone(),
            body: body.clone(),
        }));
        let reply = gw
            .post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
            .await;
        assert_eq!(reply.status, status);
        assert_eq!(reply.text(), body, "the provider's error body was changed");
        for (k, v) in &headers {
            assert_eq!(reply.header(k), Some(v.as_str()));
        }
        gw.wait_for_log(&[log]);
    }
    let logs = gw.extproc_logs();
    let line = gw.wait_for_log(&["rejected the API key"]);
    assert!(line.contains(&key_file.display().to_string()), "{line}");
    assert!(line.contains("ERROR"), "{line}");
    assert!(logs.contains("Retry-After: 7"), "{logs}");
    assert!(!logs.contains("sk-bad-key"), "the key was logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_backend_is_an_openai_error() {
    let gw = Gateway::builder()
        .backend(
            "down",
            &format!("http://127.0.0.1:{}", free_port()),
            Some("k"),
        )
        .model("*", "down")
        .start()
        .await;
    let m = gw
        .post_json("/v1/chat/completions", &chat("m"))
        .await
        .assert_error(503, "upstream_unavailable");
    assert!(m.contains("could not be reached"), "{m}");
}
