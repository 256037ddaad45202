//! The official OpenAI Python SDK against the real gateway: chat, streaming
//! chat with usage, `models.list()` with the provider's extra fields, and a
//! gateway error the SDK maps to its own exception.

use std::process::Command;

use crate::support::{python_bin, repo_root, FakeUpstream, Gateway};

#[tokio::test(flavor = "multi_thread")]
async fn openai_python_sdk_works_through_the_gateway() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::catch_all(&up, Some("sk-gateway")).await;

    let url = format!("{}/v1", gw.url);
    let script = repo_root().join("tests/openai_sdk_client.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python_bin())
            .arg(script)
            .arg(url)
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env("NO_PROXY", "*")
            .output()
            .expect("run python")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK script failed:\n{stdout}\n{stderr}"
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).expect("script output");

    assert_eq!(seen["chat"]["content"], "Hello from tars.");
    assert_eq!(seen["chat"]["model"], "gpt-4o-mini");
    assert_eq!(seen["chat"]["total_tokens"], 13);

    assert_eq!(seen["stream"]["content"], "Hello from tars.");
    assert_eq!(seen["stream"]["chunks"], 2);
    assert_eq!(seen["stream"]["total_tokens"], 13);

    let models = seen["models"].as_array().unwrap();
    assert_eq!(models[0]["id"], "gpt-4o-mini");
    assert_eq!(models[0]["context_window"], 128000);

    assert_eq!(seen["refused"]["status"], 400, "{seen}");
    assert_eq!(seen["refused"]["code"], "invalid_model");

    // Every request reached the provider with the gateway's key only.
    let requests = up.requests();
    assert_eq!(requests.len(), 3, "{requests:?}");
    for r in &requests {
        assert_eq!(r.header_all("authorization"), ["Bearer sk-gateway"]);
    }
    let chat = &requests[0];
    assert_eq!(
        chat.header("x-title"),
        Some("Kilo Code"),
        "client headers must pass through"
    );
    assert!(chat
        .header("user-agent")
        .unwrap_or("")
        .contains("OpenAI/Python"));
    assert_eq!(requests[1].json()["stream_options"]["include_usage"], true);
}
