//! One HTTP exchange as the processor sees it: request headers, request
//! body, response headers, response body. Holds the per-request state
//! between those phases and decides, at each, whether to forward (and how)
//! or to answer itself.
//!
//! Envoy's processing mode for the filter (rendered by `envoy_config`):
//! request headers SEND, request body BUFFERED, response headers SEND,
//! response body STREAMED (sent without waiting for the headers' answer).
//! So a POST is seen as its headers, then its whole body in one message; a
//! GET as its headers only; a response as its headers, then its body chunk
//! by chunk as it passes (a successful inference body is read for usage;
//! no body is ever held back or changed).
//!
//! Security rules enforced here, on every request that is forwarded:
//! - the client's credentials and gateway-internal headers are removed;
//! - the routing header and `Authorization` are set by the gateway, with
//!   `clear_route_cache`, so Envoy routes on what the gateway decided;
//! - a request that cannot be routed gets an immediate error, never a pass.

use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use tonic::Status;

use super::headers::{header, response_status, RequestHead};
use super::order::{Message, StreamOrder};
use super::reply::{self, set_header, Changes};
use super::report::{self, Completion, Outcome};
use super::{BACKEND_HEADER, MODEL_HEADER};
use crate::client_keys::ClientKey;
use crate::metrics::Phase;
use crate::openai::error::ApiError;
use crate::openai::request::{rewrite_model, summarize};
use crate::openai::response::{ResponseReader, Unreadable};
use crate::openai::usage::Observed;
use crate::openai::{models, Endpoint};
use crate::provider_keys::ApiKey;
use crate::routes::Backend;
use crate::state::{GatewayState, Snapshot};

/// The per-request state machine.
pub struct Exchange {
    state: Arc<GatewayState>,
    order: StreamOrder,
    /// The configuration this request is served under, from start to end.
    snapshot: Arc<Snapshot>,
    started: Instant,
    head: RequestHead,
    endpoint: Option<Endpoint>,
    /// Set once the request is forwarded: whom it went to.
    forwarded: Option<Forwarded>,
    response: Option<ResponseSeen>,
    /// Set when the gateway answered itself.
    answered: Option<(u16, Option<&'static str>)>,
    /// The gateway key the client presented, when access control is on.
    client: Option<Arc<ClientKey>>,
    /// The request line was logged and metrics recorded.
    reported: bool,
}

struct Forwarded {
    backend: Arc<Backend>,
    model: Option<String>,
    stream: bool,
}

struct ResponseSeen {
    status: u16,
    /// Present while a successful body is being read.
    reader: Option<ResponseReader>,
    first_byte: Option<Instant>,
    /// What the finished body told; `Some` once the body ended.
    observed: Option<Observed>,
}

/// The kind of a message, and its end-of-stream flag.
fn kind_of(message: &ProcessingRequest) -> Option<(Message, bool)> {
    Some(match message.request.as_ref()? {
        Request::RequestHeaders(h) => (Message::RequestHeaders, h.end_of_stream),
        Request::RequestBody(b) => (Message::RequestBody, b.end_of_stream),
        Request::RequestTrailers(_) => (Message::RequestTrailers, true),
        Request::ResponseHeaders(h) => (Message::ResponseHeaders, h.end_of_stream),
        Request::ResponseBody(b) => (Message::ResponseBody, b.end_of_stream),
        Request::ResponseTrailers(_) => (Message::ResponseTrailers, true),
    })
}

/// The phase a message belongs to, for the per-phase timing metric.
fn phase_of(kind: Message) -> Phase {
    match kind {
        Message::RequestHeaders => Phase::RequestHeaders,
        Message::RequestBody => Phase::RequestBody,
        Message::ResponseHeaders => Phase::ResponseHeaders,
        Message::ResponseBody => Phase::ResponseBody,
        Message::RequestTrailers | Message::ResponseTrailers => Phase::Other,
    }
}

impl Exchange {
    pub fn new(state: Arc<GatewayState>) -> Self {
        let snapshot = state.snapshot();
        Self {
            state,
            order: StreamOrder::default(),
            snapshot,
            started: Instant::now(),
            head: RequestHead::default(),
            endpoint: None,
            forwarded: None,
            response: None,
            answered: None,
            client: None,
            reported: false,
        }
    }

    /// Answers one message from Envoy: exactly one answer per message, or a
    /// gRPC error (which ends the stream; Envoy fails the request closed)
    /// for a message out of order.
    pub fn on_message(&mut self, message: ProcessingRequest) -> Result<ProcessingResponse, Status> {
        let started = Instant::now();
        let Some((kind, end_of_stream)) = kind_of(&message) else {
            return Err(Status::invalid_argument(
                "ProcessingRequest without a request",
            ));
        };
        if let Err(e) = self.order.accept(kind, end_of_stream) {
            tracing::warn!(request_id = %self.head.request_id, "{e}");
            return Err(Status::failed_precondition(e.to_string()));
        }
        let answer = match message.request {
            Some(Request::RequestHeaders(h)) => self.on_request_headers(h),
            Some(Request::RequestBody(b)) => self.on_request_body(b),
            Some(Request::ResponseHeaders(h)) => self.on_response_headers(&h),
            Some(Request::ResponseBody(b)) => self.on_response_body(&b),
            // Trailers are never asked for, so `accept` refused them.
            _ => return Err(Status::failed_precondition("trailers are not processed")),
        };
        self.state
            .metrics
            .phases
            .observe(phase_of(kind), started.elapsed().as_secs_f64());
        Ok(answer)
    }

