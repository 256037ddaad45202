//! Binding and serving the ext_proc gRPC endpoint, on a Unix socket (the
//! default: Envoy runs beside the processor) or TCP.
//!
//! The endpoint hands out provider keys to whoever may open a stream (see
//! `stream_auth`), so binding is careful:
//! - the Unix socket is created in a private directory, given its mode
//!   (`extproc.socket_mode`), and only then renamed into place: no moment
//!   exists where another user could connect to it;
//! - an existing socket is replaced only if nothing answers on it (a crashed
//!   run's leftover); a live one belongs to a running processor, and this
//!   one refuses to start rather than take it over;
//! - TCP is served with mutual TLS when `extproc.tls` says so.

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::Request;

use super::grpc::{ExtProcEndpoint, ProcessFirstLayer};
use super::ExtProcService;
use crate::config::{ExtprocConfig, ExtprocTls, ListenAddr};
use crate::regular_file::{self, ReadError};
use crate::xds::AdsService;

/// Room for the protobuf framing around a request body in one message.
const MESSAGE_OVERHEAD: usize = 64 * 1024;

/// Certificates and keys are a few kilobytes.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// A bound ext_proc listener.
pub struct ExtProcListener {
    socket: Bound,
    tls: Option<ServerTlsConfig>,
}

enum Bound {
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
    #[error("another process is serving {path} (a second ai-gateway-extproc?); stop it first, or listen elsewhere")]
    InUse { path: PathBuf },
    #[error("cannot read {what} {path}: {source}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: ReadError,
    },
    #[error("extproc.tls: {0}")]
    Tls(#[source] tonic::transport::Error),
}

impl ExtProcListener {
    pub async fn bind(config: &ExtprocConfig) -> Result<Self, ListenError> {
        let addr = &config.listen;
        let bind_err = |source| ListenError::Bind {
            addr: addr.to_string(),
            source,
        };
        let socket = match addr {
            ListenAddr::Tcp(a) => Bound::Tcp(TcpListener::bind(a).await.map_err(bind_err)?),
            ListenAddr::Unix(path) => Bound::Unix {
                listener: bind_unix(path, config.socket_mode).map_err(|e| match e {
                    BindUnix::Io(source) => bind_err(source),
                    BindUnix::Other(e) => e,
                })?,
                path: path.clone(),
            },
        };
        let tls = config.tls.as_ref().map(server_tls).transpose()?;
        Ok(Self { socket, tls })
    }

    /// The address actually bound (the port is real even if 0 was asked).
    pub fn local_addr(&self) -> String {
        match &self.socket {
            Bound::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp:?".into()),
            Bound::Unix { path, .. } => format!("unix:{}", path.display()),
        }
    }

