//! The counters in Redis (or Valkey), shared by every replica: each
//! admission and each settlement is one Lua script, one round trip, atomic
//! (`reserve.lua`, `settle.lua`, loaded once and called by their SHA).
//!
//! Keys: one hash per window, `{<namespace>}:m:<UTC minute>` and
//! `{<namespace>}:d:<UTC day>`, fields `k:<key name>:<limit>` and
//! `g:<limit>`. They hold key *names*, never a key or its digest, and they
//! expire on their own. The braces are a hash tag: every counter of a
//! gateway lives in one Redis Cluster slot, so one script can check a key's
//! windows and the gateway's together.
//!
//! The connection is made on first use and then kept by redis-rs's
//! `ConnectionManager` (or cluster connection), which reconnects by itself:
//! a Redis down at start, or restarted, is an outage the gateway rides out,
//! never a restart.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{IntoConnectionInfo, Script, ScriptInvocation, Value};
use tokio::sync::OnceCell;

use super::limits::{Check, Window};
use super::store::{Correction, StoreError, Verdict, WindowIds};

/// After a failed connection attempt, calls fail at once for this long
/// instead of each trying again (an outage costs no latency per request).
const RECONNECT_BACKOFF: Duration = Duration::from_millis(500);

/// Connecting may take this long at most.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub struct RedisStore {
    target: Target,
    connection: OnceCell<Connection>,
    last_failure: Mutex<Option<Instant>>,
    namespace: String,
    /// A key in the namespace's slot, passed as KEYS[1].
    anchor: String,
    reserve: Script,
    settle: Script,
}

/// What to connect to (boxed: built once, and far apart in size).
enum Target {
    Single(Box<redis::Client>),
    Cluster(Box<ClusterClient>),
}

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

fn redis_error(e: redis::RedisError) -> StoreError {
    // redis-rs errors name the command and the server's message, never
    // the URL's password.
    StoreError::Redis(e.to_string())
}

impl RedisStore {
    pub fn single(
        url: &str,
        namespace: &str,
        password: Option<String>,
    ) -> Result<Self, StoreError> {
        let mut info = url.into_connection_info().map_err(redis_error)?;
        if let Some(password) = password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info).map_err(redis_error)?;
        Ok(Self::new(Target::Single(Box::new(client)), namespace))
    }

    pub fn cluster(
        nodes: &[String],
        namespace: &str,
        password: Option<String>,
    ) -> Result<Self, StoreError> {
        let mut builder = ClusterClient::builder(nodes.iter().map(String::as_str))
            .connection_timeout(CONNECT_TIMEOUT);
        if let Some(password) = password {
            builder = builder.password(password);
        }
        let client = builder.build().map_err(redis_error)?;
        Ok(Self::new(Target::Cluster(Box::new(client)), namespace))
    }

    fn new(target: Target, namespace: &str) -> Self {
        Self {
            target,
            connection: OnceCell::new(),
            last_failure: Mutex::new(None),
            namespace: namespace.to_string(),
            anchor: format!("{{{namespace}}}:anchor"),
            reserve: Script::new(include_str!("reserve.lua")),
            settle: Script::new(include_str!("settle.lua")),
        }
    }

    async fn connection(&self, timeout: Duration) -> Result<Connection, StoreError> {
        if let Some(c) = self.connection.get() {
            return Ok(c.clone());
        }
        let failed_recently = self
            .last_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < RECONNECT_BACKOFF);
        if failed_recently {
            return Err(StoreError::Redis("not connected (retrying shortly)".into()));
        }
        let connect = async {
            match &self.target {
                Target::Single(client) => {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(CONNECT_TIMEOUT))
                        .set_response_timeout(Some(timeout))
                        .set_number_of_retries(1)
                        .set_max_delay(RECONNECT_BACKOFF);
                    ConnectionManager::new_with_config((**client).clone(), config)
                        .await
                        .map(Connection::Single)
                }
                Target::Cluster(client) => {
                    client.get_async_connection().await.map(Connection::Cluster)
                }
            }
        };
        let result = self
            .connection
            .get_or_try_init(|| async {
                match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                    Ok(r) => r.map_err(redis_error),
                    Err(_) => Err(StoreError::Timeout(CONNECT_TIMEOUT)),
                }
            })
            .await;
        match result {
            Ok(c) => Ok(c.clone()),
            Err(e) => {
                *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                Err(e)
            }
        }
    }

    async fn invoke(
        &self,
        call: &ScriptInvocation<'_>,
        timeout: Duration,
    ) -> Result<Value, StoreError> {
        let connection = self.connection(timeout).await?;
        let run = async {
            match connection {
                Connection::Single(mut c) => call.invoke_async(&mut c).await,
                Connection::Cluster(mut c) => call.invoke_async(&mut c).await,
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(result) => result.map_err(redis_error),
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }

    pub async fn reserve(
        &self,
        checks: &[Check],
        timeout: Duration,
    ) -> Result<Verdict, StoreError> {
        let mut call = self.reserve.key(&self.anchor);
        call.arg(&self.namespace);
        for check in checks {
            call.arg(window_arg(check.kind.window()))
                .arg(check.field())
                .arg(check.amount)
                .arg(check.limit.unwrap_or(-1));
        }
        let reply = self.invoke(&call, timeout).await?;
        parse_verdict(reply, checks.len())
    }

    pub async fn settle(
        &self,
        windows: WindowIds,
        corrections: &[Correction],
        timeout: Duration,
    ) -> Result<(), StoreError> {
        if corrections.is_empty() {
            return Ok(());
        }
        let mut call = self.settle.key(&self.anchor);
        call.arg(&self.namespace)
            .arg(windows.minute)
            .arg(windows.day);
        for c in corrections {
            call.arg(window_arg(c.check.kind.window()))
                .arg(c.check.field())
                .arg(c.delta);
        }
        self.invoke(&call, timeout).await.map(|_| ())
    }
}

fn window_arg(w: Window) -> &'static str {
    match w {
        Window::Minute => "m",
        Window::Day => "d",
    }
}

