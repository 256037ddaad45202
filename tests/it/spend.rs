//! Budgets and rate limits through the real Envoy, with a real Redis
//! (Debian's `redis-server`) shared by two gateway replicas, or the memory
//! store: a limit is a limit, however many requests run at once and on
//! however many replicas.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::support::redis_server::RedisServer;
use crate::support::{chat, client, python_bin, repo_root, Canned, FakeUpstream, Gateway, Reply};

const TEAM_A: &str = "gw-team-a-0123456789abcdef";
const TEAM_B: &str = "gw-team-b-0123456789abcdef";

fn keys(team_a_limits: &str) -> String {
    format!(
        "keys:\n  - {{name: team-a, key: {TEAM_A}, limits: {team_a_limits}}}\n  - {{name: team-b, key: {TEAM_B}, limits: {{requests_per_minute: 1000}}}}\n"
    )
}

/// A gateway (processor and Envoy) on `store`, with the client keys and
/// any further `spend:` fields.
async fn replica(up: &FakeUpstream, store: &str, keys: &str, spend: &str) -> Gateway {
    Gateway::builder()
        .backend("tars", &up.url(), Some("sk-provider"))
        .model("*", "tars")
        .client_keys(keys)
        .extra_yaml(&format!("spend: {{store: {store:?}{spend}}}\n"))
        .extproc_args(&["--log-level", "info"])
        .start()
        .await
}

/// Waits until the current UTC minute has at least `needed` seconds left:
/// windows are fixed minutes, and a test's burst must fall in one.
async fn within_one_minute(needed: u64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let left = 60 - now % 60;
    if left < needed {
        tokio::time::sleep(Duration::from_secs(left) + Duration::from_millis(200)).await;
    }
}

/// The `spend:` fields of a replica that takes bursts: these tests are
/// about exactness, not latency. A debug-build processor answering 300
/// requests at once on a loaded two-core CI machine can take longer than
/// the 250 ms default store timeout for a Redis call, which then counts as
/// a store error (503) and, when it timed out after the script ran, leaves
/// a reservation nobody settles. `a_hung_redis_is_a_store_error_after_the_store_timeout`
/// tests the timeout itself.
const BURST_SPEND: &str = ", store_timeout: 10s";

