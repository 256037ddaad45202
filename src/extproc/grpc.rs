//! The ext_proc gRPC endpoint, with small per-stream codec buffers.
//!
//! Envoy opens one gRPC stream per HTTP request, so a gateway carrying
//! 1,000 streams (long SSE answers) holds 1,000 of them at once. tonic's
//! prost codec allocates an 8 KiB decode and an 8 KiB encode buffer per
//! stream up front: 16 MiB for 1,000 streams, more than everything else
//! the processor holds (measured in `bench/RESULTS.md`). Nearly all messages
//! are far smaller (headers, SSE chunks, short answers); the buffers grow
//! when a large body comes, so 1 KiB to start costs nothing there.
//!
//! Messages are decoded by [`inbound::decode`], which leaves a body in
//! the receive buffer instead of copying it out.
//!
//! The generated `ExternalProcessorServer` hard-codes the default codec, so
//! this endpoint does its one job (route the `Process` method to the
//! service through this codec) and nothing else. [`ProcessFirstLayer`]
//! puts it in front of tonic's router, so that Envoy's streams skip the
//! router's per-stream work (`bench/RESULTS.md` entry 70).

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::Either;
use tower_layer::Layer;

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::codegen::{http, Body, BoxFuture, Service, StdError};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::{ProstCodec, ProstEncoder};

use super::inbound::{self, Inbound};
use super::service::{ExtProcService, ResponseStream};

const PROCESS_PATH: &str = "/envoy.service.ext_proc.v3.ExternalProcessor/Process";
/// Initial (and growth step of) each stream's codec buffers.
const BUFFER_BYTES: usize = 1024;
/// tonic's default: how much encoded output is batched before yielding.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// The `ExternalProcessor` gRPC service as served to Envoy.
#[derive(Clone)]
pub struct ExtProcEndpoint {
    service: ExtProcService,
    max_message_bytes: usize,
}

impl ExtProcEndpoint {
    /// `max_message_bytes` bounds each message both ways: the largest
    /// request body plus protobuf overhead.
    pub fn new(service: ExtProcService, max_message_bytes: usize) -> Self {
        Self {
            service,
            max_message_bytes,
        }
    }
}

impl NamedService for ExtProcEndpoint {
    const NAME: &'static str = "envoy.service.ext_proc.v3.ExternalProcessor";
}

impl<B> Service<http::Request<B>> for ExtProcEndpoint
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
        if request.uri().path() != PROCESS_PATH {
            let unimplemented = Status::unimplemented("only ExternalProcessor/Process is served");
            return Box::pin(async move { Ok(unimplemented.into_http()) });
        }
        // Before any message is read: a stream that is not Envoy's gets
        // nothing, not even an error about its content.
        if let Err(refused) = self.service.auth().check(request.headers()) {
            return Box::pin(async move { Ok(refused.into_http()) });
        }
        let process = Process(self.service.clone());
        let limit = Some(self.max_message_bytes);
        Box::pin(async move {
            let mut grpc = Grpc::new(SmallBufferCodec).apply_max_message_size_config(limit, limit);
            Ok(grpc.streaming(process, request).await)
        })
    }
}

/// Puts [`ExtProcEndpoint`] in front of tonic's router: Envoy's `Process`
/// streams (one per request) go straight to it; anything else (health,
/// xDS) goes through the router as before. The router is axum's: per
/// stream it matches the path, records URL parameters, and wraps the
/// request and response bodies in boxed adapters that every message then
/// passes through, none of which a single-method endpoint needs.
#[derive(Clone)]
pub struct ProcessFirstLayer(ExtProcEndpoint);

impl ProcessFirstLayer {
    pub fn new(endpoint: ExtProcEndpoint) -> Self {
        Self(endpoint)
    }
}

impl<S> Layer<S> for ProcessFirstLayer {
    type Service = ProcessFirst<S>;

    fn layer(&self, router: S) -> Self::Service {
        ProcessFirst {
            endpoint: self.0.clone(),
            router,
        }
    }
}

/// See [`ProcessFirstLayer`].
#[derive(Clone)]
pub struct ProcessFirst<S> {
    endpoint: ExtProcEndpoint,
    router: S,
}

impl<S> Service<http::Request<tonic::body::Body>> for ProcessFirst<S>
where
    S: Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = Infallible,
    >,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Either<BoxFuture<Self::Response, Self::Error>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The endpoint is always ready; the router's readiness is its own
        // (axum's is always ready too, and reserves nothing).
        self.router.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() == PROCESS_PATH {
            Either::Left(self.endpoint.call(request))
        } else {
            Either::Right(self.router.call(request))
        }
    }
}

/// The `Process` method, as tonic's server machinery calls it. The
/// service is a handle (an `Arc` inside): cloning it per call is cheap.
struct Process(ExtProcService);

