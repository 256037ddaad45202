//! What a red team tried against a running gateway, each as a test: the
//! processor's own gRPC endpoint attacked directly (a client written here,
//! speaking ext_proc as an attacker would), model-rule bypasses, files that
//! are not files, and the headers and query parameters a provider must
//! never get. `docs/reliability.md` ("Security") tabulates them.

use crate::support::certs::TestCa;
use crate::support::extproc_client::{
    body, carries, chat_headers, exchange, headers, tcp_channel, unix_channel,
};
use std::time::Duration;

use crate::support::{
    chat, extproc_bin, post_h2_with_trailers, rename_key, FakeUpstream, Gateway, EXTPROC_SECRET,
};

#[tokio::test(flavor = "multi_thread")]
async fn an_http2_request_with_trailers_is_routed() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::builder()
        .backend("tars", &up.url(), Some("sk-provider"))
        .model("gpt-4o-mini", "tars")
        .start()
        .await;
    let reply = post_h2_with_trailers(
        &gw.url,
        "/v1/chat/completions",
        chat("gpt-4o-mini").to_string().into_bytes(),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = up.last();
    assert_eq!(seen.header("authorization"), Some("Bearer sk-provider"));
    assert_eq!(seen.json(), chat("gpt-4o-mini"));
}

/// The Unix socket has mode 0600, and the kernel holds to it: another user
/// cannot even connect. (The attack as another user needs root to switch
/// users; CI runs as root. Without root the mode is still checked.)
#[tokio::test(flavor = "multi_thread")]
async fn the_extproc_socket_lets_no_other_user_in() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::catch_all(&up, Some("sk-provider")).await;
    let socket = gw.extproc_socket();
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "socket mode");
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: cannot switch users to attack the socket; its mode was checked");
        return;
    }
    // Let anyone traverse the directory, so only the socket's own mode
    // stands in the way.
    std::fs::set_permissions(gw.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(
        connect_as(65534, 65534, &socket),
        libc::EACCES,
        "user nobody connected to the ext_proc socket"
    );
    // The control: the owner's group can connect once the mode allows it.
    let up2 = FakeUpstream::start("tars").await;
    let shared = Gateway::builder()
        .backend("tars", &up2.url(), Some("sk-provider"))
        .model("*", "tars")
        .extproc_option("socket_mode: \"0660\"")
        .start()
        .await;
    std::fs::set_permissions(shared.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let group = std::fs::metadata(shared.extproc_socket()).unwrap().gid();
    assert_eq!(connect_as(65534, group, &shared.extproc_socket()), 0);
    assert_eq!(
        connect_as(65534, 65534, &shared.extproc_socket()),
        libc::EACCES
    );
}

/// Forks, becomes `uid`/`gid`, connects to the Unix socket `path`; returns
/// 0 or the errno of `connect`.
fn connect_as(uid: u32, gid: u32, path: &std::path::Path) -> i32 {
    use std::os::unix::ffi::OsStrExt;
    // Everything the child needs is prepared before the fork: after it, the
    // child makes raw system calls only.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: the child only calls async-signal-safe functions and exits.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                libc::_exit(200);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let r = libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len);
            libc::_exit(if r == 0 { 0 } else { *libc::__errno_location() });
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        let code = libc::WEXITSTATUS(status);
        assert_ne!(code, 200, "could not switch to uid {uid}");
        code
    }
}

/// On TCP, a stream without the shared secret (or with a wrong one) is
/// refused before its first message is read: no answer, no key.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_streams_without_the_secret_get_nothing() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::builder()
        .tcp_extproc()
        .backend("tars", &up.url(), Some("sk-provider-tcp"))
        .model("*", "tars")
        .start()
        .await;
    let routable = || {
        vec![
            chat_headers(&[]),
            body(&chat("gpt-4o-mini").to_string(), true),
        ]
    };
    for secret in [None, Some("wrong-secret-wrong-secret-wrong-secret!")] {
        let channel = tcp_channel(&gw.extproc_addr, None).await.unwrap();
        let answers = exchange(channel, secret, routable()).await;
        assert_eq!(answers.len(), 1, "{answers:?}");
        let status = answers[0].as_ref().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(!status.message().contains(EXTPROC_SECRET));
    }
    // Envoy, with the secret, is served as before.
    let reply = gw
        .post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    // And a client holding the secret gets the key only by the protocol.
    let channel = tcp_channel(&gw.extproc_addr, None).await.unwrap();
    let answers = exchange(channel, Some(EXTPROC_SECRET), routable()).await;
    assert!(answers.iter().all(|a| a.is_ok()), "{answers:?}");
    assert!(
        !gw.extproc_logs().contains(EXTPROC_SECRET),
        "the secret was logged"
    );
}

