//! `ai-gateway-extproc`: parses the command line and wires the pieces.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio::sync::watch;

use ai_gateway_extproc::client_keys::{ClientKeySet, ClientKeys, ClientKeysReload};
use ai_gateway_extproc::config::{parse_socket_addr, Config, ListenAddr, Overrides};
use ai_gateway_extproc::config_reload::ConfigReload;
use ai_gateway_extproc::extproc::listener::ExtProcListener;
use ai_gateway_extproc::extproc::stream_auth::StreamAuth;
use ai_gateway_extproc::extproc::ExtProcService;
use ai_gateway_extproc::logging::{self, LogFormat};
use ai_gateway_extproc::login::{LoginOptions, Output};
use ai_gateway_extproc::metrics::Metrics;
use ai_gateway_extproc::provider_keys::{ProviderKeyWatcher, ProviderKeys};
use ai_gateway_extproc::spend::prices::PriceRefresher;
use ai_gateway_extproc::spend::Spend;
use ai_gateway_extproc::state::{GatewayState, Snapshot};
use ai_gateway_extproc::watched_file::WatchedFile;
use ai_gateway_extproc::xds::{AdsService, ServedResources};
use ai_gateway_extproc::{admin, envoy_config, shutdown, VERSION};

/// Envoy external processor that turns Envoy into an OpenAI-compatible LLM
/// gateway: routes by `model`, injects the provider key from a watched file.
#[derive(Parser)]
#[command(name = "ai-gateway-extproc", version = VERSION)]
struct Cli {
    /// Gateway configuration file (YAML or JSON). A running gateway watches
    /// it: a valid new version applies without restart.
    #[arg(long, global = true, env = "AI_GATEWAY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(flatten)]
    addresses: Addresses,

    /// Log filter: a level (error, warn, info, debug, trace) or a tracing
    /// directive list. Overrides RUST_LOG; default info.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,

    /// Log line format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,

    /// Threads serving requests. One gave 5 to 7 % more throughput than
    /// two in the benchmark (fewer wake-ups across threads;
    /// bench/RESULTS.md entry 26); raise it when the processor's CPU nears
    /// one core.
    #[arg(
        long,
        value_name = "N",
        env = "AI_GATEWAY_WORKER_THREADS",
        default_value_t = 1
    )]
    worker_threads: usize,

    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = humantime_serde::re::humantime::parse_duration)]
    drain_timeout: Duration,

    #[command(subcommand)]
    command: Option<Command>,
}

/// Where the processor listens, overriding the file: for running it, and
/// for rendering the Envoy bootstrap of a processor run that way.
#[derive(clap::Args, Clone, Default)]
struct Addresses {
    /// Where to serve Envoy's ext_proc gRPC stream: `host:port` or
    /// `unix:/path/to.sock`. Overrides `extproc.listen`.
    #[arg(long, value_name = "ADDR", value_parser = ListenAddr::from_str)]
    listen: Option<ListenAddr>,

    /// Where to serve /healthz, /readyz and /metrics (`host:port`).
    /// Overrides `admin.listen`.
    #[arg(long, value_name = "ADDR", value_parser = parse_socket_addr)]
    admin_listen: Option<SocketAddr>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the Envoy bootstrap YAML for the configuration. By default
    /// Envoy gets its listener, routes and clusters from the running
    /// processor over xDS, live; --static puts them all in the bootstrap.
    EnvoyConfig(EnvoyConfigArgs),
    /// Get a TARS API key by signing in with a browser (OAuth 2.0 PKCE) and
    /// write it where the gateway reads it; a running gateway picks it up.
    Login(LoginArgs),
}

#[derive(clap::Args)]
struct EnvoyConfigArgs {
    #[command(flatten)]
    addresses: Addresses,

    /// Everything in the bootstrap, no xDS: a change to backends, models'
    /// fallbacks, timeouts or limits then needs a new render and an Envoy
    /// restart.
    #[arg(long = "static")]
    static_resources: bool,
}

#[derive(clap::Args)]
struct LoginArgs {
    /// The key file to write (atomically, mode 0600).
    #[arg(long, value_name = "PATH", conflicts_with = "backend")]
    key_file: Option<PathBuf>,

    /// Write the `api_key_file` of this backend of the --config file.
    #[arg(long, value_name = "NAME")]
    backend: Option<String>,

