//! `ai-gateway-extproc`: an Envoy external processor that makes Envoy an
//! OpenAI-compatible LLM gateway.
//!
//! Envoy sends each request's phases over the ext_proc gRPC stream; the
//! processor reads the `model` from the body, picks the backend, and tells
//! Envoy where to send the request and with which key. Module map:
//!
//! - [`config`]: the configuration file, loaded and validated;
//! - [`client_keys`]: optional gateway keys clients must present;
//! - [`routes`]: model → backend rules ([`routes::RouteTable`]);
//! - [`decision`]: what to do with a request, as pure functions;
//! - [`outcome`]: how a request ended, as logs and metrics name it;
//! - [`provider_keys`]: provider keys and their file watcher;
//! - [`regular_file`]: bounded reads of the files the gateway trusts;
//! - [`watch`]: "this file may have changed" notifications;
//! - [`watched_file`]: the reloader of the config and client keys files;
//! - [`config_reload`]: configuration hot reload;
//! - [`state`]: the immutable snapshot the data path reads;
//! - [`spend`]: budgets and rate limits, reserved before admission;
//! - [`openai`]: the OpenAI-compatible API (endpoints, bodies, errors);
//! - [`extproc`]: the gRPC service and the per-request state machine;
//! - [`envoy_config`]: Envoy's resources and bootstrap, rendered from the
//!   same config;
//! - [`xds`]: those resources served live to Envoy (ADS);
//! - [`admin`], [`metrics`], [`logging`], [`shutdown`]: operations;
//! - [`login`]: `ai-gateway-extproc login`, a key by OAuth PKCE.

pub mod admin;
pub mod client_keys;
pub mod config;
pub mod config_reload;
pub mod decision;
pub mod envoy_config;
pub mod extproc;
pub mod log_queue;
pub mod logging;
pub mod login;
pub mod metrics;
pub mod offload;
pub mod openai;
pub mod outcome;
pub mod provider_keys;
pub mod regular_file;
pub mod routes;
pub mod shutdown;
pub mod spend;
pub mod state;
pub mod watch;
pub mod watched_file;
pub mod xds;

/// The version shown by `--version` and in the start log line.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("AI_GATEWAY_GIT_REV"),
    ")"
);
