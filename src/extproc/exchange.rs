//! One HTTP exchange as the processor sees it: request headers, request
//! body, response headers, response body. The exchange keeps the state
//! between those phases and orchestrates: the `decision` says what to do,
//! `reply` says it in Envoy's terms, `report` records the end.
//!
//! Envoy's processing mode for the filter (rendered by `envoy_config`):
//! request headers SEND, request body BUFFERED, response headers SEND,
//! response body STREAMED (sent without waiting for the headers' answer).
//! So a POST is seen as its headers, then its whole body in one message; a
//! GET as its headers only; a response as its headers, then its body chunk
//! by chunk as it passes (a successful inference body is read for usage;
//! no body is ever held back or changed).
//!
//! A model on a fallback chain is routed to the chain, without a key: the
//! exchange leaves what the attempts need in `chains`, and each attempt
//! gets its key from the attempt pass (`attempt`). When the response
//! begins, the attempts are over, and the backend that answered is the one
//! usage, spend and metrics are counted for.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, ProcessingRequest, ProcessingResponse,
};
use envoy_types::pb::google::protobuf::Struct;
use tonic::Status;

use super::chains::ChainRequest;
use super::headers::{request_head, HeaderList};
use super::inbound::Inbound;
use super::order::{Message, StreamOrder};
use super::reply::{self, Changes, Destination};
use super::report::{self, Completion};
use crate::decision::{self, Admitted, Answer, Forward, HeadDecision, RequestHead, Target};
use crate::metrics::Phase;
use crate::openai::error::ApiError;
use crate::openai::response::ResponseReader;
use crate::openai::usage::{Observed, UsageGap};
use crate::openai::Endpoint;
use crate::outcome::Outcome;
use crate::routes::Backend;
use crate::spend::{Reservation, Settled, Settlement, SpendRequest};
use crate::state::{GatewayState, Snapshot};

/// The per-request state machine.
pub struct Exchange {
    state: Arc<GatewayState>,
    /// The configuration this request is served under, from start to end.
    snapshot: Arc<Snapshot>,
    order: StreamOrder,
    started: Instant,
    head: RequestHead,
    /// Set once the head checks passed.
    admitted: Option<Admitted>,
    /// The path as it goes upstream, when it differs from the client's
    /// (a credential taken out of the query).
    upstream_path: Option<String>,
    /// Set once the request is forwarded: whom it went to.
    forwarded: Option<Forwarded>,
    response: Option<ResponseSeen>,
    /// Set when the gateway answered itself.
    own_answer: Option<OwnAnswer>,
    /// When the gateway gave its last answer: the response's end, or its
    /// own answer. The exchange is reported later, when the stream closes
    /// (see `Drop`), so that the report never delays an answer.
    finished: Option<Instant>,
}

struct Forwarded {
    /// The backend that answers: the route's, or on a chain the one whose
    /// attempt answered last.
    backend: Arc<Backend>,
    /// The request's fallback chain, with the id its attempts carry.
    chain: Option<(Box<str>, Arc<ChainRequest>)>,
    model: Option<Box<str>>,
    stream: bool,
    /// Where spend control is with it; `None` when nothing is metered.
    spend: Option<Metered>,
}

/// A metered request's spend: reserved at admission, then settled once
/// (how the request ended), then published when the stream closes.
enum Metered {
    Reserved(Reservation),
    /// The store is corrected; the metrics wait for the stream's close.
    Settled(Settled),
}

/// The gateway's own answer to a request.
#[derive(Clone, Copy)]
enum OwnAnswer {
    /// An OpenAI-shaped error; `limit` when a budget or rate limit refused.
    Refused {
        status: u16,
        code: &'static str,
        limit: Option<&'static str>,
    },
    /// Its own model list.
    Models,
}

