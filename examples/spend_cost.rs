//! What spend control costs the processor per request, measured in-process:
//! one admission and its settlement, for a key with every limit against
//! the same key without limits. End to end through Envoy the difference is
//! a few microseconds in a hundred, below the noise of a 2-core machine;
//! here it stands alone. `bench/bench.py` runs it and reports its figures.
//!
//!   cargo run --release --example spend_cost -- [memory|redis://HOST:PORT] [requests]
//!
//! Prints one JSON object: CPU time per request with and without limits,
//! the processor's CPU time (every thread, the Redis client's included).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ai_gateway_extproc::client_keys::ClientKeySet;
use ai_gateway_extproc::config::Config;
use ai_gateway_extproc::metrics::Metrics;
use ai_gateway_extproc::openai::usage::TokenUsage;
use ai_gateway_extproc::spend::{Settlement, Spend, SpendRequest};

const KEY_LIMITED: &str = "gw-limited-0123456789";
const KEY_FREE: &str = "gw-free-0123456789abc";

/// Requests in flight at once, as on a busy gateway.
const CONCURRENCY: usize = 32;

/// The process's CPU time (user + system, every thread), in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are the 12th and 13th fields after the name; Linux
    // counts them in 1/100 s.
    (ticks(11) + ticks(12)) / 100.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let store = args.next().unwrap_or_else(|| "memory".into());
    let requests: usize = args
        .next()
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(200_000);

    let config = Config::from_text(
        &format!(
            "backends: [{{name: tars, url: 'http://127.0.0.1:1', api_key_file: k}}]\n\
             models: [{{name: '*', backend: tars}}]\n\
             spend: {{store: '{store}', prices: [{{model: '*', input: 0.15, output: 0.6}}]}}\n"
        ),
        Path::new("spend_cost.yaml"),
    )?;
    let keys = ClientKeySet::parse(
        Path::new("keys.yaml"),
        &format!(
            "keys:\n\
             - {{name: limited, key: {KEY_LIMITED}, limits: {{requests_per_minute: 1000000000, \
                tokens_per_minute: 1000000000000, tokens_per_day: 1000000000000, usd_per_day: 1000000000}}}}\n\
             - {{name: free, key: {KEY_FREE}}}\n"
        ),
    )?;
    let spend = Arc::new(Spend::new(&config.spend, Arc::new(Metrics::new()?))?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let body: Arc<[u8]> =
        Arc::from(&br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi."}]}"#[..]);

    let mut per_request = Vec::new();
    for key in [KEY_FREE, KEY_LIMITED] {
        let client = keys
            .authorize(key.as_bytes())
            .ok_or("the key does not authorize")?;
        let run = |n: usize| {
            let tasks: Vec<_> = (0..CONCURRENCY)
                .map(|_| {
                    let (spend, config, client, body) = (
                        Arc::clone(&spend),
                        config.spend.clone(),
                        Arc::clone(&client),
                        Arc::clone(&body),
                    );
                    runtime.spawn(async move {
                        let usage = TokenUsage {
                            input: Some(9),
                            output: Some(4),
                            total: Some(13),
                            ..TokenUsage::default()
                        };
                        for _ in 0..n / CONCURRENCY {
                            let request = SpendRequest {
                                key: Some(&client),
                                model: "gpt-4o-mini",
                                upstream_model: "gpt-4o-mini",
                                backend: "tars",
                                body: &body,
                                max_output_tokens: None,
                            };
                            match spend.admit(&config, &request).await {
                                Ok(Some(reservation)) => spend.publish(
                                    spend.settle(reservation, Settlement::Used(&usage)),
                                    "tars",
                                    "gpt-4o-mini",
                                ),
                                Ok(None) => {}
                                Err(e) => panic!("refused: {}", e.message),
                            }
                        }
                    })
                })
                .collect();
            runtime.block_on(async {
                for t in tasks {
                    t.await.map_err(|e| e.to_string())?;
                }
                Ok::<_, String>(())
            })
        };
        run(requests / 10)?; // warm-up: connection, maps, caches
        let (cpu0, t0) = (cpu_seconds(), Instant::now());
        run(requests)?;
        per_request.push((
            (cpu_seconds() - cpu0) / requests as f64 * 1e6,
            t0.elapsed().as_secs_f64() / requests as f64 * 1e6,
        ));
    }
    let [(free_cpu, free_wall), (limited_cpu, limited_wall)] = per_request[..] else {
        return Err("two runs expected".into());
    };
    println!(
        "{}",
        serde_json::json!({
            "store": if store == "memory" { "memory" } else { "redis" },
            "requests": requests,
            "cpu_us_without_limits": free_cpu,
            "cpu_us_with_limits": limited_cpu,
            "wall_us_without_limits": free_wall,
            "wall_us_with_limits": limited_wall,
        })
    );
    Ok(())
}
