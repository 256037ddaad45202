//! Build-time facts for the binary:
//! - the git revision it was built from, so the start log line and
//!   `--version` say exactly what runs;
//! - the descriptors of the Envoy configuration types the processor serves
//!   over xDS (`src/xds/encode.rs`): the bootstrap renderer writes Envoy's
//!   resources in Envoy's JSON form, and the descriptors let the same JSON
//!   be encoded as the protobuf messages xDS carries, so both halves come
//!   from one renderer.
//!
//! Envoy's Rust types come pre-generated from the `envoy-types` crate (see
//! `proto/README.md`); the `.proto` files it ships are compiled here with
//! protox (pure Rust, no `protoc` needed), and only those the renderer
//! uses, with what they import.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Envoy messages the renderer writes, by proto file.
const ENVOY_PROTOS: &[&str] = &[
    "envoy/config/cluster/v3/cluster.proto",
    "envoy/config/listener/v3/listener.proto",
    "envoy/config/route/v3/route.proto",
    "envoy/extensions/access_loggers/stream/v3/stream.proto",
    "envoy/extensions/clusters/aggregate/v3/cluster.proto",
    "envoy/extensions/filters/http/ext_proc/v3/ext_proc.proto",
    "envoy/extensions/filters/http/header_mutation/v3/header_mutation.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/filters/http/upstream_codec/v3/upstream_codec.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/formatter/req_without_query/v3/req_without_query.proto",
    "envoy/extensions/retry/priority/previous_priorities/v3/previous_priorities_config.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
];

/// Where `envoy-types` keeps each proto tree it ships.
const INCLUDE_DIRS: &[&str] = &[
    "data-plane-api",
    "xds",
    "protoc-gen-validate",
    "googleapis",
    "cel-spec",
    "opentelemetry-proto",
    "client_model",
];

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

    if let Err(e) = envoy_descriptors() {
        // A build script reports by panicking; this is build time, not
        // the running gateway.
        panic!("cannot compile Envoy's descriptors: {e}");
    }
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

fn envoy_descriptors() -> Result<(), String> {
    println!("cargo:rerun-if-env-changed=ENVOY_TYPES_PROTO_DIR");
    println!("cargo:rerun-if-changed=Cargo.lock");
    let root = match std::env::var_os("ENVOY_TYPES_PROTO_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => envoy_types_dir()?.join("proto"),
    };
    let includes: Vec<PathBuf> = INCLUDE_DIRS.iter().map(|d| root.join(d)).collect();
    let descriptors = protox::Compiler::new(&includes)
        .and_then(|mut c| {
            c.include_imports(true).include_source_info(false);
            c.open_files(ENVOY_PROTOS)?;
            Ok(c.encode_file_descriptor_set())
        })
        .map_err(|e| format!("{} ({e})", root.display()))?;
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?);
    std::fs::write(out.join("envoy_descriptors.bin"), descriptors).map_err(|e| e.to_string())
}

/// The source directory of the `envoy-types` package this build uses, as
/// Cargo resolved it (registry, vendored or git alike). Offline first; the
/// registry only if a package of the graph (a dev-dependency, say) was
/// never downloaded, since `cargo metadata` reads every manifest.
fn envoy_types_dir() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(&std::env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?)
        .join("Cargo.toml");
    let target = std::env::var("TARGET").map_err(|e| e.to_string())?;
    let metadata = |offline: bool| {
        let mut cmd = Command::new(&cargo);
        cmd.args([
            "metadata",
            "--format-version",
            "1",
            "--filter-platform",
            &target,
        ])
        .arg("--manifest-path")
        .arg(&manifest);
        if offline {
            cmd.arg("--offline");
        }
        cmd.output()
    };
    let out = match metadata(true) {
        Ok(out) if out.status.success() => out,
        _ => metadata(false).map_err(|e| format!("cannot run cargo metadata: {e}"))?,
    };
    if !out.status.success() {
        return Err(format!(
            "cargo metadata failed: {} (set ENVOY_TYPES_PROTO_DIR to envoy-types' proto directory)",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("cargo metadata: {e}"))?;
    metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "envoy-types")
        .and_then(|p| p["manifest_path"].as_str())
        .and_then(|m| Path::new(m).parent().map(Path::to_path_buf))
        .ok_or_else(|| "envoy-types is not in cargo metadata's package list".into())
}