/// Hand-built streams in every wrong order: a gRPC error each time, never
/// an answer with the key (the red team got `Bearer <key>` from a lone body
/// message, and from a body sent after a 401).
#[tokio::test(flavor = "multi_thread")]
async fn out_of_order_streams_get_an_error_never_the_key() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::builder()
        .backend("tars", &up.url(), Some("sk-provider-order"))
        .model("*", "tars")
        .client_keys("keys:\n  - {name: team, key: gw-team-0123456789abcdef}\n")
        .start()
        .await;
    let routable_body = || body(&chat("gpt-4o-mini").to_string(), true);
    let authorized = || chat_headers(&[("authorization", "Bearer gw-team-0123456789abcdef")]);
    let cases: Vec<(&str, Vec<_>, usize)> = vec![
        ("a lone body", vec![routable_body()], 0),
        (
            "a body after a 401",
            vec![chat_headers(&[]), routable_body()],
            1,
        ),
        (
            "a second request",
            vec![authorized(), routable_body(), authorized(), routable_body()],
            2,
        ),
        (
            "two bodies",
            vec![authorized(), body("{", false), routable_body()],
            2,
        ),
        (
            "a body after a GET without body",
            vec![
                headers(
                    &[
                        (":method", "GET"),
                        (":path", "/v1/models"),
                        ("authorization", "Bearer gw-team-0123456789abcdef"),
                    ],
                    true,
                ),
                routable_body(),
            ],
            1,
        ),
    ];
    for (what, messages, refused_at) in cases {
        let channel = unix_channel(&gw.extproc_socket()).await.unwrap();
        let answers = exchange(channel, None, messages).await;
        assert_eq!(answers.len(), refused_at + 1, "{what}: {answers:?}");
        let status = answers[refused_at].as_ref().unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::FailedPrecondition,
            "{what}: {status:?}"
        );
        // Without a legitimate request first, no answer carries the key;
        // with one, only the answers before the refusal exist at all.
        if matches!(what, "a lone body" | "a body after a 401") {
            for a in answers.iter().flatten() {
                assert!(
                    !carries(a, "sk-provider-order"),
                    "{what}: key handed out: {a:?}"
                );
            }
        }
    }
    assert!(
        up.requests().is_empty(),
        "an attack stream reached the provider"
    );
}

#[test]
fn tcp_without_a_secret_or_tls_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        "backends: [{name: t, url: 'http://127.0.0.1:9', api_key_file: k}]\nmodels: [{name: '*', backend: t}]\n\
         extproc: {listen: '127.0.0.1:0'}\nadmin: {listen: '127.0.0.1:0'}\n",
    )
    .unwrap();
    for args in [vec!["--config"], vec!["envoy-config", "--config"]] {
        let out = std::process::Command::new(extproc_bin())
            .args(&args)
            .arg(&config)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("extproc.listen")
                && stderr.contains("secret_file")
                && stderr.contains("tls"),
            "{stderr}"
        );
    }
}

