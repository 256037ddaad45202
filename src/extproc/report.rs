//! What is recorded when an exchange ends: one log line, the metrics, and
//! (with `envoy.usage_metadata`) the route and token counts as Envoy
//! dynamic metadata (namespace [`METADATA_NAMESPACE`]), where Envoy's
//! access log and other filters can read them.

use std::time::Duration;

use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};

use crate::metrics::{GenAiExchange, Metrics};
use crate::openai::usage::{Observed, TokenUsage};
use crate::openai::Endpoint;
use crate::outcome::Outcome;

/// The dynamic metadata namespace the gateway writes in Envoy.
pub const METADATA_NAMESPACE: &str = "io.envoy.ai_gateway";

/// Everything known about an exchange when it ends.
pub struct Completion<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    /// The gateway key's name, when clients present keys.
    pub client: Option<&'a str>,
    pub endpoint: Option<Endpoint>,
    pub backend: Option<&'a str>,
    /// The attempts of a request on a fallback chain (`tars:429 other:200`).
    pub attempts: Option<&'a str>,
    pub model: Option<&'a str>,
    pub stream: bool,
    pub status: Option<u16>,
    /// The gateway's own error code, when it refused the request.
    pub error: Option<&'static str>,
    /// The budget or rate limit that refused it.
    pub limit: Option<&'static str>,
    pub outcome: Outcome,
    pub observed: Option<&'a Observed>,
    pub duration: Duration,
    pub time_to_first_byte: Option<Duration>,
}

/// Logs the request line and records the metrics.
pub fn record(metrics: &Metrics, c: &Completion<'_>) {
    let usage = c.observed.map(|o| o.usage).unwrap_or_default();
    let response_model = c.observed.and_then(|o| o.model.as_deref());
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    // Metrics first: whoever sees the log line sees the metrics too.
    metrics.record_request(c.endpoint, c.outcome, c.error);
    if let (true, Some(backend), Some(endpoint)) = (c.outcome.forwarded(), c.backend, c.endpoint) {
        metrics.record_exchange(&GenAiExchange {
            request_model: c.model.unwrap_or("-"),
            response_model,
            backend,
            endpoint,
            outcome: c.outcome,
            stream: c.stream,
            duration: c.duration,
            time_to_first_byte: c.time_to_first_byte,
            usage,
        });
    }
    tracing::info!(
        request_id = c.request_id,
        method = c.method,
        path = c.path,
        client = c.client.unwrap_or("-"),
        model = c.model.unwrap_or("-"),
        response_model = response_model.unwrap_or("-"),
        backend = c.backend.unwrap_or("-"),
        attempts = c.attempts.unwrap_or("-"),
        status = c.status.unwrap_or(0),
        error = c.error.unwrap_or("-"),
        limit = c.limit.unwrap_or("-"),
        outcome = c.outcome.label(),
        stream = c.stream,
        input_tokens = usage.input,
        output_tokens = usage.output,
        cached_input_tokens = usage.cached_input,
        reasoning_tokens = usage.reasoning,
        duration_ms = ms(c.duration),
        ttfb_ms = c.time_to_first_byte.map(ms),
        "request"
    );
}

/// Dynamic metadata with the route and the token counts, set once per
/// request: when a successful response ends, or with the headers of a
/// failed one. Each write costs Envoy's worker a protobuf merge.
pub fn response_metadata(backend: &str, model: Option<&str>, observed: &Observed) -> Struct {
    let TokenUsage {
        input,
        output,
        cached_input,
        reasoning,
        ..
    } = observed.usage;
    let mut fields = vec![("backend", string(backend))];
    if let Some(m) = model {
        fields.push(("model", string(m)));
    }
    for (key, value) in [
        ("input_tokens", input),
        ("output_tokens", output),
        ("total_tokens", observed.usage.total()),
        ("cached_input_tokens", cached_input),
        ("reasoning_tokens", reasoning),
    ] {
        if let Some(n) = value {
            fields.push((key, number(n)));
        }
    }
    if let Some(m) = &observed.model {
        fields.push(("response_model", string(m)));
    }
    namespaced(fields)
}

/// Dynamic metadata with string fields.
pub fn metadata(fields: &[(&str, &str)]) -> Struct {
    namespaced(fields.iter().map(|(k, v)| (*k, string(v))).collect())
}

fn namespaced(fields: Vec<(&str, Value)>) -> Struct {
    let inner = Struct {
        fields: fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    };
    Struct {
        fields: [(
            METADATA_NAMESPACE.to_string(),
            Value {
                kind: Some(Kind::StructValue(inner)),
            },
        )]
        .into(),
    }
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn number(n: u64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n as f64)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one metadata write carries the route as well as the counts.
    #[test]
    fn response_metadata_names_the_route_and_the_counts() {
        let observed = Observed {
            model: Some("gpt-4o-mini-2024-07-18".into()),
            usage: TokenUsage {
                input: Some(9),
                output: Some(4),
                ..TokenUsage::default()
            },
        };
        let metadata = response_metadata("tars", Some("gpt-4o-mini"), &observed);
        let Some(Kind::StructValue(inner)) = metadata.fields[METADATA_NAMESPACE].kind.clone()
        else {
            panic!("no {METADATA_NAMESPACE} struct: {metadata:?}");
        };
        let field = |k: &str| inner.fields.get(k).and_then(|v| v.kind.clone());
        assert_eq!(field("backend"), Some(Kind::StringValue("tars".into())));
        assert_eq!(
            field("model"),
            Some(Kind::StringValue("gpt-4o-mini".into()))
        );
        assert_eq!(
            field("response_model"),
            Some(Kind::StringValue("gpt-4o-mini-2024-07-18".into()))
        );
        assert_eq!(field("input_tokens"), Some(Kind::NumberValue(9.0)));
        assert_eq!(field("total_tokens"), Some(Kind::NumberValue(13.0)));
        assert_eq!(field("reasoning_tokens"), None);
    }
}
