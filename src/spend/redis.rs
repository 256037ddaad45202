//! The counters in Redis (or Valkey), shared by every replica: each
//! admission is one Lua script, one round trip, atomic (`spend.lua`,
//! loaded once and called by its SHA).
//!
//! Keys: one hash per window, `{<namespace>}:m:<UTC minute>` and
//! `{<namespace>}:d:<UTC day>`, fields `k:<key name>:<limit>` and
//! `g:<limit>`. They hold key *names*, never a key or its digest, and they
//! expire on their own. The braces are a hash tag: every counter of a
//! gateway lives in one Redis Cluster slot, so one script can check a key's
//! windows and the gateway's together.
//!
//! Settlements are not a round trip of their own: they wait in this
//! process and ride along with the next admission's script call, which
//! applies them before it checks (so the check sees them). When no
//! admission comes within [`SETTLE_DELAY`], they go on their own. On a
//! busy gateway this halves what spend control costs Redis and the
//! processor (measured in `bench/RESULTS.md`).
//!
//! The connection is made on first use and then kept by redis-rs's
//! `ConnectionManager` (or cluster connection), which reconnects by itself:
//! a Redis down at start, or restarted, is an outage the gateway rides out,
//! never a restart.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{IntoConnectionInfo, Script, ScriptInvocation, Value};
use tokio::sync::{Notify, OnceCell};

use super::limits::{Check, Window};
use super::store::{Delta, StoreError, Verdict, WindowIds};
use crate::metrics::Metrics;

/// After a failed connection attempt, calls fail at once for this long
/// instead of each trying again (an outage costs no latency per request).
const RECONNECT_BACKOFF: Duration = Duration::from_millis(500);

/// Connecting may take this long at most.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a settlement waits for an admission to carry it before it goes
/// on its own. Short: another replica's admissions see it only once it is
/// in Redis.
pub const SETTLE_DELAY: Duration = Duration::from_millis(5);

/// How long a settlement of its own may take.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

/// At most this many corrections wait (an outage of hours under load);
/// past it the oldest are dropped, and their reservations stand as
/// charged.
const MAX_WAITING: usize = 100_000;

/// At most this many corrections ride along with one call.
const MAX_CARRIED: usize = 512;

pub struct RedisStore {
    shared: Arc<Shared>,
}

/// What the store and its settlement task share.
struct Shared {
    target: Target,
    connection: OnceCell<Connection>,
    last_failure: Mutex<Option<Instant>>,
    namespace: String,
    /// A key in the namespace's slot, passed as KEYS[1].
    anchor: String,
    script: Script,
    /// Settlements not yet in Redis.
    waiting: Mutex<Vec<Waiting>>,
    /// Wakes the settlement task.
    wake: Notify,
    /// The settlement task is awake (or about to be): settlements need not
    /// wake it. On a busy gateway it wakes once per [`SETTLE_DELAY`], not
    /// once per request.
    awake: AtomicBool,
    /// The store was dropped (a reload switched stores): the task sends
    /// what waits and ends.
    closed: AtomicBool,
    started: Once,
    metrics: Arc<Metrics>,
}

/// One counter correction waiting to be sent, with the window it belongs
/// to.
struct Waiting {
    window: Window,
    id: u64,
    field: String,
    delta: i64,
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

/// A failed call, and whether it may have run in Redis.
struct CallError {
    error: StoreError,
    /// Nothing reached Redis (no connection, refused): what the call
    /// carried can be sent again without counting twice.
    unsent: bool,
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
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let mut info = url.into_connection_info().map_err(redis_error)?;
        if let Some(password) = password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info).map_err(redis_error)?;
        Ok(Self::new(
            Target::Single(Box::new(client)),
            namespace,
            metrics,
        ))
    }

    pub fn cluster(
        nodes: &[String],
        namespace: &str,
        password: Option<String>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let mut builder = ClusterClient::builder(nodes.iter().map(String::as_str))
            .connection_timeout(CONNECT_TIMEOUT);
        if let Some(password) = password {
            builder = builder.password(password);
        }
        let client = builder.build().map_err(redis_error)?;
        Ok(Self::new(
            Target::Cluster(Box::new(client)),
            namespace,
            metrics,
        ))
    }

    fn new(target: Target, namespace: &str, metrics: Arc<Metrics>) -> Self {
        Self {
            shared: Arc::new(Shared {
                target,
                connection: OnceCell::new(),
                last_failure: Mutex::new(None),
                namespace: namespace.to_string(),
                anchor: format!("{{{namespace}}}:anchor"),
                script: Script::new(include_str!("spend.lua")),
                waiting: Mutex::new(Vec::new()),
                wake: Notify::new(),
                awake: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                started: Once::new(),
                metrics,
            }),
        }
    }

    /// Checks and charges `checks`, carrying the settlements that wait.
    pub async fn reserve(
        &self,
        checks: &[Check],
        timeout: Duration,
    ) -> Result<Verdict, StoreError> {
        let shared = &self.shared;
        let carried = shared.take_waiting();
        let mut call = shared.call(&carried);
        for check in checks {
            call.arg(window_arg(check.kind.window()))
                .arg(check.field())
                .arg(check.amount)
                .arg(check.limit.unwrap_or(-1));
        }
        match shared.invoke(&call, timeout).await {
            Ok(reply) => parse_verdict(reply, checks.len()),
            Err(e) => {
                shared.carried_failed(carried, e.unsent);
                Err(e.error)
            }
        }
    }

    /// Queues a reservation's corrections (`delta`, in its windows); they reach
    /// Redis with the next admission, or on their own within
    /// [`SETTLE_DELAY`].
    pub fn settle(&self, windows: WindowIds, checks: &[Check], delta: Delta) {
        let shared = &self.shared;
        {
            let mut waiting = shared.waiting.lock().unwrap_or_else(|p| p.into_inner());
            waiting.extend(checks.iter().filter_map(|check| {
                let window = check.kind.window();
                let delta = delta.of(check.kind);
                (delta != 0).then(|| Waiting {
                    window,
                    id: windows.of(window),
                    field: check.field(),
                    delta,
                })
            }));
            shared.bound(&mut waiting);
        }
        shared.start_settling();
        shared.rouse();
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        self.shared.wake.notify_one();
    }
}

