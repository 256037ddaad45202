#!/usr/bin/env bash
# Runs every test: installs what is missing (scripts/setup.sh), then format and
# lint checks, the smoke check of scripts/run.sh, and all unit and integration
# tests (the integration tests run the real Envoy against the real extproc).
set -euo pipefail
cd "$(dirname "$0")/.."

start=$SECONDS
# Each step says when it starts; a first run spends most of its time
# compiling (cargo's "Compiling" lines are the progress).
step() { printf '[test] %s (at %dm%02ds)\n' "$*" $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)); }

step "setup: Python venv, Envoy, Redis"
scripts/setup.sh
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy (the first run compiles everything here)"
cargo clippy --all-targets -- -D warnings
step "scripts/check-run.sh (builds the release binaries on a first run)"
scripts/check-run.sh
step "cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --no-fail-fast --lib --bins --tests 2>&1 | tee "$log"
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ {p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}' "$log"
step "done"
