//! What tokens cost: `spend.prices` from the config (USD per million
//! tokens, by model glob), and each backend's own `GET /v1/models` list,
//! fetched with the backend's key and refreshed; the last good list stays
//! when a fetch fails.
//!
//! TARS lists, per model, `input_price`, `output_price`, `cached_price`
//! (cache reads) and `caching_price` (cache writes) in USD **per token**,
//! as numbers or numeric strings: its clients multiply them by a million
//! to get a price per million tokens (Roo Code and Kilo Code,
//! `src/api/providers/fetchers/tars.ts` with `parseApiPrice` in
//! `src/shared/cost.ts`: `parseFloat(price) * 1_000_000`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Deserialize;
use tokio::sync::watch;

use super::limits::usd_to_nano;
use crate::config::PriceRule;
use crate::openai::usage::TokenUsage;
use crate::provider_keys::ProviderKeys;
use crate::regular_file;
use crate::routes::{glob_match, Backend};
use crate::state::GatewayState;

/// A model's prices, in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    /// Input tokens read from the provider's cache.
    pub cached_input: f64,
    /// Input tokens written to the provider's cache.
    pub cache_write: f64,
}

impl Price {
    fn of_rule(rule: &PriceRule) -> Self {
        Self {
            input: rule.input,
            output: rule.output,
            cached_input: rule.cached_input.unwrap_or(rule.input),
            cache_write: rule.cache_write.unwrap_or(rule.input),
        }
    }

    /// What `input` input tokens and `output` output tokens at most cost,
    /// in billionths of a dollar (rounded up).
    pub fn estimate_nano(&self, input: u64, output: u64) -> i64 {
        usd_to_nano((input as f64 * self.input + output as f64 * self.output) / 1e6)
    }

    /// What a response's usage cost, in billionths of a dollar; `None`
    /// without an input count. Cached and cache-write tokens are part of the
    /// input (see `openai::usage`) and priced as such.
    pub fn cost_nano(&self, usage: &TokenUsage) -> Option<i64> {
        let input = usage.input?;
        let cached = usage.cached_input.unwrap_or(0).min(input);
        let written = usage.cache_write.unwrap_or(0).min(input - cached);
        let plain = input - cached - written;
        let output = usage.output.unwrap_or(0);
        Some(usd_to_nano(
            (plain as f64 * self.input
                + cached as f64 * self.cached_input
                + written as f64 * self.cache_write
                + output as f64 * self.output)
                / 1e6,
        ))
    }
}

/// One backend's prices, by model id.
pub type PriceList = HashMap<String, Price>;

/// Every price the gateway knows: the config's rules (passed per request,
/// from the snapshot) over the backends' own lists.
#[derive(Default)]
pub struct PriceBook {
    /// Backend name → its list.
    lists: ArcSwap<HashMap<Box<str>, Arc<PriceList>>>,
}

impl PriceBook {
    /// The price of `model` (as the client names it) sent to `backend` as
    /// `upstream_model`: the config's rules first (an exact rule, then globs
    /// in file order, matched against the client's name), then the
    /// backend's own list (by the name the backend knows).
    pub fn price(
        &self,
        rules: &[PriceRule],
        model: &str,
        backend: &str,
        upstream_model: &str,
    ) -> Option<Price> {
        let rule = rules
            .iter()
            .find(|r| r.model == model)
            .or_else(|| rules.iter().find(|r| glob_match(&r.model, model)));
        if let Some(r) = rule {
            return Some(Price::of_rule(r));
        }
        self.lists.load().get(backend)?.get(upstream_model).copied()
    }

    /// Puts a backend's freshly fetched list in force.
    pub fn replace(&self, backend: &str, list: HashMap<String, Price>) {
        self.lists.rcu(|lists| {
            let mut next = HashMap::clone(lists);
            next.insert(backend.into(), Arc::new(list.clone()));
            next
        });
    }
}

/// A price as TARS lists it: a number or a numeric string, per token.
#[derive(Deserialize)]
#[serde(untagged)]
enum ListedPrice {
    Number(f64),
    Text(String),
}

