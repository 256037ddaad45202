//! One HTTP exchange as the processor sees it: request headers, request
//! body, response headers. Holds the per-request state between those phases
//! and decides, at each, whether to forward (and how) or to answer itself.
//!
//! Envoy's processing mode for the filter (rendered by `envoy_config`):
//! request headers SEND, request body BUFFERED, response headers SEND,
//! everything else off. So a POST is seen as its headers, then its whole
//! body in one message; a GET as its headers only.
//!
//! Security rules enforced here, on every request that is forwarded:
//! - the client's credentials and gateway-internal headers are removed;
//! - the routing header and `Authorization` are set by the gateway, with
//!   `clear_route_cache`, so Envoy routes on what the gateway decided;
//! - a request that cannot be routed gets an immediate error, never a pass.

use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use tonic::Status;

use super::headers::{header, response_status, RequestHead};
use super::reply::{self, set_header, Changes};
use super::{BACKEND_HEADER, MODEL_HEADER};
use crate::openai::error::ApiError;
use crate::openai::request::{rewrite_model, summarize};
use crate::openai::{models, Endpoint};
use crate::routes::Backend;
use crate::secret::ApiKey;
use crate::state::{GatewayState, Snapshot};

/// The per-request state machine.
pub struct Exchange {
    state: Arc<GatewayState>,
    /// The configuration this request is served under, from start to end.
    snapshot: Arc<Snapshot>,
    head: RequestHead,
    endpoint: Option<Endpoint>,
    /// Body chunks, kept only if Envoy sends the body in several messages.
    body: Vec<u8>,
    /// Set once the request is forwarded: whom it went to.
    forwarded: Option<Forwarded>,
}

struct Forwarded {
    backend: Arc<Backend>,
    model: Option<String>,
}

impl Exchange {
    pub fn new(state: Arc<GatewayState>) -> Self {
        let snapshot = state.snapshot();
        Self {
            state,
            snapshot,
            head: RequestHead::default(),
            endpoint: None,
            body: Vec::new(),
            forwarded: None,
        }
    }

    /// Answers one message from Envoy. Every message gets exactly one answer.
    pub fn on_message(&mut self, message: ProcessingRequest) -> Result<ProcessingResponse, Status> {
        Ok(match message.request {
            Some(Request::RequestHeaders(h)) => self.on_request_headers(h),
            Some(Request::RequestBody(b)) => self.on_request_body(b),
            Some(Request::ResponseHeaders(h)) => self.on_response_headers(&h),
            // Not requested by the shipped configuration; pass them through
            // unchanged should an operator's configuration send them.
            Some(Request::ResponseBody(_)) => reply::response_body(Changes::default()),
            Some(Request::RequestTrailers(_)) | Some(Request::ResponseTrailers(_)) => {
                return Err(Status::failed_precondition(
                    "ai-gateway-extproc does not process trailers; set the trailer modes to SKIP",
                ))
            }
            None => {
                return Err(Status::invalid_argument(
                    "ProcessingRequest without a request",
                ))
            }
        })
    }

    fn on_request_headers(&mut self, h: HttpHeaders) -> ProcessingResponse {
        self.head = RequestHead::from_headers(h.headers.as_ref());
        let Some(endpoint) = Endpoint::from_path(&self.head.path) else {
            return self.reject(ApiError::unknown_path(&self.head.method, &self.head.path));
        };
        self.endpoint = Some(endpoint);
        if self.head.method != endpoint.method() {
            return self.reject(ApiError::method_not_allowed(
                &self.head.method,
                &self.head.path,
                endpoint.method(),
            ));
        }
        if !endpoint.has_model_body() {
            return self.answer_model_listing(endpoint);
        }
        if h.end_of_stream {
            return self.reject(ApiError::invalid_body(
                "The request has no body; send a JSON object with a `model` field.".into(),
            ));
        }
        let limit = self.snapshot.max_request_body_bytes;
        if self
            .head
            .content_length
            .is_some_and(|len| len > limit as u64)
        {
            return self.reject(ApiError::body_too_large(limit));
        }
        // Strip client credentials now; routing waits for the body.
        reply::request_headers(Changes {
            remove: std::mem::take(&mut self.head.to_remove),
            ..Changes::default()
        })
    }

