//! The shipped deployment files, checked without a Docker engine or a
//! cluster: Kubernetes manifests against the Kubernetes schemas, the pod and
//! compose structure the README promises, every shipped Envoy bootstrap
//! against its gateway config and the real Envoy, and the containers' exact
//! command lines run for real against their mounted layouts (a kubelet-style
//! Secret and ConfigMap, compose's plain directories).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{
    client, envoy_bin, extproc_bin, kubelet_swap, python_bin, rename_key, repo_root, ChildGuard,
    FakeUpstream, ENVOY_VERSION,
};
use serde_json::Value;

/// Each gateway config shipped with the Envoy bootstrap rendered from it.
const BOOTSTRAPS: &[(&str, &str)] = &[
    ("config/tars.yaml", "envoy/envoy.yaml"),
    ("deploy/compose/gateway.yaml", "deploy/compose/envoy.yaml"),
    (
        "deploy/compose/gateway-offline.yaml",
        "deploy/compose/envoy.yaml",
    ),
    // The with-redis overlay's config: spend changes nothing in Envoy.
    (
        "deploy/kubernetes/with-redis/gateway.yaml",
        "deploy/kubernetes/envoy.yaml",
    ),
    (
        "deploy/kubernetes/gateway.yaml",
        "deploy/kubernetes/envoy.yaml",
    ),
];

fn yaml(path: &str) -> Value {
    let text =
        std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn shipped_bootstraps_are_what_envoy_config_renders_and_envoy_accepts() {
    for (config, bootstrap) in BOOTSTRAPS {
        let out = Command::new(extproc_bin())
            .args(["envoy-config", "--config", config])
            .current_dir(repo_root())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{config}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let shipped = std::fs::read(repo_root().join(bootstrap)).unwrap();
        assert!(
            out.stdout == shipped,
            "{bootstrap} drifted from {config}; regenerate it with:\n  \
             target/debug/ai-gateway-extproc envoy-config --config {config} > {bootstrap} (after cargo build)"
        );
    }
    // The shipped (dynamic) bootstraps, and the same configs rendered
    // static: everything Envoy gets over xDS, inline, so Envoy checks the
    // resources themselves too.
    let dir = tempfile::tempdir().unwrap();
    let mut to_validate: Vec<PathBuf> = BOOTSTRAPS
        .iter()
        .map(|(_, bootstrap)| repo_root().join(bootstrap))
        .collect();
    for (i, (config, _)) in BOOTSTRAPS.iter().enumerate() {
        let out = Command::new(extproc_bin())
            .args(["envoy-config", "--static", "--config", config])
            .current_dir(repo_root())
            .output()
            .unwrap();
        assert!(out.status.success(), "{config}: {}", output_text(&out));
        let path = dir.path().join(format!("static-{i}.yaml"));
        std::fs::write(&path, &out.stdout).unwrap();
        to_validate.push(path);
    }
    for bootstrap in to_validate {
        let out = Command::new(envoy_bin())
            .args(["--mode", "validate", "-c"])
            .arg(&bootstrap)
            .output()
            .unwrap();
        let all = output_text(&out);
        assert!(
            out.status.success() && all.contains("OK"),
            "{}: {all}",
            bootstrap.display()
        );
    }
}

#[test]
fn kubernetes_manifests_validate_against_the_schemas() {
    let kustomization = yaml("deploy/kubernetes/kustomization.yaml");
    let mut files: Vec<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("deploy/kubernetes/{}", r.as_str().unwrap()))
        .collect();
    assert!(files.len() >= 2, "{files:?}");
    // Not a kustomize resource (it would overwrite the key), but shipped.
    files.push("deploy/kubernetes/secret.example.yaml".into());
    // The with-redis overlay: the base, its Redis, its config.
    let overlay = yaml("deploy/kubernetes/with-redis/kustomization.yaml");
    assert_eq!(overlay["resources"][0], "../");
    for r in overlay["resources"].as_array().unwrap().iter().skip(1) {
        files.push(format!(
            "deploy/kubernetes/with-redis/{}",
            r.as_str().unwrap()
        ));
    }
    assert_eq!(overlay["configMapGenerator"][0]["behavior"], "replace");
    assert!(repo_root()
        .join("deploy/kubernetes/with-redis/gateway.yaml")
        .is_file());
    for generator in kustomization["configMapGenerator"].as_array().unwrap() {
        for file in generator["files"].as_array().unwrap() {
            let path = repo_root()
                .join("deploy/kubernetes")
                .join(file.as_str().unwrap());
            assert!(path.is_file(), "{} is missing", path.display());
        }
    }
    let validator = crate::support::python_bin().with_file_name("kubernetes-validate");
    assert!(
        validator.exists(),
        "kubernetes-validate not found at {}: run scripts/setup.sh",
        validator.display()
    );
    files.sort();
    // 1.29: the oldest Kubernetes with native sidecars on by default.
    for version in ["1.29.0", "1.33.0"] {
        let out = Command::new(&validator)
            .args(["--strict", "-k", version])
            .args(&files)
            .current_dir(repo_root())
            .output()
            .unwrap();
        let all = output_text(&out);
        assert!(out.status.success(), "Kubernetes {version}:\n{all}");
        // One line per resource; a file may hold several.
        let resources: usize = files
            .iter()
            .map(|f| {
                std::fs::read_to_string(repo_root().join(f))
                    .unwrap()
                    .split("\n---")
                    .filter(|doc| doc.contains("\nkind:") || doc.starts_with("kind:"))
                    .count()
            })
            .sum();
        assert_eq!(
            all.matches("passed for resource").count(),
            resources,
            "{all}"
        );
    }
}