/// Mutual TLS instead of the secret: Envoy (with its certificate) is
/// served; a client without a certificate, or with one from another CA,
/// never gets past the handshake.
#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_serves_envoy_and_refuses_everyone_else() {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    let ca = TestCa::new("ai-gateway test CA");
    let ca_file = ca.write(dir, "ca.crt");
    let server = ca.issue(dir, "extproc", &["extproc.local"]);
    let envoy = ca.issue(dir, "envoy", &["envoy.local"]);
    let stranger = TestCa::new("someone else").issue(dir, "stranger", &["envoy.local"]);
    let tls = format!(
        "tls: {{ca_file: {:?}, cert_file: {:?}, key_file: {:?}, envoy_cert_file: {:?}, envoy_key_file: {:?}, server_name: extproc.local}}",
        ca_file.display().to_string(),
        server.cert.display().to_string(),
        server.key.display().to_string(),
        envoy.cert.display().to_string(),
        envoy.key.display().to_string(),
    );
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::builder()
        .tcp_extproc_with(&tls)
        .backend("tars", &up.url(), Some("sk-provider-mtls"))
        .model("*", "tars")
        .start()
        .await;
    let reply = gw
        .post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        up.last().header("authorization"),
        Some("Bearer sk-provider-mtls")
    );

    let pem = |p: &std::path::Path| std::fs::read(p).unwrap();
    let trust = || {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem(&ca_file)))
            .domain_name("extproc.local")
    };
    let attempts = [
        ("no client certificate", trust()),
        (
            "a certificate from another CA",
            trust().identity(Identity::from_pem(pem(&stranger.cert), pem(&stranger.key))),
        ),
    ];
    for (what, tls) in attempts {
        let messages = vec![chat_headers(&[]), body(&chat("m").to_string(), true)];
        match tcp_channel(&gw.extproc_addr, Some(tls)).await {
            Err(_) => {} // refused at the handshake
            Ok(channel) => {
                let answers = exchange(channel, None, messages).await;
                assert!(
                    answers.iter().all(|a| a.is_err()),
                    "{what}: the processor answered: {answers:?}"
                );
            }
        }
    }
    // With Envoy's own certificate the protocol works (the control).
    let tls = trust().identity(Identity::from_pem(pem(&envoy.cert), pem(&envoy.key)));
    let channel = tcp_channel(&gw.extproc_addr, Some(tls)).await.unwrap();
    let answers = exchange(channel, None, vec![chat_headers(&[])]).await;
    assert!(answers[0].is_ok(), "{answers:?}");
}