impl Shared {
    /// The script call with its key, namespace and `carried` corrections;
    /// checks go after.
    fn call(&self, carried: &[Waiting]) -> ScriptInvocation<'_> {
        let mut call = self.script.key(&self.anchor);
        call.arg(&self.namespace).arg(carried.len());
        for w in carried {
            call.arg(window_arg(w.window))
                .arg(w.id)
                .arg(&w.field)
                .arg(w.delta);
        }
        call
    }

    fn take_waiting(&self) -> Vec<Waiting> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if waiting.len() <= MAX_CARRIED {
            std::mem::take(&mut *waiting)
        } else {
            waiting.drain(..MAX_CARRIED).collect()
        }
    }

    /// A call that carried settlements failed: unsent, they wait for the
    /// next one; otherwise Redis may or may not have applied them, and
    /// sending them again could count them twice, so they are dropped (the
    /// reservations stand as charged: the safe side for a refund).
    fn carried_failed(&self, carried: Vec<Waiting>, unsent: bool) {
        if carried.is_empty() {
            return;
        }
        if unsent {
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            let later = std::mem::replace(&mut *waiting, carried);
            waiting.extend(later);
            self.bound(&mut waiting);
            drop(waiting);
            // The settlement task sends them if no admission does.
            self.rouse();
        } else {
            tracing::warn!(
                corrections = carried.len(),
                "spend settlements may not have reached the store; their reservations stay charged"
            );
        }
    }

    /// Keeps at most [`MAX_WAITING`] corrections, dropping the oldest.
    fn bound(&self, waiting: &mut Vec<Waiting>) {
        if waiting.len() > MAX_WAITING {
            let over = waiting.len() - MAX_WAITING;
            waiting.drain(..over);
            tracing::warn!(
                dropped = over,
                "too many spend settlements waiting for the store; the oldest are dropped and their reservations stay charged"
            );
        }
    }

    /// Wakes the settlement task unless it is awake already.
    fn rouse(&self) {
        if !self.awake.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    /// Starts the settlement task, once, on the runtime of the first
    /// settlement (there is always one: settlements come from requests).
    fn start_settling(self: &Arc<Self>) {
        self.started.call_once(|| {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(Arc::clone(self).settle_loop());
            }
        });
    }

    /// Sends settlements that no admission carried: woken by the first one
    /// waiting, it gives admissions [`SETTLE_DELAY`] to take them, then
    /// sends what is left. Ends once the store is dropped and nothing waits.
    async fn settle_loop(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            loop {
                tokio::time::sleep(SETTLE_DELAY).await;
                let carried = self.take_waiting();
                if carried.is_empty() {
                    // Asleep again; a settlement that came in between
                    // found `awake` still set, so look once more.
                    self.awake.store(false, Ordering::Release);
                    let more = !self
                        .waiting
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_empty();
                    if more && !self.awake.swap(true, Ordering::AcqRel) {
                        continue;
                    }
                    break;
                }
                let call = self.call(&carried);
                match self.invoke(&call, SETTLE_TIMEOUT).await {
                    // More may have come meanwhile: go round again.
                    Ok(_) => continue,
                    Err(e) => {
                        self.metrics.spend_store_error();
                        tracing::debug!(error = %e.error, "spend settlement not sent");
                        let unsent = e.unsent;
                        // Back in the queue if unsent: this task retries.
                        self.carried_failed(carried, unsent);
                        if self.closed.load(Ordering::Relaxed) {
                            break;
                        }
                        if unsent {
                            // The store is down: try again once it may be back.
                            tokio::time::sleep(RECONNECT_BACKOFF).await;
                        }
                    }
                }
            }
            if self.closed.load(Ordering::Relaxed) {
                return;
            }
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
    ) -> Result<Value, CallError> {
        let connection = self.connection(timeout).await.map_err(|error| CallError {
            error,
            unsent: true,
        })?;
        let run = async {
            match connection {
                Connection::Single(mut c) => call.invoke_async(&mut c).await,
                Connection::Cluster(mut c) => call.invoke_async(&mut c).await,
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(Ok(reply)) => Ok(reply),
            // The connection's own response timeout is the same length and
            // usually fires first: say which limit it was, as below.
            Ok(Err(e)) if e.is_timeout() => Err(CallError {
                error: StoreError::Timeout(timeout),
                unsent: false,
            }),
            Ok(Err(e)) => Err(CallError {
                unsent: e.is_connection_refusal(),
                error: redis_error(e),
            }),
            Err(_) => Err(CallError {
                error: StoreError::Timeout(timeout),
                unsent: false,
            }),
        }
    }
}

fn window_arg(w: Window) -> &'static str {
    match w {
        Window::Minute => "m",
        Window::Day => "d",
    }
}

/// Reads `spend.lua`'s reply to an admission.
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
