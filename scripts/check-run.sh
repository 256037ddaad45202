#!/usr/bin/env bash
# Smoke-checks the README's start command: runs scripts/run.sh (offline mode)
# on free ports, sends a chat completion through it, stops it, and checks that
# nothing it started is left running.
set -euo pipefail
cd "$(dirname "$0")/.."

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export GATEWAY_PORT=$(free_port) ADMIN_PORT=$(free_port) FAKE_UPSTREAM_PORT=$(free_port) AI_GATEWAY_MODE=fake
log=$(mktemp)
scripts/run.sh > "$log" 2>&1 &
run_pid=$!
stop() { kill "$run_pid" 2>/dev/null || true; wait "$run_pid" 2>/dev/null || true; }
trap 'stop; rm -f "$log"' EXIT

for _ in $(seq 1200); do
  grep -q "gateway ready" "$log" && break
  kill -0 "$run_pid" 2>/dev/null || { cat "$log"; echo "check-run: scripts/run.sh exited early" >&2; exit 1; }
  sleep 0.5
done
grep -q "gateway ready" "$log" || { cat "$log"; echo "check-run: gateway not ready after 10 minutes" >&2; exit 1; }

answer=$(curl -fsS -H 'Content-Type: application/json' \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi."}]}' \
  "http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions")
case "$answer" in
  *'Hello from fake-openai.'*) ;;
  *) echo "check-run: unexpected answer: $answer" >&2; exit 1 ;;
esac
# Offline mode routes as a real deployment does: named models only.
status=$(curl -sS -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' \
  -d '{"model":"no-such-model","messages":[{"role":"user","content":"Hi."}]}' \
  "http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions")
[ "$status" = 404 ] || { echo "check-run: an unknown model got $status, not 404" >&2; exit 1; }
curl -fsS "http://127.0.0.1:$GATEWAY_PORT/v1/models/gpt-4o-mini" | grep -q '"id":"gpt-4o-mini"' \
  || { echo "check-run: GET /v1/models/gpt-4o-mini did not answer the model" >&2; exit 1; }

# A second run.sh from this checkout refuses, and leaves the first serving.
second=$(scripts/run.sh 2>&1) && { echo "check-run: a second scripts/run.sh started: $second" >&2; exit 1; }
case "$second" in
  *"another scripts/run.sh is running"*) ;;
  *) echo "check-run: the second scripts/run.sh failed without saying why: $second" >&2; exit 1 ;;
esac
curl -fsS -H 'Content-Type: application/json' \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi."}]}' \
  "http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions" | grep -q 'Hello from fake-openai.' \
  || { echo "check-run: the first gateway stopped serving after a second run.sh" >&2; exit 1; }

stop
sleep 0.5
if pgrep -f "127.0.0.1:$FAKE_UPSTREAM_PORT|\.run/gateway.yaml|\.run/envoy.yaml" >/dev/null; then
  echo "check-run: processes left running after scripts/run.sh stopped:" >&2
  pgrep -fa "127.0.0.1:$FAKE_UPSTREAM_PORT|\.run/gateway.yaml|\.run/envoy.yaml" >&2
  exit 1
fi
echo "check-run: scripts/run.sh served a chat completion, routed by name, refused a second instance and stopped cleanly"
