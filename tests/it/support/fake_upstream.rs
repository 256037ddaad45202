//! A fake OpenAI-compatible provider: answers chat, completions, embeddings,
//! responses, messages and the model list like a real one, and records every
//! request it receives so tests can check what the gateway sent.
//!
//! Used by the integration tests and, through `examples/fake_upstream.rs`,
//! by `scripts/run.sh` as the default offline upstream.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::{rustls, server::TlsStream, TlsAcceptor};
use tokio_stream::wrappers::ReceiverStream;

/// One request as the provider received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The HTTP version it came in (`HTTP/1.1`, `HTTP/2.0`).
    pub version: String,
    /// `:authority` (HTTP/2) or `Host` (HTTP/1.1).
    pub authority: Option<String>,
    pub path: String,
    /// The query string, without its `?`.
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Every value of a header (to catch duplicates).
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A fixed answer to give instead of the normal one.
#[derive(Debug, Clone)]
pub struct Canned {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

struct Inner {
    name: String,
    recorded: Mutex<Vec<Recorded>>,
    canned: Mutex<Option<Canned>>,
    /// Streams wait on this after their first event, when set.
    gate: Mutex<Option<Arc<Notify>>>,
    /// Compress responses with gzip (streams flushed per event).
    gzip: AtomicBool,
    /// Pause between stream events, in milliseconds (0: none).
    stream_interval_ms: std::sync::atomic::AtomicU64,
    /// Pause before answering at all, in milliseconds (0: none).
    delay_ms: std::sync::atomic::AtomicU64,
    /// Record requests without their bodies (large-body tests).
    discard_bodies: AtomicBool,
    /// Behind TLS: the server name (SNI) of each handshake that succeeded.
    server_names: Mutex<Vec<String>>,
}

/// A running fake provider.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

/// The model list the fake provider serves, with the extra per-model fields
/// that TARS and some clients use; the gateway must pass them untouched.
/// Prices as TARS lists them: USD per token, as strings or numbers.
pub const MODEL_LIST: &str = r#"{"object":"list","data":[{"id":"gpt-4o-mini","object":"model","created":1721172741,"owned_by":"openai","context_window":128000,"max_output_tokens":16384,"input_price":"0.00000015","output_price":6e-7,"cached_price":"0.000000075","supports_vision":true},{"id":"claude-sonnet-4-20250514","object":"model","created":1747958400,"owned_by":"anthropic","context_window":200000,"supports_reasoning":true}]}"#;

impl FakeUpstream {
    /// Starts on an ephemeral loopback port.
    pub async fn start(name: &str) -> Self {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(name: &str, addr: SocketAddr) -> Self {
        Self::start_with(name, addr, None).await
    }

    async fn start_with(name: &str, addr: SocketAddr, tls: Option<Tls<'_>>) -> Self {
        let inner = Arc::new(Inner {
            name: name.to_string(),
            recorded: Mutex::new(Vec::new()),
            canned: Mutex::new(None),
            gate: Mutex::new(None),
            gzip: AtomicBool::new(false),
            stream_interval_ms: std::sync::atomic::AtomicU64::new(0),
            delay_ms: std::sync::atomic::AtomicU64::new(0),
            discard_bodies: AtomicBool::new(false),
            server_names: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind fake upstream");
        let addr = listener.local_addr().expect("fake upstream address");
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&inner));
        match tls {
            None => {
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app).await;
                });
            }
            Some(tls) => {
                let listener = TlsListener {
                    tcp: listener,
                    acceptor: tls_acceptor(&tls),
                    inner: Arc::clone(&inner),
                };
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app).await;
                });
            }
        }
        Self { addr, inner }
    }

    /// Starts behind TLS with the PEM files `cert` and `key`, offering the
    /// ALPN protocols `alpn` (`h2`, `http/1.1`), on an ephemeral loopback
    /// port.
    pub async fn start_tls(name: &str, cert: &Path, key: &Path, alpn: &[&str]) -> Self {
        let tls = Tls { cert, key, alpn };
        Self::start_with(name, "127.0.0.1:0".parse().unwrap(), Some(tls)).await
    }

    /// The server names (SNI) the TLS handshakes asked for.
    pub fn server_names(&self) -> Vec<String> {
        self.inner.server_names.lock().unwrap().clone()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.recorded.lock().unwrap().clone()
    }

    pub fn last(&self) -> Recorded {
        self.requests()
            .pop()
            .expect("the upstream received no request")
    }

    pub fn clear(&self) {
        self.inner.recorded.lock().unwrap().clear();
    }

    /// Makes every following stream send its first event, then wait until
    /// the returned `Notify` is notified before sending the rest.
    pub fn hold_streams_after_first_event(&self) -> Arc<Notify> {
        let gate = Arc::new(Notify::new());
        *self.inner.gate.lock().unwrap() = Some(Arc::clone(&gate));
        gate
    }

    /// Pauses this long between the events of following streams, as a
    /// model generating tokens does.
    #[allow(dead_code)] // examples/fake_upstream.rs uses it
    pub fn set_stream_interval(&self, interval: std::time::Duration) {
        let ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        self.inner.stream_interval_ms.store(ms, Ordering::Relaxed);
    }

    /// Waits this long before answering each following request.
    pub fn set_delay(&self, delay: std::time::Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.inner.delay_ms.store(ms, Ordering::Relaxed);
    }

    /// Records following requests without their bodies (the answer still
    /// reads the model), so large-body tests do not hold every body.
    pub fn discard_bodies(&self) {
        self.inner.discard_bodies.store(true, Ordering::Relaxed);
    }

    /// Compresses following responses with gzip (`content-encoding: gzip`).
    pub fn set_gzip(&self, on: bool) {
        self.inner.gzip.store(on, Ordering::Relaxed);
    }

    /// Answers every following request with `canned` (None: normal again).
    pub fn set_canned(&self, canned: Option<Canned>) {
        *self.inner.canned.lock().unwrap() = canned;
    }
}

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let recorded = Recorded {
        method: parts.method.to_string(),
        version: format!("{:?}", parts.version),
        authority: parts.uri.authority().map(|a| a.to_string()).or_else(|| {
            parts
                .headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        }),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers,
        body,
    };
    let mut kept = recorded.clone();
    if inner.discard_bodies.load(Ordering::Relaxed) {
        kept.body = Bytes::new();
    }
    inner.recorded.lock().unwrap().push(kept);
    let delay = inner.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }

    let canned = inner.canned.lock().unwrap().clone();
    if let Some(c) = canned {
        let mut builder = Response::builder().status(c.status);
        for (k, v) in &c.headers {
            builder = builder.header(k, v);
        }
        return builder.body(Body::from(c.body)).unwrap();
    }

    let request = recorded.json();
    let model = request["model"].as_str().unwrap_or("unknown").to_string();
    let name = &inner.name;
    let gzip = inner.gzip.load(Ordering::Relaxed);
    let answer = match (recorded.method.as_str(), recorded.path.as_str()) {
        ("GET", "/v1/models") => return json_response(StatusCode::OK, MODEL_LIST.to_string(), name, false),
        ("POST", "/v1/chat/completions") if request["stream"] == json!(true) => {
            let gate = inner.gate.lock().unwrap().clone();
            let include_usage = request["stream_options"]["include_usage"] == json!(true);
            let interval = std::time::Duration::from_millis(inner.stream_interval_ms.load(Ordering::Relaxed));
            return sse_response(&model, name, include_usage, gate, gzip, interval);
        }
        ("POST", "/v1/chat/completions") => json!({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("Hello from {name}.")}, "finish_reason": "stop"}],
            "usage": usage(),
        }),
        ("POST", "/v1/completions") => json!({
            "id": "cmpl-fake", "object": "text_completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "text": format!("Hello from {name}."), "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        }),
        ("POST", "/v1/embeddings") => json!({
            "object": "list", "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
            "usage": {"prompt_tokens": 2, "total_tokens": 2},
        }),
        ("POST", "/v1/responses") => json!({
            "id": "resp-fake", "object": "response", "model": model, "status": "completed",
            "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": format!("Hello from {name}.")}]}],
            "usage": {"input_tokens": 9, "output_tokens": 4, "total_tokens": 13},
        }),
        ("POST", "/v1/messages") => json!({
            "id": "msg-fake", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": format!("Hello from {name}.")}],
            "stop_reason": "end_turn", "usage": {"input_tokens": 9, "output_tokens": 4},
        }),
        _ => {
            return json_response(
                StatusCode::NOT_FOUND,
                json!({"error": {"message": "fake upstream: no such path", "type": "invalid_request_error", "code": "not_found"}}).to_string(),
                name,
                false,
            )
        }
    };
    json_response(StatusCode::OK, answer.to_string(), name, gzip)
}

