//! `ai-gateway-extproc login`: obtains a TARS API key with the OAuth 2.0
//! PKCE flow that Kilo Code and Goose use, and writes it where the gateway
//! reads it, so a running gateway picks it up through its hot reload.
//!
//! 1. make a random verifier and its S256 challenge, and a random `state`;
//! 2. start a callback server on 127.0.0.1, on a free port;
//! 3. send the user's browser to `<auth>/auth?code_challenge=…&callback=…`;
//! 4. take the code the browser brings back to `/callback`;
//! 5. POST `{"code", "code_verifier"}` to `<auth>/api/api-keys/verify` and
//!    read `{"key"}`;
//! 6. write the key atomically (mode 0600), or print a Kubernetes Secret.
//!
//! The key is never logged or printed, except in the Secret manifest the
//! user asked for. Every failure leaves the old key file as it was.

mod callback;
mod key_file;
pub mod pkce;

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use callback::CallbackServer;

/// What `login` was asked to do.
pub struct LoginOptions {
    /// The authorization server: `https://router.tetrate.ai` for TARS.
    pub auth_url: String,
    /// The name the authorization server shows for this client.
    pub client: String,
    pub timeout: Duration,
    pub open_browser: bool,
    pub output: Output,
}

/// Where the key goes.
pub enum Output {
    KeyFile(PathBuf),
    /// A Kubernetes Secret manifest with this name on stdout.
    Secret {
        name: String,
    },
}

/// Why a login failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("--auth-url {0:?} is not an http(s) URL")]
    AuthUrl(String),
    #[error("cannot start the local callback server: {0}")]
    Callback(std::io::Error),
    #[error("the local callback server stopped before the browser came back")]
    CallbackGone,
    #[error("no random numbers from the operating system: {0}")]
    Random(getrandom::Error),
    #[error("timed out after {0:?} waiting for the browser to come back; run again, and finish signing in within that time (--timeout)")]
    Timeout(Duration),
    #[error("the callback did not carry this login's state: it is not the answer to this sign-in")]
    StateMismatch,
    #[error("the authorization server refused: {error} {description}")]
    Denied { error: String, description: String },
    #[error("the callback carried no code")]
    NoCode,
    #[error("cannot reach {url}: {source}")]
    Exchange {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered HTTP {status}: {body}")]
    ExchangeStatus {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url} answered without a usable `key`")]
    NoKey { url: String },
    #[error("cannot write the key file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Serialize)]
struct Exchange<'a> {
    code: &'a str,
    code_verifier: &'a str,
}

/// Runs the whole flow. Progress goes to stderr; stdout carries only the
/// Secret manifest when one was asked for.
pub async fn run(opts: LoginOptions) -> Result<(), LoginError> {
    let base = url::Url::parse(opts.auth_url.trim_end_matches('/'))
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or_else(|| LoginError::AuthUrl(opts.auth_url.clone()))?;
    let verifier = pkce::random_unreserved(pkce::VERIFIER_LEN).map_err(LoginError::Random)?;
    let state = pkce::random_unreserved(32).map_err(LoginError::Random)?;

    let mut server = CallbackServer::start(state.clone()).await?;
    let callback = format!("http://localhost:{}/callback?state={state}", server.port);
    let mut auth = endpoint(&base, "auth");
    auth.query_pairs_mut()
        .append_pair("code_challenge", &pkce::challenge(&verifier))
        .append_pair("code_challenge_method", "S256")
        .append_pair("callback", &callback)
        .append_pair("client", &opts.client);

    eprintln!("Sign in to get an API key; open this URL in a browser:\n\n  {auth}\n");
    if opts.open_browser && open_browser(auth.as_str()) {
        eprintln!("(a browser was asked to open it)");
    }
    eprintln!(
        "Waiting up to {:?} for the sign-in to complete…",
        opts.timeout
    );

    let code = tokio::time::timeout(opts.timeout, server.outcome())
        .await
        .map_err(|_| LoginError::Timeout(opts.timeout))??;
    drop(server);

    let key = exchange(&endpoint(&base, "api/api-keys/verify"), &code, &verifier).await?;
    match opts.output {
        Output::KeyFile(path) => {
            key_file::write_atomically(&path, &key).map_err(|source| LoginError::Write {
                path: path.clone(),
                source,
            })?;
            eprintln!(
                "Wrote the new key to {} (mode 0600). A running gateway applies it within a second.",
                path.display()
            );
        }
        Output::Secret { name } => {
            print!("{}", secret_manifest(&name, &key));
            eprintln!("Printed a Secret `{name}` with the key as `apiKey`; pipe it into `kubectl apply -f -`.");
        }
    }
    Ok(())
}

