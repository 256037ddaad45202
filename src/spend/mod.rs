//! Spend control: budgets and rate limits per gateway key and for the whole
//! gateway, enforced *before* a request reaches a provider, and exact
//! across replicas.
//!
//! Every peer that has budgets charges tokens after the response, so
//! requests running at once all pass a limit that only the first should
//! have passed. Here a request reserves first: 1 request, its estimated
//! input tokens plus its output cap, and what those cost, checked against
//! every window of its key and of the gateway and charged in one atomic
//! step (all windows or none). When the response ends, the reservation is
//! replaced by the real usage; an upstream error gives the tokens back (the
//! request still counts). A stream whose usage never comes keeps its
//! reservation: never a silent free pass.
//!
//! - `limits`: what a limit counts, its window, the counters one admission
//!   touches;
//! - `store`: the counters, in `memory` (one replica) or `redis` (shared);
//! - `prices`: what tokens cost, from the config and the backends' lists;
//! - `estimate`: the input token guess.

pub mod estimate;
pub mod limits;
mod memory;
pub mod prices;
mod redis;
pub mod store;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::client_keys::{ClientKey, ClientKeys};
use crate::config::{Limits, OnStoreError, SpendConfig, StoreConfig};
use crate::metrics::Metrics;
use crate::openai::error::ApiError;
use crate::openai::usage::TokenUsage;
use limits::{nano_to_usd, Charge, Check, LimitKind, Measure, Scope};
use prices::{Price, PriceBook};
use store::{Delta, SpendStore, StoreError, Verdict, WindowIds};

/// The request facts spend control needs.
pub struct SpendRequest<'a> {
    /// The gateway key, when clients present keys.
    pub key: Option<&'a ClientKey>,
    /// The model as the client names it, and as the backend gets it.
    pub model: &'a str,
    pub upstream_model: &'a str,
    pub backend: &'a str,
    pub body: &'a [u8],
    /// The output cap the request names.
    pub max_output_tokens: Option<u64>,
}

/// A request's reservation. Settled exactly once: by [`Spend::settle`],
/// which takes it by value.
pub struct Reservation {
    /// The store it was made in (a reload that switches stores does not
    /// send its settlement elsewhere).
    store: Arc<SpendStore>,
    windows: WindowIds,
    checks: Vec<Check>,
    /// Each check's counter just after this reservation's charge: what
    /// the settlement reports as left (`ai_gateway_budget_remaining`).
    counted: Vec<i64>,
    tokens: i64,
    nano_usd: i64,
    estimated_input: u64,
    price: Option<Price>,
    /// The gateway key's name; `None` when clients present no keys.
    key: Option<Arc<str>>,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("key", &self.key)
            .field("tokens", &self.tokens)
            .field("nano_usd", &self.nano_usd)
            .finish_non_exhaustive()
    }
}

/// What a settlement leaves for the metrics, published by
/// [`Spend::publish`] once the response's last answer is sent: a plain
/// chat's client waits for that answer, and each lookup of a series by its
/// labels costs about a microsecond with the caches as a request finds them
/// (bench/RESULTS.md entry 67). The backend and model it is published
/// under are the exchange's: it knows which backend of a chain answered.
#[must_use = "publish it once the response is answered"]
pub struct Settled {
    key: Option<Arc<str>>,
    /// What the request cost, when it is priced and not free.
    spent_nano_usd: Option<i64>,
    /// Input tokens counted over estimated, when the response said.
    estimate_ratio: Option<f64>,
    checks: Vec<Check>,
    counted: Vec<i64>,
    delta: Delta,
}

/// How a reserved request ended.
pub enum Settlement<'a> {
    /// The response ended and reported this usage.
    Used(&'a TokenUsage),
    /// The provider (or Envoy on its way there) answered 400 or above: the
    /// tokens are given back, the request still counts.
    UpstreamFailed,
    /// Usage unknown (no usage reported, the client left): the reservation
    /// stands as the charge.
    Unknown,
}