    fn on_request_headers(&mut self, h: HttpHeaders) -> ProcessingResponse {
        self.head = RequestHead::from_headers(h.headers.as_ref());
        // Access first: without a valid gateway key, nothing else is said.
        if let Some(keys) = self.state.client_keys.current().as_ref() {
            let presented = self.head.credential.take().unwrap_or_default();
            match keys.authorize(&presented) {
                Some(key) => self.client = Some(key),
                None => return self.reject(ApiError::invalid_api_key()),
            }
        }
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
        reply::request_headers(self.client_hygiene(Changes::default()))
    }

    /// Adds what every forwarded request loses: the client's credential
    /// headers, the internal headers it sent, credential query parameters.
    fn client_hygiene(&mut self, mut changes: Changes) -> Changes {
        changes.remove = std::mem::take(&mut self.head.to_remove);
        if let Some(path) = self.head.path_without_credentials() {
            changes.set.push(set_header(":path", path.as_bytes()));
        }
        changes
    }

    fn on_request_body(&mut self, chunk: HttpBody) -> ProcessingResponse {
        if !self.endpoint.is_some_and(Endpoint::has_model_body) {
            // A GET routes by its path, decided with its headers; a body it
            // carries is passed along unread and changes nothing.
            return reply::request_body(Changes::default());
        }
        // BUFFERED: this one message is the whole body (its `end_of_stream`
        // is false when HTTP/2 trailers follow; see `order`).
        let limit = self.snapshot.max_request_body_bytes;
        if chunk.body.len() > limit {
            return self.reject(ApiError::body_too_large(limit));
        }
        let body = chunk.body;

        let summary = match summarize(&body) {
            Ok(s) => s,
            Err(e) if e.is_model_error() => {
                return self.reject(ApiError::invalid_model(e.to_string()))
            }
            Err(e) => return self.reject(ApiError::invalid_body(e.to_string())),
        };
        if self
            .client
            .as_ref()
            .is_some_and(|c| !c.allows(&summary.model))
        {
            return self.reject(ApiError::model_not_allowed(&summary.model));
        }
        let snapshot = Arc::clone(&self.snapshot);
        let Some(route) = snapshot.routes.resolve(&summary.model) else {
            return self.reject(ApiError::model_not_found(&summary.model));
        };
        let Some(key) = self.state.provider_keys.get(&route.backend.name) else {
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
        self.count("routed", "");
        self.forwarded = Some(Forwarded {
            backend: Arc::clone(&route.backend),
            model: Some(summary.model.into_owned()),
            stream: summary.stream,
        });
        reply::request_body(changes)
    }

    /// `GET /v1/models[/{id}]`: the catch-all backend's own answer if there
    /// is one (clients such as Kilo Code read the provider's extra fields),
    /// otherwise the gateway's list of the models it routes.
    fn answer_model_listing(&mut self, endpoint: Endpoint) -> ProcessingResponse {
        let snapshot = Arc::clone(&self.snapshot);
        if endpoint == Endpoint::Model {
            let id = &self.head.path["/v1/models/".len()..];
            if id.contains('%') {
                // The provider may decode `%2F` into a path separator (or
                // not): the gateway cannot know which model it would read.
                return self.reject(ApiError::invalid_model(
                    "The model id in the path must not be percent-encoded; send it as it is (e.g. /v1/models/xai/grok-4.5).".into(),
                ));
            }
            if let Err(m) = crate::config::check_model_name(id) {
                return self.reject(ApiError::invalid_model(format!(
                    "The model id in the path {m}."
                )));
            }
        }
        if let Some(backend) = snapshot.routes.catch_all_backend() {
            let Some(key) = self.state.provider_keys.get(&backend.name) else {
                return self.reject(ApiError::key_unavailable(&backend.name));
            };
            let changes = self.client_hygiene(routing_changes(backend, None, &key));
            self.forwarded = Some(Forwarded {
                backend: Arc::clone(backend),
                model: None,
                stream: false,
            });
            self.count("routed", "");
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
        self.count("answered", "");
        self.answered = Some((200, None));
        self.order.answered();
        self.report(Outcome::Answered);
        reply::immediate(200, body, "application/json", "ai_gateway_model_list")
    }

    fn on_response_headers(&mut self, h: &HttpHeaders) -> ProcessingResponse {
        let headers = h.headers.as_ref();
        let status = response_status(headers).unwrap_or(0);
        let Some(fwd) = &self.forwarded else {
            return reply::response_headers(Changes::default());
        };
        let failed = status >= 400;
        let metadata = failed.then(|| {
            let retry_after = header(headers, "retry-after").map(String::from_utf8_lossy);
            self.log_upstream_error(fwd, status, retry_after.as_deref());
            // The one metadata write of a failed request: the access log
            // names its backend and model.
            report::response_metadata(
                &fwd.backend.name,
                fwd.model.as_deref(),
                &Observed::default(),
            )
        });
        // Only inference responses carry usage; a model list is left alone.
        let read_body = (200..300).contains(&status)
            && !h.end_of_stream
            && self.endpoint.is_some_and(Endpoint::has_model_body);
        self.response = Some(ResponseSeen {
            status,
            reader: read_body.then(|| {
                ResponseReader::new(
                    header(headers, "content-type"),
                    header(headers, "content-encoding"),
                )
            }),
            first_byte: None,
            observed: None,
        });
        if let Some(metadata) = metadata {
            return reply::with_metadata(reply::response_headers(Changes::default()), metadata);
        }
        if !read_body {
            return reply::response_headers(Changes::default());
        }
        // Envoy sends the body in chunks (STREAMED, without waiting for this
        // answer). `content-length` goes: the body is streamed through, and
        // a stale length would cut it.
        reply::response_headers(Changes {
            remove: vec!["content-length".into()],
            ..Changes::default()
        })
    }

    fn on_response_body(&mut self, chunk: &HttpBody) -> ProcessingResponse {
        let Some(response) = self.response.as_mut() else {
            return reply::response_body(Changes::default());
        };
        if response.first_byte.is_none() && !chunk.body.is_empty() {
            response.first_byte = Some(Instant::now());
        }
        if let Some(reader) = response.reader.as_mut() {
            reader.push(&chunk.body);
        }
        if !chunk.end_of_stream {
            return reply::response_body(Changes::default());
        }
        // A body the gateway does not read (an error, a model list) passes
        // as it is; the exchange is reported when Envoy closes the stream.
        let Some(reader) = response.reader.take() else {
            return reply::response_body(Changes::default());
        };
        let Some(fwd) = self.forwarded.as_ref() else {
            return reply::response_body(Changes::default());
        };
        let backend = &*fwd.backend.name;
        let observed = match reader.finish() {
            Ok(o) => {
                if o.usage.is_empty() {
                    self.usage_unavailable(backend, "not_reported");
                }
                o
            }
            Err(e) => {
                self.usage_unavailable(
                    backend,
                    match e {
                        Unreadable::Encoding => "encoding",
                        Unreadable::Corrupt => "corrupt",
                    },
                );
                Observed::default()
            }
        };
        let metadata = report::response_metadata(backend, fwd.model.as_deref(), &observed);
        if let Some(r) = self.response.as_mut() {
            r.observed = Some(observed);
        }
        self.report(Outcome::Success);
        reply::with_metadata(reply::response_body(Changes::default()), metadata)
    }

    fn usage_unavailable(&self, backend: &str, reason: &str) {
        self.state
            .metrics
            .usage_unavailable
            .with_label_values(&[backend, reason])
            .inc();
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
        self.count("rejected", error.code);
        self.answered = Some((error.status, Some(error.code)));
        self.order.answered();
        self.report(Outcome::Answered);
        reply::error(&error)
    }

    fn count(&self, outcome: &str, error: &str) {
        let endpoint = self.endpoint.map_or("unknown", Endpoint::label);
        self.state
            .metrics
            .requests
            .with_label_values(&[endpoint, outcome, error])
            .inc();
    }

    /// Logs the request line and records metrics, once per exchange.
    fn report(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.reported, true) {
            return;
        }
        let fwd = self.forwarded.as_ref();
        let response = self.response.as_ref();
        let (status, error) = match (self.answered, response) {
            (Some((status, error)), _) => (Some(status), error),
            (None, Some(r)) => (Some(r.status), None),
            (None, None) => (None, None),
        };
        report::record(
            &self.state.metrics,
            &Completion {
                request_id: &self.head.request_id,
                method: &self.head.method,
                path: &self.head.path,
                client: self.client.as_ref().map(|c| c.name.as_str()),
                endpoint: self.endpoint,
                backend: fwd.map(|f| &*f.backend.name),
                model: fwd.and_then(|f| f.model.as_deref()),
                stream: fwd.is_some_and(|f| f.stream),
                status,
                error,
                outcome,
                observed: response.and_then(|r| r.observed.as_ref()),
                duration: self.started.elapsed(),
                time_to_first_byte: response
                    .and_then(|r| r.first_byte)
                    .map(|t| t - self.started),
            },
        );
    }
}

impl Drop for Exchange {
    /// Envoy closes the stream when the HTTP exchange is over: what has not
    /// been reported yet is reported now, with how it ended.
    fn drop(&mut self) {
        if self.reported || !self.order.started() {
            return;
        }
        let outcome = match &self.response {
            Some(r) if r.status >= 400 => Outcome::UpstreamError,
            // The body was being read and never ended: cut short.
            Some(r) if r.reader.is_some() => Outcome::Cancelled,
            Some(_) => Outcome::Success,
            None => Outcome::Cancelled,
        };
        self.report(outcome);
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
