//! Logs to stdout, as `kubectl logs -c ai-gateway-extproc` shows them.
//!
//! Lines are written by a background thread ([`crate::log_queue`]): a
//! request's log line must not make a tokio worker wait on a slow stdout
//! pipe. The queue applies back-pressure rather than dropping lines when it
//! is full.

use tracing_subscriber::EnvFilter;

use crate::log_queue::{self, LogFlush};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `level` (from `--log-level`) wins over
/// `RUST_LOG`; with neither, `info`. Keep the returned guard until exit: it
/// flushes the last lines when dropped.
pub fn init(level: Option<&str>, format: LogFormat) -> Result<LogFlush, String> {
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("invalid --log-level {l:?}: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let (writer, guard) = log_queue::start(std::io::stdout())
        .map_err(|e| format!("cannot start the log writer thread: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false);
    let result = match format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| format!("cannot install the logger: {e}"))?;
    Ok(guard)
}