/// Spend control, shared by every request.
pub struct Spend {
    /// The store in force, and the settings it was built from.
    store: ArcSwap<(StoreSettings, Arc<SpendStore>)>,
    /// Serializes store switches (a reload), never held across an await.
    switching: Mutex<()>,
    prices: PriceBook,
    metrics: Arc<Metrics>,
    /// The store is failing now: logged once per outage, not per request.
    down: AtomicBool,
}

impl Spend {
    pub fn new(config: &SpendConfig, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        let store = SpendStore::new(config, &metrics)?;
        Ok(Self {
            store: ArcSwap::from_pointee((StoreSettings::of(config), store)),
            switching: Mutex::new(()),
            prices: PriceBook::default(),
            metrics,
            down: AtomicBool::new(false),
        })
    }

    /// A reloaded config: a different store takes over for new requests
    /// (counters in the old memory store are not carried over); limits and
    /// prices are read per request and need nothing here.
    pub fn reconfigure(&self, config: &SpendConfig) {
        let _one_at_a_time = self.switching.lock().unwrap_or_else(|p| p.into_inner());
        let settings = StoreSettings::of(config);
        if self.store.load().0 == settings {
            return;
        }
        match SpendStore::new(config, &self.metrics) {
            Ok(store) => {
                tracing::info!(store = %config.store, "spend store switched");
                self.store.store(Arc::new((settings, store)));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot use the new spend store; the old one stays")
            }
        }
    }

    pub fn prices(&self) -> &PriceBook {
        &self.prices
    }

    /// Whether any budget is in dollars (prices are needed, and fetched).
    pub fn needs_prices(&self, gateway: &Limits, keys: &ClientKeys) -> bool {
        gateway.usd_per_day.is_some()
            || keys
                .current()
                .as_ref()
                .as_ref()
                .is_some_and(|k| k.keys().any(|k| k.limits.usd_per_day.is_some()))
    }

    /// Reserves what `request` may use, or refuses it. `Ok(None)`: nothing
    /// to meter (no limit applies, or the store is down and
    /// `on_store_error: admit`).
    pub async fn admit(
        &self,
        config: &SpendConfig,
        request: &SpendRequest<'_>,
    ) -> Result<Option<Reservation>, ApiError> {
        let key_limits = request.key.map(|k| (&k.name, &k.limits));
        let key_limited = key_limits.is_some_and(|(_, l)| !l.is_empty());
        if !key_limited && config.limits.is_empty() {
            return Ok(None);
        }
        let estimated_input = estimate::input_tokens(request.body);
        let output_cap = request
            .max_output_tokens
            .unwrap_or(config.default_max_output_tokens);
        let price = self.prices.price(
            &config.prices,
            request.model,
            request.backend,
            request.upstream_model,
        );
        let dollars_limited = config.limits.usd_per_day.is_some()
            || key_limits.is_some_and(|(_, l)| l.usd_per_day.is_some());
        if dollars_limited && price.is_none() {
            return Err(ApiError::model_price_unknown(request.model));
        }
        let charge = Charge {
            requests: 1,
            tokens: i64::try_from(estimated_input.saturating_add(output_cap)).unwrap_or(i64::MAX),
            nano_usd: price.map_or(0, |p| p.estimate_nano(estimated_input, output_cap)),
        };
        let checks = limits::checks(key_limits, &config.limits, &charge);
        let (_, store) = &**self.store.load();
        let verdict = match store.reserve(&checks, config.store_timeout).await {
            Ok(v) => {
                self.store_ok();
                v
            }
            Err(e) => return self.store_failed(e, config.on_store_error),
        };
        match verdict {
            // What is left is published with the settlement's metrics,
            // after the response's last answer, not here: four gauge
            // lookups by label were a fifth of an admission, which delays
            // a request's first byte, and the figure after the real usage
            // is the truer one (bench/RESULTS.md entry 67).
            Verdict::Admitted { windows, after } => Ok(Some(Reservation {
                store: Arc::clone(store),
                windows,
                counted: after,
                tokens: charge.tokens,
                nano_usd: charge.nano_usd,
                checks,
                estimated_input,
                price,
                key: request.key.map(|k| Arc::clone(&k.name)),
            })),
            Verdict::Refused {
                index,
                current,
                now,
            } => {
                let refusing = &checks[index];
                if let Some(limit) = refusing.limit {
                    self.metrics.budget_remaining(
                        refusing.scope.label(),
                        refusing.kind,
                        limit - current[index],
                    );
                }
                self.metrics
                    .limit_rejection(refusing.scope.label(), refusing.kind);
                Err(refusal(&checks, index, &current, now))
            }
        }
    }