    fn on_request_body(&mut self, chunk: HttpBody) -> ProcessingResponse {
        let limit = self.snapshot.max_request_body_bytes;
        if self.body.len() + chunk.body.len() > limit {
            return self.reject(ApiError::body_too_large(limit));
        }
        if !chunk.end_of_stream {
            self.body.extend_from_slice(&chunk.body);
            return reply::request_body(Changes::default());
        }
        let body = if self.body.is_empty() {
            chunk.body
        } else {
            let mut all = std::mem::take(&mut self.body);
            all.extend_from_slice(&chunk.body);
            all
        };

        let summary = match summarize(&body) {
            Ok(s) => s,
            Err(e) if e.is_model_error() => {
                return self.reject(ApiError::invalid_model(e.to_string()))
            }
            Err(e) => return self.reject(ApiError::invalid_body(e.to_string())),
        };
        let snapshot = Arc::clone(&self.snapshot);
        let Some(route) = snapshot.routes.resolve(&summary.model) else {
            return self.reject(ApiError::model_not_found(&summary.model));
        };
        let Some(key) = self.state.keys.get(&route.backend.api_key_file) else {
            return self.reject(ApiError::key_unavailable(&route.backend.name));
        };

        let mut changes = routing_changes(&route.backend, Some(&summary.model), &key);
        if let Some(upstream) = route
            .upstream_model
            .as_deref()
            .filter(|u| **u != *summary.model)
        {
            let rewritten = rewrite_model(&body, &summary.model_span, upstream);
            changes.set.push(set_header(
                "content-length",
                rewritten.len().to_string().as_bytes(),
            ));
            changes.body = Some(rewritten);
        }
        tracing::debug!(
            request_id = %self.head.request_id,
            model = %summary.model,
            upstream_model = route.upstream_model.as_deref().unwrap_or(&summary.model),
            backend = %route.backend.name,
            stream = summary.stream,
            "routing request"
        );
        self.forwarded = Some(Forwarded {
            backend: Arc::clone(&route.backend),
            model: Some(summary.model.into_owned()),
        });
        self.count("routed");
        reply::request_body(changes)
    }

    /// `GET /v1/models[/{id}]`: the catch-all backend's own answer if there
    /// is one (clients such as Kilo Code read the provider's extra fields),
    /// otherwise the gateway's list of the models it routes.
    fn answer_model_listing(&mut self, endpoint: Endpoint) -> ProcessingResponse {
        let snapshot = Arc::clone(&self.snapshot);
        if let Some(backend) = snapshot.routes.catch_all_backend() {
            let Some(key) = self.state.keys.get(&backend.api_key_file) else {
                return self.reject(ApiError::key_unavailable(&backend.name));
            };
            let mut changes = routing_changes(backend, None, &key);
            changes.remove = std::mem::take(&mut self.head.to_remove);
            self.forwarded = Some(Forwarded {
                backend: Arc::clone(backend),
                model: None,
            });
            self.count("routed");
            return reply::request_headers(changes);
        }
        let body = match endpoint {
            Endpoint::Model => {
                let id = &self.head.path["/v1/models/".len()..];
                if !snapshot.routes.is_listed(id) {
                    return self.reject(ApiError::model_not_found(id));
                }
                models::model_json(id)
            }
            _ => snapshot.model_list_json.clone(),
        };
        self.count("answered");
        reply::immediate(200, body, "application/json", "ai_gateway_model_list")
    }

    fn on_response_headers(&mut self, h: &HttpHeaders) -> ProcessingResponse {
        if let (Some(status), Some(fwd)) = (response_status(h.headers.as_ref()), &self.forwarded) {
            if status >= 400 {
                let retry_after =
                    header(h.headers.as_ref(), "retry-after").map(String::from_utf8_lossy);
                self.log_upstream_error(fwd, status, retry_after.as_deref());
            }
        }
        reply::response_headers(Changes::default())
    }

    /// One clear line per upstream error, saying what the operator can do.
    fn log_upstream_error(&self, fwd: &Forwarded, status: u16, retry_after: Option<&str>) {
        let backend = &*fwd.backend.name;
        let model = fwd.model.as_deref().unwrap_or("-");
        let request_id = &self.head.request_id;
        let status_label = status.to_string();
        self.state
            .metrics
            .upstream_errors
            .with_label_values(&[backend, status_label.as_str()])
            .inc();
        match status {
            401 | 403 => tracing::error!(
                request_id, backend, model, status,
                key_file = %fwd.backend.api_key_file.display(),
                "backend {backend} rejected the API key read from {}: put a valid key in that file (it is reloaded without restart)",
                fwd.backend.api_key_file.display()
            ),
            429 => tracing::warn!(
                request_id, backend, model, status,
                retry_after = retry_after.unwrap_or("-"),
                "backend {backend} rate-limited the request; the client is told when to retry (Retry-After: {})",
                retry_after.unwrap_or("not given")
            ),
            500..=599 => tracing::warn!(
                request_id, backend, model, status,
                "backend {backend} answered {status}: the provider is failing or unreachable (Envoy also answers 503 when it cannot connect)"
            ),
            _ => tracing::info!(request_id, backend, model, status, "backend {backend} refused the request with {status}"),
        }
    }

    fn reject(&mut self, error: ApiError) -> ProcessingResponse {
        tracing::debug!(
            request_id = %self.head.request_id,
            method = %self.head.method,
            path = %self.head.path,
            status = error.status,
            code = error.code,
            "request answered by the gateway"
        );
        self.count(error.code);
        reply::error(&error)
    }

    fn count(&self, outcome: &str) {
        let endpoint = self.endpoint.map_or("unknown", Endpoint::label);
        self.state
            .metrics
            .requests
            .with_label_values(&[endpoint, outcome])
            .inc();
    }
}

/// The header changes that send a request to `backend` with its key.
fn routing_changes(backend: &Backend, model: Option<&str>, key: &ApiKey) -> Changes {
    let mut set = vec![
        set_header(BACKEND_HEADER, backend.name.as_bytes()),
        set_header("authorization", key.authorization().as_bytes()),
    ];
    if let Some(model) = model {
        set.push(set_header(MODEL_HEADER, model.as_bytes()));
    }
    Changes {
        set,
        reroute: true,
        ..Changes::default()
    }
}
