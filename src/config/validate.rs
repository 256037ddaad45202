//! What serde cannot check: names, references from models to backends,
//! duplicates, bounds, and the rules between fields (TCP needs a secret or
//! TLS). Every problem is reported at once, with its field path, so an
//! operator fixes a file in one pass.

use std::collections::HashSet;
use std::time::Duration;

use super::names::{check_backend_name, check_dns_name, check_model_name};
use super::{Config, ListenAddr, Problem, RetryOn, MAX_REQUEST_BODY_BYTES_CEILING};

impl Config {
    /// Every problem serde cannot see, each with its field path.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut report = |field: String, message: String| problems.push(Problem { field, message });

        if self.backends.is_empty() {
            report("backends".into(), "at least one backend is required".into());
        }
        let mut backend_names = HashSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            let at = |f: &str| format!("backends[{i}].{f}");
            if let Err(e) = check_backend_name(&b.name) {
                report(at("name"), e.to_string());
            } else if !backend_names.insert(b.name.as_str()) {
                report(at("name"), format!("duplicate backend name {:?}", b.name));
            }
            if b.api_key_file.as_os_str().is_empty() {
                report(
                    at("api_key_file"),
                    "must name the file holding the key".into(),
                );
            }
            if b.connect_timeout.is_zero() {
                report(at("connect_timeout"), "must be more than 0".into());
            }
        }

        if self.models.is_empty() {
            report(
                "models".into(),
                "at least one model rule is required".into(),
            );
        }
        let mut model_names = HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let at = |f: &str| format!("models[{i}].{f}");
            if let Err(e) = check_model_name(&m.name) {
                report(at("name"), e.to_string());
            } else if !model_names.insert(m.name.as_str()) {
                report(
                    at("name"),
                    format!(
                        "duplicate model rule {:?}: only the first would ever match",
                        m.name
                    ),
                );
            }
            if !self.backends.iter().any(|b| b.name == m.backend) {
                report(
                    at("backend"),
                    format!("no backend named {:?} in `backends`", m.backend),
                );
            }
            let mut chain = vec![m.backend.as_str()];
            let hops = std::iter::once((at("upstream_model"), &m.upstream_model)).chain(
                m.fallbacks.iter().enumerate().map(|(j, f)| {
                    (
                        format!("models[{i}].fallbacks[{j}].upstream_model"),
                        &f.upstream_model,
                    )
                }),
            );
            for (field, upstream) in hops {
                if let Some(up) = upstream {
                    if let Err(e) = check_model_name(up) {
                        report(field, e.to_string());
                    } else if up.contains('*') {
                        report(field, "must be a model name, not a glob".into());
                    }
                }
            }
            for (j, f) in m.fallbacks.iter().enumerate() {
                let field = format!("models[{i}].fallbacks[{j}].backend");
                if !self.backends.iter().any(|b| b.name == f.backend) {
                    report(
                        field,
                        format!("no backend named {:?} in `backends`", f.backend),
                    );
                } else if chain.contains(&f.backend.as_str()) {
                    report(
                        field,
                        format!("{:?} is already in this model's chain: each backend is tried at most once", f.backend),
                    );
                } else {
                    chain.push(&f.backend);
                }
            }
        }
        let retry = &self.retry;
        if !(1..=10).contains(&retry.max_attempts) {
            report("retry.max_attempts".into(), "must be 1 to 10".into());
        }
        if retry.eject_after == 0 {
            report("retry.eject_after".into(), "must be at least 1".into());
        }
        if retry.ejection_time.is_zero() {
            report("retry.ejection_time".into(), "must be more than 0".into());
        }
        for (i, on) in retry.retry_on.iter().enumerate() {
            if *on == RetryOn::Status(400) {
                report(
                    format!("retry.retry_on[{i}]"),
                    "400 is never retried: another provider will not fix a bad request".into(),
                );
            }
        }

        let body = self.limits.max_request_body_bytes;
        if !(1024..=MAX_REQUEST_BODY_BYTES_CEILING).contains(&body) {
            report(
                "limits.max_request_body_bytes".into(),
                format!("{body} is outside 1024..={MAX_REQUEST_BODY_BYTES_CEILING}"),
            );
        }
        if !(1..=1_000_000).contains(&self.limits.max_concurrent_requests) {
            report(
                "limits.max_concurrent_requests".into(),
                "must be 1 to 1000000".into(),
            );
        }
        if self.extproc.message_timeout.is_some_and(|t| t.is_zero()) {
            report(
                "extproc.message_timeout".into(),
                "must be more than 0".into(),
            );
        }
        if let Some(ck) = &self.client_keys {
            if ck.file.as_os_str().is_empty() {
                report(
                    "client_keys.file".into(),
                    "must name the client keys file".into(),
                );
            }
        }
        if self.watch.poll_interval < Duration::from_millis(50) {
            report("watch.poll_interval".into(), "must be at least 50ms".into());
        }
        if let ListenAddr::Tcp(a) = &self.extproc.listen {
            if a.port() != 0
                && a.port() == self.admin.listen.port()
                && a.ip() == self.admin.listen.ip()
            {
                report(
                    "admin.listen".into(),
                    "must differ from extproc.listen".into(),
                );
            }
            if self.extproc.secret_file.is_none() && self.extproc.tls.is_none() {
                report(
                    "extproc.listen".into(),
                    format!(
                        "TCP ({a}) lets anyone who reaches the port ask for the provider keys: \
                         set extproc.secret_file (a shared secret Envoy presents on every stream) \
                         or extproc.tls (mutual TLS), or listen on a Unix socket (unix:/path)"
                    ),
                );
            }
        } else if self.extproc.tls.is_some() {
            report(
                "extproc.tls".into(),
                "TLS applies to TCP only; a Unix socket is guarded by its file mode".into(),
            );
        }
        let spend = &self.spend;
        for (field, message) in spend.limits.problems() {
            report(format!("spend.limits.{field}"), message);
        }
        for (i, price) in spend.prices.iter().enumerate() {
            let at = |f: &str| format!("spend.prices[{i}].{f}");
            if let Err(e) = check_model_name(&price.model) {
                report(at("model"), e.to_string());
            }
            for (field, value) in [
                ("input", Some(price.input)),
                ("output", Some(price.output)),
                ("cached_input", price.cached_input),
                ("cache_write", price.cache_write),
            ] {
                if value.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
                    report(
                        at(field),
                        "must be a price of 0 or more (USD per 1M tokens)".into(),
                    );
                }
            }
        }
        if spend.default_max_output_tokens == 0 {
            report(
                "spend.default_max_output_tokens".into(),
                "must be more than 0".into(),
            );
        }
        if spend.store_timeout.is_zero() {
            report("spend.store_timeout".into(), "must be more than 0".into());
        }
        if spend.price_refresh < Duration::from_secs(10) {
            report("spend.price_refresh".into(), "must be at least 10s".into());
        }
        if let Err(e) = check_backend_name(&spend.namespace) {
            report("spend.namespace".into(), e.to_string());
        }
        if let Some(tls) = &self.extproc.tls {
            if let Err(e) = check_dns_name(&tls.server_name) {
                report("extproc.tls.server_name".into(), e.to_string());
            }
        }
        problems
    }
}
