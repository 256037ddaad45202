//! Hostile and odd request bodies through the real Envoy: each gets a clear
//! OpenAI-style error or correct routing, and the processor stays up.

use crate::support::{chat, FakeUpstream, Gateway};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn odd_bodies_are_refused_clearly_or_routed_correctly() {
    let up = FakeUpstream::start("tars").await;
    let mut gw = Gateway::catch_all(&up, Some("k")).await;
    let path = "/v1/chat/completions";

    // JSON nested 100,000 deep outside `model`: valid JSON, routed as is.
    let depth = 100_000;
    let deep = format!(
        r#"{{"model":"m","x":{}{}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let reply = gw.post(path, deep.clone()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(up.last().body, deep.as_bytes());
    // ... and inside `model`: not a string.
    let deep_model = format!(r#"{{"model":{}{}}}"#, "[".repeat(depth), "]".repeat(depth));
    gw.post(path, deep_model)
        .await
        .assert_error(400, "invalid_model");
    // Unbalanced: not JSON.
    gw.post(
        path,
        format!(r#"{{"model":"m","x":{}}}"#, "[".repeat(depth)),
    )
    .await
    .assert_error(400, "invalid_body");

    // An array of 100,000 elements.
    let wide =
        json!({"model": "m", "messages": vec![json!({"role": "user", "content": "x"}); 100_000]});
    let reply = gw.post_json(path, &wide).await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    // A 10 KB model name: refused before it can become a header.
    let m = gw
        .post_json(path, &chat(&"m".repeat(10_240)))
        .await
        .assert_error(400, "invalid_model");
    assert!(m.contains("longer than 256"), "{m}");

    // Wrong or no content type: the body decides, as providers do.
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let reply = gw
            .request(
                reqwest::Method::POST,
                path,
                chat("m").to_string(),
                &[("content-type", content_type)],
            )
            .await;
        assert_eq!(reply.status, 200, "{content_type}: {}", reply.text());
    }

    // A chunked body (no content-length) is routed like any other.
    let pieces: Vec<Result<String, std::io::Error>> = vec![
        Ok(r#"{"mo"#.into()),
        Ok(r#"del":"chunked-model","messages":[]"#.into()),
        Ok("}".into()),
    ];
    let reply = gw
        .post(path, reqwest::Body::wrap_stream(tokio_stream::iter(pieces)))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(up.last().json()["model"], "chunked-model");

    // Non-string and duplicate models, empty and whitespace bodies.
    for (body, code) in [
        (r#"{"model":["a"]}"#, "invalid_model"),
        (r#"{"model":{"name":"a"}}"#, "invalid_model"),
        (r#"{"model":true}"#, "invalid_model"),
        (r#"{"model":"a","model":"a"}"#, "invalid_model"),
        ("   ", "invalid_body"),
        ("null", "invalid_body"),
    ] {
        gw.post(path, body).await.assert_error(400, code);
    }

    // Still up and routing after all of it.
    assert_eq!(gw.post_json(path, &chat("m")).await.status, 200);
    assert!(gw.extproc().try_status().is_none(), "the processor died");
}
