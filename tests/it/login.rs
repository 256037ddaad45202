//! `ai-gateway-extproc login` against a local fake authorization server
//! that checks the S256 challenge against the verifier as a real one does.
//! The test plays the browser: it follows the URL the command prints, the
//! server redirects to the command's callback, and the command exchanges the
//! code for a key.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::support::{chat, client, extproc_bin, ChildGuard, FakeUpstream, Gateway};
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const NEW_KEY: &str = "sk-from-login-0123456789";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Normal,
    /// The challenge on record does not match the verifier sent later.
    WrongVerifier,
    /// The user cancels: the browser comes back with an error.
    Deny,
    ExchangeFails,
    NoKey,
}

#[derive(Default)]
struct Seen {
    challenge: Option<String>,
    method: Option<String>,
    client: Option<String>,
    code: Option<String>,
    exchanges: Vec<Value>,
}

struct FakeAuth {
    url: String,
    seen: Arc<Mutex<Seen>>,
}

async fn fake_auth(mode: Mode) -> FakeAuth {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let app = Router::new()
        .route("/auth", get(authorize))
        .route("/api/api-keys/verify", post(verify))
        .with_state((mode, Arc::clone(&seen)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    FakeAuth { url, seen }
}

async fn authorize(
    State((mode, seen)): State<(Mode, Arc<Mutex<Seen>>)>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let mut s = seen.lock().unwrap();
    s.challenge = q.get("code_challenge").cloned();
    if mode == Mode::WrongVerifier {
        s.challenge = Some(URL_SAFE_NO_PAD.encode(Sha256::digest(b"some other verifier")));
    }
    s.method = q.get("code_challenge_method").cloned();
    s.client = q.get("client").cloned();
    let callback = q.get("callback").cloned().unwrap_or_default();
    let sep = if callback.contains('?') { '&' } else { '?' };
    let location = if mode == Mode::Deny {
        format!("{callback}{sep}error=access_denied&error_description=cancelled")
    } else {
        s.code = Some("code-123".into());
        format!("{callback}{sep}code=code-123")
    };
    (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
}

async fn verify(
    State((mode, seen)): State<(Mode, Arc<Mutex<Seen>>)>,
    Json(body): Json<Value>,
) -> Response {
    let mut s = seen.lock().unwrap();
    s.exchanges.push(body.clone());
    if mode == Mode::ExchangeFails {
        return (StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded").into_response();
    }
    let verifier = body["code_verifier"].as_str().unwrap_or_default();
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    if body["code"].as_str() != s.code.as_deref() || Some(challenge) != s.challenge {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant"})),
        )
            .into_response();
    }
    if mode == Mode::NoKey {
        return Json(json!({"ok": true})).into_response();
    }
    Json(json!({"key": NEW_KEY})).into_response()
}

/// A running `login`, its stderr collected line by line.
struct Login {
    child: ChildGuard,
    lines: mpsc::Receiver<String>,
    stderr: Vec<String>,
    stdout: std::process::ChildStdout,
}

impl Login {
    /// `login --key-file <file> --auth-url <auth>`, the common case.
    fn to_key_file(key_file: &std::path::Path, auth_url: &str) -> Self {
        Self::start(&[
            "--key-file",
            key_file.to_str().unwrap(),
            "--auth-url",
            auth_url,
        ])
    }

    fn start(args: &[&str]) -> Self {
        let mut cmd = Command::new(extproc_bin());
        cmd.arg("login")
            .args(args)
            .arg("--no-browser")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn("login", cmd);
        let stderr = child.take_stderr();
        let stdout = child.take_stdout();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self {
            child,
            lines,
            stderr: Vec::new(),
            stdout,
        }
    }

    /// The sign-in URL the command printed.
    fn url(&mut self) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .expect("no URL printed");
            self.stderr.push(line.clone());
            if let Some(url) = line
                .trim()
                .strip_prefix("http")
                .map(|rest| format!("http{rest}"))
            {
                return url;
            }
        }
    }

    /// Waits for the exit; returns the exit code and all of stderr.
    fn finish(mut self) -> (i32, String, String) {
        let status = self
            .child
            .wait_exit(Duration::from_secs(20))
            .expect("login did not exit");
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.stderr.push(line);
        }
        let mut out = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut out).unwrap();
        (status.code().unwrap_or(-1), self.stderr.join("\n"), out)
    }
}

/// A key file holding `sk-old`, in a directory of its own.
fn old_key_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("apiKey");
    std::fs::write(&key_file, "sk-old\n").unwrap();
    (dir, key_file)
}

