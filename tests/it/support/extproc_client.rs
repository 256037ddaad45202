//! An ext_proc client written for the tests, speaking to the processor's
//! endpoint directly as an attacker on the machine would: hand-built
//! messages, in any order, with or without the shared secret or a client
//! certificate.

use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request, HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::Status;

/// Opens a channel to a Unix socket.
pub async fn unix_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = path.to_path_buf();
    Endpoint::from_static("http://extproc.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}

/// Opens a channel to a TCP address, with TLS when given.
pub async fn tcp_channel(
    addr: &str,
    tls: Option<ClientTlsConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    endpoint.connect().await
}

/// Sends `messages` on one stream, one at a time, reading the answer to
/// each; stops at the first error (a refused stream, an out-of-order
/// message). `secret` goes into the stream's metadata, as Envoy sends it.
pub async fn exchange(
    channel: Channel,
    secret: Option<&str>,
    messages: Vec<ProcessingRequest>,
) -> Vec<Result<ProcessingResponse, Status>> {
    let mut client = ExternalProcessorClient::new(channel);
    let (tx, rx) = mpsc::channel(8);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(s) = secret {
        request
            .metadata_mut()
            .insert("x-ai-gateway-secret", s.parse().unwrap());
    }
    let mut out = Vec::new();
    let mut pending = messages.into_iter();
    let Some(first) = pending.next() else {
        return out;
    };
    tx.send(first).await.unwrap();
    let mut inbound = match client.process(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            out.push(Err(status));
            return out;
        }
    };
    loop {
        match inbound.next().await {
            Some(Ok(answer)) => out.push(Ok(answer)),
            Some(Err(status)) => {
                out.push(Err(status));
                return out;
            }
            None => return out,
        }
        match pending.next() {
            Some(m) => {
                if tx.send(m).await.is_err() {
                    return out;
                }
            }
            None => return out,
        }
    }
}

/// Whether an answer carries `needle` anywhere (a header value, a body).
pub fn carries(answer: &ProcessingResponse, needle: &str) -> bool {
    let bytes = answer.encode_to_vec();
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// A request-headers message.
pub fn headers(pairs: &[(&str, &str)], end_of_stream: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(processing_request::Request::RequestHeaders(header_map(
            pairs,
            end_of_stream,
        ))),
        ..Default::default()
    }
}

/// A response-headers message.
pub fn response_headers(pairs: &[(&str, &str)], end_of_stream: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(processing_request::Request::ResponseHeaders(header_map(
            pairs,
            end_of_stream,
        ))),
        ..Default::default()
    }
}

fn header_map(pairs: &[(&str, &str)], end_of_stream: bool) -> HttpHeaders {
    HttpHeaders {
        headers: Some(HeaderMap {
            headers: pairs
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: k.to_string(),
                    raw_value: v.as_bytes().to_vec(),
                    ..Default::default()
                })
                .collect(),
        }),
        end_of_stream,
        ..Default::default()
    }
}

/// A request-body message.
pub fn body(content: &str, end_of_stream: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(processing_request::Request::RequestBody(HttpBody {
            body: content.as_bytes().to_vec(),
            end_of_stream,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// A response-body message.
pub fn response_body(content: &str, end_of_stream: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(processing_request::Request::ResponseBody(HttpBody {
            body: content.as_bytes().to_vec(),
            end_of_stream,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The request headers of a chat completion, as Envoy forwards them.
pub fn chat_headers(extra: &[(&str, &str)]) -> ProcessingRequest {
    let mut pairs = vec![
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("content-type", "application/json"),
    ];
    pairs.extend_from_slice(extra);
    headers(&pairs, false)
}
