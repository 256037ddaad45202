//! `GET /v1/models`: the provider's own list (extra fields untouched) when a
//! `*` rule sends every model to one backend, else the gateway's list.

use crate::support::{FakeUpstream, Gateway, MODEL_LIST};

#[tokio::test(flavor = "multi_thread")]
async fn catch_all_backend_answers_with_its_own_list() {
    let up = FakeUpstream::start("tars").await;
    let other = FakeUpstream::start("other").await;
    let gw = Gateway::builder()
        .backend("tars", &up.url(), Some("sk-tars"))
        .backend("other", &other.url(), Some("sk-other"))
        .model("local-model", "other")
        .model("*", "tars")
        .start()
        .await;

    let reply = gw
        .request(
            reqwest::Method::GET,
            "/v1/models",
            "",
            &[("authorization", "Bearer sk-client")],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    // Byte for byte: context_window, prices and flags reach the client.
    assert_eq!(reply.text(), MODEL_LIST);
    let seen = up.last();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("GET", "/v1/models")
    );
    assert_eq!(seen.header_all("authorization"), ["Bearer sk-tars"]);
    assert!(other.requests().is_empty());

    // GET /v1/models/{id} goes the same way.
    gw.get("/v1/models/xai/grok-4.5").await;
    assert_eq!(up.last().path, "/v1/models/xai/grok-4.5");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_catch_all_the_gateway_lists_its_models() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::builder()
        .backend("tars", &up.url(), Some("k"))
        .model("gpt-4o-mini", "tars")
        .model("claude-*", "tars")
        .model("xai/grok-4.5", "tars")
        .start()
        .await;

    let reply = gw.get("/v1/models").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    let list = reply.json();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    // Globs name no model, so they are not listed.
    assert_eq!(ids, ["gpt-4o-mini", "xai/grok-4.5"]);
    assert_eq!(list["data"][0]["object"], "model");

    let one = gw.get("/v1/models/xai/grok-4.5").await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["id"], "xai/grok-4.5");
    gw.get("/v1/models/unknown")
        .await
        .assert_error(404, "model_not_found");
    assert!(
        up.requests().is_empty(),
        "the gateway's own list called the provider"
    );
}