/// Plays the browser: follows the URL through the redirect to the callback.
async fn browse(url: &str) -> (u16, String) {
    let r = client().get(url).send().await.expect("browser request");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn login_hands_a_new_key_to_the_running_gateway() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::catch_all(&up, Some("sk-old")).await;
    let key_file = gw.key_file("tars");
    let auth = fake_auth(Mode::Normal).await;

    let mut login = Login::to_key_file(&key_file, &auth.url);
    let url = login.url();
    assert!(url.starts_with(&format!("{}/auth?", auth.url)), "{url}");
    let (status, page) = browse(&url).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("you can close this window"), "{page}");
    let (code, stderr, stdout) = login.finish();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains(&key_file.display().to_string()), "{stderr}");
    assert!(
        !stderr.contains(NEW_KEY) && !stdout.contains(NEW_KEY),
        "the key was printed"
    );

    {
        let seen = auth.seen.lock().unwrap();
        assert_eq!(seen.method.as_deref(), Some("S256"));
        assert_eq!(seen.client.as_deref(), Some("ai-gateway-extproc"));
        let verifier = seen.exchanges[0]["code_verifier"].as_str().unwrap();
        assert!(verifier.len() >= 43, "{verifier}");
        assert!(verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b)));
    }
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap(),
        format!("{NEW_KEY}\n")
    );
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The running gateway picked it up through its hot reload.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reply = gw.post_json("/v1/chat/completions", &chat("m")).await;
    assert_eq!(reply.status, 200);
    let expected = format!("Bearer {NEW_KEY}");
    assert_eq!(up.last().header("authorization"), Some(expected.as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_exit_1_and_leave_the_old_key() {
    for (mode, expected) in [
        (Mode::WrongVerifier, "HTTP 400"),
        (Mode::Deny, "refused: access_denied"),
        (Mode::ExchangeFails, "HTTP 500"),
        (Mode::NoKey, "without a usable `key`"),
    ] {
        let (dir, key_file) = old_key_file();
        let auth = fake_auth(mode).await;
        let mut login = Login::start(&[
            "--key-file",
            key_file.to_str().unwrap(),
            "--auth-url",
            &auth.url,
        ]);
        let url = login.url();
        browse(&url).await;
        let (code, stderr, _) = login.finish();
        assert_eq!(code, 1, "{mode:?}: {stderr}");
        assert!(stderr.contains(expected), "{mode:?}: {stderr}");
        assert!(stderr.contains("the key file was not changed"), "{stderr}");
        assert_eq!(
            std::fs::read_to_string(&key_file).unwrap(),
            "sk-old\n",
            "{mode:?}"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "a temporary file was left"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_callback_with_another_state_is_refused() {
    let (_dir, key_file) = old_key_file();
    let auth = fake_auth(Mode::Normal).await;
    let mut login = Login::to_key_file(&key_file, &auth.url);
    let url = login.url();
    // Someone else's code, sent to our callback without our state.
    let callback = url::Url::parse(&url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "callback")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    let port = url::Url::parse(&callback).unwrap().port().unwrap();
    let (status, _) = browse(&format!(
        "http://127.0.0.1:{port}/callback?state=forged&code=attacker"
    ))
    .await;
    assert_eq!(status, 400);
    let (code, stderr, _) = login.finish();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("state"), "{stderr}");
    assert!(
        auth.seen.lock().unwrap().exchanges.is_empty(),
        "a forged code was exchanged"
    );
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), "sk-old\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_exits_1() {
    let (_dir, key_file) = old_key_file();
    let auth = fake_auth(Mode::Normal).await;
    let mut login = Login::start(&[
        "--key-file",
        key_file.to_str().unwrap(),
        "--auth-url",
        &auth.url,
        "--timeout",
        "1s",
    ]);
    login.url(); // and never follow it
    let (code, stderr, _) = login.finish();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("timed out"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), "sk-old\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn print_secret_and_backend_from_config() {
    let auth = fake_auth(Mode::Normal).await;
    let mut login = Login::start(&["--print-secret", "--auth-url", &auth.url]);
    browse(&login.url()).await;
    let (code, stderr, stdout) = login.finish();
    assert_eq!(code, 0, "{stderr}");
    let secret: Value = serde_yaml_ng::from_str(&stdout).unwrap();
    assert_eq!(secret["kind"], "Secret");
    assert_eq!(secret["metadata"]["name"], "tars-api-key");
    assert_eq!(secret["stringData"]["apiKey"], NEW_KEY);

    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("secrets/tars/apiKey");
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "backends: [{{name: tars, url: 'https://api.router.tetrate.ai', api_key_file: '{}'}}]\nmodels: [{{name: '*', backend: tars}}]\n",
            key_file.display()
        ),
    )
    .unwrap();
    let auth = fake_auth(Mode::Normal).await;
    let mut login = Login::start(&[
        "--config",
        config.to_str().unwrap(),
        "--backend",
        "tars",
        "--auth-url",
        &auth.url,
    ]);
    browse(&login.url()).await;
    let (code, stderr, _) = login.finish();
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap(),
        format!("{NEW_KEY}\n")
    );
}