impl ListedPrice {
    /// USD per million tokens.
    fn per_million(&self) -> Option<f64> {
        let per_token = match self {
            Self::Number(n) => *n,
            Self::Text(t) => t.trim().parse().ok()?,
        };
        (per_token.is_finite() && per_token >= 0.0).then_some(per_token * 1e6)
    }
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ListedModel>,
}

#[derive(Deserialize)]
struct ListedModel {
    id: String,
    input_price: Option<ListedPrice>,
    output_price: Option<ListedPrice>,
    cached_price: Option<ListedPrice>,
    caching_price: Option<ListedPrice>,
}

/// The prices in a backend's `GET /v1/models` answer. A model without both
/// an input and an output price has no price.
pub fn parse_model_list(json: &[u8]) -> Result<HashMap<String, Price>, serde_json::Error> {
    let list: ModelList = serde_json::from_slice(json)?;
    Ok(list
        .data
        .into_iter()
        .filter_map(|m| {
            let input = m.input_price.as_ref()?.per_million()?;
            let output = m.output_price.as_ref()?.per_million()?;
            let or_input = |p: &Option<ListedPrice>| {
                p.as_ref()
                    .and_then(ListedPrice::per_million)
                    .unwrap_or(input)
            };
            Some((
                m.id,
                Price {
                    input,
                    output,
                    cached_input: or_input(&m.cached_price),
                    cache_write: or_input(&m.caching_price),
                },
            ))
        })
        .collect())
}

/// Largest model list read (TARS's is some hundreds of kilobytes).
const MAX_LIST_BYTES: usize = 16 * 1024 * 1024;

/// After a failed fetch, the next try comes this much sooner than a
/// refresh.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);

/// The task that keeps the backends' lists fresh, while some key or the
/// gateway has a USD budget (otherwise no price is needed, and no backend
/// is asked).
pub struct PriceRefresher {
    pub state: Arc<GatewayState>,
}

impl PriceRefresher {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let snapshot = self.state.snapshot();
            let refresh = snapshot.config.spend.price_refresh;
            let wait = if self
                .state
                .spend
                .needs_prices(&snapshot.config.spend.limits, &self.state.client_keys)
            {
                let mut all_ok = true;
                for backend in snapshot.routes.backends() {
                    all_ok &= self.fetch(backend, &self.state.provider_keys).await;
                }
                if all_ok {
                    refresh
                } else {
                    refresh.min(RETRY_AFTER_FAILURE)
                }
            } else {
                // Look again soon: a budget may be added by a reload.
                RETRY_AFTER_FAILURE.min(refresh)
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Fetches one backend's list; false if it failed (the last good list
    /// stays).
    async fn fetch(&self, backend: &Backend, keys: &ProviderKeys) -> bool {
        let name = &*backend.name;
        let Some(key) = keys.get(name) else {
            return false;
        };
        let url = format!("{}/v1/models", backend.url);
        let result = async {
            let client = client_for(backend).await?;
            let response = client
                .get(&url)
                .header("authorization", key.authorization())
                .send()
                .await
                .map_err(|e| e.without_url().to_string())?;
            if !response.status().is_success() {
                return Err(format!("answered {}", response.status()));
            }
            let body = response
                .bytes()
                .await
                .map_err(|e| e.without_url().to_string())?;
            if body.len() > MAX_LIST_BYTES {
                return Err("the model list is too large".into());
            }
            parse_model_list(&body).map_err(|e| format!("not a model list: {e}"))
        }
        .await;
        match result {
            Ok(list) => {
                tracing::debug!(
                    backend = name,
                    models = list.len(),
                    "prices loaded from the backend's model list"
                );
                self.state.spend.prices().replace(name, list);
                true
            }
            Err(error) => {
                tracing::warn!(backend = name, %error, "cannot read the backend's prices; the last ones stay in force");
                false
            }
        }
    }
}

/// An HTTP client that trusts what Envoy trusts for this backend (its
/// `ca_file`), with no proxy from the environment.
async fn client_for(backend: &Backend) -> Result<reqwest::Client, String> {
    // rustls needs a process-wide crypto provider; a second install is a no-op.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30));
    if backend.url.tls {
        let pem = regular_file::read_async(backend.ca_file.clone(), 8 * 1024 * 1024)
            .await
            .map_err(|e| format!("cannot read ca_file {}: {e}", backend.ca_file.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("ca_file {}: {e}", backend.ca_file.display()))?;
        builder = builder.tls_certs_only(certs);
    }
    builder.build().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tars_lists_per_token_prices_as_numbers_or_strings() {
        let list = br#"{"object":"list","data":[
            {"id":"gpt-4o-mini","input_price":"0.00000015","output_price":6e-7,"cached_price":"0.000000075"},
            {"id":"claude-sonnet-4","input_price":0.000003,"output_price":"0.000015","caching_price":"0.00000375","cached_price":"0.0000003"},
            {"id":"free-ish","input_price":0,"output_price":"0"},
            {"id":"unpriced","context_window":128000},
            {"id":"broken","input_price":"n/a","output_price":"1"}
        ]}"#;
        let prices = parse_model_list(list).unwrap();
        let mini = prices["gpt-4o-mini"];
        assert!((mini.input - 0.15).abs() < 1e-9 && (mini.output - 0.6).abs() < 1e-9);
        assert!((mini.cached_input - 0.075).abs() < 1e-9);
        assert!(
            (mini.cache_write - 0.15).abs() < 1e-9,
            "defaults to the input price"
        );
        assert!((prices["claude-sonnet-4"].cache_write - 3.75).abs() < 1e-9);
        assert_eq!(prices["free-ish"].input, 0.0);
        assert!(!prices.contains_key("unpriced") && !prices.contains_key("broken"));
    }

