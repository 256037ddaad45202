#!/usr/bin/env bash
# Runs every fuzz target for a bounded time each (default 60 s):
#   scripts/fuzz.sh [SECONDS]
# Targets: request_body (the request-body reader and model rewrite), decision
# (the whole decision against a fixed config and keys), sse (the
# SSE parser), config (the config parser and Envoy renderer), response (the
# response reader: gzip/deflate, SSE, JSON usage), inbound (the ext_proc
# message decoder that leaves bodies in place, against prost). cargo-fuzz needs nightly
# compiler flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
# A crash is saved under fuzz/artifacts/<target>/ and stops the run: fix it
# and keep the input as a unit test.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
for target in request_body decision sse config response inbound; do
  echo "[fuzz] $target for ${seconds}s"
  mkdir -p "fuzz/corpus/$target"
  cargo fuzz run "$target" "fuzz/corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 2>&1 \
    | grep -E "^(#[0-9]+.*(DONE|pulse)|Done|==|SUMMARY|artifact)" || true
  if ls "fuzz/artifacts/$target"/crash-* >/dev/null 2>&1; then
    echo "[fuzz] $target: crash found, see fuzz/artifacts/$target" >&2
    exit 1
  fi
done
echo "[fuzz] no crash in any target"