/// `n` chat requests at once, round robin over `gateways`, with `key`.
async fn burst(gateways: &[&Gateway], n: usize, key: &str, body: serde_json::Value) -> Vec<Reply> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let url = format!("{}/v1/chat/completions", gateways[i % gateways.len()].url);
            let key = key.to_string();
            let body = body.to_string();
            tokio::spawn(async move {
                let r = client()
                    .post(url)
                    .header("content-type", "application/json")
                    .header("authorization", format!("Bearer {key}"))
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let headers = r.headers().clone();
                let body = r.bytes().await.unwrap().to_vec();
                Reply {
                    status,
                    headers,
                    body,
                }
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn statuses(replies: &[Reply]) -> BTreeMap<u16, usize> {
    let mut m = BTreeMap::new();
    for r in replies {
        *m.entry(r.status).or_insert(0) += 1;
    }
    m
}

/// Each status with the OpenAI error code it carried, for failure messages.
fn outcomes(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in replies {
        let code = serde_json::from_slice::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_default();
        *m.entry(format!("{} {code}", r.status)).or_insert(0) += 1;
    }
    m
}

async fn post(gw: &Gateway, key: &str, body: &serde_json::Value) -> Reply {
    gw.request(
        reqwest::Method::POST,
        "/v1/chat/completions",
        body.to_string(),
        &[("authorization", &format!("Bearer {key}"))],
    )
    .await
}

fn with_max_tokens(max: u64) -> serde_json::Value {
    let mut body = chat("gpt-4o-mini");
    body["max_tokens"] = json!(max);
    body
}

/// Two replicas on one Redis, 300 requests at once for a key allowed 100 a
/// minute: exactly 100 are served and the provider sees exactly 100.
#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_on_one_redis_admit_exactly_the_limit() {
    let redis = RedisServer::start();
    let up = FakeUpstream::start("tars").await;
    let keys = keys("{requests_per_minute: 100}");
    let a = replica(&up, &redis.url(), &keys, BURST_SPEND).await;
    let b = replica(&up, &redis.url(), &keys, BURST_SPEND).await;
    // Both replicas have their Envoy-to-processor and Redis connections
    // up before the burst (the other key, its own counter).
    for gw in [&a, &b] {
        assert_eq!(post(gw, TEAM_B, &chat("gpt-4o-mini")).await.status, 200);
    }
    up.clear();
    within_one_minute(25).await;
    let replies = burst(&[&a, &b], 300, TEAM_A, chat("gpt-4o-mini")).await;
    assert_eq!(
        statuses(&replies),
        BTreeMap::from([(200, 100), (429, 200)]),
        "a limit of 100 across two replicas: {:?}",
        outcomes(&replies)
    );
    assert_eq!(
        up.requests().len(),
        100,
        "the provider saw more than the limit"
    );
    // Either replica alone would have served 100 of its 150: 100 in all
    // means each counted the other's admissions. (Which replica served how
    // many is up to scheduling, so it is not asserted.)

    // The other key has its own counter.
    assert_eq!(post(&a, TEAM_B, &chat("gpt-4o-mini")).await.status, 200);
}

/// Tokens: each request reserves its estimate and cap, and settles to the
/// fixed usage the provider reports (13 tokens). However many run at once,
/// the tokens charged never pass the limit.
#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_never_admit_more_tokens_than_the_limit() {
    let redis = RedisServer::start();
    let up = FakeUpstream::start("tars").await;
    let keys = keys("{tokens_per_minute: 500}");
    let a = replica(&up, &redis.url(), &keys, BURST_SPEND).await;
    let b = replica(&up, &redis.url(), &keys, BURST_SPEND).await;
    within_one_minute(25).await;
    let replies = burst(&[&a, &b], 300, TEAM_A, with_max_tokens(4)).await;
    let served = statuses(&replies).get(&200).copied().unwrap_or(0);
    assert!(served > 0, "{:?}", statuses(&replies));
    assert_eq!(up.requests().len(), served);
    // Wait for the last settlements, then read the counter itself.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counted: i64 = redis
        .counters("ai-gateway")
        .iter()
        .filter(|(k, f, _)| k.contains(":m:") && f == "k:team-a:tpm")
        .map(|(_, _, v)| *v)
        .sum();
    assert_eq!(
        counted,
        13 * served as i64,
        "every admitted request settled to its usage"
    );
    assert!(
        counted <= 500,
        "{counted} tokens admitted against a limit of 500"
    );
    for r in replies.iter().filter(|r| r.status == 429) {
        let v = r.json();
        assert_eq!(
            (v["error"]["type"].as_str(), v["error"]["code"].as_str()),
            (Some("tokens"), Some("rate_limit_exceeded"))
        );
    }
}

/// A request that asks for a large cap and uses little frees the rest for
/// the next one; an upstream 500 gives its tokens back.
#[tokio::test(flavor = "multi_thread")]
async fn settlement_frees_what_was_not_used_and_errors_refund() {
    let redis = RedisServer::start();
    let up = FakeUpstream::start("tars").await;
    let gw = replica(&up, &redis.url(), &keys("{tokens_per_minute: 5000}"), "").await;
    within_one_minute(15).await;
    for i in 0..3 {
        let r = post(&gw, TEAM_A, &with_max_tokens(4000)).await;
        assert_eq!(
            r.status,
            200,
            "request {i}: the last one's unused tokens were not freed: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    up.set_canned(Some(Canned {
        status: 500,
        headers: vec![],
        body: r#"{"error":{"message":"boom","type":"server_error"}}"#.into(),
    }));
    for _ in 0..3 {
        assert_eq!(post(&gw, TEAM_A, &with_max_tokens(4000)).await.status, 500);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    up.set_canned(None);
    let r = post(&gw, TEAM_A, &with_max_tokens(4000)).await;
    assert_eq!(
        r.status,
        200,
        "the failed requests kept their tokens: {}",
        r.text()
    );
}

