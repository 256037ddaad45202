//! Requests in flight on a fallback chain, between the two passes that
//! serve them.
//!
//! The router pass (`exchange`) decides once per request: which chain, the
//! client's model, the body. Envoy then makes one attempt per backend of
//! the chain, and its upstream filter asks the attempt pass (`attempt`)
//! for each one's key and body. Both passes run in this process, on
//! separate gRPC streams; they meet here, by an id the router pass gives
//! the request (`x-request-id`, rewritten to `<client's id>.<sequence>`):
//! the client chooses the prefix, never the whole, so one request can
//! never reach another's entry. An entry lives as long as its router
//! pass, which ends after the last attempt.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::routes::{Hop, Route};

/// The header both passes read the request's id from.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// What the attempts of one request share.
#[derive(Debug)]
pub struct ChainRequest {
    pub route: Route,
    /// The model as the client named it.
    pub model: Box<str>,
    /// The path the client asked for, without credentials; each attempt
    /// prefixes it with its backend's path.
    pub path: Box<str>,
    /// The client's body and the span of its model, kept only when some
    /// backend of the chain gets the model under another name (a view of
    /// the received message, not a copy).
    pub body: Option<(Bytes, Range<usize>)>,
    /// The length of the client's body.
    pub body_len: usize,
    attempts: Mutex<Vec<Attempt>>,
}

/// One attempt, as far as it went.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The chain's backend it went to, with the model name it got.
    pub hop: Hop,
    /// The status the backend answered; `None`: no answer (a connection
    /// that failed or was reset).
    pub status: Option<u16>,
}

impl ChainRequest {
    pub fn new(
        route: Route,
        model: Box<str>,
        path: Box<str>,
        body: Option<(Bytes, Range<usize>)>,
        body_len: usize,
    ) -> Self {
        Self {
            route,
            model,
            path,
            body,
            body_len,
            attempts: Mutex::new(Vec::new()),
        }
    }

    /// Records that an attempt to `hop` begins; returns its index.
    pub fn begin(&self, hop: Hop) -> usize {
        let mut attempts = self.attempts();
        attempts.push(Attempt { hop, status: None });
        attempts.len() - 1
    }

    /// Records the status attempt `index` was answered with.
    pub fn answered(&self, index: usize, status: u16) {
        if let Some(a) = self.attempts().get_mut(index) {
            a.status = Some(status);
        }
    }

    /// Every attempt so far, in order.
    pub fn attempts(&self) -> MutexGuard<'_, Vec<Attempt>> {
        // A panic while the lock was held cannot leave the list half
        // changed (each change is one push or one field write).
        self.attempts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The backend whose answer the client gets: the last one that
    /// answered.
    pub fn answering_hop(&self) -> Option<Hop> {
        self.attempts()
            .iter()
            .rev()
            .find(|a| a.status.is_some())
            .map(|a| a.hop.clone())
    }

    /// The attempts for the request log: `tars:429 other:200`, `-` for an
    /// attempt without an answer.
    pub fn attempts_line(&self) -> String {
        let mut line = String::new();
        for (i, a) in self.attempts().iter().enumerate() {
            if i > 0 {
                line.push(' ');
            }
            let _ = match a.status {
                Some(s) => write!(line, "{}:{s}", a.hop.backend.name),
                None => write!(line, "{}:-", a.hop.backend.name),
            };
        }
        line
    }
}

/// The chain requests in flight, by id.
#[derive(Default)]
pub struct ChainRequests {
    sequence: AtomicU64,
    by_id: Mutex<HashMap<Box<str>, Arc<ChainRequest>>>,
}

impl ChainRequests {
    /// Registers a request; returns the id its attempts will carry.
    pub fn register(
        &self,
        client_request_id: &str,
        request: ChainRequest,
    ) -> (Box<str>, Arc<ChainRequest>) {
        let n = self.sequence.fetch_add(1, Ordering::Relaxed);
        let id: Box<str> = format!("{client_request_id}.{n}").into();
        let request = Arc::new(request);
        self.map().insert(id.clone(), Arc::clone(&request));
        (id, request)
    }

    pub fn get(&self, id: &str) -> Option<Arc<ChainRequest>> {
        self.map().get(id).cloned()
    }

    pub fn remove(&self, id: &str) {
        self.map().remove(id);
    }

    /// How many are in flight.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn map(&self) -> MutexGuard<'_, HashMap<Box<str>, Arc<ChainRequest>>> {
        // Held for one map operation, never across an await.
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn route() -> Route {
        let config = crate::config::Config::from_text(
            "backends:\n  - {name: a, url: 'http://127.0.0.1:1', api_key_file: k}\n  - {name: b, url: 'http://127.0.0.1:2/v2', api_key_file: k}\nmodels: [{name: m, backend: a, fallbacks: [{backend: b}]}]\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        crate::routes::RouteTable::new(&config)
            .resolve("m")
            .unwrap()
            .clone()
    }

    #[test]
    fn ids_are_unique_even_when_clients_reuse_theirs() {
        let chains = ChainRequests::default();
        let new = || ChainRequest::new(route(), "m".into(), "/v1/chat/completions".into(), None, 2);
        let (first, _) = chains.register("same", new());
        let (second, _) = chains.register("same", new());
        assert_ne!(first, second);
        assert!(first.starts_with("same."));
        assert_eq!(chains.len(), 2);
        chains.remove(&first);
        assert!(chains.get(&first).is_none());
        assert!(chains.get(&second).is_some());
        // A client naming another request's whole id only prefixes it.
        let (third, _) = chains.register(&second, new());
        assert_ne!(third, second);
    }

    #[test]
    fn the_last_backend_that_answered_is_the_answering_one() {
        let chain = ChainRequest::new(route(), "m".into(), "/".into(), None, 2);
        let hops: Vec<_> = chain.route.hops().collect();
        let answering = || chain.answering_hop().map(|h| h.backend.name.to_string());
        assert!(answering().is_none());
        let first = chain.begin(hops[0].clone());
        chain.answered(first, 429);
        let second = chain.begin(hops[1].clone());
        assert_eq!(answering().as_deref(), Some("a"));
        chain.answered(second, 200);
        assert_eq!(answering().as_deref(), Some("b"));
        assert_eq!(chain.attempts_line(), "a:429 b:200");
        let third = chain.begin(hops[0].clone());
        let _ = third;
        assert_eq!(chain.attempts_line(), "a:429 b:200 a:-");
    }
}
