//! The cheapest possible ext_proc server, for the benchmark's floor.
//!
//! It does no work at all: every message gets an empty "continue" answer,
//! except the request body, whose answer sets one fixed routing header (so
//! the request reaches the backend route, as with the real processor).
//! Whatever Envoy + this costs over Envoy alone is the price of the ext_proc
//! mechanism itself, which no processor can go below; `bench/bench.py`
//! measures it beside the real processor.
//!
//! It reads only which phase a message is: its message type declares the
//! `oneof` and nothing inside it, so prost skips headers without building
//! them and a body's bytes stay where they arrived (prost's stock decoding
//! of envoy-types' `HttpBody` copies a body into a fresh `Vec`, which
//! would put a copy in the floor that the gateway does not make). Its
//! transport is set as the gateway's (HTTP/2 windows and the largest
//! message), so it receives the same bodies the same way: the floor of the
//! body rows too.
//!
//!   cargo run --release --example null_extproc -- unix:/tmp/null.sock <backend>

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue, HeaderValueOption,
};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Out;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ProcessingResponse,
};
use tokio_stream::{Stream, StreamExt};
use tonic::codegen::{http, Body, BoxFuture, Service, StdError};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

/// The gateway's default `max_request_body_bytes` (16 MiB) and its
/// allowance for the rest of a message.
const MAX_MESSAGE: usize = 16 * 1024 * 1024 + 64 * 1024;
const PROCESS_PATH: &str = "/envoy.service.ext_proc.v3.ExternalProcessor/Process";

/// `ProcessingRequest` as far as this server reads it: the phase only.
/// Every other field is unknown here and skipped.
#[derive(Clone, PartialEq, prost::Message)]
struct Phased {
    #[prost(oneof = "Phase", tags = "2, 3, 4, 5, 6, 7")]
    phase: Option<Phase>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Phase {
    #[prost(message, tag = "2")]
    RequestHeaders(Unread),
    #[prost(message, tag = "3")]
    ResponseHeaders(Unread),
    #[prost(message, tag = "4")]
    RequestBody(Unread),
    #[prost(message, tag = "5")]
    ResponseBody(Unread),
    #[prost(message, tag = "6")]
    RequestTrailers(Unread),
    #[prost(message, tag = "7")]
    ResponseTrailers(Unread),
}

/// A message whose fields are all skipped.
#[derive(Clone, PartialEq, prost::Message)]
struct Unread {}

type Answers = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[derive(Clone)]
struct NullProcessor {
    backend: String,
}

impl StreamingService<Phased> for NullProcessor {
    type Response = ProcessingResponse;
    type ResponseStream = Answers;
    type Future = BoxFuture<Response<Answers>, Status>;

    fn call(&mut self, request: Request<Streaming<Phased>>) -> Self::Future {
        let backend = self.backend.clone();
        let answers = request.into_inner().map(move |message| {
            let answer = match message?.phase {
                Some(Phase::RequestHeaders(_)) => Out::RequestHeaders(HeadersResponse::default()),
                Some(Phase::RequestBody(_)) => Out::RequestBody(BodyResponse {
                    response: Some(route_to(&backend)),
                }),
                Some(Phase::ResponseHeaders(_)) => Out::ResponseHeaders(HeadersResponse::default()),
                Some(Phase::ResponseBody(_)) => Out::ResponseBody(BodyResponse::default()),
                _ => return Err(Status::invalid_argument("unexpected message")),
            };
            Ok(ProcessingResponse {
                response: Some(answer),
                ..Default::default()
            })
        });
        Box::pin(async move { Ok(Response::new(Box::pin(answers) as Answers)) })
    }
}

impl NamedService for NullProcessor {
    const NAME: &'static str = "envoy.service.ext_proc.v3.ExternalProcessor";
}

impl<B> Service<http::Request<B>> for NullProcessor
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let process = self.clone();
        let unknown = request.uri().path() != PROCESS_PATH;
        Box::pin(async move {
            if unknown {
                return Ok(Status::unimplemented("only Process").into_http());
            }
            let codec = ProstCodec::<ProcessingResponse, Phased>::default();
            let limit = Some(MAX_MESSAGE);
            let mut grpc = Grpc::new(codec).apply_max_message_size_config(limit, limit);
            Ok(grpc.streaming(process, request).await)
        })
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
    let window = u32::try_from(MAX_MESSAGE).unwrap_or(u32::MAX);
    let server = tonic::transport::Server::builder()
        .initial_stream_window_size(window)
        .initial_connection_window_size(window.saturating_mul(4))
        .add_service(NullProcessor { backend });
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