#[test]
fn kubernetes_pod_is_a_hardened_envoy_with_its_sidecar() {
    let d = yaml("deploy/kubernetes/deployment.yaml");
    let spec = &d["spec"]["template"]["spec"];
    let sidecar = spec["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "ai-gateway-extproc")
        .expect("no ai-gateway-extproc sidecar");
    assert_eq!(sidecar["restartPolicy"], "Always", "not a native sidecar");
    let envoy = spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "envoy")
        .expect("no envoy container");
    assert_eq!(envoy["image"], format!("envoyproxy/envoy:v{ENVOY_VERSION}"));

    // The Secret, whole, without subPath, where the config reads the key.
    let example = yaml("deploy/kubernetes/secret.example.yaml");
    assert!(
        example["stringData"]["apiKey"].is_string(),
        "the Secret's entry must be apiKey"
    );
    let secret_volume = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == example["metadata"]["name"])
        .expect("no Secret volume");
    let mount = sidecar["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == secret_volume["name"])
        .expect("the Secret is not mounted in the sidecar");
    assert!(
        mount.get("subPath").is_none(),
        "a subPath mount never sees a rotation"
    );
    let gateway = yaml("deploy/kubernetes/gateway.yaml");
    let key_file = gateway["backends"][0]["api_key_file"].as_str().unwrap();
    assert_eq!(
        format!("{}/apiKey", mount["mountPath"].as_str().unwrap()),
        key_file
    );

    // Probes on the admin port, which the config binds on the pod IP.
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(sidecar["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(sidecar["ports"][0]["containerPort"], 1064);
    assert_eq!(gateway["admin"]["listen"], "0.0.0.0:1064");

    // The socket directory is shared, and the socket is in it.
    let socket_dir = |c: &Value| {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "extproc-socket")
            .map(|m| m["mountPath"].as_str().unwrap().to_string())
    };
    assert_eq!(socket_dir(sidecar), socket_dir(envoy));
    let listen = gateway["extproc"]["listen"].as_str().unwrap();
    assert!(
        listen.starts_with(&format!("unix:{}/", socket_dir(sidecar).unwrap())),
        "{listen}"
    );

    for c in [sidecar, envoy] {
        let name = c["name"].as_str().unwrap();
        for r in ["requests", "limits"] {
            for k in ["cpu", "memory"] {
                assert!(
                    c["resources"][r][k].is_string(),
                    "{name}: no resources.{r}.{k}"
                );
            }
        }
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["capabilities"]["drop"][0], "ALL", "{name}");
    }
    let pod_sc = &spec["securityContext"];
    assert_eq!(pod_sc["runAsNonRoot"], true);
    assert_eq!(pod_sc["runAsUser"], 65532);
    assert_eq!(spec["automountServiceAccountToken"], false);
}

