//! Envoy follows the gateway config live over xDS: backends and models
//! added, changed and removed reach Envoy without a restart; a change Envoy
//! rejects is logged and counted and the last accepted one keeps serving;
//! Envoy started before the processor waits for it.

use std::fs;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use futures_util::StreamExt;
use serde_json::json;
use tonic::metadata::MetadataValue;

use crate::support::extproc_client::tcp_channel;
use crate::support::{
    chat, client, rename_key, FakeUpstream, Gateway, GatewayBuilder, Reply, EXTPROC_SECRET,
};

/// How long a change may take before a test gives up. The time a change
/// actually takes is printed, and measured in `bench/RESULTS.md`.
const PATIENCE: Duration = Duration::from_secs(10);

/// A gateway with one backend, `a` (key `key-a`) at `upstream`, serving
/// `model`.
fn one_backend(upstream: &FakeUpstream, model: &str) -> GatewayBuilder {
    Gateway::builder()
        .backend("a", &upstream.url(), Some("key-a"))
        .model(model, "a")
}

/// Rewrites the running config file atomically.
fn edit_config(gw: &Gateway, edit: impl FnOnce(String) -> String) {
    let old = fs::read_to_string(&gw.config_path).unwrap();
    let new = edit(old.clone());
    assert_ne!(old, new, "the edit changed nothing");
    rename_key(&gw.config_path, &new);
}

/// A key file for a backend added later.
fn key_file(gw: &Gateway, backend: &str, key: &str) -> String {
    let path = gw.dir().join("secrets").join(backend).join("apiKey");
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, key).unwrap();
    path.display().to_string()
}

fn with_backend(yaml: String, line: &str) -> String {
    yaml.replacen("backends:\n", &format!("backends:\n  - {line}\n"), 1)
}

fn with_model(yaml: String, model: &str, backend: &str) -> String {
    yaml.replacen(
        "models:\n",
        &format!("models:\n  - {{name: {model:?}, backend: {backend:?}}}\n"),
        1,
    )
}

async fn chat_reply(gw: &Gateway, model: &str) -> Reply {
    gw.post_json("/v1/chat/completions", &chat(model)).await
}