/// A settlement rides along with the replica's next admission, but does
/// not wait for one: with no other request, it still reaches Redis (within
/// milliseconds), so another replica's admissions see the freed tokens.
#[tokio::test(flavor = "multi_thread")]
async fn a_settlement_reaches_redis_without_another_request() {
    let redis = RedisServer::start();
    let up = FakeUpstream::start("tars").await;
    let keys = keys("{tokens_per_minute: 5000}");
    let a = replica(&up, &redis.url(), &keys, "").await;
    let b = replica(&up, &redis.url(), &keys, "").await;
    within_one_minute(15).await;
    assert_eq!(post(&a, TEAM_A, &with_max_tokens(4000)).await.status, 200);
    // The fake provider reports 13 tokens used: the 4,000-token cap's
    // reservation comes down to them with no request after it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tpm: Vec<i64> = redis
            .counters("ai-gateway")
            .iter()
            .filter(|(k, f, _)| k.contains(":m:") && f == "k:team-a:tpm")
            .map(|(_, _, v)| *v)
            .collect();
        if tpm == [13] {
            break;
        }
        assert!(Instant::now() < deadline, "not settled in Redis: {tpm:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(post(&b, TEAM_A, &with_max_tokens(4000)).await.status, 200);
}

/// The counters live in Redis: a restarted processor finds them; each key
/// has its own.
#[tokio::test(flavor = "multi_thread")]
async fn counters_survive_a_processor_restart_and_are_per_key() {
    let redis = RedisServer::start();
    let up = FakeUpstream::start("tars").await;
    let mut gw = replica(&up, &redis.url(), &keys("{requests_per_minute: 3}"), "").await;
    within_one_minute(20).await;
    for _ in 0..2 {
        assert_eq!(post(&gw, TEAM_A, &chat("m")).await.status, 200);
    }
    gw.kill_extproc();
    gw.restart_extproc();
    let deadline = Instant::now() + Duration::from_secs(10);
    let third = loop {
        let r = post(&gw, TEAM_A, &chat("m")).await;
        if r.status != 500 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(third.status, 200, "{}", third.text());
    post(&gw, TEAM_A, &chat("m"))
        .await
        .assert_error(429, "rate_limit_exceeded");
    assert_eq!(post(&gw, TEAM_B, &chat("m")).await.status, 200);
    // Redis holds the key's name, never the key or its digest.
    let fields: Vec<String> = redis
        .counters("ai-gateway")
        .into_iter()
        .map(|(k, f, _)| format!("{k} {f}"))
        .collect();
    assert!(
        fields.iter().any(|f| f.contains("k:team-a:rpm")),
        "{fields:?}"
    );
    assert!(!fields.iter().any(|f| f.contains(TEAM_A)), "{fields:?}");
}

/// Redis down: `reject` answers 503 (OpenAI-shaped) and the provider sees
/// nothing; logged once; Redis back: limits hold again, no restart.
#[tokio::test(flavor = "multi_thread")]
async fn redis_down_rejects_then_recovers_by_itself() {
    let mut redis = RedisServer::start();
    let up = FakeUpstream::start("tars").await;
    let gw = replica(&up, &redis.url(), &keys("{requests_per_minute: 2}"), "").await;
    within_one_minute(30).await;
    assert_eq!(post(&gw, TEAM_A, &chat("m")).await.status, 200);
    redis.stop();
    up.clear();
    for _ in 0..3 {
        let r = post(&gw, TEAM_A, &chat("m")).await;
        let message = r.assert_error(503, "spend_store_unavailable");
        assert!(message.contains("budgets"), "{message}");
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    assert!(
        up.requests().is_empty(),
        "served unmetered with on_store_error: reject"
    );
    let outage_lines = gw
        .extproc_logs()
        .lines()
        .filter(|l| l.contains("spend store unreachable"))
        .count();
    assert_eq!(
        outage_lines,
        1,
        "one line per outage:\n{}",
        gw.extproc_logs()
    );
    // Each refused admission is a store error (and so is the settlement of
    // the request served just before, if it met the outage).
    let errors = gw.metric("ai_gateway_spend_store_errors_total").await;
    assert!(errors.is_some_and(|n| n >= 3.0), "{errors:?}");

    // Back (empty: its data went with it): enforced again, by itself.
    redis.resume();
    served_again(&gw, "not back after Redis returned").await;
    assert_eq!(post(&gw, TEAM_A, &chat("m")).await.status, 200);
    post(&gw, TEAM_A, &chat("m"))
        .await
        .assert_error(429, "rate_limit_exceeded");
    gw.wait_for_log(&["spend store reachable again"]);
}

/// A Redis that hangs (frozen: connections open, no answer) is a store
/// error after `store_timeout`: the client gets the processor's 503, not
/// Envoy's timeout of the whole exchange, and nothing reaches the provider
/// unmetered. Thawed, the same connection serves again.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_redis_is_a_store_error_after_the_store_timeout() {
    let redis = RedisServer::start();
    let up = FakeUpstream::start("tars").await;
    let gw = replica(
        &up,
        &redis.url(),
        &keys("{requests_per_minute: 1000}"),
        ", store_timeout: 300ms",
    )
    .await;
    assert_eq!(post(&gw, TEAM_A, &chat("m")).await.status, 200);
    redis.freeze();
    up.clear();
    let r = post(&gw, TEAM_A, &chat("m")).await;
    redis.thaw();
    r.assert_error(503, "spend_store_unavailable");
    assert!(up.requests().is_empty(), "served unmetered");
    gw.wait_for_log(&["spend store unreachable", "did not answer within"]);
    served_again(&gw, "not served after Redis thawed").await;
}

/// Posts for `TEAM_A` until a request is served (the store is back), for
/// up to 10 s.
async fn served_again(gw: &Gateway, failure: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = post(gw, TEAM_A, &chat("m")).await;
        if r.status == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "{failure}: {}", r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `on_store_error: admit` serves while Redis is down.
#[tokio::test(flavor = "multi_thread")]
async fn redis_down_with_admit_serves() {
    let mut redis = RedisServer::start();
    let up = FakeUpstream::start("tars").await;
    let gw = replica(
        &up,
        &redis.url(),
        &keys("{requests_per_minute: 1}"),
        ", on_store_error: admit",
    )
    .await;
    redis.stop();
    for _ in 0..3 {
        assert_eq!(post(&gw, TEAM_A, &chat("m")).await.status, 200);
    }
    gw.wait_for_log(&["spend store unreachable", "unmetered"]);
}

/// Dollars: prices from `spend.prices`, or from the provider's own model
/// list (TARS-shaped: USD per token); a request that would pass the budget
/// is refused as spent quota, and what was spent shows in the metrics.
#[tokio::test(flavor = "multi_thread")]
async fn usd_budgets_with_config_prices_and_listed_prices() {
    let up = FakeUpstream::start("tars").await;
    for (spend, per_million_out) in [
        // $2 per 1M output tokens: 1,000 tokens of cap cost $0.002.
        (", prices: [{model: 'gpt-*', input: 1.0, output: 2.0}]", 2.0),
        // The fake lists gpt-4o-mini at 0.0000006 per output token: $0.6/M.
        ("", 0.6),
    ] {
        let budget = per_million_out * 1500.0 / 1e6; // room for a 1,000-token cap, not a 2,000 one
        let gw = replica(
            &up,
            "memory",
            &keys(&format!("{{usd_per_day: {budget}}}")),
            spend,
        )
        .await;
        // Listed prices arrive with the first fetch, just after start.
        let deadline = Instant::now() + Duration::from_secs(10);
        let big = loop {
            let r = post(&gw, TEAM_A, &with_max_tokens(2000)).await;
            if r.status != 403 || Instant::now() > deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let message = big.assert_error(429, "insufficient_quota");
        assert_eq!(big.json()["error"]["type"], "insufficient_quota");
        assert!(
            message.contains("usd_per_day") && message.contains("`team-a`"),
            "{message}"
        );
        let ok = post(&gw, TEAM_A, &with_max_tokens(1000)).await;
        assert_eq!(ok.status, 200, "{}", ok.text());
        // A model without any price, under a budget in dollars: never free.
        post(&gw, TEAM_A, &chat("no-price-model"))
            .await
            .assert_error(403, "model_price_unknown");
        let line = gw.wait_for_log(&[r#"client="team-a""#, r#"limit="usd_per_day""#]);
        assert!(line.contains("status=429"), "{line}");
        let m = gw.admin_get("/metrics").await.text();
        let spent: f64 = m
            .lines()
            .find(|l| l.starts_with("ai_gateway_spend_usd_total{") && l.contains(r#"key="team-a""#))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no spend metric:\n{m}"));
        assert!(spent > 0.0 && spent < budget, "spent {spent}");
        assert!(
            m.contains(r#"ai_gateway_limit_rejections_total{key="team-a",limit="usd_per_day"} 1"#),
            "{m}"
        );
        assert!(
            m.contains(r#"ai_gateway_budget_remaining{key="team-a",limit="usd_per_day"}"#),
            "{m}"
        );
        assert!(m.contains("ai_gateway_token_estimate_ratio_count"), "{m}");
    }
}

/// The 429's body and every `x-ratelimit-*` header; the OpenAI Python SDK
/// raises its `RateLimitError`.
#[tokio::test(flavor = "multi_thread")]
async fn the_429_is_openai_shaped_down_to_the_sdk() {
    let up = FakeUpstream::start("tars").await;
    let gw = replica(
        &up,
        "memory",
        &keys("{requests_per_minute: 2, tokens_per_minute: 100000}"),
        "",
    )
    .await;
    within_one_minute(20).await;
    for _ in 0..2 {
        assert_eq!(post(&gw, TEAM_A, &chat("m")).await.status, 200);
    }
    let r = post(&gw, TEAM_A, &chat("m")).await;
    let message = r.assert_error(429, "rate_limit_exceeded");
    assert_eq!(r.json()["error"]["type"], "requests");
    assert!(
        message.contains("requests_per_minute") && message.contains("`team-a`"),
        "{message}"
    );
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    assert!(r
        .header("x-ratelimit-reset-requests")
        .is_some_and(|v| v.ends_with('s')));
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("100000"));
    assert!(r.header("x-ratelimit-remaining-tokens").is_some());
    assert!(r.header("x-ratelimit-reset-tokens").is_some());
    assert_eq!(
        up.requests().len(),
        2,
        "a refused request reached the provider"
    );

    let out = Command::new(python_bin())
        .arg(repo_root().join("tests/openai_sdk_client.py"))
        .arg(format!("{}/v1", gw.url))
        .args(["limited", TEAM_B])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // team-b: 1,000 a minute; the SDK tour below hits team-a's instead.
    assert_eq!(seen["error_class"], serde_json::Value::Null, "{seen}");
    let out = Command::new(python_bin())
        .arg(repo_root().join("tests/openai_sdk_client.py"))
        .arg(format!("{}/v1", gw.url))
        .args(["limited", TEAM_A])
        .output()
        .expect("run python");
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["error_class"], "RateLimitError", "{seen}");
    assert_eq!(
        (seen["status"].as_u64(), seen["code"].as_str()),
        (Some(429), Some("rate_limit_exceeded"))
    );
    assert_eq!(seen["limit_requests"], "2");
    assert!(seen["retry_after"].is_string(), "{seen}");
}

/// The memory store holds the single-replica cases too: exactly the limit.
#[tokio::test(flavor = "multi_thread")]
async fn the_memory_store_admits_exactly_the_limit_on_one_replica() {
    let up = FakeUpstream::start("tars").await;
    let gw = replica(&up, "memory", &keys("{requests_per_minute: 50}"), "").await;
    within_one_minute(20).await;
    let replies = burst(&[&gw], 150, TEAM_A, chat("gpt-4o-mini")).await;
    assert_eq!(statuses(&replies), BTreeMap::from([(200, 50), (429, 100)]));
    assert_eq!(up.requests().len(), 50);
}

/// A client that leaves mid-stream: its usage never comes, so its
/// reservation stands as the charge (never a free pass).
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_left_midway_keeps_its_reservation() {
    let redis = RedisServer::start();
    let up = FakeUpstream::start("tars").await;
    let gw = replica(&up, &redis.url(), &keys("{tokens_per_minute: 100000}"), "").await;
    within_one_minute(20).await;
    let _gate = up.hold_streams_after_first_event();
    let mut body = with_max_tokens(1000);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let auth = format!("Bearer {TEAM_A}");
    let mut stream = Box::pin(
        gw.open_stream(&body, &[("authorization", auth.as_str())])
            .await,
    );
    use tokio_stream::StreamExt;
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    drop(stream); // the client leaves
    gw.wait_for_log(&[r#"outcome="cancelled""#]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tpm: i64 = redis
        .counters("ai-gateway")
        .iter()
        .filter(|(k, f, _)| k.contains(":m:") && f == "k:team-a:tpm")
        .map(|(_, _, v)| *v)
        .sum();
    assert!(
        tpm >= 1000,
        "the left stream's reservation was given back: {tpm}"
    );
}

/// A Redis with a password, read from `spend.password_file` (a mounted
/// Secret) rather than written in the URL; a wrong one is an outage.
#[tokio::test(flavor = "multi_thread")]
async fn redis_with_a_password_from_a_file() {
    let redis = RedisServer::start_with_password(Some("s3cret-redis-password"));
    let up = FakeUpstream::start("tars").await;
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("redis-password");
    std::fs::write(&password, "s3cret-redis-password\n").unwrap();
    let wrong = dir.path().join("wrong-password");
    std::fs::write(&wrong, "not-it\n").unwrap();
    let with =
        |file: &std::path::Path| format!(", password_file: {:?}", file.display().to_string());
    let gw = replica(
        &up,
        &redis.url(),
        &keys("{requests_per_minute: 1}"),
        &with(&password),
    )
    .await;
    within_one_minute(10).await;
    assert_eq!(post(&gw, TEAM_A, &chat("m")).await.status, 200);
    post(&gw, TEAM_A, &chat("m"))
        .await
        .assert_error(429, "rate_limit_exceeded");
    let gw = replica(
        &up,
        &redis.url(),
        &keys("{requests_per_minute: 1}"),
        &with(&wrong),
    )
    .await;
    post(&gw, TEAM_A, &chat("m"))
        .await
        .assert_error(503, "spend_store_unavailable");
    assert!(!gw.extproc_logs().contains("s3cret-redis-password"));
}

/// A Redis Cluster: the counters of one admission share a slot (the
/// namespace is their hash tag), so one script checks them all.
#[tokio::test(flavor = "multi_thread")]
async fn redis_cluster_holds_the_limit() {
    let redis = RedisServer::start_cluster();
    let up = FakeUpstream::start("tars").await;
    let store = format!("redis+cluster://127.0.0.1:{}", redis.port);
    let keys = keys("{requests_per_minute: 20}");
    let a = replica(&up, &store, &keys, BURST_SPEND).await;
    let b = replica(&up, &store, &keys, BURST_SPEND).await;
    within_one_minute(20).await;
    let replies = burst(&[&a, &b], 60, TEAM_A, chat("gpt-4o-mini")).await;
    assert_eq!(statuses(&replies), BTreeMap::from([(200, 20), (429, 40)]));
    let keys_in_redis: Vec<String> = redis
        .counters("ai-gateway")
        .into_iter()
        .map(|(k, _, _)| k)
        .collect();
    assert!(
        keys_in_redis.iter().all(|k| k.starts_with("{ai-gateway}:")),
        "{keys_in_redis:?}"
    );
}

/// Raising a spent limit in the keys file (reloaded live) applies to the
/// next request, and the counters stand: the window's use so far counts.
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_limit_applies_at_once_and_keeps_the_counters() {
    let up = FakeUpstream::start("tars").await;
    let gw = replica(&up, "memory", &keys("{requests_per_minute: 2}"), "").await;
    within_one_minute(20).await;
    for _ in 0..2 {
        assert_eq!(post(&gw, TEAM_A, &chat("m")).await.status, 200);
    }
    post(&gw, TEAM_A, &chat("m"))
        .await
        .assert_error(429, "rate_limit_exceeded");
    crate::support::rename_key(&gw.client_keys_file(), &keys("{requests_per_minute: 4}"));
    gw.wait_for_log(&["client keys reloaded"]);
    // Two more fit under 4 (the two served still count), not three.
    for _ in 0..2 {
        assert_eq!(post(&gw, TEAM_A, &chat("m")).await.status, 200);
    }
    post(&gw, TEAM_A, &chat("m"))
        .await
        .assert_error(429, "rate_limit_exceeded");
}
