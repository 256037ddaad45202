//! The decision: what the gateway does with a request, as pure functions.
//!
//! Request head + body + the configuration snapshot + the keys in force →
//! forward instructions, or an OpenAI-shaped [`ApiError`]. No I/O, no clock,
//! no Envoy: the ext_proc exchange feeds the phases in and turns the result
//! into Envoy's messages. Every rule of access, routing and body checking
//! lives here, tested table by table.
//!
//! Two steps, because the headers must be answered before the body comes:
//! 1. [`decide_head`]: the client key, the path, the method, the declared
//!    size; a `GET` is decided entirely here (by its path);
//! 2. [`decide_body`]: the body's `model`, the client key's model rules,
//!    the route, the provider key, the rewrite.

pub mod head;

use std::ops::Range;
use std::sync::Arc;

use crate::client_keys::{ClientKey, ClientKeySet};
use crate::config::check_model_name;
use crate::openai::error::ApiError;
use crate::openai::request::{rewrite_model, summarize};
use crate::openai::{models, Endpoint};
use crate::provider_keys::{ApiKey, ProviderKeys};
use crate::routes::Route;
use crate::state::Snapshot;

pub use head::{Hygiene, RequestHead};

/// What the request headers decide.
#[derive(Debug)]
pub enum HeadDecision {
    /// The gateway answers now: an error, or its own model list.
    Answer(Answer),
    /// Forward now, by the path (`GET /v1/models[/{id}]` to the catch-all
    /// backend).
    Forward(Admitted, Hygiene, Forward),
    /// Forward once the body has named the model; strip the client's
    /// credentials meanwhile.
    AwaitBody(Admitted, Hygiene),
}

/// The gateway's own answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    Error(ApiError),
    /// `GET /v1/models[/{id}]` answered from the configuration.
    Models(Vec<u8>),
}

/// A request that passed the head checks.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub endpoint: Endpoint,
    /// The gateway key the client presented, when client keys are on.
    pub client: Option<Arc<ClientKey>>,
}

/// Where a request goes, and how.
#[derive(Debug, Clone)]
pub struct Forward {
    pub route: Route,
    pub target: Target,
    /// The client's model; `None` for a model listing.
    pub model: Option<Box<str>>,
    pub stream: bool,
    /// The output cap the request names, if any.
    pub max_output_tokens: Option<u64>,
}

/// How a forwarded request reaches its provider.
#[derive(Debug, Clone)]
pub enum Target {
    /// One backend: its key, and the body to send instead of the client's
    /// when the model is renamed for it.
    Backend { key: ApiKey, body: Option<Vec<u8>> },
    /// A fallback chain (`route.chain`): Envoy tries its backends in turn,
    /// and each attempt gets its backend's key, and its body, from the
    /// per-attempt pass (`extproc::attempt`), never from here. The span of
    /// the model's value in the body, for the attempts that rename it.
    Chain { model_span: Range<usize> },
}

/// Decides on the request headers. `client_keys` is `None` when access is
/// open.
pub fn decide_head(
    head: &RequestHead,
    snapshot: &Snapshot,
    client_keys: Option<&ClientKeySet>,
    provider_keys: &ProviderKeys,
) -> HeadDecision {
    let refuse = |e: ApiError| HeadDecision::Answer(Answer::Error(e));
    // Access first: without a valid gateway key, nothing else is said (not
    // even whether the path exists).
    let client = match client_keys {
        None => None,
        Some(keys) => {
            let presented = head.credential.as_deref().unwrap_or_default();
            match keys.authorize(presented) {
                Some(key) => Some(key),
                None => return refuse(ApiError::invalid_api_key()),
            }
        }
    };
    let Some(endpoint) = Endpoint::from_path(&head.path) else {
        return refuse(ApiError::unknown_path(&head.method, &head.path));
    };
    if head.method != endpoint.method() {
        return refuse(ApiError::method_not_allowed(
            &head.method,
            &head.path,
            endpoint.method(),
        ));
    }
    let admitted = Admitted { endpoint, client };
    if !endpoint.has_model_body() {
        return decide_model_listing(head, admitted, snapshot, provider_keys);
    }
    if head.bodiless {
        return refuse(ApiError::invalid_body(
            "The request has no body; send a JSON object with a `model` field.".into(),
        ));
    }
    let limit = snapshot.max_request_body_bytes;
    if head.content_length.is_some_and(|len| len > limit as u64) {
        return refuse(ApiError::body_too_large(limit));
    }
    HeadDecision::AwaitBody(admitted, Hygiene::of(head))
}

