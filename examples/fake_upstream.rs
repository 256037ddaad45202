//! A local, offline OpenAI-compatible provider for trying the gateway
//! without a key: `scripts/run.sh` starts it when no TARS key is given.
//! It is the same fake the integration tests use.
//!
//! Usage: cargo run --example fake_upstream -- [ADDR]   (default 127.0.0.1:8000)
//! `FAKE_UPSTREAM_STREAM_INTERVAL_MS=N` pauses N ms between stream events.

// The tests' fake; this binary uses only part of it.
#[allow(dead_code)]
#[path = "../tests/it/support/fake_upstream.rs"]
mod fake_upstream;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8000".into());
    let addr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fake_upstream: invalid address {addr:?}: {e}");
            std::process::exit(2);
        }
    };
    let upstream = fake_upstream::FakeUpstream::start_on("fake-openai", addr).await;
    if let Some(ms) = std::env::var("FAKE_UPSTREAM_STREAM_INTERVAL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        upstream.set_stream_interval(std::time::Duration::from_millis(ms));
    }
    println!(
        "fake OpenAI-compatible upstream listening on {}",
        upstream.url()
    );
    let _ = tokio::signal::ctrl_c().await;
}
