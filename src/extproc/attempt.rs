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
    processing_request::Request, ProcessingResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use tonic::Status;

use super::chains::{ChainRequest, REQUEST_ID_HEADER};
use super::headers::HeaderList;
use super::inbound::Inbound;
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
    /// The attempt was refused with an answer of the pass's own: Envoy
    /// sends nothing more on this stream.
    refused: bool,
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
            refused: false,
        }
    }

    /// Answers one message; anything but request headers then response
    /// headers, once each, is a gRPC error.
    pub fn on_message(&mut self, inbound: Inbound) -> Result<ProcessingResponse, Status> {
        let Inbound {
            message, headers, ..
        } = inbound;
        match message.request {
            Some(Request::RequestHeaders(_)) if self.begun.is_none() && !self.refused => {
                let backend = backend_attribute(&message.attributes);
                let answer = self.on_request_headers(&headers, backend.as_deref());
                self.refused = self.begun.is_none();
                Ok(answer)
            }
            Some(Request::ResponseHeaders(_)) if self.begun.is_some() && !self.answered => {
                Ok(self.on_response_headers(&headers))
            }
            _ => Err(Status::failed_precondition(
                "the attempt pass takes request headers, then response headers",
            )),
        }
    }

    fn on_request_headers(
        &mut self,
        headers: &HeaderList,
        backend: Option<&str>,
    ) -> ProcessingResponse {
        let id = headers
            .get(REQUEST_ID_HEADER)
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        let Some(chain) = self.state.chains.get(&id) else {
            // Not a request the router pass sent here (or this process was
            // restarted in between): fail closed, no key.
            tracing::warn!(request_id = %id, "an attempt for a request this processor is not serving: refused");
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
        let index = chain.begin(hop.clone());
        self.begun = Some(Begun {
            backend: name.clone(),
            chain,
            index,
        });
        reply::with_metadata(
            reply::request_headers_replacing_body(changes),
            Some(report::metadata(&[(CONTENT_LENGTH_FIELD, &length)])),
        )
    }

    fn on_response_headers(&mut self, headers: &HeaderList) -> ProcessingResponse {
        self.answered = true;
        let status = headers.status().unwrap_or(0);
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
            .unwrap_or_else(|| body.to_vec())
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

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::Bytes;

    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::ext_proc::v3::common_response::ResponseStatus;
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
    use envoy_types::pb::envoy::service::ext_proc::v3::{HttpHeaders, ProcessingRequest};
    use envoy_types::pb::google::protobuf::{Struct, Value};

    use crate::decision::Target;

    const CONFIG: &str = "backends:\n  - {name: a, url: 'http://127.0.0.1:1', api_key_file: k}\n  - {name: b, url: 'http://127.0.0.1:2/openai', api_key_file: k}\n  - {name: c, url: 'http://127.0.0.1:3', api_key_file: k}\nmodels:\n  - {name: m, backend: a, fallbacks: [{backend: b, upstream_model: m-b}]}\n";

    fn state() -> Arc<GatewayState> {
        crate::state::for_tests(CONFIG, &[("a", "sk-a"), ("b", "sk-b"), ("c", "sk-c")])
    }

    /// Registers a request for model `m` with `body`, as the router pass does.
    fn register(state: &GatewayState, body: &[u8]) -> Box<str> {
        let snapshot = state.snapshot();
        let route = snapshot.routes.resolve("m").unwrap().clone();
        let forward = crate::decision::decide_body(
            &crate::decision::Admitted {
                endpoint: crate::openai::Endpoint::ChatCompletions,
                client: None,
            },
            body,
            &snapshot,
            &state.provider_keys,
        )
        .unwrap();
        let Target::Chain { model_span } = forward.target else {
            panic!("m is a chain");
        };
        let request = ChainRequest::new(
            route,
            "m".into(),
            "/v1/chat/completions".into(),
            Some((Bytes::copy_from_slice(body), model_span)),
            body.len(),
        );
        state.chains.register("client-id", request).0
    }

    fn request_headers(id: &str, backend: Option<&str>) -> Inbound {
        let mut attributes = std::collections::HashMap::new();
        if let Some(b) = backend {
            let value = Value {
                kind: Some(Kind::StringValue(b.into())),
            };
            attributes.insert(
                "envoy.filters.http.ext_proc".to_string(),
                Struct {
                    fields: [(BACKEND_ATTRIBUTE.to_string(), value)].into(),
                },
            );
        }
        Inbound::from(ProcessingRequest {
            request: Some(Request::RequestHeaders(HttpHeaders {
                headers: Some(HeaderMap {
                    headers: vec![HeaderValue {
                        key: REQUEST_ID_HEADER.into(),
                        raw_value: id.as_bytes().to_vec(),
                        ..Default::default()
                    }],
                }),
                ..Default::default()
            })),
            attributes,
            ..Default::default()
        })
    }

    fn response_headers(status: &str) -> Inbound {
        Inbound::from(ProcessingRequest {
            request: Some(Request::ResponseHeaders(HttpHeaders {
                headers: Some(HeaderMap {
                    headers: vec![HeaderValue {
                        key: ":status".into(),
                        raw_value: status.as_bytes().to_vec(),
                        ..Default::default()
                    }],
                }),
                ..Default::default()
            })),
            ..Default::default()
        })
    }

    /// The headers an answer sets, and whether it replaces the body.
    fn sets(answer: &ProcessingResponse) -> (Vec<(String, String)>, Option<Vec<u8>>) {
        let Some(Response::RequestHeaders(h)) = &answer.response else {
            panic!("not a headers answer: {answer:?}");
        };
        let common = h.response.as_ref().unwrap();
        let set = common
            .header_mutation
            .as_ref()
            .unwrap()
            .set_headers
            .iter()
            .map(|o| {
                let h = o.header.as_ref().unwrap();
                (
                    h.key.clone(),
                    String::from_utf8_lossy(&h.raw_value).into_owned(),
                )
            })
            .collect();
        let body = common.body_mutation.as_ref().map(|m| match &m.mutation {
            Some(envoy_types::pb::envoy::service::ext_proc::v3::body_mutation::Mutation::Body(
                b,
            )) => {
                assert_eq!(common.status, ResponseStatus::ContinueAndReplace as i32);
                b.clone()
            }
            other => panic!("{other:?}"),
        });
        (set, body)
    }

    /// The `content_length` the answer writes in the gateway's metadata.
    fn content_length(answer: &ProcessingResponse) -> Option<String> {
        let ns = answer
            .dynamic_metadata
            .as_ref()?
            .fields
            .get(crate::extproc::report::METADATA_NAMESPACE)?;
        let Some(Kind::StructValue(fields)) = &ns.kind else {
            return None;
        };
        match fields.fields.get(CONTENT_LENGTH_FIELD)?.kind.as_ref()? {
            Kind::StringValue(v) => Some(v.clone()),
            _ => None,
        }
    }

    #[test]
    fn each_attempt_gets_its_own_key_path_and_body() {
        let state = state();
        let body = br#"{"model":"m","messages":[]}"#;
        let id = register(&state, body);
        // Backend a keeps the client's name: its body is the client's.
        let mut first = AttemptExchange::new(Arc::clone(&state));
        let answer = first.on_message(request_headers(&id, Some("a"))).unwrap();
        let (set, sent) = sets(&answer);
        assert!(set.contains(&("authorization".into(), "Bearer sk-a".into())));
        assert!(set.contains(&(":path".into(), "/v1/chat/completions".into())));
        assert_eq!(sent.as_deref(), Some(&body[..]));
        assert_eq!(content_length(&answer), Some(body.len().to_string()));
        first.on_message(response_headers("429")).unwrap();
        // Backend b: its own key, its path prefix, its model name, and the
        // length of that body in the metadata.
        let mut second = AttemptExchange::new(Arc::clone(&state));
        let answer = second.on_message(request_headers(&id, Some("b"))).unwrap();
        let (set, sent) = sets(&answer);
        assert!(set.contains(&("authorization".into(), "Bearer sk-b".into())));
        assert!(set.contains(&(":path".into(), "/openai/v1/chat/completions".into())));
        let sent = sent.unwrap();
        assert_eq!(sent, br#"{"model":"m-b","messages":[]}"#);
        assert_eq!(
            content_length(&answer).as_deref(),
            Some(sent.len().to_string().as_str()),
            "the length of this attempt's body, for its content-length"
        );
        second.on_message(response_headers("200")).unwrap();
        let chain = state.chains.get(&id).unwrap();
        assert_eq!(chain.attempts_line(), "a:429 b:200");
        assert_eq!(&*chain.answering_hop().unwrap().backend.name, "b");
    }

    /// Table: what an attempt that does not fit gets. Never a key.
    #[test]
    fn odd_attempts_get_no_key() {
        let state = state();
        let id = register(&state, br#"{"model":"m"}"#);
        let cases: [(&str, Inbound, bool); 4] = [
            ("unknown id", request_headers("client-id", Some("a")), true),
            ("no backend attribute", request_headers(&id, None), true),
            (
                "a backend outside the chain",
                request_headers(&id, Some("c")),
                true,
            ),
            ("response headers first", response_headers("200"), false),
        ];
        for (what, message, answered) in cases {
            let mut attempt = AttemptExchange::new(Arc::clone(&state));
            match attempt.on_message(message) {
                Ok(answer) => {
                    assert!(answered, "{what}: answered");
                    let text = format!("{answer:?}");
                    assert!(
                        matches!(answer.response, Some(Response::ImmediateResponse(_))),
                        "{what}: {text}"
                    );
                    assert!(!text.contains("sk-"), "{what}: a key in {text}");
                }
                Err(status) => assert!(!answered, "{what}: {status}"),
            }
        }
        // Nothing more after a refusal.
        let mut refused = AttemptExchange::new(Arc::clone(&state));
        refused
            .on_message(request_headers("client-id", Some("a")))
            .unwrap();
        assert!(refused.on_message(request_headers(&id, Some("a"))).is_err());
        assert!(refused.on_message(response_headers("200")).is_err());
        // A second request headers message on one stream is refused.
        let mut attempt = AttemptExchange::new(Arc::clone(&state));
        attempt.on_message(request_headers(&id, Some("a"))).unwrap();
        assert!(attempt.on_message(request_headers(&id, Some("b"))).is_err());
        attempt.on_message(response_headers("200")).unwrap();
        assert!(attempt.on_message(response_headers("200")).is_err());
    }
}