    /// The authorization server; enterprise tenants use their own.
    #[arg(long, value_name = "URL", default_value = "https://router.tetrate.ai")]
    auth_url: String,

    /// How long to wait for the browser sign-in.
    #[arg(long, value_name = "DURATION", default_value = "180s", value_parser = humantime_serde::re::humantime::parse_duration)]
    timeout: Duration,

    /// Only print the URL (headless machines: open it anywhere that reaches
    /// this machine's localhost, e.g. through an SSH tunnel).
    #[arg(long)]
    no_browser: bool,

    /// Print a Kubernetes Secret manifest with the key (entry `apiKey`) on
    /// stdout instead of writing a file: `... --print-secret | kubectl apply -f -`.
    #[arg(long, conflicts_with_all = ["key_file", "backend"])]
    print_secret: bool,

    /// The Secret's name, with --print-secret.
    #[arg(long, value_name = "NAME", default_value = "tars-api-key")]
    secret_name: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Some(Command::EnvoyConfig(args)) => print_envoy_config(&cli, args),
        Some(Command::Login(args)) => login(&cli, args),
        None => run(cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ai-gateway-extproc: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line. The library's errors already
/// name their cause in their own message (log lines show only that), so a
/// cause whose text is already there is not repeated.
fn describe(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn overrides(addresses: &Addresses) -> Overrides {
    Overrides {
        extproc_listen: addresses.listen.clone(),
        admin_listen: addresses.admin_listen,
    }
}

fn load_config(cli: &Cli, addresses: &Addresses) -> Result<(PathBuf, Config)> {
    let path = cli
        .config
        .clone()
        .context("--config FILE is required (or set AI_GATEWAY_CONFIG)")?;
    let config = overrides(addresses).apply(Config::load(&path)?, &path)?;
    Ok((path, config))
}

fn print_envoy_config(cli: &Cli, args: &EnvoyConfigArgs) -> Result<()> {
    // Before or after the command name, as the user wrote it.
    let addresses = Addresses {
        listen: args
            .addresses
            .listen
            .clone()
            .or(cli.addresses.listen.clone()),
        admin_listen: args.addresses.admin_listen.or(cli.addresses.admin_listen),
    };
    let (_, config) = load_config(cli, &addresses)?;
    let bootstrap = if args.static_resources {
        envoy_config::render_static(&config)?
    } else {
        envoy_config::render_dynamic(&config)?
    };
    print!("{bootstrap}");
    Ok(())
}

fn login(cli: &Cli, args: &LoginArgs) -> Result<()> {
    let output = if args.print_secret {
        Output::Secret {
            name: args.secret_name.clone(),
        }
    } else if let Some(path) = &args.key_file {
        Output::KeyFile(path.clone())
    } else if let Some(name) = &args.backend {
        let (path, config) = load_config(cli, &Addresses::default())?;
        let backend = config
            .backends
            .iter()
            .find(|b| &b.name == name)
            .with_context(|| format!("no backend named {name:?} in {}", path.display()))?;
        Output::KeyFile(backend.api_key_file.clone())
    } else {
        anyhow::bail!(
            "login needs --key-file PATH, --backend NAME (with --config), or --print-secret"
        );
    };
    let opts = LoginOptions {
        auth_url: args.auth_url.clone(),
        client: "ai-gateway-extproc".into(),
        timeout: args.timeout,
        open_browser: !args.no_browser,
        output,
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(ai_gateway_extproc::login::run(opts))
        .context("login failed; the key file was not changed")
}

fn run(cli: Cli) -> Result<()> {
    let _log_flush =
        logging::init(cli.log_level.as_deref(), cli.log_format).map_err(anyhow::Error::msg)?;
    let (config_path, config) = load_config(&cli, &cli.addresses)?;
    // Multi-threaded even with one worker: `offload::heavy` hands the
    // worker's other tasks to a fresh thread while a step computes.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.worker_threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(serve(cli, config_path, config));
    // A file read stuck in the kernel (a hung network filesystem) must not
    // keep the process alive after the drain: blocking threads get a
    // moment, then the process exits without them.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn serve(cli: Cli, config_path: PathBuf, config: Config) -> Result<()> {
    let metrics = Arc::new(Metrics::new().context("cannot register metrics")?);
    let snapshot = Snapshot::new(config);
    let poll_interval = snapshot.config.watch.poll_interval;
    let provider_keys = Arc::new(ProviderKeys::default());
    let (mut key_watcher, key_sources) = ProviderKeyWatcher::new(
        Arc::clone(&provider_keys),
        snapshot.key_sources(),
        poll_interval,
        Arc::clone(&metrics),
    );
    key_watcher.load_now().await;

    let admin_addr = snapshot.config.admin.listen;
    let body_limit = snapshot.max_request_body_bytes;
    let (backends, models) = (snapshot.config.backends.len(), snapshot.config.models.len());
    // Gateway keys: a bad or missing keys file stops the start (fail closed).
    let client_keys = Arc::new(ClientKeys::default());
    let client_keys_file = snapshot.config.client_keys.as_ref().map(|c| c.file.clone());
    if let Some(file) = &client_keys_file {
        client_keys.replace(Some(ClientKeySet::load(file)?));
    }
    let spend = Spend::new(&snapshot.config.spend, Arc::clone(&metrics))
        .context("cannot set up the spend store")?;
    let spend_store = snapshot.config.spend.store.to_string();
    let state = Arc::new(GatewayState::new(
        snapshot,
        provider_keys,
        metrics,
        Arc::clone(&client_keys),
        spend,
    ));

    let extproc = ExtProcListener::bind(&state.snapshot().config.extproc).await?;
    let secret = envoy_config::stream_secret(&state.snapshot().config)?;
    let stream_auth = match &secret {
        Some(secret) => StreamAuth::shared_secret(secret),
        // A Unix socket's mode, or mutual TLS, lets only Envoy in.
        None => StreamAuth::transport(),
    };
    let envoy = Arc::new(
        ServedResources::new(&state.snapshot().config, secret, Arc::clone(&state.metrics))
            .context("cannot make Envoy's resources from the configuration")?,
    );
    let admin_listener = TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("cannot listen on {admin_addr} (admin)"))?;
    let admin_bound = admin_listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let backend_names: Vec<String> = state
        .snapshot()
        .config
        .backends
        .iter()
        .map(|b| b.name.clone())
        .collect();
    tracing::info!(
        version = VERSION,
        extproc = %extproc.local_addr(),
        admin = %admin_bound,
        config = %config_path.display(),
        backends = %backend_names.join(","),
        models,
        spend_store = %spend_store,
        "ai-gateway-extproc started with {backends} backend(s) and {models} model rule(s)"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(key_watcher.run(stop_rx.clone()));
    let config_reload = ConfigReload {
        overrides: overrides(&cli.addresses),
        state: Arc::clone(&state),
        key_sources,
        envoy: Arc::clone(&envoy),
    };
    tokio::spawn(WatchedFile::new(config_path, poll_interval).run(config_reload, stop_rx.clone()));
    tokio::spawn(
        PriceRefresher {
            state: Arc::clone(&state),
        }
        .run(stop_rx.clone()),
    );
    if let Some(file) = client_keys_file {
        let reload = ClientKeysReload { keys: client_keys };
        tokio::spawn(WatchedFile::new(file, poll_interval).run(reload, stop_rx.clone()));
    }
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        Arc::clone(&state),
        shutdown::requested(stop_rx.clone()),
    ));

    let service = ExtProcService::new(Arc::clone(&state), stream_auth);
    let ads = AdsService::new(envoy, stop_rx.clone());
    let mut server =
        tokio::spawn(extproc.serve(service, ads, body_limit, shutdown::requested(stop_rx)));
    tokio::select! {
        _ = shutdown::signal() => {}
        result = &mut server => {
            // The server stopped on its own: that is a failure.
            result.context("ext_proc server task failed")??;
            anyhow::bail!("ext_proc server stopped unexpectedly");
        }
    }
    tracing::info!(drain_timeout = ?cli.drain_timeout, "shutting down: no new streams, draining in-flight requests");
    let _ = stop_tx.send(true);
    match tokio::time::timeout(cli.drain_timeout, server).await {
        Ok(result) => result.context("ext_proc server task failed")??,
        Err(_) => tracing::warn!("drain timeout reached; closing remaining streams"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), admin_task).await;
    tracing::info!("stopped");
    Ok(())
}