fn endpoint(base: &url::Url, path: &str) -> url::Url {
    let mut u = base.clone();
    let joined = format!("{}/{path}", u.path().trim_end_matches('/'));
    u.set_path(&joined);
    u
}

async fn exchange(url: &url::Url, code: &str, verifier: &str) -> Result<String, LoginError> {
    // rustls needs a process-wide crypto provider; a second install is a no-op.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let url_text = url.to_string();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|source| LoginError::Exchange {
            url: url_text.clone(),
            source,
        })?;
    let resp = client
        .post(url.clone())
        .json(&Exchange {
            code,
            code_verifier: verifier,
        })
        .send()
        .await
        .map_err(|source| LoginError::Exchange {
            url: url_text.clone(),
            source,
        })?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|source| LoginError::Exchange {
        url: url_text.clone(),
        source,
    })?;
    if !status.is_success() {
        // An error body is the server's message, not a key: shown, shortened.
        let text = String::from_utf8_lossy(&body);
        let body: String = text.chars().take(300).collect();
        return Err(LoginError::ExchangeStatus {
            url: url_text,
            status: status.as_u16(),
            body,
        });
    }
    let key = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("key")?.as_str().map(str::trim).map(str::to_owned))
        .filter(|k| crate::provider_keys::parse_key(k.as_bytes()).is_ok());
    key.ok_or(LoginError::NoKey { url: url_text })
}

/// A Secret with the key as `apiKey`, as the deployment mounts it.
fn secret_manifest(name: &str, key: &str) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Secret<'a> {
        api_version: &'a str,
        kind: &'a str,
        metadata: Metadata<'a>,
        #[serde(rename = "type")]
        kind_of_secret: &'a str,
        string_data: Data<'a>,
    }
    #[derive(Serialize)]
    struct Metadata<'a> {
        name: &'a str,
    }
    #[derive(Serialize)]
    struct Data<'a> {
        #[serde(rename = "apiKey")]
        api_key: &'a str,
    }
    serde_yaml_ng::to_string(&Secret {
        api_version: "v1",
        kind: "Secret",
        metadata: Metadata { name },
        kind_of_secret: "Opaque",
        string_data: Data { api_key: key },
    })
    .unwrap_or_default()
}

/// Asks the desktop to open `url`; false where there is none.
fn open_browser(url: &str) -> bool {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_keep_a_base_path() {
        let base = url::Url::parse("https://router.tetrate.ai").unwrap();
        assert_eq!(
            endpoint(&base, "auth").as_str(),
            "https://router.tetrate.ai/auth"
        );
        let tenant = url::Url::parse("https://example.test/tenant").unwrap();
        assert_eq!(
            endpoint(&tenant, "api/api-keys/verify").as_str(),
            "https://example.test/tenant/api/api-keys/verify"
        );
    }

    #[test]
    fn secret_manifest_is_valid_yaml_with_api_key() {
        let text = secret_manifest("tars-api-key", "sk-a\"b: c");
        let v: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(v["kind"], "Secret");
        assert_eq!(v["metadata"]["name"], "tars-api-key");
        assert_eq!(v["stringData"]["apiKey"], "sk-a\"b: c");
    }
}
