#!/usr/bin/env bash
# Runs every test: installs what is missing (scripts/setup.sh), then format and
# lint checks, the smoke check of scripts/run.sh, and all unit and integration
# tests (the integration tests run the real Envoy against the real extproc).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
echo "[test] cargo fmt --check"
cargo fmt --all -- --check
echo "[test] cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
echo "[test] scripts/check-run.sh"
scripts/check-run.sh
echo "[test] cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --no-fail-fast --lib --bins --tests 2>&1 | tee "$log"
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ {p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}' "$log"
