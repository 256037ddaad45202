//! The gateway's Prometheus metrics, served on the admin port at `/metrics`.
//!
//! Two families:
//! - the OpenTelemetry GenAI metrics, under their Prometheus names
//!   (`gen_ai_client_token_usage`, `gen_ai_server_request_duration_seconds`,
//!   `gen_ai_server_time_to_first_token_seconds`,
//!   `gen_ai_server_time_per_output_token_seconds`), labelled by request
//!   model, response model, provider (backend), operation and outcome;
//! - the gateway's own (`ai_gateway_*`): requests by outcome and error,
//!   processing time per ext_proc phase, key and config reloads.
//!
//! Label cardinality is bounded. Endpoints, outcomes and error codes are
//! fixed sets and backends come from the configuration. Model names come
//! from clients and providers, so they pass through [`ModelLabels`]: the
//! first [`MODEL_LABEL_BUDGET`] distinct names are kept, later ones become
//! `other`, and a client sending random names cannot grow the registry.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::openai::usage::{TokenUsage, UsageGap};
use crate::openai::Endpoint;
use crate::outcome::Outcome;

/// Distinct model names kept as label values.
pub const MODEL_LABEL_BUDGET: usize = 100;
/// The label value for models past the budget.
pub const OTHER_MODEL: &str = "other";

const GENAI_LABELS: &[&str] = &[
    "gen_ai_request_model",
    "gen_ai_response_model",
    "gen_ai_provider_name",
    "gen_ai_operation_name",
    "outcome",
];

/// All metrics, registered in one registry. The vectors are private: the
/// data path records through typed methods, so a label set is checked by
/// the compiler, not at run time.
pub struct Metrics {
    registry: Registry,
    /// Requests by endpoint, outcome and error code (empty unless the
    /// gateway refused the request).
    requests: IntCounterVec,
    /// Upstream answers of 400 and above, by backend and status.
    upstream_errors: IntCounterVec,
    /// Attempts on fallback chains, by backend and outcome.
    attempts: IntCounterVec,
    /// Tokens per request, by `gen_ai_token_type` (input, output,
    /// cached_input, reasoning) and the GenAI labels.
    token_usage: HistogramVec,
    request_duration: HistogramVec,
    time_to_first_token: HistogramVec,
    time_per_output_token: HistogramVec,
    /// Responses whose usage could not be read, by backend and reason.
    usage_unavailable: IntCounterVec,
    /// `ai_gateway_extproc_phase_duration_seconds`'s series, resolved once:
    /// observed on every message.
    phases: PhaseTimers,
    /// Key changes (success) and new key-file failures, by backend.
    key_reloads: IntCounterVec,
    /// Increments each time a backend's key changes.
    key_generation: IntGaugeVec,
    key_last_success: GaugeVec,
    /// Seconds since the backend's key in force was loaded.
    key_age: GaugeVec,
    /// Failed reads of a backend's key file, by reason.
    key_read_errors: IntCounterVec,
    /// 1 while the backend's key file cannot be read (the key in force may
    /// be stale), else 0.
    key_read_failing: IntGaugeVec,
    /// Configuration reloads by result.
    config_reloads: IntCounterVec,
    /// Dollars spent, by key, backend and model.
    spend_usd: GaugeVec,
    /// Requests refused by a limit, by key (`*`: the gateway's) and limit.
    limit_rejections: IntCounterVec,
    /// What is left of each limit in its window, by key and limit.
    budget_remaining: GaugeVec,
    /// Failed calls to the counter store.
    spend_store_errors: prometheus::IntCounter,
    /// Reported input tokens / estimated input tokens.
    token_estimate_ratio: prometheus::Histogram,
    /// The xDS version served to Envoy, and the one Envoy acknowledged.
    xds_version: IntGaugeVec,
    /// Versions Envoy rejected (NACK).
    xds_nacks: prometheus::IntCounter,
    /// Envoys following the config over xDS now.
    xds_streams: prometheus::IntGauge,
    /// Keeps model label values bounded.
    models: ModelLabels,
}

