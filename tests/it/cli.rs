//! The command line: flags, help, and invalid configurations stopping the
//! start with the field and place named. (The shipped bootstraps are checked
//! against `envoy-config` in `deploy.rs`.)

use std::process::Command;

use crate::support::{extproc_bin, repo_root};

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(extproc_bin())
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("run ai-gateway-extproc");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invalid_config_stops_the_start_naming_field_and_place() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "backends:\n  - name: tars\n    url: https://h\n    api_key_file: k\n  - {name: tars, url: 'http://h2', api_key_file: k}\nmodels:\n  - {name: m, backend: ghost}\n",
    )
    .unwrap();
    let bad = bad.to_str().unwrap();
    for args in [vec!["--config", bad], vec!["envoy-config", "--config", bad]] {
        let (code, _, stderr) = run(&args);
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains(bad), "{stderr}");
        // Every problem at once.
        assert!(stderr.contains("backends[1].name"), "{stderr}");
        assert!(stderr.contains("models[0].backend"), "{stderr}");
    }

    // A value of the wrong form: its field and line.
    let url = dir.path().join("url.yaml");
    std::fs::write(
        &url,
        "backends:\n  - name: tars\n    url: ftp://nowhere\n    api_key_file: k\nmodels: [{name: m, backend: tars}]\n",
    )
    .unwrap();
    let (code, _, stderr) = run(&["--config", url.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("backends[0].url") && stderr.contains("ftp") && stderr.contains("line 2"),
        "{stderr}"
    );

    let typo = dir.path().join("typo.yaml");
    std::fs::write(&typo, "backends: []\nmodels: []\nlimts: {}\n").unwrap();
    let (code, _, stderr) = run(&["--config", typo.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("limts") && stderr.contains("line 3"),
        "{stderr}"
    );

    let (code, _, stderr) = run(&["--config", "/nonexistent/gateway.yaml"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot read config file /nonexistent/gateway.yaml"),
        "{stderr}"
    );

    let (code, _, stderr) = run(&[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--config"), "{stderr}");
}

#[test]
fn help_explains_every_flag() {
    let (code, help, _) = run(&["--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--config",
        "--listen",
        "--admin-listen",
        "--log-level",
        "--log-format",
        "envoy-config",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
    let (code, version, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert!(version.starts_with("ai-gateway-extproc "), "{version}");
    assert!(help.contains("--worker-threads"), "{help}");
    // A one-shot command offers only what it uses.
    let (code, login, _) = run(&["login", "--help"]);
    assert_eq!(code, 0);
    assert!(login.contains("--key-file"), "{login}");
    assert!(
        !login.contains("--listen"),
        "login does not listen:\n{login}"
    );
}

/// An error names its cause once.
#[test]
fn a_missing_file_is_said_once() {
    let (code, _, stderr) = run(&["--config", "/nonexistent/gateway.yaml"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("/nonexistent/gateway.yaml"), "{stderr}");
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
}

#[test]
fn flags_override_the_file() {
    let (code, yaml, stderr) = run(&[
        "envoy-config",
        "--config",
        "config/tars.yaml",
        "--listen",
        "unix:/run/ai-gateway/extproc.sock",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        yaml.contains("path: /run/ai-gateway/extproc.sock"),
        "{yaml}"
    );
}