    /// Moves a reservation of `model` to the backend of a fallback chain
    /// that answered: its usage is priced at that backend's prices. Where
    /// they are unknown, the reservation's own estimate is the charge
    /// (never free).
    pub fn answered_by(
        &self,
        reservation: &mut Reservation,
        config: &SpendConfig,
        model: &str,
        backend: &str,
        upstream_model: Option<&str>,
    ) {
        reservation.price = self.prices.price(
            &config.prices,
            model,
            backend,
            upstream_model.unwrap_or(model),
        );
    }

    /// Replaces a reservation by what the request really used (or gives
    /// its tokens back). Never waits: the response is never held up. The
    /// metrics wait for [`Spend::publish`].
    pub fn settle(&self, reservation: Reservation, ending: Settlement<'_>) -> Settled {
        let used = match ending {
            Settlement::Used(usage) => usage.total().map(|total| (total, usage)),
            _ => None,
        };
        let mut estimate_ratio = None;
        let (tokens, nano_usd) = match (&ending, used) {
            (Settlement::UpstreamFailed, _) => (0, 0),
            (_, Some((total, usage))) => {
                if let (Some(input), true) = (usage.input, reservation.estimated_input > 0) {
                    estimate_ratio = Some(input as f64 / reservation.estimated_input as f64);
                }
                let cost = reservation
                    .price
                    .and_then(|p| p.cost_nano(usage))
                    .unwrap_or(reservation.nano_usd);
                (i64::try_from(total).unwrap_or(i64::MAX), cost)
            }
            // Usage unknown: the reservation is the charge.
            _ => (reservation.tokens, reservation.nano_usd),
        };
        let delta = Delta {
            tokens: tokens - reservation.tokens,
            nano_usd: nano_usd - reservation.nano_usd,
        };
        reservation
            .store
            .settle(reservation.windows, &reservation.checks, delta);
        Settled {
            spent_nano_usd: (reservation.price.is_some() && nano_usd > 0).then_some(nano_usd),
            estimate_ratio,
            key: reservation.key,
            checks: reservation.checks,
            counted: reservation.counted,
            delta,
        }
    }

    /// Puts a settlement in the metrics: what was spent (on `backend`, for
    /// `model` as the client named it), how far off the estimate was, and
    /// what is left of each limit.
    pub fn publish(&self, settled: Settled, backend: &str, model: &str) {
        if let Some(ratio) = settled.estimate_ratio {
            self.metrics.token_estimate_ratio(ratio);
        }
        if let Some(nano_usd) = settled.spent_nano_usd {
            self.metrics.spent_usd(
                settled.key.as_deref().unwrap_or("-"),
                backend,
                model,
                nano_to_usd(nano_usd),
            );
        }
        // As of this request: others settled or admitted meanwhile are
        // not in it (their own settlements publish theirs).
        for (check, counted) in settled.checks.iter().zip(&settled.counted) {
            if let Some(limit) = check.limit {
                let used = counted.saturating_add(settled.delta.of(check.kind)).max(0);
                self.metrics
                    .budget_remaining(check.scope.label(), check.kind, limit - used);
            }
        }
    }

