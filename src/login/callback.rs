//! The local HTTP server the browser returns to after signing in: it takes
//! the first `/callback` request, answers the browser with a short page, and
//! hands the outcome to the waiting login.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Html;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::LoginError;

/// What the browser brought back.
pub type Outcome = Result<String, LoginError>;

type Pending = Arc<Mutex<Option<oneshot::Sender<Outcome>>>>;

/// A running callback server; dropping it stops it.
pub struct CallbackServer {
    pub port: u16,
    outcome: oneshot::Receiver<Outcome>,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl CallbackServer {
    /// Listens on 127.0.0.1 (and [::1] on the same port where it can: the
    /// browser may resolve `localhost` to either). `state` must come back.
    pub async fn start(state: String) -> Result<Self, LoginError> {
        let v4 = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .map_err(LoginError::Callback)?;
        let port = v4.local_addr().map_err(LoginError::Callback)?.port();
        let (tx, outcome) = oneshot::channel();
        let pending: Pending = Arc::new(Mutex::new(Some(tx)));
        let app = Router::new()
            .route("/callback", get(callback))
            .with_state((Arc::new(state), pending));
        let mut listeners = vec![v4];
        if let Ok(v6) = TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await {
            listeners.push(v6);
        }
        let tasks = listeners
            .into_iter()
            .map(|l| {
                let app = app.clone();
                tokio::spawn(async move {
                    let _ = axum::serve(l, app).await;
                })
            })
            .collect();
        Ok(Self {
            port,
            outcome,
            _tasks: tasks,
        })
    }

    /// Waits for the browser.
    pub async fn outcome(&mut self) -> Outcome {
        (&mut self.outcome)
            .await
            .unwrap_or(Err(LoginError::CallbackGone))
    }
}

impl Drop for CallbackServer {
    fn drop(&mut self) {
        for t in &self._tasks {
            t.abort();
        }
    }
}

async fn callback(
    State((expected_state, pending)): State<(Arc<String>, Pending)>,
    Query(params): Query<HashMap<String, String>>,
) -> (StatusCode, Html<String>) {
    let outcome: Outcome =
        if params.get("state").map(String::as_str) != Some(expected_state.as_str()) {
            Err(LoginError::StateMismatch)
        } else if let Some(error) = params.get("error") {
            Err(LoginError::Denied {
                error: error.clone(),
                description: params.get("error_description").cloned().unwrap_or_default(),
            })
        } else if let Some(code) = params.get("code").filter(|c| !c.is_empty()) {
            Ok(code.clone())
        } else {
            Err(LoginError::NoCode)
        };
    let page = match &outcome {
        Ok(_) => (
            StatusCode::OK,
            "Signed in. ai-gateway-extproc is fetching your key; you can close this window."
                .to_string(),
        ),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            format!("Sign-in failed: {e}. See the terminal."),
        ),
    };
    // Only the first callback counts.
    if let Some(tx) = pending.lock().ok().and_then(|mut p| p.take()) {
        let _ = tx.send(outcome);
    }
    (
        page.0,
        Html(format!(
            "<!doctype html><meta charset=utf-8><title>ai-gateway-extproc</title><p>{}</p>",
            html_escape(&page.1)
        )),
    )
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