/// Reads `reserve.lua`'s reply.
fn parse_verdict(reply: Value, checks: usize) -> Result<Verdict, StoreError> {
    let bad = || StoreError::Redis(format!("unexpected reply to the reserve script: {reply:?}"));
    let Value::Array(items) = &reply else {
        return Err(bad());
    };
    let ints: Vec<i64> = items
        .iter()
        .map(|v| match v {
            Value::Int(i) => Some(*i),
            _ => None,
        })
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    match ints.as_slice() {
        [1, minute, day, after @ ..] if after.len() == checks => Ok(Verdict::Admitted {
            windows: WindowIds {
                minute: u64::try_from(*minute).map_err(|_| bad())?,
                day: u64::try_from(*day).map_err(|_| bad())?,
            },
            after: after.to_vec(),
        }),
        [0, index, now, current @ ..]
            if *index >= 1 && (*index as usize) <= checks && current.len() == checks =>
        {
            Ok(Verdict::Refused {
                index: (*index - 1) as usize,
                current: current.to_vec(),
                now: u64::try_from(*now).map_err(|_| bad())?,
            })
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_read_or_refused_as_errors() {
        let admitted = Value::Array(vec![
            Value::Int(1),
            Value::Int(10),
            Value::Int(2),
            Value::Int(7),
        ]);
        assert_eq!(
            parse_verdict(admitted, 1).unwrap(),
            Verdict::Admitted {
                windows: WindowIds { minute: 10, day: 2 },
                after: vec![7]
            }
        );
        let refused = Value::Array(vec![
            Value::Int(0),
            Value::Int(2),
            Value::Int(99),
            Value::Int(3),
            Value::Int(60),
        ]);
        assert_eq!(
            parse_verdict(refused, 2).unwrap(),
            Verdict::Refused {
                index: 1,
                current: vec![3, 60],
                now: 99
            }
        );
        for odd in [
            Value::Nil,
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![
                Value::Int(0),
                Value::Int(9),
                Value::Int(0),
                Value::Int(0),
            ]),
            Value::Array(vec![
                Value::Int(1),
                Value::Int(1),
                Value::Int(1),
                Value::Int(1),
                Value::Int(1),
            ]),
        ] {
            assert!(parse_verdict(odd, 1).is_err());
        }
    }
}