    #[test]
    fn cost_prices_each_kind_of_input_token() {
        let p = Price {
            input: 3.0,
            output: 15.0,
            cached_input: 0.3,
            cache_write: 3.75,
        };
        let usage = TokenUsage {
            input: Some(1_000_000),
            output: Some(100_000),
            cached_input: Some(600_000),
            cache_write: Some(100_000),
            ..TokenUsage::default()
        };
        // 300k plain x $3 + 600k cached x $0.3 + 100k written x $3.75 + 100k out x $15
        let usd = 0.9 + 0.18 + 0.375 + 1.5;
        assert_eq!(p.cost_nano(&usage), Some(usd_to_nano(usd)));
        assert_eq!(p.cost_nano(&TokenUsage::default()), None);
        assert_eq!(p.estimate_nano(1_000_000, 0), 3_000_000_000);
    }

    #[test]
    fn config_rules_win_exact_first_then_globs() {
        let book = PriceBook::default();
        book.replace(
            "tars",
            [(
                "gpt-4o-mini-2024-07-18".to_string(),
                Price {
                    input: 1.0,
                    output: 2.0,
                    cached_input: 1.0,
                    cache_write: 1.0,
                },
            )]
            .into(),
        );
        let rules = vec![
            PriceRule {
                model: "gpt-*".into(),
                input: 9.0,
                output: 9.0,
                cached_input: None,
                cache_write: None,
            },
            PriceRule {
                model: "gpt-4o".into(),
                input: 5.0,
                output: 5.0,
                cached_input: None,
                cache_write: None,
            },
        ];
        assert_eq!(
            book.price(&rules, "gpt-4o", "tars", "gpt-4o")
                .unwrap()
                .input,
            5.0
        );
        assert_eq!(
            book.price(&rules, "gpt-x", "tars", "gpt-x").unwrap().input,
            9.0
        );
        // No rule: the backend's list, under the upstream name.
        assert_eq!(
            book.price(&[], "mini", "tars", "gpt-4o-mini-2024-07-18")
                .unwrap()
                .input,
            1.0
        );
        assert!(book
            .price(&[], "mini", "other", "gpt-4o-mini-2024-07-18")
            .is_none());
    }
}
