//! Binding and serving the ext_proc gRPC service on TCP or a Unix socket.
//!
//! A Unix socket is the cheaper transport when Envoy runs beside the
//! processor (same pod, shared `emptyDir`); TCP is there for everything else.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use super::grpc::ExtProcEndpoint;
use super::ExtProcService;
use crate::config::ListenAddr;

/// Room for the protobuf framing around a request body in one message.
const MESSAGE_OVERHEAD: usize = 64 * 1024;

/// A bound ext_proc listener.
pub enum ExtProcListener {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
}

/// Why the ext_proc listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
}

impl ExtProcListener {
    pub async fn bind(addr: &ListenAddr) -> Result<Self, ListenError> {
        let bind_err = |source| ListenError::Bind {
            addr: addr.to_string(),
            source,
        };
        match addr {
            ListenAddr::Tcp(a) => Ok(Self::Tcp(TcpListener::bind(a).await.map_err(bind_err)?)),
            ListenAddr::Unix(path) => {
                remove_stale_socket(path)?;
                let listener = UnixListener::bind(path).map_err(bind_err)?;
                Ok(Self::Unix {
                    listener,
                    path: path.clone(),
                })
            }
        }
    }

    /// The address actually bound (the port is real even if 0 was asked).
    pub fn local_addr(&self) -> String {
        match self {
            Self::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp:?".into()),
            Self::Unix { path, .. } => format!("unix:{}", path.display()),
        }
    }

    /// Serves `service`, and the gRPC health service beside it, until
    /// `shutdown` resolves and open streams finish. Health says SERVING
    /// until shutdown starts, then NOT_SERVING while streams drain.
    pub async fn serve(
        self,
        service: ExtProcService,
        max_request_body_bytes: usize,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        let limit = max_request_body_bytes.saturating_add(MESSAGE_OVERHEAD);
        let grpc = ExtProcEndpoint::new(service, limit);
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<ExtProcEndpoint>().await;
        let shutdown = async move {
            shutdown.await;
            health.set_not_serving::<ExtProcEndpoint>().await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        };
        let server = Server::builder()
            // Envoy keeps its connection for good; pings find a dead peer.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(health_service)
            .add_service(grpc);
        match self {
            Self::Tcp(listener) => {
                let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                server
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
            Self::Unix { listener, path } => {
                let result = server
                    .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
                    .await;
                let _ = std::fs::remove_file(&path);
                result
            }
        }
    }
}

/// A socket file left by a previous run would make `bind` fail; anything
/// else at that path is not ours to delete.
fn remove_stale_socket(path: &Path) -> Result<(), ListenError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            let _ = std::fs::remove_file(path);
            Ok(())
        }
        Ok(_) => Err(ListenError::NotASocket {
            path: path.to_path_buf(),
        }),
        Err(_) => Ok(()),
    }
}
