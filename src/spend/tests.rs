//! Spend control with the memory store: admission, the refusals and their
//! OpenAI shape, settlement.

use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::client_keys::ClientKeySet;
use crate::config::PriceRule;

fn keys(limits: &str) -> ClientKeySet {
    ClientKeySet::parse(
        Path::new("keys.yaml"),
        &format!("keys:\n  - {{name: team-a, key: gw-team-a-0123456789, limits: {limits}}}\n"),
    )
    .unwrap()
}

fn spend() -> Spend {
    Spend::new(&SpendConfig::default(), Arc::new(Metrics::new().unwrap())).unwrap()
}

fn config(gateway: Limits) -> SpendConfig {
    SpendConfig {
        limits: gateway,
        prices: vec![PriceRule {
            model: "gpt-*".into(),
            input: 1.0,
            output: 2.0,
            cached_input: None,
            cache_write: None,
        }],
        ..SpendConfig::default()
    }
}

fn request<'a>(
    key: Option<&'a ClientKey>,
    body: &'a [u8],
    max_output: Option<u64>,
) -> SpendRequest<'a> {
    SpendRequest {
        key,
        model: "gpt-4o-mini",
        upstream_model: "gpt-4o-mini",
        backend: "tars",
        body,
        max_output_tokens: max_output,
    }
}

fn header<'a>(e: &'a ApiError, name: &str) -> Option<&'a str> {
    e.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn nothing_is_metered_without_limits() {
    let s = spend();
    let keys = keys("{}");
    let key = keys.authorize(b"gw-team-a-0123456789").unwrap();
    let r = s
        .admit(
            &config(Limits::default()),
            &request(Some(&key), b"{}", None),
        )
        .await
        .unwrap();
    assert!(r.is_none());
}