/// One finished exchange with a provider, for the GenAI metrics.
pub struct GenAiExchange<'a> {
    pub request_model: &'a str,
    pub response_model: Option<&'a str>,
    pub backend: &'a str,
    pub endpoint: Endpoint,
    pub outcome: Outcome,
    pub stream: bool,
    pub duration: Duration,
    pub time_to_first_byte: Option<Duration>,
    pub usage: TokenUsage,
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<GaugeVec> {
    let g = GaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new();
        let genai_token_labels: Vec<&str> = std::iter::once("gen_ai_token_type")
            .chain(GENAI_LABELS.iter().copied())
            .collect();
        let metrics = Self {
            requests: counter(
                &r,
                "ai_gateway_requests_total",
                "Requests seen by the gateway, by endpoint, outcome and error code.",
                &["endpoint", "outcome", "error"],
            )?,
            upstream_errors: counter(
                &r,
                "ai_gateway_upstream_errors_total",
                "Upstream responses with status 400 or above, by backend and status.",
                &["backend", "status"],
            )?,
            attempts: counter(
                &r,
                "ai_gateway_attempts_total",
                "Attempts of requests on a fallback chain, by backend and outcome: the status the backend answered, or no_response (connection failed or reset).",
                &["backend", "outcome"],
            )?,
            // Buckets as the OpenTelemetry GenAI semantic conventions advise.
            token_usage: histogram(
                &r,
                "gen_ai_client_token_usage",
                "Tokens used per request, by token type.",
                &genai_token_labels,
                &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0],
            )?,
            request_duration: histogram(
                &r,
                "gen_ai_server_request_duration_seconds",
                "Time from the request reaching the gateway to the end of the response.",
                GENAI_LABELS,
                &[0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92],
            )?,
            time_to_first_token: histogram(
                &r,
                "gen_ai_server_time_to_first_token_seconds",
                "Time from the request reaching the gateway to the first byte of a streamed response.",
                GENAI_LABELS,
                &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0],
            )?,
            time_per_output_token: histogram(
                &r,
                "gen_ai_server_time_per_output_token_seconds",
                "Streamed responses: time after the first byte divided by the output tokens after the first.",
                GENAI_LABELS,
                &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5],
            )?,
            usage_unavailable: counter(
                &r,
                "ai_gateway_usage_unavailable_total",
                "Successful responses whose token usage could not be read, by backend and reason.",
                &["backend", "reason"],
            )?,
            phases: PhaseTimers::new(&histogram(
                &r,
                "ai_gateway_extproc_phase_duration_seconds",
                "Processor time per ext_proc message, by phase.",
                &["phase"],
                &[5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2],
            )?),
            key_reloads: counter(
                &r,
                "ai_gateway_key_reloads_total",
                "API key file reloads by backend and result (success or failure).",
                &["backend", "result"],
            )?,
            key_generation: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "ai_gateway_key_generation",
                        "Number of distinct keys loaded for the backend since start.",
                    ),
                    &["backend"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            key_last_success: {
                let g = GaugeVec::new(
                    Opts::new(
                        "ai_gateway_key_last_success_timestamp_seconds",
                        "Unix time of the last successful key load for the backend.",
                    ),
                    &["backend"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            key_age: gauge(
                &r,
                "ai_gateway_key_age_seconds",
                "Seconds since the backend's key in force was loaded from its file.",
                &["backend"],
            )?,
            key_read_errors: counter(
                &r,
                "ai_gateway_key_read_errors_total",
                "Failed reads of a backend's key file, by reason (missing, permission, not_regular, too_large, empty, malformed, ...).",
                &["backend", "reason"],
            )?,
            key_read_failing: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "ai_gateway_key_read_failing",
                        "1 while the backend's key file cannot be read and the key in force may be stale, else 0.",
                    ),
                    &["backend"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            config_reloads: counter(
                &r,
                "ai_gateway_config_reloads_total",
                "Configuration reloads by result.",
                &["result"],
            )?,
            spend_usd: gauge(
                &r,
                "ai_gateway_spend_usd_total",
                "US dollars spent, as the prices in force value the reported usage (or the reservation, when usage is unknown), by key, backend and model.",
                &["key", "backend", "model"],
            )?,
            limit_rejections: counter(
                &r,
                "ai_gateway_limit_rejections_total",
                "Requests refused by a budget or rate limit, by key (* for the gateway's own limits) and limit.",
                &["key", "limit"],
            )?,
            budget_remaining: gauge(
                &r,
                "ai_gateway_budget_remaining",
                "What is left of a limit in its current window (requests, tokens or US dollars), as of the key's last settled request.",
                &["key", "limit"],
            )?,
            spend_store_errors: {
                let c = prometheus::IntCounter::new(
                    "ai_gateway_spend_store_errors_total",
                    "Calls to the spend counter store that failed or timed out.",
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            token_estimate_ratio: {
                let h = prometheus::Histogram::with_opts(
                    HistogramOpts::new(
                        "ai_gateway_token_estimate_ratio",
                        "Reported input tokens divided by the gateway's estimate at admission (below 1: the estimate was high).",
                    )
                    .buckets(vec![0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0, 10.0]),
                )?;
                r.register(Box::new(h.clone()))?;
                h
            },
            xds_version: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "ai_gateway_xds_version",
                        "The xDS version of Envoy's resources: served (the newest the processor offers) and acked (the newest an Envoy accepted whole).",
                    ),
                    &["state"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            xds_nacks: {
                let c = prometheus::IntCounter::new(
                    "ai_gateway_xds_nacks_total",
                    "xDS responses Envoy rejected (it keeps the last version it accepted; the log says why).",
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            xds_streams: {
                let g = prometheus::IntGauge::new(
                    "ai_gateway_xds_streams",
                    "Envoys following the gateway config over xDS now.",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            models: ModelLabels::new(MODEL_LABEL_BUDGET),
            registry: r,
        };
        // Present from the start, so a dashboard or alert sees 0, not nothing.
        for result in ["success", "failure"] {
            metrics.config_reloads.with_label_values(&[result]);
        }
        for state in ["served", "acked"] {
            metrics.xds_version.with_label_values(&[state]);
        }
        #[cfg(target_os = "linux")]
        metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(metrics)
    }

    /// One request, counted once when it ends.
    pub fn record_request(
        &self,
        endpoint: Option<Endpoint>,
        outcome: Outcome,
        error: Option<&str>,
    ) {
        let endpoint = endpoint.map_or("unknown", Endpoint::label);
        self.requests
            .with_label_values(&[endpoint, outcome.label(), error.unwrap_or("")])
            .inc();
    }

    /// A provider answered 400 or above.
    pub fn record_upstream_error(&self, backend: &str, status: u16) {
        let status = status.to_string();
        self.upstream_errors
            .with_label_values(&[backend, status.as_str()])
            .inc();
    }

    /// One attempt of a request on a fallback chain; `status` `None`: the
    /// backend never answered.
    pub fn record_attempt(&self, backend: &str, status: Option<u16>) {
        let outcome = status.map(|s| s.to_string());
        self.attempts
            .with_label_values(&[backend, outcome.as_deref().unwrap_or("no_response")])
            .inc();
    }

    /// A successful response whose usage could not be read.
    pub fn record_usage_unavailable(&self, backend: &str, gap: UsageGap) {
        self.usage_unavailable
            .with_label_values(&[backend, gap.label()])
            .inc();
    }

    /// The processor's time on one ext_proc message.
    pub fn observe_phase(&self, phase: Phase, elapsed: Duration) {
        self.phases.observe(phase, elapsed.as_secs_f64());
    }

    /// The GenAI metrics of one exchange with a provider.
    pub fn record_exchange(&self, e: &GenAiExchange<'_>) {
        let request_model = self.models.label(e.request_model);
        let response_model = self.models.label(e.response_model.unwrap_or(request_model));
        let labels = [
            request_model,
            response_model,
            e.backend,
            e.endpoint.operation(),
            e.outcome.label(),
        ];
        self.request_duration
            .with_label_values(&labels)
            .observe(e.duration.as_secs_f64());
        if let (true, Some(ttfb)) = (e.stream, e.time_to_first_byte) {
            self.time_to_first_token
                .with_label_values(&labels)
                .observe(ttfb.as_secs_f64());
            if let Some(output) = e.usage.output.filter(|o| *o > 1) {
                let generating = e.duration.saturating_sub(ttfb).as_secs_f64();
                self.time_per_output_token
                    .with_label_values(&labels)
                    .observe(generating / (output - 1) as f64);
            }
        }
        let [a, b, c, d, f] = labels;
        for (kind, count) in [
            ("input", e.usage.input),
            ("output", e.usage.output),
            ("cached_input", e.usage.cached_input),
            ("reasoning", e.usage.reasoning),
        ] {
            if let Some(n) = count {
                self.token_usage
                    .with_label_values(&[kind, a, b, c, d, f])
                    .observe(n as f64);
            }
        }
    }

    /// Dollars a request cost.
    pub fn spent_usd(&self, key: &str, backend: &str, model: &str, usd: f64) {
        let model = self.models.label(model);
        self.spend_usd
            .with_label_values(&[key, backend, model])
            .add(usd);
    }

    /// A request refused by a limit.
    pub fn limit_rejection(&self, key: &str, limit: crate::spend::limits::LimitKind) {
        self.limit_rejections
            .with_label_values(&[key, limit.label()])
            .inc();
    }

    /// What is left of a limit, in its unit (dollars for `usd_per_day`).
    pub fn budget_remaining(&self, key: &str, limit: crate::spend::limits::LimitKind, left: i64) {
        let value = match limit.measure() {
            crate::spend::limits::Measure::NanoUsd => crate::spend::limits::nano_to_usd(left),
            _ => left as f64,
        };
        self.budget_remaining
            .with_label_values(&[key, limit.label()])
            .set(value);
    }

    pub fn spend_store_error(&self) {
        self.spend_store_errors.inc();
    }

    pub fn token_estimate_ratio(&self, ratio: f64) {
        self.token_estimate_ratio.observe(ratio);
    }

    /// A config file version was put in force, or refused.
    pub fn config_reloaded(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.config_reloads.with_label_values(&[result]).inc();
    }

    /// The processor offers Envoy this xDS version.
    pub fn xds_served(&self, version: u64) {
        let version = i64::try_from(version).unwrap_or(i64::MAX);
        self.xds_version.with_label_values(&["served"]).set(version);
    }

    /// Envoy accepted this xDS version whole.
    pub fn xds_acked(&self, version: u64) {
        let version = i64::try_from(version).unwrap_or(i64::MAX);
        self.xds_version.with_label_values(&["acked"]).set(version);
    }

    /// Envoy rejected an xDS response.
    pub fn xds_nacked(&self) {
        self.xds_nacks.inc();
    }

    /// An Envoy started (`+1`) or stopped (`-1`) following over xDS.
    pub fn xds_stream(&self, delta: i64) {
        self.xds_streams.add(delta);
    }

    /// A backend's key changed: this is its `generation`-th key.
    pub fn key_loaded(&self, backend: &str, generation: i64) {
        self.key_reloads
            .with_label_values(&[backend, "success"])
            .inc();
        self.key_generation
            .with_label_values(&[backend])
            .set(generation);
        self.key_last_success
            .with_label_values(&[backend])
            .set(unix_now());
        self.key_age.with_label_values(&[backend]).set(0.0);
    }

    /// A backend's key file was read and parsed.
    pub fn key_read_ok(&self, backend: &str) {
        self.key_read_failing.with_label_values(&[backend]).set(0);
    }

    /// A read of a backend's key file failed.
    pub fn key_read_failed(&self, backend: &str, reason: &str) {
        self.key_read_errors
            .with_label_values(&[backend, reason])
            .inc();
        self.key_read_failing.with_label_values(&[backend]).set(1);
    }

    /// A backend's key file started failing (or failed differently).
    pub fn key_failure_started(&self, backend: &str) {
        self.key_reloads
            .with_label_values(&[backend, "failure"])
            .inc();
    }

    /// How long ago the backend's key in force was loaded.
    pub fn key_age(&self, backend: &str, age: std::time::Duration) {
        self.key_age
            .with_label_values(&[backend])
            .set(age.as_secs_f64());
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// One ext_proc message kind, for the per-phase timer.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
    Other,
}

/// The series of `ai_gateway_extproc_phase_duration_seconds`, one per phase.
struct PhaseTimers {
    timers: Vec<prometheus::Histogram>,
}

impl PhaseTimers {
    const LABELS: [&'static str; 5] = [
        "request_headers",
        "request_body",
        "response_headers",
        "response_body",
        "other",
    ];

    fn new(vec: &HistogramVec) -> Self {
        Self {
            timers: Self::LABELS
                .iter()
                .map(|l| vec.with_label_values(&[*l]))
                .collect(),
        }
    }

    fn observe(&self, phase: Phase, seconds: f64) {
        if let Some(t) = self.timers.get(phase as usize) {
            t.observe(seconds);
        }
    }
}

/// A bounded set of model names allowed as label values. Reads are one
/// atomic load; the set is copied on insert, which happens at most
/// `budget` times in the life of the process.
struct ModelLabels {
    seen: ArcSwap<HashSet<Arc<str>>>,
    budget: usize,
}

impl ModelLabels {
    fn new(budget: usize) -> Self {
        Self {
            seen: ArcSwap::from_pointee(HashSet::new()),
            budget,
        }
    }

    /// `model` itself while within budget, else [`OTHER_MODEL`].
    fn label<'a>(&self, model: &'a str) -> &'a str {
        if self.seen.load().contains(model) {
            return model;
        }
        let mut admitted = false;
        self.seen.rcu(|seen| {
            admitted = seen.contains(model) || seen.len() < self.budget;
            if admitted && !seen.contains(model) {
                let mut grown = HashSet::clone(seen);
                grown.insert(Arc::from(model));
                Arc::new(grown)
            } else {
                Arc::clone(seen)
            }
        });
        if admitted {
            model
        } else {
            OTHER_MODEL
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_labels_are_bounded() {
        let labels = ModelLabels::new(3);
        assert_eq!(labels.label("a"), "a");
        assert_eq!(labels.label("b"), "b");
        assert_eq!(labels.label("a"), "a");
        assert_eq!(labels.label("c"), "c");
        assert_eq!(labels.label("d"), OTHER_MODEL);
        assert_eq!(labels.label("b"), "b");
    }

    #[test]
    fn random_models_cannot_grow_the_registry() {
        let m = Metrics::new().unwrap();
        for i in 0..10_000 {
            let model = format!("random-{i}");
            m.record_exchange(&GenAiExchange {
                request_model: &model,
                response_model: Some(&model),
                backend: "tars",
                endpoint: Endpoint::ChatCompletions,
                outcome: Outcome::Success,
                stream: false,
                duration: Duration::from_millis(100),
                time_to_first_byte: None,
                usage: TokenUsage::default(),
            });
        }
        let text = String::from_utf8(m.render()).unwrap();
        let series = text
            .lines()
            .filter(|l| l.starts_with("gen_ai_server_request_duration_seconds_count"))
            .count();
        assert_eq!(
            series,
            MODEL_LABEL_BUDGET + 1,
            "one series per kept model, plus `other`"
        );
    }
}
