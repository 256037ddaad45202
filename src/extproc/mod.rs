//! The Envoy external processor: the gRPC service, the per-request state
//! machine it drives, and the builders of Envoy's response messages.
//!
//! `grpc` serves the gRPC method and `inbound` decodes Envoy's messages
//! (a body stays in the receive buffer); `service` only moves messages between
//! Envoy and an [`Exchange`] (the router pass, one per request) or an
//! attempt (`attempt`, one per attempt on a fallback chain); `exchange`
//! decides; `chains` is where the two passes of one request meet; `reply`
//! knows Envoy's protobuf shapes.

mod attempt;
pub mod chains;
mod exchange;
mod grpc;
pub mod headers;
pub mod inbound;
pub mod listener;
mod order;
mod reply;
pub mod report;
mod service;
pub mod stream_auth;

pub use attempt::{BACKEND_ATTRIBUTE, CONTENT_LENGTH_FIELD};
pub use exchange::Exchange;
pub use service::ExtProcService;

/// Header naming the backend the request must go to. The rendered Envoy
/// routes match on it, so the processor overwrites it on every request it
/// forwards and removes any copy the client sent.
pub const BACKEND_HEADER: &str = "x-ai-eg-backend";
/// Header carrying the requested model from routing on, for Envoy filters
/// after ext_proc (a rate limit descriptor); the route removes it before
/// the provider. (Measured: it costs Envoy 5.3 k instructions per request,
/// `bench/RESULTS.md` entry 22; kept for that use.)
pub const MODEL_HEADER: &str = "x-ai-eg-model";
pub use crate::decision::head::INTERNAL_HEADER_PREFIX;
/// gRPC metadata naming the pass a stream serves; Envoy's upstream ext_proc
/// filter sends it (`initial_metadata`) with [`ATTEMPT_PASS`].
pub const PASS_HEADER: &str = "x-ai-gateway-pass";
/// The value of [`PASS_HEADER`] on attempt streams.
pub const ATTEMPT_PASS: &str = "attempt";
