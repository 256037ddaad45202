//! A real Redis for the tests: Debian's `redis-server` (installed by
//! `scripts/setup.sh`), started on a free loopback port in a private
//! directory, stopped on drop; it can be stopped and started again on the
//! same port to test an outage.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, ChildGuard};

/// The `redis-server` binary: `REDIS_SERVER`, else the `PATH`. Missing, the
/// test fails with the way to install it.
pub fn redis_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REDIS_SERVER").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("redis-server"))
                .find(|p| p.is_file())
        })
        .or_else(|| {
            let debian = PathBuf::from("/usr/bin/redis-server");
            debian.is_file().then_some(debian)
        })
        .unwrap_or_else(|| {
            panic!(
                "redis-server not found. Install it with `scripts/setup.sh` (apt-get install redis-server), \
                 or point REDIS_SERVER at a redis-server (or valkey-server) binary."
            )
        })
}

pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    password: Option<String>,
    cluster: bool,
    process: Option<ChildGuard>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with_password(None)
    }

    /// A Redis that wants `password` (`requirepass`).
    pub fn start_with_password(password: Option<&str>) -> Self {
        let mut server = Self {
            port: free_port(),
            dir: tempfile::Builder::new().prefix("redis").tempdir().unwrap(),
            password: password.map(str::to_string),
            cluster: false,
            process: None,
        };
        server.resume();
        server
    }

    /// A Redis Cluster of one node that serves every slot: a real cluster
    /// to clients (they follow its slot map), on one process.
    pub fn start_cluster() -> Self {
        let mut server = Self {
            port: free_port(),
            dir: tempfile::Builder::new().prefix("redis").tempdir().unwrap(),
            password: None,
            cluster: true,
            process: None,
        };
        server.resume();
        let mut c = server.connection().expect("cluster node not answering");
        let _: () = redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(0)
            .arg(16383)
            .query(&mut c)
            .expect("CLUSTER ADDSLOTSRANGE");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut c).unwrap();
            if info.contains("cluster_state:ok") {
                return server;
            }
            assert!(Instant::now() < deadline, "cluster not ok: {info}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops the server (an outage); its data goes with it.
    pub fn stop(&mut self) {
        self.process = None;
    }

    /// Freezes the server (SIGSTOP): it keeps its connections and answers
    /// nothing, as a Redis stuck on a slow disk or a long script does.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a frozen server run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let process = self.process.as_ref().expect("redis-server is not running");
        let pid = libc::pid_t::try_from(process.pid()).expect("pid fits pid_t");
        // SAFETY: kill(2) on the pid of our own child, which is alive (the
        // guard reaps it only on drop).
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
    }

    /// Starts it (again) on the same port, and waits until it answers.
    pub fn resume(&mut self) {
        let mut cmd = Command::new(redis_server_bin());
        cmd.args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(
                self.password
                    .iter()
                    .flat_map(|p| ["--requirepass", p.as_str()]),
            );
        if self.cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(self.dir.path().join("nodes.conf"));
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        self.process = Some(ChildGuard::spawn("redis-server", cmd));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.connection().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    fn connection(&self) -> Option<redis::Connection> {
        let url = match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/0", self.port),
            None => self.url(),
        };
        let client = redis::Client::open(url).ok()?;
        let mut c = client.get_connection().ok()?;
        redis::cmd("PING").query::<String>(&mut c).ok()?;
        Some(c)
    }

    /// Every field of every hash of the gateway's namespace, as
    /// `(key, field, value)`.
    pub fn counters(&self, namespace: &str) -> Vec<(String, String, i64)> {
        let mut c = self.connection().expect("Redis is not answering");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{{{namespace}}}:*"))
            .query(&mut c)
            .unwrap();
        let mut out = Vec::new();
        for key in keys {
            let fields: Vec<(String, i64)> = redis::cmd("HGETALL").arg(&key).query(&mut c).unwrap();
            out.extend(fields.into_iter().map(|(f, v)| (key.clone(), f, v)));
        }
        out
    }
}
