//! What a red team tried against a running gateway, each as a test: the
//! processor's own gRPC endpoint attacked directly (a client written here,
//! speaking ext_proc as an attacker would), model-rule bypasses, files that
//! are not files, and the headers and query parameters a provider must
//! never get. `docs/reliability.md` ("Security") tabulates them.

use crate::support::extproc_client::{
    body, carries, chat_headers, exchange, headers, tcp_channel, unix_channel,
};
use crate::support::{
    chat, extproc_bin, post_h2_with_trailers, FakeUpstream, Gateway, EXTPROC_SECRET,
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
    let keys_dir = tempfile::tempdir().unwrap();
    let keys = keys_dir.path().join("client-keys.yaml");
    std::fs::write(
        &keys,
        "keys:\n  - {name: team, key: gw-team-0123456789abcdef}\n",
    )
    .unwrap();
    let gw = Gateway::builder()
        .backend("tars", &up.url(), Some("sk-provider-order"))
        .model("*", "tars")
        .extra_yaml(&format!(
            "client_keys: {{file: {:?}}}\n",
            keys.display().to_string()
        ))
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
