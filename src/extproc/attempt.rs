//! The attempt pass: one ext_proc stream per attempt of a request on a
//! fallback chain, opened by the ext_proc filter in the chain cluster's
//! upstream filters (rendered by `envoy_config`), after Envoy has picked
//! the attempt's backend and before a byte goes to it.
//!
//! It gives each attempt what belongs to its backend alone: the key, the
//! path under the backend's URL, and the body with the model renamed when
//! the backend wants another name. Envoy keeps one set of request headers
//! across attempts, carrying the last attempt's changes, so every attempt
//! sets all of them again, never relying on what the request held. It also
//! records how the attempt was answered, which tells the router pass
//! (`exchange`) which backend answered the client.
//!
//! Envoy's processing mode for this filter: request headers SEND, response
//! headers SEND, nothing else. So the stream is exactly: request headers,
//! then response headers if the backend answered.

use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use tonic::Status;

use super::chains::{ChainRequest, REQUEST_ID_HEADER};
use super::headers::{header, response_status};
use super::reply::{self, set_header, Changes};
use super::report;
use crate::decision::renamed_body;
use crate::openai::error::ApiError;
use crate::routes::Hop;
use crate::state::GatewayState;

/// The request attribute naming the attempt's backend: Envoy reads it from
/// the picked endpoint's metadata, which `envoy_config` sets to the
/// backend's name.
pub const BACKEND_ATTRIBUTE: &str =
    "xds.upstream_host_metadata.filter_metadata['io.envoy.ai_gateway']['backend']";

/// The dynamic metadata field with the length of the attempt's body; an
/// upstream header filter puts it in `content-length` (Envoy lets no
/// ext_proc set that header).
pub const CONTENT_LENGTH_FIELD: &str = "content_length";

/// One attempt.
pub struct AttemptExchange {
    state: Arc<GatewayState>,
    /// Set once the request headers were answered.
    begun: Option<Begun>,
    answered: bool,
}

struct Begun {
    chain: Arc<ChainRequest>,
    index: usize,
    backend: Box<str>,
}

impl AttemptExchange {
    pub fn new(state: Arc<GatewayState>) -> Self {
        Self {
            state,
            begun: None,
            answered: false,
        }
    }

    /// Answers one message; anything but request headers then response
    /// headers, once each, is a gRPC error.
    pub fn on_message(&mut self, message: ProcessingRequest) -> Result<ProcessingResponse, Status> {
        match message.request {
            Some(Request::RequestHeaders(h)) if self.begun.is_none() => {
                let backend = backend_attribute(&message.attributes);
                Ok(self.on_request_headers(&h, backend.as_deref()))
            }
            Some(Request::ResponseHeaders(h)) if self.begun.is_some() && !self.answered => {
                Ok(self.on_response_headers(&h))
            }
            _ => Err(Status::failed_precondition(
                "the attempt pass takes request headers, then response headers",
            )),
        }
    }

    fn on_request_headers(&mut self, h: &HttpHeaders, backend: Option<&str>) -> ProcessingResponse {
        let id = header(h.headers.as_ref(), REQUEST_ID_HEADER)
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        let Some(chain) = self.state.chains.get(&id) else {
            // Not a request the router pass sent here (or this process was
            // restarted in between): fail closed, no key.
            return reply::error(&ApiError::chain_lost());
        };
        let Some(hop) = backend.and_then(|b| chain.route.hops().find(|h| *h.backend.name == *b))
        else {
            tracing::error!(request_id = %id, backend = backend.unwrap_or("-"), "an attempt went to a backend outside the request's chain: refused");
            return reply::error(&ApiError::chain_lost());
        };
        let name = &hop.backend.name;
        let Some(key) = self.state.provider_keys.get(name) else {
            return reply::error(&ApiError::key_unavailable(name));
        };
        let changes = attempt_changes(&chain, &hop, key.authorization().as_bytes());
        let length = changes
            .body
            .as_ref()
            .map_or(chain.body_len, Vec::len)
            .to_string();
        let index = chain.begin(Arc::clone(&hop.backend));
        self.begun = Some(Begun {
            backend: name.clone(),
            chain,
            index,
        });
        reply::with_metadata(
            reply::request_headers_replacing_body(changes),
            report::metadata(&[(CONTENT_LENGTH_FIELD, &length)]),
        )
    }

    fn on_response_headers(&mut self, h: &HttpHeaders) -> ProcessingResponse {
        self.answered = true;
        let status = response_status(h.headers.as_ref()).unwrap_or(0);
        if let Some(b) = &self.begun {
            b.chain.answered(b.index, status);
            self.state.metrics.record_attempt(&b.backend, Some(status));
        }
        reply::response_headers(Changes::default())
    }
}

/// What one attempt changes in the request: every field an earlier attempt
/// may have set, set again for this backend.
fn attempt_changes(chain: &ChainRequest, hop: &Hop, authorization: &[u8]) -> Changes {
    let path = format!("{}{}", hop.backend.url.path_prefix, chain.path);
    // When any backend of the chain renames the model, every attempt sends
    // its own body, the client's included: what an earlier attempt sent is
    // never left to chance.
    let body = chain.body.as_ref().map(|(body, span)| {
        renamed_body(hop.upstream_model.as_deref(), &chain.model, body, span)
            .unwrap_or_else(|| body.clone())
    });
    Changes {
        set: vec![
            set_header("authorization", authorization),
            set_header(":path", path.as_bytes()),
        ],
        body,
        ..Changes::default()
    }
}

/// The attempt's backend, from the request attributes Envoy sent.
fn backend_attribute(
    attributes: &std::collections::HashMap<String, envoy_types::pb::google::protobuf::Struct>,
) -> Option<String> {
    attributes
        .values()
        .find_map(|s| match s.fields.get(BACKEND_ATTRIBUTE)?.kind.as_ref()? {
            Kind::StringValue(v) => Some(v.clone()),
            _ => None,
        })
}

impl Drop for AttemptExchange {
    /// An attempt that began and was never answered: the connection failed
    /// or was reset.
    fn drop(&mut self) {
        if let (Some(b), false) = (&self.begun, self.answered) {
            self.state.metrics.record_attempt(&b.backend, None);
        }
    }
}