/// A gateway key limited to one model cannot reach another by spelling
/// `model` differently: Go's `encoding/json` (many OpenAI-compatible
/// servers) would read the second key. Refused with 400, also where the
/// model is renamed upstream.
#[tokio::test(flavor = "multi_thread")]
async fn differently_spelled_model_keys_are_refused() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::builder()
        .backend("tars", &up.url(), Some("sk-provider"))
        .model("gpt-4o-mini", "tars")
        .model_renamed("fast", "tars", "gpt-4o-mini-2024-07-18")
        .model("*", "tars")
        .client_keys(
            "keys:\n  - {name: cheap, key: gw-cheap-0123456789abcdef, models: [gpt-4o-mini, fast]}\n",
        )
        .start()
        .await;
    let key = [("authorization", "Bearer gw-cheap-0123456789abcdef")];
    for allowed in ["gpt-4o-mini", "fast"] {
        for body in [
            format!(r#"{{"model":"{allowed}","MODEL":"gpt-5-expensive","messages":[]}}"#),
            format!(r#"{{"model":"{allowed}","Model":"gpt-5-expensive","messages":[]}}"#),
            format!(r#"{{"model":"{allowed}","mode\u004c":"gpt-5-expensive","messages":[]}}"#),
            format!(r#"{{"MODEL":"gpt-5-expensive","model":"{allowed}","messages":[]}}"#),
            r#"{"MODEL":"gpt-5-expensive","messages":[]}"#.to_string(),
        ] {
            let reply = gw
                .request(
                    reqwest::Method::POST,
                    "/v1/chat/completions",
                    body.clone(),
                    &key,
                )
                .await;
            let message = reply.assert_error(400, "invalid_model");
            assert!(message.contains("model"), "{body}: {message}");
        }
    }
    assert!(
        up.requests().is_empty(),
        "a case-variant body reached the provider"
    );
    // The same key still works for what it may use.
    let reply = gw
        .request(
            reqwest::Method::POST,
            "/v1/chat/completions",
            chat("fast").to_string(),
            &key,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// A keys file whose entry is the digest of the empty string (what the
/// README's recipe prints when `$KEY` is unset), or a short key, is refused
/// naming the entry, at start and on reload; a request without any
/// credential never gets in.
#[tokio::test(flavor = "multi_thread")]
async fn keys_files_that_would_let_anyone_in_are_refused() {
    let empty_digest = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("client-keys.yaml");
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "backends: [{{name: t, url: 'http://127.0.0.1:9', api_key_file: k}}]\nmodels: [{{name: '*', backend: t}}]\n\
             client_keys: {{file: {:?}}}\nextproc: {{listen: 'unix:{}/x.sock'}}\nadmin: {{listen: '127.0.0.1:0'}}\n",
            keys.display().to_string(),
            dir.path().display()
        ),
    )
    .unwrap();
    for (entry, said) in [
        (
            format!("{{name: ci, sha256: {empty_digest}}}"),
            "digest of the empty string",
        ),
        ("{name: ci, key: short-key}".to_string(), "shorter than 16"),
    ] {
        std::fs::write(
            &keys,
            format!("keys:\n  - {{name: ok, key: gw-ok-0123456789abcdef}}\n  - {entry}\n"),
        )
        .unwrap();
        let out = std::process::Command::new(extproc_bin())
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{entry}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(r#"keys[1] ("ci")"#) && stderr.contains(said),
            "{stderr}"
        );
    }

    // Running: the same entry in a reload is refused; the keys in force stay.
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::builder()
        .backend("tars", &up.url(), Some("sk-provider"))
        .model("*", "tars")
        .client_keys("keys:\n  - {name: ok, key: gw-ok-0123456789abcdef}\n")
        .start()
        .await;
    rename_key(
        &gw.client_keys_file(),
        &format!("keys:\n  - {{name: ci, sha256: {empty_digest}}}\n"),
    );
    gw.wait_for_log(&["client keys reload refused", "digest of the empty string"]);
    for headers in [
        vec![],
        vec![("authorization", "Bearer ")],
        vec![("authorization", "Bearer")],
        vec![("x-api-key", "")],
    ] {
        gw.request(
            reqwest::Method::POST,
            "/v1/chat/completions",
            chat("m").to_string(),
            &headers,
        )
        .await
        .assert_error(401, "invalid_api_key");
    }
    let ok = gw
        .request(
            reqwest::Method::POST,
            "/v1/chat/completions",
            chat("m").to_string(),
            &[("authorization", "Bearer gw-ok-0123456789abcdef")],
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
}

/// A GET routes by its path: a body cannot send it elsewhere. A model id
/// with percent-encoded characters is refused (the provider might decode
/// `%2F` into another path).
#[tokio::test(flavor = "multi_thread")]
async fn a_get_routes_by_its_path_not_its_body() {
    let main = FakeUpstream::start("main").await;
    let other = FakeUpstream::start("other").await;
    let gw = Gateway::builder()
        .backend("main", &main.url(), Some("sk-main"))
        .backend("other", &other.url(), Some("sk-other"))
        .model("other-*", "other")
        .model("*", "main")
        .start()
        .await;
    let reply = gw
        .request(
            reqwest::Method::GET,
            "/v1/models/gpt-4o-mini",
            r#"{"model":"other-zz"}"#,
            &[],
        )
        .await;
    assert_ne!(reply.status, 500, "{}", reply.text());
    assert!(other.requests().is_empty(), "the GET's body re-routed it");
    assert_eq!(main.last().header("authorization"), Some("Bearer sk-main"));
    // (Envoy itself decodes escaped unreserved characters such as `%41`, so
    // the processor and the provider read the same path there.)
    for path in [
        "/v1/models/xai%2Fgrok-4.5",
        "/v1/models/xai%2fgrok-4.5",
        "/v1/models/a%2F..%2F..%2Fchat%2Fcompletions",
        "/v1/models/a%5Cb",
    ] {
        gw.get(path).await.assert_error(400, "invalid_model");
    }
    assert_eq!(
        main.requests().len(),
        1,
        "an encoded id reached the provider"
    );
}

/// What a provider must never get from a client: cookies, the organization
/// or project to bill, other credential headers, internal headers, and keys
/// in the query, which stay out of Envoy's access log too.
#[tokio::test(flavor = "multi_thread")]
async fn a_provider_gets_only_what_it_needs() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::catch_all(&up, Some("sk-provider")).await;
    let client_headers = [
        ("cookie", "session=abc"),
        ("openai-organization", "org-client"),
        ("openai-project", "proj-client"),
        ("x-auth-token", "tok-client"),
        ("anthropic-api-key", "sk-ant-client"),
        ("ocp-apim-subscription-key", "apim-client"),
        ("x-ai-eg-anything", "1"),
        ("user-agent", "kilo-code/4.0"),
    ];
    let reply = gw
        .request(
            reqwest::Method::POST,
            "/v1/chat/completions?key=sk-query-secret&api-version=2024-10-21&API-KEY=sk-query-2",
            chat("gpt-4o-mini").to_string(),
            &client_headers,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = up.last();
    for (name, _) in &client_headers[..7] {
        assert_eq!(seen.header(name), None, "{name} reached the provider");
    }
    assert_eq!(
        seen.header("user-agent"),
        Some("kilo-code/4.0"),
        "clients identify themselves"
    );
    assert_eq!(seen.header_all("authorization"), ["Bearer sk-provider"]);
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.query.as_deref(), Some("api-version=2024-10-21"));
    // A rejected request's query stays out of the access log as well.
    gw.get("/v1/nope?key=sk-query-secret")
        .await
        .assert_error(404, "unknown_url");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while gw.envoy_logs().lines().count() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let access_log = gw.envoy_logs();
    assert!(access_log.contains("/v1/chat/completions"), "{access_log}");
    assert!(
        !access_log.contains("sk-query"),
        "a query key in the access log: {access_log}"
    );
    assert!(
        !gw.extproc_logs().contains("sk-query"),
        "a query key in the processor's log"
    );
}

fn mkfifo(path: &std::path::Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A key file that is a FIFO (would block `open` forever) or a symlink to
/// `/dev/zero` (reports size 0, never ends) is refused at once: the last
/// good key stays, another backend's rotation still applies within a
/// second, memory stays flat, the failure shows in the metrics, and
/// SIGTERM still ends the process.
#[tokio::test(flavor = "multi_thread")]
async fn key_files_that_are_not_files_stall_nothing() {
    let a = FakeUpstream::start("a").await;
    let b = FakeUpstream::start("b").await;
    let mut gw = Gateway::builder()
        .backend("a", &a.url(), Some("sk-a-1"))
        .backend("b", &b.url(), Some("sk-b-1"))
        .model("model-a", "a")
        .model("model-b", "b")
        .start()
        .await;
    let key_a = gw.key_file("a");
    let rss_before = status_kib(gw.extproc().pid(), "VmRSS:");

    std::fs::remove_file(&key_a).unwrap();
    mkfifo(&key_a);
    gw.wait_for_log(&["backend=\"a\"", "a FIFO"]);
    rename_key(&gw.key_file("b"), "sk-b-2");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        gw.post_json("/v1/chat/completions", &chat("model-b"))
            .await
            .status,
        200
    );
    assert_eq!(
        b.last().header("authorization"),
        Some("Bearer sk-b-2"),
        "b's rotation stalled"
    );
    assert_eq!(
        gw.post_json("/v1/chat/completions", &chat("model-a"))
            .await
            .status,
        200
    );
    assert_eq!(a.last().header("authorization"), Some("Bearer sk-a-1"));
    assert_eq!(
        gw.metric(r#"ai_gateway_key_read_failing{backend="a"}"#)
            .await,
        Some(1.0)
    );
    assert_eq!(
        gw.metric(r#"ai_gateway_key_read_failing{backend="b"}"#)
            .await,
        Some(0.0)
    );
    assert!(gw
        .metric(r#"ai_gateway_key_read_errors_total{backend="a",reason="not_regular"}"#)
        .await
        .is_some_and(|n| n >= 1.0));
    assert!(gw
        .metric(r#"ai_gateway_key_age_seconds{backend="a"}"#)
        .await
        .is_some());

    std::fs::remove_file(&key_a).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &key_a).unwrap();
    gw.wait_for_log(&["backend=\"a\"", "a character device"]);
    // Several polls later, nothing was read into memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = status_kib(gw.extproc().pid(), "VmRSS:");
    assert!(
        rss_after < rss_before + 20 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert_eq!(gw.admin_get("/readyz").await.status, 200);

    let exited = gw.extproc().terminate(Duration::from_secs(10));
    assert!(
        exited.is_some_and(|s| s.success()),
        "SIGTERM did not end the processor: {exited:?}"
    );
}

/// A config edit with a typo in `api_key_file` keeps the working key (and
/// readiness) until the new path can be read, and says so.
#[tokio::test(flavor = "multi_thread")]
async fn a_typo_in_api_key_file_keeps_the_working_key() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::catch_all(&up, Some("sk-good")).await;
    let key = gw.key_file("tars");
    let typo = key.with_file_name("apiKye");
    let config = std::fs::read_to_string(&gw.config_path).unwrap();
    let edited = config.replace(&key.display().to_string(), &typo.display().to_string());
    assert_ne!(config, edited);
    rename_key(&gw.config_path, &edited);
    gw.wait_for_log(&["configuration reloaded"]);
    let line = gw.wait_for_log(&["backend=\"tars\"", "keeping the key read from"]);
    assert!(line.contains("apiKye"), "{line}");
    let reply = gw.post_json("/v1/chat/completions", &chat("m")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(up.last().header("authorization"), Some("Bearer sk-good"));
    assert_eq!(gw.admin_get("/readyz").await.status, 200);
    assert_eq!(
        gw.metric(r#"ai_gateway_key_read_failing{backend="tars"}"#)
            .await,
        Some(1.0)
    );

    // The new file appears: its key takes over.
    std::fs::write(&typo, "sk-new\n").unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        gw.post_json("/v1/chat/completions", &chat("m"))
            .await
            .status,
        200
    );
    assert_eq!(up.last().header("authorization"), Some("Bearer sk-new"));
    assert_eq!(
        gw.metric(r#"ai_gateway_key_read_failing{backend="tars"}"#)
            .await,
        Some(0.0)
    );
}

/// The config file, and the client keys file, replaced by a FIFO: the
/// reload is refused at once (no thread stuck on `open`), the running
/// configuration serves on.
#[tokio::test(flavor = "multi_thread")]
async fn a_config_file_that_is_a_fifo_is_refused() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::catch_all(&up, Some("sk-good")).await;
    std::fs::remove_file(&gw.config_path).unwrap();
    mkfifo(&gw.config_path);
    gw.wait_for_log(&["cannot read the configuration file", "a FIFO"]);
    assert_eq!(
        gw.post_json("/v1/chat/completions", &chat("m"))
            .await
            .status,
        200
    );
}

/// 32 bodies of 15 MB at once (the red team saw half of 24 to 48 answered
/// with Envoy's empty-bodied 504): every one is answered by the provider,
/// since the message timeout fits the body limit, and the processor's peak
/// memory stays within the stated bound of twice each concurrent body.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_large_bodies_are_answered_within_bounded_memory() {
    const BODIES: usize = 32;
    const SIZE: usize = 15 * 1024 * 1024;
    let up = FakeUpstream::start("tars").await;
    up.discard_bodies();
    let mut gw = Gateway::builder()
        .backend("tars", &up.url(), Some("sk-provider"))
        .model("*", "tars")
        .extproc_args(&["--log-level", "info"])
        .start()
        .await;
    let body = chat("gpt-4o-mini")
        .to_string()
        .replace("Hi.", &"x".repeat(SIZE));
    let tasks: Vec<_> = (0..BODIES)
        .map(|_| {
            let url = format!("{}/v1/chat/completions", gw.url);
            let body = body.clone();
            tokio::spawn(async move {
                let r = crate::support::client()
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), r.text().await.unwrap_or_default())
            })
        })
        .collect();
    for t in tasks {
        let (status, text) = t.await.unwrap();
        assert_eq!(status, 200, "{}", &text[..text.len().min(300)]);
    }
    assert_eq!(up.requests().len(), BODIES);
    let peak = status_kib(gw.extproc().pid(), "VmHWM:") * 1024;
    let bound = 2 * BODIES * SIZE + 64 * 1024 * 1024;
    assert!(
        peak as usize <= bound,
        "peak RSS {peak} over the bound {bound}"
    );
}

/// When the processor does not answer in time, Envoy's own 504 is
/// OpenAI-shaped JSON, not an empty body.
#[tokio::test(flavor = "multi_thread")]
async fn a_processor_timeout_is_an_openai_shaped_504() {
    let up = FakeUpstream::start("tars").await;
    let gw = Gateway::builder()
        .backend("tars", &up.url(), Some("sk-provider"))
        .model("*", "tars")
        .extproc_option("message_timeout: 1ms")
        .start()
        .await;
    let body = chat("m")
        .to_string()
        .replace("Hi.", &"x".repeat(4 * 1024 * 1024));
    let reply = gw.post("/v1/chat/completions", body).await;
    let message = reply.assert_error(504, "gateway_processor_timeout");
    assert!(message.contains("message_timeout"), "{message}");
    assert!(up.requests().is_empty());
}
