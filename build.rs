//! Build-time facts for the binary: the git revision it was built from, so
//! the start log line and `--version` say exactly what runs.
//!
//! Envoy's protos are not compiled here: they come pre-generated from the
//! `envoy-types` crate (see `proto/README.md`).

use std::process::Command;

fn main() {
    let rev = std::env::var("AI_GATEWAY_GIT_REV")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(git_revision)
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=AI_GATEWAY_GIT_REV={rev}");
    println!("cargo:rerun-if-env-changed=AI_GATEWAY_GIT_REV");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}

fn git_revision() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let rev = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!rev.is_empty()).then_some(rev)
}
