#!/usr/bin/env bash
# Starts the gateway locally: Envoy (client-facing, 127.0.0.1:1975) and
# ai-gateway-extproc beside it, wired through a Unix socket.
#
#   scripts/run.sh                        # offline: a local fake OpenAI-compatible upstream
#   TARS_API_KEY=sk-... scripts/run.sh    # TARS, key saved to secrets/tars-api-key
#   scripts/run.sh                        # TARS too, once secrets/tars-api-key exists
#
# Installs what is missing first (scripts/setup.sh), builds the release binary.
# Environment: GATEWAY_PORT (1975), ADMIN_PORT (1064), FAKE_UPSTREAM_PORT (8000),
# TARS_URL (https://api.router.tetrate.ai), AI_GATEWAY_MODE (tars|fake, to force one).
# Ctrl-C stops everything. Replace secrets/tars-api-key at any time: the new key
# applies within a second, no restart.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

GATEWAY_PORT=${GATEWAY_PORT:-1975}
ADMIN_PORT=${ADMIN_PORT:-1064}
FAKE_UPSTREAM_PORT=${FAKE_UPSTREAM_PORT:-8000}
TARS_URL=${TARS_URL:-https://api.router.tetrate.ai}
run="$root/.run"
key_file="$root/secrets/tars-api-key"

say() { printf '[run] %s\n' "$*"; }

# One gateway per checkout: a second one would replace the first's socket
# and logs under .run/. The lock is held until this script exits.
mkdir -p "$run"
exec 9>>"$run/lock"
if ! flock -n 9; then
  say "another scripts/run.sh is running from this checkout (pid $(cat "$run/pid" 2>/dev/null || echo '?')); stop it (Ctrl-C) first. Nothing was changed." >&2
  exit 1
fi
echo $$ > "$run/pid"
# Envoy binds with SO_REUSEPORT: on a busy port it would silently share the
# traffic with whatever listens there. Refuse instead.
for port in "$GATEWAY_PORT" "$ADMIN_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    say "port $port is in use (another gateway?); stop it, or set GATEWAY_PORT / ADMIN_PORT. Nothing was started." >&2
    exit 1
  fi
done

scripts/setup.sh
say "building the release binaries (a few minutes the first time)"
cargo build --release --bin ai-gateway-extproc --example fake_upstream
bin="$root/target/release/ai-gateway-extproc"

mkdir -p "$run" "$root/secrets"
if [ -n "${TARS_API_KEY:-}" ]; then
  (umask 077 && printf '%s\n' "$TARS_API_KEY" > "$key_file")
  say "saved TARS_API_KEY to secrets/tars-api-key (mode 0600)"
fi
mode=${AI_GATEWAY_MODE:-}
if [ -z "$mode" ]; then
  if [ -s "$key_file" ]; then mode=tars; else mode=fake; fi
fi

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

case "$mode" in
  tars)
    backend_url=$TARS_URL
    backend_key=$key_file
    say "upstream: TARS at $TARS_URL, key from secrets/tars-api-key"
    ;;
  fake)
    if (exec 3<>"/dev/tcp/127.0.0.1/$FAKE_UPSTREAM_PORT") 2>/dev/null; then
      say "port $FAKE_UPSTREAM_PORT (the local fake upstream) is in use; set FAKE_UPSTREAM_PORT. Nothing was started." >&2
      exit 1
    fi
    backend_url="http://127.0.0.1:$FAKE_UPSTREAM_PORT"
    backend_key="$run/fake-api-key"
    echo "sk-local-fake-key" > "$backend_key"
    "$root/target/release/examples/fake_upstream" "127.0.0.1:$FAKE_UPSTREAM_PORT" > "$run/fake-upstream.log" 2>&1 &
    pids+=($!)
    say "upstream: local fake OpenAI-compatible server on $backend_url (set TARS_API_KEY for TARS)"
    ;;
  *) say "AI_GATEWAY_MODE must be tars or fake, not '$mode'" >&2; exit 2 ;;
esac

# TARS: every model goes to TARS, and /v1/models is TARS's own list.
# Offline: named rules, as a real deployment has, so an unknown model gets
# the gateway's 404 and /v1/models lists what is served.
if [ "$mode" = tars ]; then
  models='  - {name: "*", backend: tars}'
else
  models='  - {name: gpt-4o-mini, backend: fake}
  - {name: gpt-4.1, backend: fake}
  - {name: "claude-*", backend: fake, upstream_model: claude-sonnet-4-20250514}'
fi
cat > "$run/gateway.yaml" <<YAML
# Written by scripts/run.sh ($mode mode); edit and save: it reloads live.
extproc: {listen: "unix:$run/extproc.sock"}
admin: {listen: "127.0.0.1:$ADMIN_PORT"}
envoy: {listen: "127.0.0.1:$GATEWAY_PORT"}
backends:
  - name: $mode
    url: $backend_url
    api_key_file: $backend_key
models:
$models
YAML

"$bin" envoy-config --config "$run/gateway.yaml" > "$run/envoy.yaml"
"$bin" --config "$run/gateway.yaml" &
pids+=($!)
for _ in $(seq 100); do [ -S "$run/extproc.sock" ] && break; sleep 0.1; done
[ -S "$run/extproc.sock" ] || { say "ai-gateway-extproc did not start" >&2; exit 1; }

"$root/.venv/bin/envoy" -c "$run/envoy.yaml" --concurrency 2 --disable-hot-restart \
  --log-level warn > "$run/envoy-access.log" 2> "$run/envoy.log" &
pids+=($!)
for _ in $(seq 100); do
  curl -fsS -o /dev/null "http://127.0.0.1:$GATEWAY_PORT/v1/models" 2>/dev/null && break
  if ! kill -0 "${pids[-1]}" 2>/dev/null; then say "Envoy exited; see $run/envoy.log:" >&2; cat "$run/envoy.log" >&2; exit 1; fi
  sleep 0.1
done

cat <<MSG
[run] gateway ready: http://127.0.0.1:$GATEWAY_PORT/v1  (metrics: http://127.0.0.1:$ADMIN_PORT/metrics)
[run] try:
  curl -H 'Content-Type: application/json' \\
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi."}]}' \\
    http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions
[run] Envoy's access log: $run/envoy-access.log; Ctrl-C stops the gateway.
MSG
wait -n "${pids[@]}"
say "a gateway process exited; stopping"
