//! The `envoy.service.ext_proc.v3.ExternalProcessor` gRPC service.
//!
//! Envoy opens one bidirectional stream per HTTP request, and one more per
//! attempt when the request is on a fallback chain (marked by
//! [`PASS_HEADER`]). Each stream gets its own [`Exchange`] or attempt, and
//! the answers are produced by unfolding the inbound stream in place, one
//! message at a time: no task, no channel and no lock per request. Only an
//! admission against a remote spend store waits on I/O, and then only that
//! stream waits.

use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse;
use futures_util::stream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::attempt::AttemptExchange;
use super::inbound::Inbound;
use super::stream_auth::StreamAuth;
use super::{Exchange, ATTEMPT_PASS, PASS_HEADER};
use crate::state::GatewayState;

/// The ext_proc service, shared by all streams.
#[derive(Clone)]
pub struct ExtProcService {
    state: Arc<GatewayState>,
    auth: Arc<StreamAuth>,
}

impl ExtProcService {
    pub fn new(state: Arc<GatewayState>, auth: StreamAuth) -> Self {
        Self {
            state,
            auth: Arc::new(auth),
        }
    }

    /// The check every stream passes before its first message (the xDS
    /// streams on the same endpoint pass it too).
    pub fn auth(&self) -> &Arc<StreamAuth> {
        &self.auth
    }
}

/// What a stream serves: a request (the router pass), or one attempt of a
/// request on a fallback chain. Not boxed on its own: it lives in the
/// stream's state, which is boxed once (see `process`).
#[allow(clippy::large_enum_variant)]
enum Pass {
    Router(Exchange),
    Attempt(AttemptExchange),
}

/// The answers of one stream, as tonic sends them.
pub type ResponseStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

impl ExtProcService {
    /// The `Process` method: one stream, one request (or one attempt).
    pub async fn process(
        &self,
        request: Request<Streaming<Inbound>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let attempt = request
            .metadata()
            .get(PASS_HEADER)
            .is_some_and(|v| v.as_bytes() == ATTEMPT_PASS.as_bytes());
        let pass = if attempt {
            Pass::Attempt(AttemptExchange::new(Arc::clone(&self.state)))
        } else {
            Pass::Router(Exchange::new(Arc::clone(&self.state)))
        };
        let inbound = request.into_inner();
        // The state (an exchange is about a kilobyte) is boxed: `unfold`
        // moves it into each message's future and back out, and moving a
        // pointer instead cost one allocation per stream and saved about
        // 4.5 k instructions per streamed chat (bench/RESULTS.md entry 47).
        let answers = stream::unfold(Box::new((pass, inbound)), |mut state| async move {
            let (pass, inbound) = &mut *state;
            let answer = match inbound.next().await? {
                Ok(message) => match pass {
                    Pass::Router(exchange) => exchange.on_message(message).await,
                    Pass::Attempt(attempt) => attempt.on_message(message),
                },
                Err(status) => Err(status),
            };
            Some((answer, state))
        });
        Ok(Response::new(Box::pin(answers)))
    }
}