#[test]
fn compose_wires_envoy_and_the_sidecar_as_documented() {
    let c = yaml("docker-compose.yml");
    let services = &c["services"];
    let sidecar = &services["ai-gateway-extproc"];
    let envoy = &services["envoy"];
    assert!(sidecar.is_object() && envoy.is_object(), "{services}");
    assert_eq!(envoy["image"], format!("envoyproxy/envoy:v{ENVOY_VERSION}"));
    assert_eq!(services["fake-upstream"]["profiles"][0], "offline");
    // The spend store, on request, never published.
    assert_eq!(services["redis"]["profiles"][0], "redis");
    assert!(services["redis"]["ports"].is_null(), "Redis published");

    let volumes = |s: &Value| -> Vec<String> {
        s["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let sidecar_volumes = volumes(sidecar);
    // The key directory, not the key file: a file bind mount pins the old
    // inode and never sees a replaced key.
    assert!(
        sidecar_volumes.contains(&"./secrets:/etc/ai-gateway/secrets:ro".to_string()),
        "{sidecar_volumes:?}"
    );
    assert!(
        sidecar_volumes
            .iter()
            .any(|v| v.starts_with("./deploy/compose:")),
        "{sidecar_volumes:?}"
    );
    let socket = "extproc-socket:/run/ai-gateway".to_string();
    assert!(sidecar_volumes.contains(&socket) && volumes(envoy).contains(&socket));
    assert!(c["volumes"]["extproc-socket"].is_object());

    for port in envoy["ports"].as_array().unwrap() {
        assert!(
            port.as_str().unwrap().starts_with("127.0.0.1:"),
            "published beyond localhost: {port}"
        );
    }
    assert!(
        sidecar.get("ports").is_none(),
        "the sidecar must not be published"
    );
    assert_eq!(
        envoy["environment"]["ENVOY_UID"], "65532",
        "Envoy must share the socket's user"
    );

    // The gateway config the command names exists, with paths inside the mounts.
    let command: Vec<&str> = sidecar["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(command[0], "--config");
    assert_eq!(
        command[1],
        "/etc/ai-gateway/config/${AI_GATEWAY_CONFIG:-gateway.yaml}"
    );
    let gateway = yaml("deploy/compose/gateway.yaml");
    assert_eq!(
        gateway["backends"][0]["api_key_file"],
        "/etc/ai-gateway/secrets/tars-api-key"
    );
    assert!(volumes(envoy)
        .contains(&"./deploy/compose/envoy.yaml:/etc/envoy/envoy.yaml:ro".to_string()));
}

/// A container's file system, rooted in a temporary directory: absolute
/// paths of the manifests map below it.
struct ContainerRoot {
    dir: tempfile::TempDir,
}

impl ContainerRoot {
    fn new() -> Self {
        Self {
            dir: tempfile::Builder::new().prefix("ctr").tempdir().unwrap(),
        }
    }
    fn path(&self, container_path: &str) -> PathBuf {
        self.dir.path().join(container_path.trim_start_matches('/'))
    }
    /// A gateway config as the container sees it, its absolute paths moved
    /// under the root and its admin port made ephemeral (tests run in
    /// parallel); nothing else changes.
    fn config_text(&self, text: &str) -> String {
        let root = self.dir.path().display().to_string();
        text.replace("/etc/ai-gateway", &format!("{root}/etc/ai-gateway"))
            .replace("/run/ai-gateway", &format!("{root}/run/ai-gateway"))
            .replace("0.0.0.0:1064", "127.0.0.1:0")
    }
    fn args(&self, args: &[&str]) -> Vec<String> {
        args.iter()
            .map(|a| {
                if a.starts_with('/') {
                    self.path(a).display().to_string()
                } else {
                    a.to_string()
                }
            })
            .collect()
    }
}

/// Starts the binary with `args`, waits for its start line, returns the
/// process, its log file and its admin URL.
fn start(root: &ContainerRoot, args: &[String]) -> (ChildGuard, PathBuf, String) {
    let log = root.dir.path().join("extproc.log");
    let mut cmd = Command::new(extproc_bin());
    cmd.args(args)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(root.dir.path().join("stderr")).unwrap());
    let mut child = ChildGuard::spawn("ai-gateway-extproc", cmd);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|l| l.contains("ai-gateway-extproc started"))
        {
            let json: Value = serde_json::from_str(line).unwrap_or(Value::Null);
            let admin = json["admin"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix("admin="))
                        .map(str::to_owned)
                })
                .unwrap();
            return (child, log, format!("http://{admin}"));
        }
        if let Some(status) = child.try_status() {
            let err = std::fs::read_to_string(root.dir.path().join("stderr")).unwrap_or_default();
            panic!("exited with {status}:\n{text}\n{err}");
        }
        assert!(Instant::now() < deadline, "did not start:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn metric_value(admin: &str, line_prefix: &str) -> Option<f64> {
    let text = client()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    crate::support::metric(&text, line_prefix, &[])
}

