//! The cheapest possible ext_proc server, for the benchmark's floor.
//!
//! It does no work at all: every message gets an empty "continue" answer,
//! except the request body, whose answer sets one fixed routing header (so
//! the request reaches the backend route, as with the real processor).
//! Whatever Envoy + this costs over Envoy alone is the price of the ext_proc
//! mechanism itself, which no processor can go below; `bench/bench.py`
//! measures it beside the real processor.
//!
//!   cargo run --release --example null_extproc -- unix:/tmp/null.sock <backend>

use std::pin::Pin;

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue, HeaderValueOption,
};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as In;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Out;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ProcessingRequest,
    ProcessingResponse,
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

struct NullProcessor {
    backend: String,
}

type Answers = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for NullProcessor {
    type ProcessStream = Answers;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Answers>, Status> {
        let backend = self.backend.clone();
        let answers = request.into_inner().map(move |message| {
            let answer = match message?.request {
                Some(In::RequestHeaders(_)) => Out::RequestHeaders(HeadersResponse::default()),
                Some(In::RequestBody(_)) => Out::RequestBody(BodyResponse {
                    response: Some(route_to(&backend)),
                }),
                Some(In::ResponseHeaders(_)) => Out::ResponseHeaders(HeadersResponse::default()),
                Some(In::ResponseBody(_)) => Out::ResponseBody(BodyResponse::default()),
                _ => return Err(Status::invalid_argument("unexpected message")),
            };
            Ok(ProcessingResponse {
                response: Some(answer),
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(answers)))
    }
}

/// The header the rendered routes match on, and a route cache clear.
fn route_to(backend: &str) -> CommonResponse {
    CommonResponse {
        header_mutation: Some(HeaderMutation {
            set_headers: vec![HeaderValueOption {
                header: Some(HeaderValue {
                    key: "x-ai-eg-backend".into(),
                    raw_value: backend.as_bytes().to_vec(),
                    ..Default::default()
                }),
                append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                ..Default::default()
            }],
            remove_headers: Vec::new(),
        }),
        clear_route_cache: true,
        ..Default::default()
    }
}

/// The runtime as the gateway builds it: `AI_GATEWAY_WORKER_THREADS`
/// worker threads, one by default (the benchmark compares like with like).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let threads = std::env::var("AI_GATEWAY_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?
        .block_on(serve())
}

async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(backend)) = (args.next(), args.next()) else {
        return Err("usage: null_extproc unix:PATH|HOST:PORT BACKEND".into());
    };
    let server = tonic::transport::Server::builder()
        .add_service(ExternalProcessorServer::new(NullProcessor { backend }));
    match listen.strip_prefix("unix:") {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path)?;
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            server.serve_with_incoming(incoming).await?;
        }
        None => server.serve(listen.parse()?).await?,
    }
    Ok(())
}