#[tokio::test]
async fn requests_per_minute_refuses_the_next_one_openai_style() {
    let s = spend();
    let keys = keys("{requests_per_minute: 2}");
    let key = keys.authorize(b"gw-team-a-0123456789").unwrap();
    let c = config(Limits::default());
    for _ in 0..2 {
        assert!(s
            .admit(&c, &request(Some(&key), b"{}", None))
            .await
            .unwrap()
            .is_some());
    }
    let e = s
        .admit(&c, &request(Some(&key), b"{}", None))
        .await
        .unwrap_err();
    assert_eq!(
        (e.status, e.kind, e.code),
        (429, "requests", "rate_limit_exceeded")
    );
    assert_eq!(e.limit, Some("requests_per_minute"));
    assert!(
        e.message.contains("`team-a`") && e.message.contains("requests_per_minute"),
        "{}",
        e.message
    );
    let retry: u64 = header(&e, "retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    assert_eq!(header(&e, "x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(header(&e, "x-ratelimit-remaining-requests"), Some("0"));
    assert!(header(&e, "x-ratelimit-reset-requests")
        .unwrap()
        .ends_with('s'));
    // No token limit: no token headers.
    assert_eq!(header(&e, "x-ratelimit-limit-tokens"), None);
}

#[tokio::test]
async fn a_settled_reservation_frees_what_was_not_used() {
    let s = spend();
    let keys = keys("{tokens_per_minute: 1100}");
    let key = keys.authorize(b"gw-team-a-0123456789").unwrap();
    let c = config(Limits::default());
    let body = [b'x'; 400]; // 100 tokens estimated
    let first = s
        .admit(&c, &request(Some(&key), &body, Some(800)))
        .await
        .unwrap()
        .unwrap();
    // 900 reserved: a second such request does not fit.
    let e = s
        .admit(&c, &request(Some(&key), &body, Some(800)))
        .await
        .unwrap_err();
    assert_eq!((e.kind, e.limit), ("tokens", Some("tokens_per_minute")));
    assert_eq!(header(&e, "x-ratelimit-limit-tokens"), Some("1100"));
    assert_eq!(header(&e, "x-ratelimit-remaining-tokens"), Some("200"));
    // It used 120: the other 780 come back, and 120 + 900 fit.
    let used = TokenUsage {
        input: Some(100),
        output: Some(20),
        ..TokenUsage::default()
    };
    s.publish(
        s.settle(first, Settlement::Used(&used)),
        "tars",
        "gpt-4o-mini",
    );
    let second = s
        .admit(&c, &request(Some(&key), &body, Some(800)))
        .await
        .unwrap();
    assert!(second.is_some(), "the unused tokens were not freed");
}

/// `ai_gateway_budget_remaining{key="team-a",limit=...}`, if published.
fn remaining(metrics: &Metrics, limit: &str) -> Option<f64> {
    let text = String::from_utf8(metrics.render()).unwrap();
    let series = format!(r#"ai_gateway_budget_remaining{{key="team-a",limit="{limit}"}} "#);
    text.lines()
        .find_map(|l| l.strip_prefix(&series)?.parse().ok())
}

#[tokio::test]
async fn what_is_left_is_published_after_the_settlement() {
    let used = TokenUsage {
        input: Some(100),
        output: Some(20),
        ..TokenUsage::default()
    };
    // 100 input tokens estimated and an 800 cap: 900 reserved of 1,100.
    let cases = [
        ("used", Settlement::Used(&used), 980.0),
        ("upstream failed", Settlement::UpstreamFailed, 1100.0),
        ("usage unknown", Settlement::Unknown, 200.0),
    ];
    for (name, ending, tokens_left) in cases {
        let metrics = Arc::new(Metrics::new().unwrap());
        let s = Spend::new(&SpendConfig::default(), Arc::clone(&metrics)).unwrap();
        let keys = keys("{requests_per_minute: 10, tokens_per_minute: 1100}");
        let key = keys.authorize(b"gw-team-a-0123456789").unwrap();
        let r = s
            .admit(
                &config(Limits::default()),
                &request(Some(&key), &[b'x'; 400], Some(800)),
            )
            .await
            .unwrap()
            .unwrap();
        // Nothing at admission (it sits before the request's first
        // byte), nor at settlement (before the response's last answer).
        assert_eq!(remaining(&metrics, "tokens_per_minute"), None, "{name}");
        let settled = s.settle(r, ending);
        assert_eq!(remaining(&metrics, "tokens_per_minute"), None, "{name}");
        s.publish(settled, "tars", "gpt-4o-mini");
        assert_eq!(
            remaining(&metrics, "tokens_per_minute"),
            Some(tokens_left),
            "{name}"
        );
        // The request counts however it ended.
        assert_eq!(
            remaining(&metrics, "requests_per_minute"),
            Some(9.0),
            "{name}"
        );
    }
}

#[tokio::test]
async fn an_upstream_error_gives_the_tokens_back_but_counts_the_request() {
    let s = spend();
    let keys = keys("{requests_per_minute: 2, tokens_per_minute: 1000}");
    let key = keys.authorize(b"gw-team-a-0123456789").unwrap();
    let c = config(Limits::default());
    let r = s
        .admit(&c, &request(Some(&key), b"{}", Some(999)))
        .await
        .unwrap()
        .unwrap();
    s.publish(
        s.settle(r, Settlement::UpstreamFailed),
        "tars",
        "gpt-4o-mini",
    );
    let r = s
        .admit(&c, &request(Some(&key), b"{}", Some(999)))
        .await
        .unwrap()
        .unwrap();
    s.publish(s.settle(r, Settlement::Unknown), "tars", "gpt-4o-mini");
    // Two requests counted; and the unknown one kept its 999 tokens.
    let e = s
        .admit(&c, &request(Some(&key), b"{}", Some(1)))
        .await
        .unwrap_err();
    assert_eq!(e.limit, Some("requests_per_minute"));
}

#[tokio::test]
async fn daily_budgets_are_quota_and_prices_are_never_free() {
    let s = spend();
    let keys = keys("{usd_per_day: 0.001}");
    let key = keys.authorize(b"gw-team-a-0123456789").unwrap();
    let c = config(Limits::default());
    // $1/M in, $2/M out: 1 in + 400 out = $0.000801.
    let r = s
        .admit(&c, &request(Some(&key), b"1234", Some(400)))
        .await
        .unwrap();
    assert!(r.is_some());
    let e = s
        .admit(&c, &request(Some(&key), b"1234", Some(400)))
        .await
        .unwrap_err();
    assert_eq!(
        (e.status, e.kind, e.code),
        (429, "insufficient_quota", "insufficient_quota")
    );
    assert_eq!(e.limit, Some("usd_per_day"));
    assert!(e.message.contains('$'), "{}", e.message);
    // A model without a price, under a budget in dollars: refused.
    let unpriced = SpendRequest {
        model: "claude-x",
        upstream_model: "claude-x",
        ..request(Some(&key), b"{}", None)
    };
    let e = s.admit(&c, &unpriced).await.unwrap_err();
    assert_eq!((e.status, e.code), (403, "model_price_unknown"));
}

#[tokio::test]
async fn the_gateway_limits_cover_every_key_and_no_key() {
    let s = spend();
    let c = config(Limits {
        requests_per_minute: Some(1),
        ..Limits::default()
    });
    assert!(s
        .admit(&c, &request(None, b"{}", None))
        .await
        .unwrap()
        .is_some());
    let e = s.admit(&c, &request(None, b"{}", None)).await.unwrap_err();
    assert!(e.message.contains("this gateway"), "{}", e.message);
}

#[tokio::test]
async fn a_request_larger_than_the_limit_says_so_without_retry_after() {
    let s = spend();
    let keys = keys("{tokens_per_minute: 100}");
    let key = keys.authorize(b"gw-team-a-0123456789").unwrap();
    let e = s
        .admit(
            &config(Limits::default()),
            &request(Some(&key), b"{}", Some(4096)),
        )
        .await
        .unwrap_err();
    assert!(e.message.contains("alone"), "{}", e.message);
    assert_eq!(header(&e, "retry-after"), None);
}

#[test]
fn reset_durations_read_like_openai_s() {
    assert_eq!(go_duration(12), "12s");
    assert_eq!(go_duration(360), "6m0s");
    assert_eq!(go_duration(3 * 3600 + 2 * 60 + 1), "3h2m1s");
}