/// Polls until `metric` reaches `value`, for at most one second: the reload
/// contract.
async fn wait_for_metric(admin: &str, metric: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        if metric_value(admin, metric).await == Some(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{metric} did not reach {value} within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_sidecar_command_runs_against_kubelet_mounts() {
    let d = yaml("deploy/kubernetes/deployment.yaml");
    let sidecar = d["spec"]["template"]["spec"]["initContainers"][0].clone();
    let args: Vec<&str> = sidecar["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let mount_of = |volume: &str| -> String {
        sidecar["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == volume)
            .map(|m| m["mountPath"].as_str().unwrap().to_string())
            .unwrap()
    };
    let root = ContainerRoot::new();
    let config_dir = root.path(&mount_of("gateway-config"));
    let secret_dir = root.path(&mount_of("tars-api-key"));
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::create_dir_all(&secret_dir).unwrap();
    std::fs::create_dir_all(root.path(&mount_of("extproc-socket"))).unwrap();

    // ConfigMap and Secret volumes as the kubelet lays them out.
    let shipped =
        std::fs::read_to_string(repo_root().join("deploy/kubernetes/gateway.yaml")).unwrap();
    kubelet_swap(
        &config_dir.join("gateway.yaml"),
        &root.config_text(&shipped),
    );
    kubelet_swap(&secret_dir.join("apiKey"), "sk-k8s-first");

    let (mut child, log, admin) = start(&root, &root.args(&args));
    let ready = client()
        .get(format!("{admin}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert!(
        root.path("/run/ai-gateway/extproc.sock").exists(),
        "no socket where Envoy looks"
    );
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .expect("the manifest asks for JSON logs");
    assert!(first["level"].is_string());

    // `kubectl apply` of a new Secret, then of a new ConfigMap.
    kubelet_swap(&secret_dir.join("apiKey"), "sk-k8s-second");
    wait_for_metric(&admin, r#"ai_gateway_key_generation{backend="tars"}"#, 2.0).await;
    let edited = format!("{shipped}  - name: \"extra-model\"\n    backend: tars\n");
    kubelet_swap(&config_dir.join("gateway.yaml"), &root.config_text(&edited));
    wait_for_metric(
        &admin,
        r#"ai_gateway_config_reloads_total{result="success"}"#,
        1.0,
    )
    .await;

    let status = child
        .terminate(Duration::from_secs(10))
        .expect("no exit on SIGTERM");
    assert!(status.success());
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(!logs.contains("sk-k8s-"), "key in the logs");
}

#[tokio::test(flavor = "multi_thread")]
async fn compose_sidecar_command_runs_against_its_bind_mounts() {
    let c = yaml("docker-compose.yml");
    let sidecar = &c["services"]["ai-gateway-extproc"];
    let args: Vec<String> = sidecar["command"]
        .as_array()
        .unwrap()
        .iter()
        // Compose's own default for the variable.
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace("${AI_GATEWAY_CONFIG:-gateway.yaml}", "gateway.yaml")
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let root = ContainerRoot::new();
    // Bind mounts: the host's directories as they are.
    let config_dir = root.path("/etc/ai-gateway/config");
    std::fs::create_dir_all(&config_dir).unwrap();
    for entry in std::fs::read_dir(repo_root().join("deploy/compose")).unwrap() {
        let entry = entry.unwrap();
        let text = std::fs::read_to_string(entry.path()).unwrap();
        std::fs::write(config_dir.join(entry.file_name()), root.config_text(&text)).unwrap();
    }
    let secrets = root.path("/etc/ai-gateway/secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::create_dir_all(root.path("/run/ai-gateway")).unwrap();
    std::fs::write(secrets.join("tars-api-key"), "sk-compose-first\n").unwrap();

    let (mut child, _log, admin) = start(&root, &root.args(&args));
    let ready = client()
        .get(format!("{admin}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "{}", ready.text().await.unwrap());
    assert!(Path::new(&root.path("/run/ai-gateway/extproc.sock")).exists());

    // Replacing the key on the host, as the README says.
    rename_key(&secrets.join("tars-api-key"), "sk-compose-second");
    wait_for_metric(&admin, r#"ai_gateway_key_generation{backend="tars"}"#, 2.0).await;
    assert!(child
        .terminate(Duration::from_secs(10))
        .expect("no exit")
        .success());
}

/// What a finished command printed, stdout then stderr.
fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The profile-guided build (`scripts/pgo.sh`, which the Dockerfile and the
/// benchmark use) trains with `scripts/pgo-train.py`, which checks every
/// answer it gets. Run here, shortened, against the processor under test and
/// the real Envoy: a change that would break the training, and with it the
/// image build, fails this test instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_profile_guided_builds_training_runs_against_this_gateway() {
    let upstream = FakeUpstream::start("fake-openai").await;
    upstream.discard_bodies();
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("train.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new(python_bin());
    cmd.arg(repo_root().join("scripts/pgo-train.py"))
        .args(["--requests", "200", "--upstream", &upstream.url()])
        .arg("--extproc")
        .arg(extproc_bin())
        .arg("--envoy")
        .arg(envoy_bin())
        .arg("--workdir")
        .arg(dir.path().join("work"))
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let status = tokio::task::spawn_blocking(move || {
        ChildGuard::spawn("scripts/pgo-train.py", cmd).wait_exit(Duration::from_secs(240))
    })
    .await
    .unwrap();
    let printed = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "the training failed ({status:?}):\n{printed}"
    );
    assert!(printed.contains("trained in"), "{printed}");
    // The training's requests reached the provider with the key the
    // gateway set (each answer's status is checked by the script itself).
    let keyed = upstream
        .requests()
        .iter()
        .filter(|r| r.header("authorization") == Some("Bearer sk-pgo-training-key"))
        .count();
    assert!(keyed >= 300, "{keyed} requests reached the provider");
}

/// No Docker engine here, so the Dockerfile is checked offline: every file
/// it copies from the repository exists (the fake provider's source moved
/// once and the Dockerfile kept the old path), and the example it builds
/// finds the source it includes.
#[test]
fn the_dockerfile_copies_what_the_repository_has() {
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let mut copied = Vec::new();
    for line in dockerfile.lines().map(str::trim) {
        let Some(args) = line.strip_prefix("COPY ") else {
            continue;
        };
        if args.starts_with("--from") {
            continue;
        }
        let words: Vec<&str> = args.split_whitespace().collect();
        for source in &words[..words.len() - 1] {
            assert!(
                repo_root().join(source).exists(),
                "Dockerfile copies {source}, which the repository does not have"
            );
            copied.push(source.to_string());
        }
    }
    let example = std::fs::read_to_string(repo_root().join("examples/fake_upstream.rs")).unwrap();
    let included = example
        .lines()
        .find_map(|l| l.trim().strip_prefix("#[path = \"../"))
        .and_then(|rest| rest.strip_suffix("\"]"))
        .expect("examples/fake_upstream.rs includes the fake by #[path]");
    assert!(
        copied.iter().any(|c| included.starts_with(c.as_str())),
        "the image builds examples/fake_upstream.rs, which includes {included}: not copied ({copied:?})"
    );
}