/// `GET /v1/models[/{id}]`, decided by the path: the catch-all backend's
/// own answer if there is one (clients such as Kilo Code read the
/// provider's extra fields), otherwise the gateway's list of the models it
/// routes.
fn decide_model_listing(
    head: &RequestHead,
    admitted: Admitted,
    snapshot: &Snapshot,
    provider_keys: &ProviderKeys,
) -> HeadDecision {
    let refuse = |e: ApiError| HeadDecision::Answer(Answer::Error(e));
    let id = head.path.strip_prefix("/v1/models/");
    if let Some(id) = id {
        if id.contains('%') {
            // The provider may decode `%2F` into a path separator (or not):
            // the gateway cannot know which model it would read.
            return refuse(ApiError::invalid_model(
                "The model id in the path must not be percent-encoded; send it as it is (e.g. /v1/models/xai/grok-4.5).".into(),
            ));
        }
        if let Err(m) = check_model_name(id) {
            return refuse(ApiError::invalid_model(format!(
                "The model id in the path {m}."
            )));
        }
    }
    if let Some(route) = snapshot.routes.catch_all() {
        let Some(key) = provider_keys.get(&route.backend.name) else {
            return refuse(ApiError::key_unavailable(&route.backend.name));
        };
        // A listing goes to the primary only: it is not worth a retry.
        let forward = Forward {
            route: route.clone(),
            target: Target::Backend { key, body: None },
            model: None,
            stream: false,
            max_output_tokens: None,
        };
        return HeadDecision::Forward(admitted, Hygiene::of(head), forward);
    }
    let body = match id {
        Some(id) if !snapshot.routes.is_listed(id) => {
            return refuse(ApiError::model_not_found(id));
        }
        Some(id) => models::model_json(id),
        None => snapshot.model_list_json.clone(),
    };
    HeadDecision::Answer(Answer::Models(body))
}

/// Decides on the request body (the whole body: Envoy buffers it).
pub fn decide_body(
    admitted: &Admitted,
    body: &[u8],
    snapshot: &Snapshot,
    provider_keys: &ProviderKeys,
) -> Result<Forward, ApiError> {
    let limit = snapshot.max_request_body_bytes;
    if body.len() > limit {
        return Err(ApiError::body_too_large(limit));
    }
    let summary = summarize(body).map_err(|e| {
        if e.is_model_error() {
            ApiError::invalid_model(e.to_string())
        } else {
            ApiError::invalid_body(e.to_string())
        }
    })?;
    if let Some(client) = &admitted.client {
        if !client.allows(&summary.model) {
            return Err(ApiError::model_not_allowed(&summary.model));
        }
    }
    let route = snapshot
        .routes
        .resolve(&summary.model)
        .ok_or_else(|| ApiError::model_not_found(&summary.model))?;
    let target = if route.chain.is_some() {
        // Each attempt's key and body are its own, given by the attempt
        // pass when Envoy has picked the attempt's backend; a backend of
        // the chain without a key fails its own attempt, not the request.
        Target::Chain {
            model_span: summary.model_span.clone(),
        }
    } else {
        let key = provider_keys
            .get(&route.backend.name)
            .ok_or_else(|| ApiError::key_unavailable(&route.backend.name))?;
        let body = renamed_body(
            route.upstream_model.as_deref(),
            &summary.model,
            body,
            &summary.model_span,
        );
        Target::Backend { key, body }
    };
    Ok(Forward {
        route: route.clone(),
        target,
        model: Some(summary.model.as_ref().into()),
        stream: summary.stream,
        max_output_tokens: summary.max_output_tokens,
    })
}

/// The body a backend gets: the client's with the model renamed to
/// `upstream_model`, or `None` when the client's goes as it is.
pub fn renamed_body(
    upstream_model: Option<&str>,
    client_model: &str,
    body: &[u8],
    model_span: &Range<usize>,
) -> Option<Vec<u8>> {
    upstream_model
        .filter(|upstream| *upstream != client_model)
        .map(|upstream| rewrite_model(body, model_span, upstream))
}

#[cfg(test)]
mod tests;
