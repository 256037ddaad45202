//! The gateway's Prometheus metrics, served on the admin port at `/metrics`.
//!
//! Every label value comes from a bounded set: endpoints and error codes are
//! enums, backends come from the configuration. Client-chosen strings (model
//! names) never become labels unless the configuration names them.

use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

/// All metrics, registered in one registry.
pub struct Metrics {
    registry: Registry,
    /// Requests by endpoint and outcome (`routed` or the error code).
    pub requests: IntCounterVec,
    /// Upstream answers of 400 and above, by backend and status.
    pub upstream_errors: IntCounterVec,
    /// Key file reads that changed or failed, by backend and result.
    pub key_reloads: IntCounterVec,
    /// Increments each time a backend's key changes.
    pub key_generation: IntGaugeVec,
    pub key_last_success: GaugeVec,
    /// Configuration reloads by result.
    pub config_reloads: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "ai_gateway_requests_total",
                "Requests seen by the gateway, by endpoint and outcome.",
            ),
            &["endpoint", "outcome"],
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "ai_gateway_upstream_errors_total",
                "Upstream responses with status 400 or above, by backend and status.",
            ),
            &["backend", "status"],
        )?;
        let key_reloads = IntCounterVec::new(
            Opts::new(
                "ai_gateway_key_reloads_total",
                "API key file reloads by backend and result (success or failure).",
            ),
            &["backend", "result"],
        )?;
        let key_generation = IntGaugeVec::new(
            Opts::new(
                "ai_gateway_key_generation",
                "Number of distinct keys loaded for the backend since start.",
            ),
            &["backend"],
        )?;
        let key_last_success = GaugeVec::new(
            Opts::new(
                "ai_gateway_key_last_success_timestamp_seconds",
                "Unix time of the last successful key load for the backend.",
            ),
            &["backend"],
        )?;
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "ai_gateway_config_reloads_total",
                "Configuration reloads by result.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;
        registry.register(Box::new(key_reloads.clone()))?;
        registry.register(Box::new(key_generation.clone()))?;
        registry.register(Box::new(key_last_success.clone()))?;
        registry.register(Box::new(config_reloads.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            registry,
            requests,
            upstream_errors,
            key_reloads,
            key_generation,
            key_last_success,
            config_reloads,
        })
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}