impl StreamingService<Inbound> for Process {
    type Response = ProcessingResponse;
    type ResponseStream = ResponseStream;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<Inbound>>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.process(request).await })
    }
}

/// tonic's prost encoder and the [`inbound`] decoder, with
/// [`BUFFER_BYTES`] buffers.
#[derive(Clone, Copy)]
struct SmallBufferCodec;

impl Codec for SmallBufferCodec {
    type Encode = ProcessingResponse;
    type Decode = Inbound;
    type Encoder = ProstEncoder<ProcessingResponse>;
    type Decoder = InboundDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<ProcessingResponse, ()>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        InboundDecoder
    }
}

/// Each message through [`inbound::decode`]; one prost refuses ends the
/// stream with `INTERNAL`, as tonic's prost decoder ends it.
struct InboundDecoder;

impl Decoder for InboundDecoder {
    type Item = Inbound;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Inbound>, Status> {
        inbound::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        processing_request::Request as In, HttpBody, ProcessingRequest,
    };
    use prost::Message;
    use tonic::codec::Codec;
    use tonic::Streaming;

    use super::SmallBufferCodec;
    use crate::extproc::inbound::Inbound;

    /// One gRPC frame: the uncompressed flag, the length, the message.
    fn framed(message: &ProcessingRequest) -> Bytes {
        let encoded = message.encode_to_vec();
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        frame.extend_from_slice(&encoded);
        Bytes::from(frame)
    }

    /// The served codec is the in-place decoder, not prost and a move
    /// afterwards: the behaviour would be the same and only memory would
    /// tell. A body read in place is a view that shares the stream's
    /// receive buffer (not unique while the stream lives); a body prost
    /// decoded is a vector of its own (unique).
    #[tokio::test]
    async fn the_served_codec_leaves_a_body_in_the_receive_buffer() {
        let message = ProcessingRequest {
            request: Some(In::RequestBody(HttpBody {
                body: vec![b'x'; 100_000],
                end_of_stream: true,
                ..Default::default()
            })),
            ..Default::default()
        };
        let body = http_body_util::Full::new(framed(&message));
        let decoder = SmallBufferCodec.decoder();
        let mut stream: Streaming<Inbound> =
            Streaming::new_request(decoder, body, None, Some(1 << 20));
        let inbound = stream.message().await.unwrap().unwrap();
        assert_eq!(inbound, Inbound::from(message.clone()));
        assert!(
            !inbound.body.is_unique(),
            "the body was copied out of the receive buffer"
        );

        let copied =
            Inbound::from(ProcessingRequest::decode(message.encode_to_vec().as_slice()).unwrap());
        assert!(
            copied.body.is_unique(),
            "the check cannot tell a copy apart"
        );
        drop(stream);
    }

    /// Only `Process` skips the router: the endpoint answers it (here with
    /// its refusal of a stream without the shared secret), and every other
    /// path, the endpoint's other methods included, is the router's.
    #[tokio::test]
    async fn only_process_streams_skip_the_router() {
        use tonic::codegen::http;
        use tower::{Layer, ServiceExt};

        use super::{ExtProcEndpoint, ProcessFirstLayer, PROCESS_PATH};
        use crate::extproc::stream_auth::StreamAuth;
        use crate::extproc::ExtProcService;

        let state = crate::state::for_tests(
            "backends:\n  - {name: a, url: 'http://127.0.0.1:1', api_key_file: k}\nmodels:\n  - {name: m, backend: a}\n",
            &[("a", "sk-a")],
        );
        let service = ExtProcService::new(state, StreamAuth::shared_secret("s3cret"));
        let router = tower::service_fn(|_: http::Request<tonic::body::Body>| async {
            let mut answer = http::Response::new(tonic::body::Body::empty());
            answer
                .headers_mut()
                .insert("x-router", "1".parse().unwrap());
            Ok::<_, std::convert::Infallible>(answer)
        });
        let served = ProcessFirstLayer::new(ExtProcEndpoint::new(service, 1 << 20)).layer(router);
        for (path, by_router) in [
            (PROCESS_PATH, false),
            ("/envoy.service.ext_proc.v3.ExternalProcessor/Other", true),
            ("/grpc.health.v1.Health/Check", true),
            (
                "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
                true,
            ),
        ] {
            let request = http::Request::builder()
                .method("POST")
                .uri(path)
                .header("content-type", "application/grpc")
                .body(tonic::body::Body::empty())
                .unwrap();
            let answer = served.clone().oneshot(request).await.unwrap();
            assert_eq!(
                answer.headers().contains_key("x-router"),
                by_router,
                "{path}"
            );
            if !by_router {
                // The endpoint's own check ran: no secret, no stream.
                assert_eq!(
                    answer.headers().get("grpc-status").map(|v| v.as_bytes()),
                    Some(b"16".as_slice()),
                    "{path}"
                );
            }
        }
    }
}
