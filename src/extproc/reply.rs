//! Builders of the `ProcessingResponse` messages Envoy expects, so the
//! exchange logic reads as decisions rather than protobuf plumbing.

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue, HeaderValueOption,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation, common_response::ResponseStatus, processing_response::Response, BodyMutation,
    BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse,
    ProcessingResponse,
};
use envoy_types::pb::google::protobuf::Struct;

use super::chains::REQUEST_ID_HEADER;
use super::{BACKEND_HEADER, MODEL_HEADER};
use crate::decision::{Forward, Hygiene};
use crate::openai::error::ApiError;
use crate::provider_keys::ApiKey;

/// A header to set, replacing any value the request already had.
pub fn set_header(key: &str, value: &[u8]) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            raw_value: value.to_vec(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// What to change in a message Envoy holds.
#[derive(Default)]
pub struct Changes {
    pub set: Vec<HeaderValueOption>,
    pub remove: Vec<String>,
    pub body: Option<Vec<u8>>,
    /// Ask Envoy to match the route again, on the headers as changed.
    pub reroute: bool,
}

impl Changes {
    /// Adds `other`'s changes to these.
    pub fn add(&mut self, other: Changes) {
        self.set.extend(other.set);
        self.remove.extend(other.remove);
        if other.body.is_some() {
            self.body = other.body;
        }
        self.reroute |= other.reroute;
    }

    fn into_common(self) -> Option<CommonResponse> {
        if self.set.is_empty() && self.remove.is_empty() && self.body.is_none() && !self.reroute {
            // An absent CommonResponse means "continue unchanged".
            return None;
        }
        let header_mutation =
            (!self.set.is_empty() || !self.remove.is_empty()).then_some(HeaderMutation {
                set_headers: self.set,
                remove_headers: self.remove,
            });
        Some(CommonResponse {
            status: ResponseStatus::Continue as i32,
            header_mutation,
            body_mutation: self.body.map(|b| BodyMutation {
                mutation: Some(body_mutation::Mutation::Body(b)),
            }),
            clear_route_cache: self.reroute,
            ..Default::default()
        })
    }
}

/// Where a forwarded request goes, as the exchange knows it once it has
/// decided: one backend with its key, or a chain by the id its attempts
/// will carry.
pub enum Destination<'a> {
    Backend {
        key: &'a ApiKey,
        body: Option<&'a Vec<u8>>,
    },
    Chain {
        name: &'a str,
        id: &'a str,
    },
}

/// The changes that send a request to `to`: the routing header Envoy's
/// routes match on (and a new route match), the model for the access log,
/// and for one backend its key and the rewritten body with its length. A
/// chain gets its keys and bodies per attempt (`attempt`); here it only
/// gets the id its attempts find it by.
pub fn forward(forward: &Forward, to: Destination<'_>) -> Changes {
    let mut set = Vec::with_capacity(4);
    let mut body = None;
    match to {
        Destination::Chain { name, id } => {
            set.push(set_header(BACKEND_HEADER, name.as_bytes()));
            set.push(set_header(REQUEST_ID_HEADER, id.as_bytes()));
        }
        Destination::Backend { key, body: renamed } => {
            set.push(set_header(
                BACKEND_HEADER,
                forward.route.backend.name.as_bytes(),
            ));
            set.push(set_header("authorization", key.authorization().as_bytes()));
            if let Some(b) = renamed {
                set.push(set_header("content-length", b.len().to_string().as_bytes()));
                body = Some(b.clone());
            }
        }
    }
    if let Some(model) = &forward.model {
        set.push(set_header(MODEL_HEADER, model.as_bytes()));
    }
    Changes {
        set,
        body,
        reroute: true,
        ..Changes::default()
    }
}

/// The changes that take the client's credentials (headers and query
/// parameters) and spoofed internal headers off a forwarded request.
pub fn hygiene(hygiene: Hygiene) -> Changes {
    let mut set = Vec::new();
    if let Some(path) = hygiene.path {
        set.push(set_header(":path", path.as_bytes()));
    }
    Changes {
        set,
        remove: hygiene.remove,
        ..Changes::default()
    }
}

pub fn request_headers(changes: Changes) -> ProcessingResponse {
    wrap(Response::RequestHeaders(HeadersResponse {
        response: changes.into_common(),
    }))
}

/// A request headers answer that may also replace the body: Envoy takes a
/// body from a headers answer only with `CONTINUE_AND_REPLACE`.
pub fn request_headers_replacing_body(changes: Changes) -> ProcessingResponse {
    let replace = changes.body.is_some();
    let mut common = changes.into_common();
    if let (true, Some(c)) = (replace, common.as_mut()) {
        c.status = ResponseStatus::ContinueAndReplace as i32;
    }
    wrap(Response::RequestHeaders(HeadersResponse {
        response: common,
    }))
}

pub fn request_body(changes: Changes) -> ProcessingResponse {
    wrap(Response::RequestBody(BodyResponse {
        response: changes.into_common(),
    }))
}

pub fn response_headers(changes: Changes) -> ProcessingResponse {
    wrap(Response::ResponseHeaders(HeadersResponse {
        response: changes.into_common(),
    }))
}

pub fn response_body(changes: Changes) -> ProcessingResponse {
    wrap(Response::ResponseBody(BodyResponse {
        response: changes.into_common(),
    }))
}

/// Adds Envoy dynamic metadata to a response, if there is any.
pub fn with_metadata(
    mut response: ProcessingResponse,
    metadata: Option<Struct>,
) -> ProcessingResponse {
    response.dynamic_metadata = metadata;
    response
}

/// Answers the client directly; nothing is sent upstream.
pub fn immediate(
    status: u16,
    body: Vec<u8>,
    content_type: &str,
    details: &str,
) -> ProcessingResponse {
    immediate_with(status, body, content_type, &[], details)
}

fn immediate_with(
    status: u16,
    body: Vec<u8>,
    content_type: &str,
    extra: &[(String, String)],
    details: &str,
) -> ProcessingResponse {
    let mut set_headers = vec![set_header("content-type", content_type.as_bytes())];
    set_headers.extend(extra.iter().map(|(k, v)| set_header(k, v.as_bytes())));
    wrap(Response::ImmediateResponse(ImmediateResponse {
        status: Some(HttpStatus {
            code: i32::from(status),
        }),
        headers: Some(HeaderMutation {
            set_headers,
            remove_headers: Vec::new(),
        }),
        body,
        // Shows in Envoy's %RESPONSE_CODE_DETAILS%.
        details: details.to_string(),
        ..Default::default()
    }))
}

/// An OpenAI-shaped error answered by the gateway.
pub fn error(e: &ApiError) -> ProcessingResponse {
    immediate_with(
        e.status,
        e.to_json(),
        "application/json",
        &e.headers,
        &format!("ai_gateway_{}", e.code),
    )
}

fn wrap(response: Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(response),
        ..Default::default()
    }
}
