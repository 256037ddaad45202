#!/usr/bin/env bash
# Benchmarks the gateway against plain Envoy and writes bench/RESULTS.md.
#   scripts/bench.sh [--seconds 10] [--connections 32] [--rates 500,1000,2000]
# Installs what is missing: .venv (scripts/setup.sh), nginx (Debian package,
# the fast upstream), valgrind (Debian package, counts Envoy's instructions),
# oha (crates.io, the load generator, into .venv/bin), and builds the
# processor as shipped (scripts/pgo.sh: profile-guided, 5 to 6 min) and the
# release examples the runs use. BENCH_EXTPROC=PATH benches that build
# instead and skips scripts/pgo.sh (e.g. target/pgo/ai-gateway-extproc from
# an earlier run, or a change's before and after in turn).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[bench] %s\n' "$*"; }

scripts/setup.sh
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing nginx-light"
    apt-get install -y -q nginx-light >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q nginx-light >/dev/null; }
  else
    say "nginx is needed as the upstream: install it (e.g. apt-get install nginx-light)" >&2
    exit 1
  fi
fi
if ! command -v valgrind >/dev/null 2>&1 && ! printf '%s\n' "$@" | grep -qx -- --no-instructions; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing valgrind (counts Envoy's instructions per request)"
    apt-get install -y -q valgrind >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q valgrind >/dev/null; }
  else
    say "valgrind is needed to count instructions: install it, or pass --no-instructions" >&2
    exit 1
  fi
fi
OHA_VERSION=1.16.0
if ! .venv/bin/oha --version 2>/dev/null | grep -q "$OHA_VERSION"; then
  say "installing oha $OHA_VERSION into .venv/bin"
  cargo install --quiet --locked --root .venv oha --version "$OHA_VERSION"
fi
say "building the processor as shipped (scripts/pgo.sh) and the release examples"
mkdir -p target
[ -n "${BENCH_EXTPROC:-}" ] || scripts/pgo.sh > target/pgo-build.log 2>&1 \
  || { say "scripts/pgo.sh failed; see target/pgo-build.log" >&2; tail -n 20 target/pgo-build.log >&2; exit 1; }
cargo build --release --quiet --example fake_upstream --example null_extproc --example spend_cost
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
PATH="$PWD/.venv/bin:$PATH" OHA="$PWD/.venv/bin/oha" exec .venv/bin/python bench/bench.py "$@"
