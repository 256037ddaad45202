//! OpenAI-shaped error responses the gateway sends on its own.
//!
//! Clients (the OpenAI SDKs, Kilo Code, Cline) parse
//! `{"error":{"message","type","param","code"}}` and show `message` to the
//! user, so every message says what went wrong and what to do about it.
//! Messages never contain a key: only names, paths and sizes.

use serde::Serialize;

/// An error answered by the gateway without calling a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// OpenAI's `type`: `invalid_request_error`, `server_error`, ...
    pub kind: &'static str,
    /// A stable machine-readable `code`, also used as a metrics label.
    pub code: &'static str,
    pub message: String,
    /// Response headers besides the content type (`retry-after`,
    /// `x-ratelimit-*`).
    pub headers: Vec<(String, String)>,
    /// The limit that refused the request (`requests_per_minute`, ...), for
    /// the request log line.
    pub limit: Option<&'static str>,
}

impl ApiError {
    fn new(status: u16, kind: &'static str, code: &'static str, message: String) -> Self {
        Self {
            status,
            kind,
            code,
            message,
            headers: Vec::new(),
            limit: None,
        }
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: impl Into<String>, value: String) -> Self {
        self.headers.push((name.into(), value));
        self
    }

    /// A per-minute limit reached: `kind` is OpenAI's `requests` or
    /// `tokens`.
    pub fn rate_limited(kind: &'static str, limit: &'static str, message: String) -> Self {
        Self {
            limit: Some(limit),
            ..Self::new(429, kind, "rate_limit_exceeded", message)
        }
    }

    /// A daily budget spent, as OpenAI says it.
    pub fn quota_spent(limit: &'static str, message: String) -> Self {
        Self {
            limit: Some(limit),
            ..Self::new(429, "insufficient_quota", "insufficient_quota", message)
        }
    }

    /// A model the gateway has no price for, under a budget in dollars:
    /// never served free.
    pub fn model_price_unknown(model: &str) -> Self {
        Self::new(
            403,
            "invalid_request_error",
            "model_price_unknown",
            format!("The model `{model}` has no known price, and this request is under a budget in dollars; the gateway's operator can add it to `spend.prices`."),
        )
    }

    /// The counter store cannot be reached and the gateway refuses rather
    /// than serve unmetered (`spend.on_store_error: reject`).
    pub fn spend_store_unavailable() -> Self {
        Self::new(
            503,
            "server_error",
            "spend_store_unavailable",
            "The gateway cannot check this request against its budgets right now (its counter store is unreachable); try again shortly.".into(),
        )
        .with_header("retry-after", "1".into())
    }

    pub fn invalid_body(message: String) -> Self {
        Self::new(400, "invalid_request_error", "invalid_body", message)
    }

    pub fn invalid_model(message: String) -> Self {
        Self::new(400, "invalid_request_error", "invalid_model", message)
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            "model_not_found",
            format!("The model `{model}` is not served by this gateway. GET /v1/models lists the models it routes."),
        )
    }

    pub fn unknown_path(method: &str, path: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            "unknown_url",
            format!("Unknown request URL: {method} {path}. The gateway serves /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses, /v1/messages and /v1/models."),
        )
    }

    pub fn method_not_allowed(method: &str, path: &str, allowed: &str) -> Self {
        Self::new(
            405,
            "invalid_request_error",
            "method_not_allowed",
            format!("{method} is not allowed on {path}; use {allowed}."),
        )
    }

    pub fn invalid_api_key() -> Self {
        Self::new(
            401,
            "invalid_request_error",
            "invalid_api_key",
            "Missing or unknown API key for this gateway. Send the key its operator gave you as `Authorization: Bearer <key>`.".into(),
        )
    }

    pub fn model_not_allowed(model: &str) -> Self {
        Self::new(
            403,
            "invalid_request_error",
            "model_not_allowed",
            format!("This API key may not use the model `{model}`."),
        )
    }

    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            413,
            "invalid_request_error",
            "request_too_large",
            too_large_message(limit),
        )
    }

    pub fn key_unavailable(backend: &str) -> Self {
        Self::new(
            503,
            "server_error",
            "backend_key_unavailable",
            format!("The gateway has no API key loaded for backend `{backend}`; its operator must provide the key file. See the gateway's logs."),
        )
    }

    /// An attempt on a fallback chain that the processor cannot match to a
    /// request it routed (it restarted in between, or the attempt is not
    /// Envoy's): refused without a key.
    pub fn chain_lost() -> Self {
        Self::new(
            503,
            "server_error",
            "gateway_attempt_unknown",
            "The gateway lost track of this request between its attempts (its external processor restarted?); try again.".to_string(),
        )
    }

    /// A state the gateway's own logic rules out; refused rather than
    /// guessed at (fail closed).
    pub fn internal(what: &str) -> Self {
        tracing::error!("internal inconsistency: {what}; the request was refused");
        Self::new(
            500,
            "server_error",
            "gateway_internal_error",
            "The gateway could not route this request (an internal inconsistency, logged); try again.".to_string(),
        )
    }

    /// The response body.
    pub fn to_json(&self) -> Vec<u8> {
        error_json(&self.message, self.kind, self.code)
    }
}

/// The message of a 413. Envoy answers oversized chunked bodies itself, and
/// the rendered Envoy config must give the same text, so it is shared.
pub fn too_large_message(limit: usize) -> String {
    format!("The request body is larger than this gateway's limit of {limit} bytes.")
}

/// Serializes one OpenAI error object.
pub fn error_json(message: &str, kind: &str, code: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct Body<'a> {
        error: Inner<'a>,
    }
    #[derive(Serialize)]
    struct Inner<'a> {
        message: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
        param: Option<&'a str>,
        code: &'a str,
    }
    let body = Body {
        error: Inner {
            message,
            kind,
            param: None,
            code,
        },
    };
    // Serializing plain strings into a Vec cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_is_openai() {
        let e = ApiError::model_not_found("no\"pe");
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert!(v["error"]["param"].is_null());
        assert!(v["error"]["message"].as_str().unwrap().contains("no\"pe"));
        assert_eq!(e.status, 404);
    }
}