/// Sends chats for `model` until one is answered by the fake provider
/// `upstream`; returns how long that took.
async fn until_served_by(gw: &Gateway, model: &str, upstream: &str) -> Duration {
    let start = Instant::now();
    loop {
        let reply = chat_reply(gw, model).await;
        if reply.status == 200 && reply.header("x-fake-upstream") == Some(upstream) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{model} never reached {upstream}: last answer {} {}",
            reply.status,
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The xDS versions the processor serves and Envoy acknowledged.
async fn xds_versions(gw: &Gateway) -> (f64, f64) {
    let text = gw.admin_get("/metrics").await.text();
    let version = |state: &str| {
        crate::support::metric(
            &text,
            "ai_gateway_xds_version",
            &[&format!("state=\"{state}\"")],
        )
        .unwrap_or(-1.0)
    };
    (version("served"), version("acked"))
}

/// Waits until Envoy has accepted `version` whole.
async fn until_envoy_applied(gw: &Gateway, version: f64) {
    let start = Instant::now();
    loop {
        let (served, acked) = xds_versions(gw).await;
        if served == version && acked == version {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "Envoy never applied version {version}: served {served}, acked {acked}\n{}",
            gw.extproc_logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The clusters Envoy got over xDS, from its `/config_dump`.
async fn envoy_clusters(gw: &Gateway) -> Vec<String> {
    let dump = gw
        .envoy_admin_json("/config_dump?resource=dynamic_active_clusters")
        .await;
    dump["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["cluster"]["name"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_and_model_added_to_the_running_config_are_served() {
    let a = FakeUpstream::start("a").await;
    let b = FakeUpstream::start("b").await;
    let gw = one_backend(&a, "m-a").start().await;
    assert_eq!(chat_reply(&gw, "m-a").await.status, 200);
    chat_reply(&gw, "m-b")
        .await
        .assert_error(404, "model_not_found");
    until_envoy_applied(&gw, 1.0).await;
    assert_eq!(envoy_clusters(&gw).await, ["a"]);

    let key = key_file(&gw, "b", "key-b");
    edit_config(&gw, |yaml| {
        let line = format!("{{name: b, url: {:?}, api_key_file: {key:?}}}", b.url());
        with_model(with_backend(yaml, &line), "m-b", "b")
    });
    let took = until_served_by(&gw, "m-b", "b").await;
    eprintln!("a new backend served {took:?} after the edit");
    assert_eq!(b.last().header("authorization"), Some("Bearer key-b"));
    until_envoy_applied(&gw, 2.0).await;
    let mut clusters = envoy_clusters(&gw).await;
    clusters.sort();
    assert_eq!(clusters, ["a", "b"], "clusters keep the backends' names");
    // The first backend is untouched.
    assert_eq!(
        chat_reply(&gw, "m-a").await.header("x-fake-upstream"),
        Some("a")
    );
    gw.wait_for_log(&["Envoy applied the configuration", "version=2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_url_changed_moves_its_traffic() {
    let a = FakeUpstream::start("a").await;
    let b = FakeUpstream::start("b").await;
    let gw = one_backend(&a, "m").start().await;
    until_served_by(&gw, "m", "a").await;
    edit_config(&gw, |yaml| yaml.replace(&a.url(), &b.url()));
    let took = until_served_by(&gw, "m", "b").await;
    eprintln!("a changed URL took {took:?}");
    assert_eq!(b.last().header("authorization"), Some("Bearer key-a"));
    until_envoy_applied(&gw, 2.0).await;
    let before = a.requests().len();
    for _ in 0..5 {
        assert_eq!(
            chat_reply(&gw, "m").await.header("x-fake-upstream"),
            Some("b")
        );
    }
    assert_eq!(
        a.requests().len(),
        before,
        "the old upstream still got traffic"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_backend_and_its_models_are_gone_and_the_rest_serve() {
    let a = FakeUpstream::start("a").await;
    let b = FakeUpstream::start("b").await;
    let gw = Gateway::builder()
        .backend("a", &a.url(), Some("key-a"))
        .backend("b", &b.url(), Some("key-b"))
        .model("m-a", "a")
        .model("m-b", "b")
        .start()
        .await;
    until_served_by(&gw, "m-b", "b").await;
    edit_config(&gw, |yaml| {
        yaml.lines()
            .filter(|l| !l.contains("name: \"b\"") && !l.contains("backend: \"b\""))
            .map(|l| format!("{l}\n"))
            .collect()
    });
    until_envoy_applied(&gw, 2.0).await;
    chat_reply(&gw, "m-b")
        .await
        .assert_error(404, "model_not_found");
    assert_eq!(
        chat_reply(&gw, "m-a").await.header("x-fake-upstream"),
        Some("a")
    );
    assert_eq!(envoy_clusters(&gw).await, ["a"]);
}

/// A stream running while its backend's cluster changes under it finishes
/// whole; the next request goes to the new upstream.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_in_flight_during_a_change_completes() {
    let a = FakeUpstream::start("a").await;
    let b = FakeUpstream::start("b").await;
    let gw = one_backend(&a, "m").start().await;
    let gate = a.hold_streams_after_first_event();
    let mut body = chat("m");
    body["stream"] = json!(true);
    let mut stream = std::pin::pin!(gw.open_stream(&body, &[]).await);
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));

    // The backend's cluster, route and the listener all change.
    edit_config(&gw, |yaml| {
        yaml.replace(&a.url(), &b.url()).replace(
            "backends:\n",
            "limits: {max_request_body_bytes: 2000000}\nbackends:\n",
        )
    });
    until_envoy_applied(&gw, 2.0).await;
    until_served_by(&gw, "m", "b").await;

    gate.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.expect("the stream was cut by the change"));
    }
    assert!(
        String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
}

/// A config the processor accepts but Envoy cannot apply (a CA file that
/// is not PEM): Envoy's reason is logged, the rejection counted, and the
/// last accepted version keeps serving; the next good edit applies.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_envoy_rejects_is_logged_counted_and_the_old_one_serves() {
    let a = FakeUpstream::start("a").await;
    let gw = one_backend(&a, "m-a").start().await;
    until_envoy_applied(&gw, 1.0).await;
    let ca = gw.dir().join("not-a-ca.pem");
    fs::write(&ca, "this is not a certificate\n").unwrap();
    let key = key_file(&gw, "bad", "key-bad");
    let original = fs::read_to_string(&gw.config_path).unwrap();
    edit_config(&gw, |yaml| {
        let line = format!(
            "{{name: bad, url: 'https://bad.example', api_key_file: {key:?}, ca_file: {:?}}}",
            ca.display().to_string()
        );
        with_model(with_backend(yaml, &line), "m-bad", "bad")
    });
    let line = gw.wait_for_log(&["Envoy rejected the new configuration"]);
    eprintln!("{line}");
    assert!(line.contains("version=2"), "{line}");
    assert!(
        line.contains("not-a-ca.pem"),
        "Envoy's reason is missing: {line}"
    );
    assert_eq!(gw.metric("ai_gateway_xds_nacks_total").await, Some(1.0));
    assert_eq!(xds_versions(&gw).await, (2.0, 1.0));
    assert_eq!(envoy_clusters(&gw).await, ["a"]);
    assert_eq!(
        chat_reply(&gw, "m-a").await.header("x-fake-upstream"),
        Some("a")
    );

    // Back to a good config: a new version, applied.
    rename_key(&gw.config_path, &original);
    until_envoy_applied(&gw, 3.0).await;
    assert_eq!(gw.metric("ai_gateway_xds_nacks_total").await, Some(1.0));
}

/// Envoy started before the processor serves within 2 s of the processor
/// being up; the processor restarting leaves Envoy's clusters in place.
#[tokio::test(flavor = "multi_thread")]
async fn envoy_started_first_serves_once_the_processor_is_up() {
    let a = FakeUpstream::start("a").await;
    let mut gw = one_backend(&a, "m").envoy_first().start().await;
    until_served_by(&gw, "m", "a").await;
    let took = gw.processor_up.unwrap().elapsed();
    eprintln!("serving {took:?} after the processor was up");
    assert!(
        took < Duration::from_secs(2),
        "Envoy served {took:?} after the processor was up"
    );

    gw.kill_extproc();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        envoy_clusters(&gw).await,
        ["a"],
        "Envoy dropped its clusters"
    );
    gw.restart_extproc();
    until_served_by(&gw, "m", "a").await;
}

/// The xDS stream hands out the listener, which carries the stream secret:
/// on TCP it needs the secret as the ext_proc streams do.
#[tokio::test(flavor = "multi_thread")]
async fn xds_on_tcp_needs_the_secret() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::builder()
        .tcp_extproc()
        .backend("tars", &up.url(), Some("sk-provider-xds"))
        .model("*", "tars")
        .start()
        .await;
    let listeners = |secret: Option<&'static str>| {
        let addr = gw.extproc_addr.clone();
        async move {
            let channel = tcp_channel(&addr, None).await.unwrap();
            let mut client = AggregatedDiscoveryServiceClient::new(channel);
            let first = DiscoveryRequest {
                node: Some(Node {
                    id: "intruder".into(),
                    ..Default::default()
                }),
                type_url: "type.googleapis.com/envoy.config.listener.v3.Listener".into(),
                ..Default::default()
            };
            let mut request = tonic::Request::new(tokio_stream::iter(vec![first]));
            if let Some(secret) = secret {
                request.metadata_mut().insert(
                    "x-ai-gateway-secret",
                    MetadataValue::try_from(secret).unwrap(),
                );
            }
            let mut answers = client
                .stream_aggregated_resources(request)
                .await?
                .into_inner();
            answers.message().await
        }
    };
    for wrong in [None, Some("wrong-secret-wrong-secret-wrong-secret!")] {
        let status = listeners(wrong).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }
    let answer = listeners(Some(EXTPROC_SECRET)).await.unwrap().unwrap();
    assert_eq!(answer.resources.len(), 1);
    assert_eq!(answer.version_info, "1");
}

/// `envoy-config --static` keeps today's bootstrap: everything inline, no
/// xDS stream; an edit to Envoy's part is logged as needing a new render.
#[tokio::test(flavor = "multi_thread")]
async fn the_static_bootstrap_serves_without_xds() {
    let a = FakeUpstream::start("a").await;
    let b = FakeUpstream::start("b").await;
    let gw = one_backend(&a, "m").static_bootstrap().start().await;
    assert_eq!(
        chat_reply(&gw, "m").await.header("x-fake-upstream"),
        Some("a")
    );
    assert_eq!(gw.metric("ai_gateway_xds_streams").await, Some(0.0));
    let bootstrap = fs::read_to_string(gw.dir().join("envoy.yaml")).unwrap();
    assert!(!bootstrap.contains("ads_config"), "{bootstrap}");

    edit_config(&gw, |yaml| yaml.replace(&a.url(), &b.url()));
    gw.wait_for_log(&["no Envoy follows over xDS"]);
    // Envoy still sends to the old upstream: its bootstrap says so.
    assert_eq!(
        chat_reply(&gw, "m").await.header("x-fake-upstream"),
        Some("a")
    );
}

/// A model moved to a backend the same edit adds, then back to the first
/// one by an edit that removes the second: requests sent all along never
/// fail. Envoy gets a new backend's cluster and route before the processor
/// routes to it, and loses an old one only after the processor stopped.
#[tokio::test(flavor = "multi_thread")]
async fn a_model_moved_between_backends_never_fails_during_the_changes() {
    let a = FakeUpstream::start("a").await;
    let b = FakeUpstream::start("b").await;
    let gw = one_backend(&a, "m").start().await;
    until_envoy_applied(&gw, 1.0).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut senders = Vec::new();
    for _ in 0..4 {
        let (url, stop) = (gw.url.clone(), stop.clone());
        senders.push(tokio::spawn(async move {
            let client = client();
            let mut answers = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let reply = client
                    .post(format!("{url}/v1/chat/completions"))
                    .header("content-type", "application/json")
                    .body(chat("m").to_string())
                    .send()
                    .await
                    .unwrap();
                let status = reply.status().as_u16();
                let upstream = reply
                    .headers()
                    .get("x-fake-upstream")
                    .map(|v| v.to_str().unwrap().to_string());
                let body = reply.text().await.unwrap();
                answers.push((status, upstream, body));
            }
            answers
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let key = key_file(&gw, "b", "key-b");
    edit_config(&gw, |yaml| {
        let line = format!("{{name: b, url: {:?}, api_key_file: {key:?}}}", b.url());
        with_backend(yaml, &line).replace(
            r#"{name: "m", backend: "a"}"#,
            r#"{name: "m", backend: "b"}"#,
        )
    });
    until_envoy_applied(&gw, 2.0).await;
    until_served_by(&gw, "m", "b").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Back to a, and b removed: Envoy keeps b until the processor routes
    // to a, then drops it (version 3).
    edit_config(&gw, |yaml| {
        yaml.lines()
            .filter(|l| !l.contains("name: b,"))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            .replace(
                r#"{name: "m", backend: "b"}"#,
                r#"{name: "m", backend: "a"}"#,
            )
    });
    until_envoy_applied(&gw, 3.0).await;
    assert_eq!(envoy_clusters(&gw).await, ["a"]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answers = Vec::new();
    for sender in senders {
        answers.extend(sender.await.unwrap());
    }
    let failed: Vec<_> = answers
        .iter()
        .filter(|(status, ..)| *status != 200)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        answers.len(),
        &failed[..failed.len().min(3)]
    );
    let on = |name: &str| {
        answers
            .iter()
            .filter(|(_, u, _)| u.as_deref() == Some(name))
            .count()
    };
    assert!(on("a") > 0 && on("b") > 0, "a: {}, b: {}", on("a"), on("b"));
    eprintln!(
        "{} requests across the change: {} on a, {} on b",
        answers.len(),
        on("a"),
        on("b")
    );
}