    fn store_ok(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!("spend store reachable again: limits are enforced");
        }
    }

    fn store_failed(
        &self,
        error: StoreError,
        on_error: OnStoreError,
    ) -> Result<Option<Reservation>, ApiError> {
        self.metrics.spend_store_error();
        if !self.down.swap(true, Ordering::Relaxed) {
            let action = match on_error {
                OnStoreError::Reject => "refusing metered requests with 503",
                OnStoreError::Admit => "serving metered requests unmetered",
            };
            tracing::error!(%error, "spend store unreachable: {action} until it is back (logged once per outage)");
        }
        match on_error {
            OnStoreError::Reject => Err(ApiError::spend_store_unavailable()),
            OnStoreError::Admit => Ok(None),
        }
    }
}

/// What a store is built from: a change of any of these builds a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StoreSettings {
    store: StoreConfig,
    namespace: String,
    password_file: Option<std::path::PathBuf>,
}

impl StoreSettings {
    fn of(config: &SpendConfig) -> Self {
        Self {
            store: config.store.clone(),
            namespace: config.namespace.clone(),
            password_file: config.password_file.clone(),
        }
    }
}

/// The 429 for a refused admission: which limit, of which key, when it
/// frees, and OpenAI's `x-ratelimit-*` headers for the refusing scope.
fn refusal(checks: &[Check], index: usize, current: &[i64], now: u64) -> ApiError {
    let refusing = &checks[index];
    let kind = refusing.kind;
    let limit = refusing.limit.unwrap_or(0);
    let whose = match &refusing.scope {
        Scope::Key(name) => format!("key `{name}`"),
        Scope::Gateway => "this gateway (all keys together)".to_string(),
    };
    let left = kind.window().seconds_left(now);
    let alone_too_big = refusing.amount > limit;
    let amount = |v: i64| match kind.measure() {
        Measure::NanoUsd => format!("${:.4}", nano_to_usd(v)),
        _ => v.to_string(),
    };
    let message = if alone_too_big {
        format!(
            "This request alone needs {} against {whose}'s {} limit of {}; send a smaller request or a lower max_tokens.",
            amount(refusing.amount),
            kind.label(),
            amount(limit)
        )
    } else {
        format!(
            "Limit reached for {whose}: {} is {}, {} used in this window. It frees in {left}s.",
            kind.label(),
            amount(limit),
            amount(current[index])
        )
    };
    let mut error = match kind {
        LimitKind::RequestsPerMinute => ApiError::rate_limited("requests", kind.label(), message),
        LimitKind::TokensPerMinute => ApiError::rate_limited("tokens", kind.label(), message),
        LimitKind::TokensPerDay | LimitKind::UsdPerDay => {
            ApiError::quota_spent(kind.label(), message)
        }
    };
    if !alone_too_big {
        error = error.with_header("retry-after", left.to_string());
    }
    // OpenAI's headers, for the refusing scope's limits.
    let scoped = |k: LimitKind| {
        checks
            .iter()
            .zip(current)
            .find(|(c, _)| c.scope == refusing.scope && c.kind == k && c.limit.is_some())
    };
    if let Some((c, used)) = scoped(LimitKind::RequestsPerMinute) {
        error = ratelimit_headers(error, "requests", c, *used, now);
    }
    if let Some((c, used)) =
        scoped(LimitKind::TokensPerMinute).or_else(|| scoped(LimitKind::TokensPerDay))
    {
        error = ratelimit_headers(error, "tokens", c, *used, now);
    }
    error
}

fn ratelimit_headers(error: ApiError, what: &str, check: &Check, used: i64, now: u64) -> ApiError {
    let limit = check.limit.unwrap_or(0);
    error
        .with_header(format!("x-ratelimit-limit-{what}"), limit.to_string())
        .with_header(
            format!("x-ratelimit-remaining-{what}"),
            (limit - used).max(0).to_string(),
        )
        .with_header(
            format!("x-ratelimit-reset-{what}"),
            go_duration(check.kind.window().seconds_left(now)),
        )
}

/// A duration as OpenAI writes it in `x-ratelimit-reset-*`: `12s`, `6m0s`,
/// `3h2m1s`.
fn go_duration(seconds: u64) -> String {
    let (h, m, s) = (seconds / 3600, seconds % 3600 / 60, seconds % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests;