/// The usage the fake reports for a chat, with the detail fields OpenAI
/// sends (prompt cache hits, reasoning tokens).
pub fn usage() -> Value {
    json!({"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13,
           "prompt_tokens_details": {"cached_tokens": 2},
           "completion_tokens_details": {"reasoning_tokens": 1}})
}

fn json_response(status: StatusCode, body: String, name: &str, gzip: bool) -> Response {
    let body = if gzip {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(body.as_bytes()).unwrap();
        enc.finish().unwrap()
    } else {
        body.into_bytes()
    };
    respond(status, Body::from(body), "application/json", name, gzip)
}

/// A response with the headers every fake answer carries: its type, its
/// encoding, and which fake provider sent it.
fn respond(
    status: StatusCode,
    body: Body,
    content_type: &'static str,
    name: &str,
    gzip: bool,
) -> Response {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let headers = r.headers_mut();
    headers.insert("content-type", HeaderValue::from_static(content_type));
    if gzip {
        headers.insert("content-encoding", HeaderValue::from_static("gzip"));
    }
    headers.insert(
        HeaderName::from_static("x-fake-upstream"),
        HeaderValue::from_str(name).unwrap(),
    );
    r
}

/// The SSE stream a provider sends for `stream: true`: role, two content
/// deltas, a finish chunk, the usage chunk (empty choices) if asked, [DONE].
/// With a gate, the stream waits after its first event until notified.
fn sse_response(
    model: &str,
    name: &str,
    include_usage: bool,
    gate: Option<Arc<Notify>>,
    gzip: bool,
    interval: std::time::Duration,
) -> Response {
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
                           "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        if include_usage {
            // As OpenAI does: every chunk carries `usage`, null but the last.
            c["usage"] = Value::Null;
        }
        c
    };
    let mut events = vec![
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        chunk(json!({"content": "Hello "}), Value::Null),
        chunk(json!({"content": format!("from {name}.")}), Value::Null),
        chunk(json!({}), json!("stop")),
    ];
    if include_usage {
        events.push(
            json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
                           "model": model, "choices": [], "usage": usage()}),
        );
    }
    let mut frames: Vec<Vec<u8>> = events
        .into_iter()
        .map(|e| format!("data: {e}\n\n").into_bytes())
        .collect();
    frames.push(b"data: [DONE]\n\n".to_vec());
    if gzip {
        // One gzip stream, flushed after each event so that every frame is
        // decodable as it arrives, as a streaming server sends it.
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let last = frames.len() - 1;
        for (i, frame) in frames.iter_mut().enumerate() {
            enc.write_all(frame).unwrap();
            enc.flush().unwrap();
            if i == last {
                enc.try_finish().unwrap();
            }
            *frame = std::mem::take(enc.get_mut());
        }
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    tokio::spawn(async move {
        let mut frames = frames.into_iter();
        if let Some(first) = frames.next() {
            let _ = tx.send(Ok(Bytes::from(first))).await;
        }
        if let Some(gate) = gate {
            gate.notified().await;
        }
        for frame in frames {
            if !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            let _ = tx.send(Ok(Bytes::from(frame))).await;
        }
    });
    respond(
        StatusCode::OK,
        Body::from_stream(ReceiverStream::new(rx)),
        "text/event-stream",
        name,
        gzip,
    )
}

/// How a fake provider serves TLS.
struct Tls<'a> {
    cert: &'a Path,
    key: &'a Path,
    alpn: &'a [&'a str],
}

fn tls_acceptor(tls: &Tls<'_>) -> TlsAcceptor {
    let certs = CertificateDer::pem_file_iter(tls.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(tls.key).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    TlsAcceptor::from(Arc::new(config))
}

/// A TCP listener whose connections are TLS: a handshake that fails (a
/// client that refuses the certificate) is dropped, and the next one
/// accepted.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    inner: Arc<Inner>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, peer)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                let name = tls.get_ref().1.server_name().unwrap_or("").to_string();
                self.inner.server_names.lock().unwrap().push(name);
                return (tls, peer);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