struct ResponseSeen {
    status: u16,
    /// Present while a successful body is being read.
    reader: Option<ResponseReader>,
    first_byte: Option<Instant>,
    /// What the finished body told.
    observed: Option<Observed>,
    /// The response has ended (its last message was seen).
    ended: bool,
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
            snapshot,
            order: StreamOrder::default(),
            started: Instant::now(),
            head: RequestHead::default(),
            admitted: None,
            upstream_path: None,
            forwarded: None,
            response: None,
            own_answer: None,
            finished: None,
        }
    }

    /// Answers one message from Envoy: exactly one answer per message, or a
    /// gRPC error (which ends the stream; Envoy fails the request closed)
    /// for a message out of order.
    pub async fn on_message(&mut self, inbound: Inbound) -> Result<ProcessingResponse, Status> {
        let Inbound {
            message,
            body,
            headers,
        } = inbound;
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
            Some(Request::RequestHeaders(_)) => self.on_request_headers(&headers, end_of_stream),
            Some(Request::RequestBody(_)) => self.on_request_body(body).await,
            Some(Request::ResponseHeaders(_)) => self.on_response_headers(&headers, end_of_stream),
            Some(Request::ResponseBody(_)) => self.on_response_body(&body, end_of_stream),
            // Trailers are never asked for, so `accept` refused them.
            _ => return Err(Status::failed_precondition("trailers are not processed")),
        };
        self.state
            .metrics
            .observe_phase(phase_of(kind), started.elapsed());
        Ok(answer)
    }

    fn on_request_headers(
        &mut self,
        headers: &HeaderList,
        end_of_stream: bool,
    ) -> ProcessingResponse {
        self.head = request_head(headers, end_of_stream);
        let client_keys = self.state.client_keys.current();
        let decision = decision::decide_head(
            &self.head,
            &self.snapshot,
            client_keys.as_ref().as_ref(),
            &self.state.provider_keys,
        );
        match decision {
            HeadDecision::Answer(answer) => self.answer(answer),
            HeadDecision::AwaitBody(admitted, hygiene) => {
                self.admitted = Some(admitted);
                self.upstream_path.clone_from(&hygiene.path);
                // Strip the client's credentials now; routing waits for
                // the body.
                reply::request_headers(reply::hygiene(hygiene))
            }
            HeadDecision::Forward(admitted, hygiene, forward) => {
                self.admitted = Some(admitted);
                // A model listing goes to one backend: never a chain.
                let Target::Backend { key, body } = &forward.target else {
                    return self.answer(Answer::Error(ApiError::internal(
                        "a model listing on a chain",
                    )));
                };
                let to = Destination::Backend {
                    key,
                    body: body.as_ref(),
                };
                let mut changes = reply::forward(&forward, to);
                changes.add(reply::hygiene(hygiene));
                self.forwarded = Some(Forwarded::from(forward));
                reply::request_headers(changes)
            }
        }
    }

    async fn on_request_body(&mut self, body: Bytes) -> ProcessingResponse {
        let Some(admitted) = &self.admitted else {
            // A GET decided by its path: a body it carries is passed along
            // unread and changes nothing.
            return reply::request_body(Changes::default());
        };
        if self.forwarded.is_some() {
            return reply::request_body(Changes::default());
        }
        // BUFFERED: this one message is the whole body (its `end_of_stream`
        // is false when HTTP/2 trailers follow; see `order`).
        // Read on this worker even when large: handing a multi-MB scan to
        // another thread (`offload::heavy`) doubled its CPU and peak memory
        // (bench/RESULTS.md entry 29).
        let forward =
            match decision::decide_body(admitted, &body, &self.snapshot, &self.state.provider_keys)
            {
                Ok(forward) => forward,
                Err(e) => return self.answer(Answer::Error(e)),
            };
        // Spend control: reserve before anything reaches the provider.
        let model = forward.model.as_deref().unwrap_or_default();
        let request = SpendRequest {
            key: admitted.client.as_deref(),
            model,
            upstream_model: forward.route.upstream_model.as_deref().unwrap_or(model),
            backend: &forward.route.backend.name,
            body: &body,
            max_output_tokens: forward.max_output_tokens,
        };
        let reservation = match self
            .state
            .spend
            .admit(&self.snapshot.config.spend, &request)
            .await
        {
            Ok(r) => r,
            Err(e) => return self.answer(Answer::Error(e)),
        };
        let (changes, chain) = match (&forward.target, &forward.route.chain) {
            (Target::Chain { model_span }, Some(name)) => {
                let (id, chain) = self.register_chain(&forward, body, model_span);
                let to = Destination::Chain { name, id: &id };
                (reply::forward(&forward, to), Some((id, chain)))
            }
            (Target::Backend { key, body }, _) => {
                let to = Destination::Backend {
                    key,
                    body: body.as_ref(),
                };
                (reply::forward(&forward, to), None)
            }
            // The decision names a chain only for a route that has one.
            (Target::Chain { .. }, None) => {
                return self.answer(Answer::Error(ApiError::internal(
                    "a chain target on a route without a chain",
                )));
            }
        };
        let mut forwarded = Forwarded::from(forward);
        forwarded.spend = reservation.map(Metered::Reserved);
        forwarded.chain = chain;
        self.forwarded = Some(forwarded);
        reply::request_body(changes)
    }

    /// Leaves what the attempts of a chain need where they will look.
    fn register_chain(
        &self,
        forward: &Forward,
        body: Bytes,
        model_span: &Range<usize>,
    ) -> (Box<str>, Arc<ChainRequest>) {
        let model = forward.model.clone().unwrap_or_default();
        let renames = forward
            .route
            .hops()
            .any(|h| h.upstream_model.as_deref().is_some_and(|u| u != &*model));
        let path = self.upstream_path.as_deref().unwrap_or(&self.head.path);
        let body_len = body.len();
        let request = ChainRequest::new(
            forward.route.clone(),
            model,
            path.into(),
            renames.then(|| (body, model_span.clone())),
            body_len,
        );
        self.state.chains.register(&self.head.request_id, request)
    }

    /// Settles the reservation, if any, once: how the request ended.
    fn settle(&mut self, ending: Settlement<'_>) {
        if let Some(fwd) = self.forwarded.as_mut() {
            fwd.spend = match fwd.spend.take() {
                Some(Metered::Reserved(reservation)) => Some(Metered::Settled(
                    self.state.spend.settle(reservation, ending),
                )),
                // Settled already (or never metered): it stays as it is.
                other => other,
            };
        }
    }

    /// The gateway answers the request itself; nothing goes upstream.
    fn answer(&mut self, answer: Answer) -> ProcessingResponse {
        let (own, reply) = match answer {
            Answer::Error(e) => (
                OwnAnswer::Refused {
                    status: e.status,
                    code: e.code,
                    limit: e.limit,
                },
                reply::error(&e),
            ),
            Answer::Models(body) => (
                OwnAnswer::Models,
                reply::immediate(200, body, "application/json", "ai_gateway_model_list"),
            ),
        };
        self.own_answer = Some(own);
        self.order.answered();
        self.finished.get_or_insert_with(Instant::now);
        reply
    }

    fn on_response_headers(
        &mut self,
        headers: &HeaderList,
        end_of_stream: bool,
    ) -> ProcessingResponse {
        let status = headers.status().unwrap_or(0);
        self.find_answering_backend();
        let Some(fwd) = &self.forwarded else {
            // Not forwarded (Envoy answered on its own, e.g. a 413).
            return reply::response_headers(Changes::default());
        };
        let failed = status >= 400;
        // The one metadata write of a failed request: the access log names
        // its backend and model.
        let metadata = if failed {
            let retry_after = headers.get("retry-after").map(String::from_utf8_lossy);
            self.log_upstream_error(fwd, status, retry_after.as_deref());
            usage_metadata(&self.snapshot, fwd, &Observed::default())
        } else {
            None
        };
        // Only inference responses carry usage; a model list is left alone.
        let read_body = (200..300).contains(&status)
            && !end_of_stream
            && self
                .admitted
                .as_ref()
                .is_some_and(|a| a.endpoint.has_model_body());
        self.response = Some(ResponseSeen {
            status,
            reader: read_body.then(|| {
                ResponseReader::new(headers.get("content-type"), headers.get("content-encoding"))
            }),
            first_byte: None,
            observed: None,
            ended: end_of_stream,
        });
        if end_of_stream {
            self.finished.get_or_insert_with(Instant::now);
        }
        if failed {
            // Nothing was generated: the tokens go back, the request counts.
            self.settle(Settlement::UpstreamFailed);
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

    fn on_response_body(&mut self, chunk: &[u8], end_of_stream: bool) -> ProcessingResponse {
        let Some(response) = self.response.as_mut() else {
            return reply::response_body(Changes::default());
        };
        if response.first_byte.is_none() && !chunk.is_empty() {
            response.first_byte = Some(Instant::now());
        }
        if let Some(reader) = response.reader.as_mut() {
            reader.push(chunk);
        }
        if !end_of_stream {
            return reply::response_body(Changes::default());
        }
        response.ended = true;
        self.finished.get_or_insert_with(Instant::now);
        // A body the gateway does not read (an error, a model list) passes
        // as it is; the exchange is reported when Envoy closes the stream.
        let (Some(reader), Some(fwd)) = (response.reader.take(), self.forwarded.as_ref()) else {
            return reply::response_body(Changes::default());
        };
        let backend = &*fwd.backend.name;
        let observed = match reader.finish() {
            Ok(o) => {
                if o.usage.is_empty() {
                    self.state
                        .metrics
                        .record_usage_unavailable(backend, UsageGap::NotReported);
                }
                o
            }
            Err(gap) => {
                self.state.metrics.record_usage_unavailable(backend, gap);
                Observed::default()
            }
        };
        let metadata = usage_metadata(&self.snapshot, fwd, &observed);
        let usage = observed.usage;
        response.observed = Some(observed);
        self.settle(if usage.is_empty() {
            Settlement::Unknown
        } else {
            Settlement::Used(&usage)
        });
        // The spend is settled before this answer: the next request's
        // admission must see it. The report waits for the stream's end.
        reply::with_metadata(reply::response_body(Changes::default()), metadata)
    }

    /// On a chain, the attempts are over when the response begins: the
    /// client gets the answer of the last attempt that had one. Usage,
    /// spend and metrics go to that backend.
    fn find_answering_backend(&mut self) {
        let Some(fwd) = self.forwarded.as_mut() else {
            return;
        };
        let Some((_, chain)) = &fwd.chain else {
            return;
        };
        let Some(hop) = chain.answering_hop() else {
            return;
        };
        if hop.backend.name == fwd.backend.name {
            return;
        }
        if let Some(Metered::Reserved(r)) = fwd.spend.as_mut() {
            self.state.spend.answered_by(
                r,
                &self.snapshot.config.spend,
                fwd.model.as_deref().unwrap_or_default(),
                &hop.backend.name,
                hop.upstream_model.as_deref(),
            );
        }
        fwd.backend = hop.backend;
    }

    /// One clear line per upstream error, saying what the operator can do.
    fn log_upstream_error(&self, fwd: &Forwarded, status: u16, retry_after: Option<&str>) {
        let backend = &*fwd.backend.name;
        let model = fwd.model.as_deref().unwrap_or("-");
        let request_id = &self.head.request_id;
        self.state.metrics.record_upstream_error(backend, status);
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
                "backend {backend} answered {status}: the provider is failing or unreachable (Envoy also answers 503 when it cannot connect or its TLS check fails; Envoy's access log `details` names the cause)"
            ),
            _ => tracing::info!(request_id, backend, model, status, "backend {backend} refused the request with {status}"),
        }
    }

    /// How the exchange ended, from what was seen of it.
    fn outcome(&self) -> Outcome {
        match (self.own_answer, &self.response) {
            (Some(OwnAnswer::Refused { .. }), _) => Outcome::Rejected,
            (Some(OwnAnswer::Models), _) => Outcome::Answered,
            (None, Some(r)) if r.status >= 400 => Outcome::UpstreamError,
            (None, Some(r)) if r.ended => Outcome::Success,
            // Cut short: the response never ended, or never began.
            (None, _) => Outcome::Cancelled,
        }
    }

    /// Logs the request line and records metrics: once, when the stream
    /// closes.
    fn report(&self) {
        let fwd = self.forwarded.as_ref();
        let response = self.response.as_ref();
        let attempts = fwd
            .and_then(|f| f.chain.as_ref())
            .map(|(_, chain)| chain.attempts_line());
        let (status, error, limit) = match self.own_answer {
            Some(OwnAnswer::Refused {
                status,
                code,
                limit,
            }) => (Some(status), Some(code), limit),
            Some(OwnAnswer::Models) => (Some(200), None, None),
            None => (response.map(|r| r.status), None, None),
        };
        report::record(
            &self.state.metrics,
            &Completion {
                request_id: &self.head.request_id,
                method: &self.head.method,
                path: &self.head.path,
                client: self
                    .admitted
                    .as_ref()
                    .and_then(|a| a.client.as_ref())
                    .map(|c| &*c.name),
                // A request refused before it was admitted is still counted
                // under the endpoint its path names.
                endpoint: self
                    .admitted
                    .as_ref()
                    .map(|a| a.endpoint)
                    .or_else(|| Endpoint::from_path(&self.head.path)),
                backend: fwd.map(|f| &*f.backend.name),
                attempts: attempts.as_deref(),
                model: fwd.and_then(|f| f.model.as_deref()),
                stream: fwd.is_some_and(|f| f.stream),
                status,
                error,
                limit,
                outcome: self.outcome(),
                observed: response.and_then(|r| r.observed.as_ref()),
                // To the last answer, not to when the stream closed.
                duration: self
                    .finished
                    .unwrap_or_else(Instant::now)
                    .saturating_duration_since(self.started),
                time_to_first_byte: response
                    .and_then(|r| r.first_byte)
                    .map(|t| t - self.started),
            },
        );
    }
}

