//! The Envoy external processor: the gRPC service, the per-request state
//! machine it drives, and the builders of Envoy's response messages.
//!
//! `grpc` serves the gRPC method; `service` only moves messages between
//! Envoy and an [`Exchange`]; `exchange` decides; `reply` knows Envoy's
//! protobuf shapes.

mod exchange;
mod grpc;
pub mod headers;
pub mod listener;
mod order;
mod reply;
pub mod report;
mod service;
pub mod stream_auth;

pub use exchange::Exchange;
pub use service::ExtProcService;

/// Header naming the backend the request must go to. The rendered Envoy
/// routes match on it, so the processor overwrites it on every request it
/// forwards and removes any copy the client sent.
pub const BACKEND_HEADER: &str = "x-ai-eg-backend";
/// Header carrying the requested model, for Envoy's access log.
pub const MODEL_HEADER: &str = "x-ai-eg-model";
pub use crate::decision::head::INTERNAL_HEADER_PREFIX;
