//! The `envoy.service.ext_proc.v3.ExternalProcessor` gRPC service.
//!
//! Envoy opens one bidirectional stream per HTTP request. Each stream gets
//! its own [`Exchange`], and the answers are produced by unfolding the
//! inbound stream in place, one message at a time: no task, no channel and
//! no lock per request. Only an admission against a remote spend store
//! waits on I/O, and then only that stream waits.

use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use futures_util::stream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::stream_auth::StreamAuth;
use super::Exchange;
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

    /// The check every stream passes before its first message.
    pub fn auth(&self) -> &StreamAuth {
        &self.auth
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let exchange = Exchange::new(Arc::clone(&self.state));
        let inbound = request.into_inner();
        let answers = stream::unfold(
            (exchange, inbound),
            |(mut exchange, mut inbound)| async move {
                let answer = match inbound.next().await? {
                    Ok(message) => exchange.on_message(message).await,
                    Err(status) => Err(status),
                };
                Some((answer, (exchange, inbound)))
            },
        );
        Ok(Response::new(Box::pin(answers)))
    }
}