    /// Serves `service`, Envoy's xDS (`ads`, to the streams `service`'s
    /// check lets in) and the gRPC health service beside them, until
    /// `shutdown` resolves and open streams finish. Health says SERVING
    /// until shutdown starts, then NOT_SERVING while streams drain.
    pub async fn serve(
        self,
        service: ExtProcService,
        ads: AdsService,
        max_request_body_bytes: usize,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        let limit = max_request_body_bytes.saturating_add(MESSAGE_OVERHEAD);
        let auth = Arc::clone(service.auth());
        // The listener Envoy gets over xDS carries the stream secret: the
        // same check as the ext_proc streams, before any message is read.
        let xds =
            AggregatedDiscoveryServiceServer::with_interceptor(ads, move |request: Request<()>| {
                auth.check(&request.metadata().clone().into_headers())?;
                Ok(request)
            });
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
        let window = u32::try_from(limit).unwrap_or(u32::MAX);
        // Envoy keeps its connection for good. Over TCP, pings find a peer
        // that vanished without a word (a partition, a host gone). Over a
        // Unix socket the kernel closes the connection when the peer goes,
        // and the pings' timer, reset on every frame read, cost about 3 k
        // instructions per streamed chat (bench/RESULTS.md entry 52).
        let keepalive = matches!(self.socket, Bound::Tcp(_)).then(|| Duration::from_secs(30));
        let mut builder = Server::builder()
            .http2_keepalive_interval(keepalive)
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            // One request body is one message: let Envoy send it whole
            // without waiting for window updates (the HTTP/2 default of
            // 64 KiB costs a round trip per 64 KiB, and with many large
            // bodies at once, Envoy's per-message timeout).
            .initial_stream_window_size(window)
            .initial_connection_window_size(window.saturating_mul(4));
        if let Some(tls) = self.tls {
            builder = builder.tls_config(tls)?;
        }
        // `Process` streams are taken before the router (see
        // `ProcessFirstLayer`); the router keeps the endpoint for its other
        // methods, which it answers UNIMPLEMENTED in its own words.
        let server = builder
            .layer(ProcessFirstLayer::new(grpc.clone()))
            .add_service(health_service)
            .add_service(grpc)
            .add_service(xds);
        match self.socket {
            Bound::Tcp(listener) => {
                let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                server
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
            Bound::Unix { listener, path } => {
                let result = server
                    .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
                    .await;
                let _ = std::fs::remove_file(&path);
                result
            }
        }
    }
}

enum BindUnix {
    Io(std::io::Error),
    Other(ListenError),
}

impl From<std::io::Error> for BindUnix {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Creates the socket at `path` with `mode`, atomically.
fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, BindUnix> {
    remove_stale_socket(path).map_err(BindUnix::Other)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    warn_if_shared(dir);
    // A directory only this user can enter: the socket is born there, with
    // whatever mode the umask gives it, and gets its real mode before it
    // becomes reachable by the rename.
    let private = dir.join(format!(".ai-gateway-extproc.{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("extproc.sock");
    let result = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&staged, path)?;
        listener.set_nonblocking(true)?;
        UnixListener::from_std(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    Ok(result?)
}

/// A socket file left by a previous run would make `bind` fail. Nothing
/// answering on it means it is a leftover; anything else at that path is
/// not ours to delete.
fn remove_stale_socket(path: &Path) -> Result<(), ListenError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ListenError::InUse {
                    path: path.to_path_buf(),
                });
            }
            let _ = std::fs::remove_file(path);
            Ok(())
        }
        Ok(_) => Err(ListenError::NotASocket {
            path: path.to_path_buf(),
        }),
        Err(_) => Ok(()),
    }
}

/// A directory like `/tmp` (every user may write, sticky bit) is shared by
/// every user of the host: another user could put a socket of their own at
/// the path before the processor starts, and Envoy would talk to it. (A
/// pod's `emptyDir` is world-writable too, but only the pod's containers
/// can reach it: no warning there.)
fn warn_if_shared(dir: &Path) {
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    let mode = meta.permissions().mode();
    if mode & 0o1002 == 0o1002 {
        tracing::warn!(
            dir = %dir.display(),
            "the ext_proc socket is in a directory every user of this host can write to; another user could take its path while the processor is down: use a directory only the processor and Envoy can write"
        );
    }
}

fn server_tls(tls: &ExtprocTls) -> Result<ServerTlsConfig, ListenError> {
    let pem = |what: &'static str, path: &Path| {
        regular_file::read(path, MAX_PEM_BYTES).map_err(|source| ListenError::Pem {
            what,
            path: path.to_path_buf(),
            source,
        })
    };
    let identity = Identity::from_pem(
        pem("extproc.tls.cert_file", &tls.cert_file)?,
        pem("extproc.tls.key_file", &tls.key_file)?,
    );
    let ca = Certificate::from_pem(pem("extproc.tls.ca_file", &tls.ca_file)?);
    // `client_auth_optional` stays false: a stream without a certificate
    // signed by the CA never gets past the handshake.
    Ok(ServerTlsConfig::new().identity(identity).client_ca_root(ca))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[tokio::test]
    async fn socket_gets_its_mode_and_a_live_socket_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("extproc.sock");
        let config = ExtprocConfig {
            listen: ListenAddr::Unix(path.clone()),
            socket_mode: 0o660,
            ..ExtprocConfig::default()
        };
        let first = ExtProcListener::bind(&config).await.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o660);
        let second = ExtProcListener::bind(&config).await;
        assert!(
            matches!(second, Err(ListenError::InUse { .. })),
            "a running processor's socket was replaced"
        );
        // No staging directory is left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers, [std::ffi::OsString::from("extproc.sock")]);
        drop(first);
        // Nothing answers now: a leftover, replaced.
        let again = ExtProcListener::bind(&ExtprocConfig {
            socket_mode: 0o600,
            ..config
        })
        .await
        .unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        drop(again);
    }

    #[test]
    fn a_file_in_the_way_is_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("extproc.sock");
        std::fs::write(&path, "not a socket").unwrap();
        assert!(matches!(
            remove_stale_socket(&path),
            Err(ListenError::NotASocket { .. })
        ));
        assert!(path.exists());
    }
}