impl From<Forward> for Forwarded {
    fn from(f: Forward) -> Self {
        Self {
            backend: f.route.backend,
            chain: None,
            model: f.model,
            stream: f.stream,
            spend: None,
        }
    }
}

impl Drop for Exchange {
    /// Envoy closes the stream when the HTTP exchange is over, just after
    /// the gateway's last answer: the exchange is reported now, with how it
    /// ended. Not before that answer: with a one-chunk response (every
    /// plain chat) the client waits for it, and recording up to eight
    /// metric series cost it about 40 µs (`bench/RESULTS.md` entry 42).
    fn drop(&mut self) {
        // Cut short (the client left, a reset): the usage is unknown, so
        // the reservation stands as the charge.
        self.settle(Settlement::Unknown);
        // Before the request line: whoever reads that line finds the
        // spend in the metrics.
        if let Some(fwd) = self.forwarded.as_mut() {
            if let Some(Metered::Settled(settled)) = fwd.spend.take() {
                let model = fwd.model.as_deref().unwrap_or_default();
                self.state.spend.publish(settled, &fwd.backend.name, model);
            }
        }
        if self.order.started() {
            self.report();
        }
        if let Some((id, _)) = self.forwarded.as_ref().and_then(|f| f.chain.as_ref()) {
            self.state.chains.remove(id);
        }
    }
}

/// What Envoy's dynamic metadata gets, when the config asks for it
/// (`envoy.usage_metadata`): nothing is written otherwise, which saves
/// Envoy's worker the write and the access log's formatting of it.
fn usage_metadata(snapshot: &Snapshot, fwd: &Forwarded, observed: &Observed) -> Option<Struct> {
    snapshot
        .config
        .envoy
        .usage_metadata
        .then(|| report::response_metadata(&fwd.backend.name, fwd.model.as_deref(), observed))
}
