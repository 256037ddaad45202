#!/usr/bin/env python3
"""The training run of the profile-guided build (scripts/pgo.sh).

Runs an instrumented ai-gateway-extproc behind the real Envoy, in front of
the project's fake OpenAI-compatible upstream, and sends it the traffic a
production gateway sees: small chats and streams (most of it), embeddings,
the Responses and Messages APIs, large bodies of prose, source code and
non-ASCII text with `model` first or last, client errors (bad JSON, wrong
types, a missing or unknown model), a fallback chain whose first backend is down, and,
after a live config reload, gateway keys with spend limits on the memory
store. The processor writes its profile when it exits on SIGTERM.

Why a mix and not the benchmark: a profile taken on the benchmark alone lays
out the code for the benchmark; the layout should favour what production
runs hot, and leave the rest merely correct.

Standard library only: the Docker build stage has Python but not the
project's .venv.

usage: pgo-train.py --extproc BIN (--fake-upstream BIN | --upstream URL) --envoy BIN --workdir DIR
(--upstream: an OpenAI-compatible fake already running, as in the test that
keeps this script in step with the gateway)
"""
import argparse
import ctypes
import http.client
import json
import random
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent():
    """In the child: SIGTERM when this script dies, even by SIGKILL, so a
    killed build or test leaves no Envoy or processor behind (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def say(msg):
    print(f"[pgo-train] {msg}", flush=True)


class Processes:
    """Every process started, stopped at the end whatever happens."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.procs = []

    def start(self, name, argv):
        log = open(self.logdir / f"{name}.log", "wb")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             preexec_fn=die_with_parent)
        self.procs.append((name, p))
        return p

    def stop(self, p, timeout=30):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode

    def stop_all(self):
        for _, p in reversed(self.procs):
            self.stop(p, timeout=10)


def request(conn, method, path, body=None, headers=None, stream=False):
    """One request on a keep-alive connection: (status, body bytes)."""
    h = {"content-type": "application/json"}
    h.update(headers or {})
    conn.request(method, path, body=body, headers=h)
    resp = conn.getresponse()
    if stream:
        data = b"".join(iter(lambda: resp.read1(65536), b""))
    else:
        data = resp.read()
    return resp.status, data


def wait_until(what, check, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"pgo-train: timed out waiting for {what}")
        time.sleep(0.1)


PROSE = ("The gateway reads the model from the body, picks the backend and sets its key. "
         "Streams pass through without buffering; usage is counted as it goes by. ")
SOURCE = ('fn main() {\n    let s = "quoted\\tstring";\n    println!("{}", s);\n}\n'
          "\t// a comment with 'quotes' and a path C:\\\\tmp\\\\x\n")
NON_ASCII = "Καλημέρα κόσμε. こんにちは世界。Grüße aus Köln — naïve café. 😀 "


def chat_body(model, text, stream=False, model_last=False, ensure_ascii=True, extra=None):
    fields = [("messages", [{"role": "system", "content": "You are terse."},
                            {"role": "user", "content": text}])]
    model_field = [("model", model)]
    fields = fields + model_field if model_last else model_field + fields
    if stream:
        fields.append(("stream", True))
        fields.append(("stream_options", {"include_usage": True}))
    for k, v in (extra or {}).items():
        fields.append((k, v))
    return json.dumps(dict(fields), ensure_ascii=ensure_ascii).encode()


def filled(unit, size):
    return (unit * (size // len(unit) + 1))[:size]


def expect(status, want, what):
    if status not in want:
        raise SystemExit(f"pgo-train: {what}: status {status}, expected {sorted(want)}")


def small_traffic(base, n, keys=None, seed=0):
    """Most of production: chats and streams of a few KB, on a few models."""
    host, port = base
    conn = http.client.HTTPConnection(host, port, timeout=30)
    rng = random.Random(seed)
    models = ["gpt-4o-mini", "gpt-4.1", "claude-sonnet", "claude-haiku"]
    for i in range(n):
        headers = {}
        if keys:
            headers["authorization"] = f"Bearer {rng.choice(keys)}"
        model = rng.choice(models)
        text = filled(PROSE, rng.randint(20, 4000))
        roll = rng.random()
        if roll < 0.45:
            status, body = request(conn, "POST", "/v1/chat/completions",
                                   chat_body(model, text, stream=True, model_last=rng.random() < 0.5,
                                             extra={"max_tokens": 256} if rng.random() < 0.5 else None),
                                   headers, stream=True)
            expect(status, {200}, "stream")
            if b"data: [DONE]" not in body:
                raise SystemExit("pgo-train: a stream ended without [DONE]")
        elif roll < 0.85:
            status, _ = request(conn, "POST", "/v1/chat/completions",
                                chat_body(model, text, model_last=rng.random() < 0.5), headers)
            expect(status, {200}, "chat")
        elif roll < 0.90:
            status, _ = request(conn, "POST", "/v1/embeddings",
                                json.dumps({"model": model, "input": [text[:500], text[:200]]}).encode(), headers)
            expect(status, {200}, "embeddings")
        elif roll < 0.93:
            status, _ = request(conn, "POST", "/v1/responses",
                                json.dumps({"model": model, "input": text, "stream": False}).encode(), headers)
            expect(status, {200}, "responses")
        elif roll < 0.95:
            status, _ = request(conn, "POST", "/v1/messages",
                                json.dumps({"model": model, "max_tokens": 100,
                                            "messages": [{"role": "user", "content": text}]}).encode(), headers)
            expect(status, {200}, "messages")
        elif roll < 0.96:
            status, _ = request(conn, "GET", "/v1/models", None, headers)
            expect(status, {200}, "models")
        elif roll < 0.97:
            # Client errors: what a buggy client or a probe sends.
            bad = rng.choice([b'{"model": "gpt-4o-mini", "messages": [', b"not json", b"[]",
                              b'{"messages": []}', b'{"model": 42}', b'{"model": "no-such-model", "messages": []}'])
            status, _ = request(conn, "POST", "/v1/chat/completions", bad, headers)
            expect(status, {400, 403, 404}, "a bad request")
        else:
            # A chain whose first backend refuses connections: the fallback answers.
            status, _ = request(conn, "POST", "/v1/chat/completions",
                                chat_body("chained", text, stream=rng.random() < 0.5), headers,
                                stream=True)
            expect(status, {200}, "a fallback chain")
        if i % 500 == 499:
            # Envoy closes idle connections on its own schedule; a fresh
            # connection now and then trains the stream start as well.
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.close()


def large_bodies(base):
    """Long contexts: what the body scan is for."""
    host, port = base
    conn = http.client.HTTPConnection(host, port, timeout=60)
    kinds = [(PROSE, True), (SOURCE, True), (NON_ASCII, False), (NON_ASCII, True)]
    sizes = [100_000] * 12 + [1_000_000] * 8 + [8_000_000] * 2
    for i, size in enumerate(sizes):
        unit, ensure_ascii = kinds[i % len(kinds)]
        body = chat_body("gpt-4o-mini", filled(unit, size), stream=i % 2 == 0,
                         model_last=i % 3 != 0, ensure_ascii=ensure_ascii)
        status, _ = request(conn, "POST", "/v1/chat/completions", body, stream=True)
        expect(status, {200}, f"a body of {len(body)} bytes")
    conn.close()


def run_threads(target, argsets):
    errors = []

    def wrap(args):
        try:
            target(*args)
        except BaseException as e:  # reported below; a thread must not die silently
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(a,)) for a in argsets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def config_yaml(work, ports, upstream, spend, keys):
    cfg = f"""# Written by scripts/pgo-train.py: the training gateway.
extproc: {{listen: "unix:{work}/extproc.sock"}}
admin: {{listen: "127.0.0.1:{ports['admin']}"}}
envoy: {{listen: "127.0.0.1:{ports['envoy']}"}}
backends:
  - {{name: fake, url: "{upstream}", api_key_file: "{work}/provider-key"}}
  - {{name: down, url: "http://127.0.0.1:{ports['down']}", api_key_file: "{work}/provider-key"}}
models:
  - {{name: gpt-4o-mini, backend: fake}}
  - {{name: gpt-4.1, backend: fake}}
  - {{name: "claude-*", backend: fake, upstream_model: claude-sonnet-4-20250514}}
  - {{name: chained, backend: down, fallbacks: [{{backend: fake, upstream_model: gpt-4o-mini}}]}}
"""
    if keys:
        cfg += f'client_keys: {{file: "{work}/client-keys.yaml"}}\n'
    if spend:
        cfg += """spend:
  store: memory
  limits: {tokens_per_day: 100000000000, usd_per_day: 1000000}
  prices:
    - {model: gpt-4o-mini, input: 0.15, output: 0.60}
    - {model: "claude-*", input: 3, output: 15, cached_input: 0.3}
    - {model: "*", input: 1, output: 4}
"""
    return cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extproc", required=True, type=Path)
    up = ap.add_mutually_exclusive_group(required=True)
    up.add_argument("--fake-upstream", type=Path, help="the fake_upstream example, started here")
    up.add_argument("--upstream", help="the base URL of a fake that is already running")
    ap.add_argument("--envoy", required=True, type=Path)
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--requests", type=int, default=4000, help="small requests per phase (default 4000)")
    a = ap.parse_args()

    work = a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    ports = {k: free_port() for k in ("admin", "envoy", "down")}
    upstream = a.upstream or f"http://127.0.0.1:{free_port()}"
    (work / "provider-key").write_text("sk-pgo-training-key\n")
    keys = ["gw-pgo-team-a-0123456789", "gw-pgo-team-b-0123456789"]
    (work / "client-keys.yaml").write_text(
        "keys:\n"
        f"  - {{name: team-a, key: {keys[0]}}}\n"
        f"  - {{name: team-b, key: {keys[1]}, models: [\"gpt-*\", \"claude-*\", chained],\n"
        "     limits: {requests_per_minute: 1000000, tokens_per_day: 100000000000}}\n")
    cfg = work / "gateway.yaml"
    cfg.write_text(config_yaml(work, ports, upstream, spend=False, keys=False))

    procs = Processes(work)
    try:
        if a.fake_upstream:
            procs.start("fake-upstream", [str(a.fake_upstream), upstream.removeprefix("http://")])
        extproc = procs.start("extproc", [str(a.extproc), "--config", str(cfg)])
        wait_until("the processor", lambda: request(
            http.client.HTTPConnection("127.0.0.1", ports["admin"], timeout=2), "GET", "/healthz")[0] == 200)
        bootstrap = subprocess.run([str(a.extproc), "envoy-config", "--config", str(cfg)],
                                   check=True, capture_output=True).stdout
        (work / "envoy.yaml").write_bytes(bootstrap)
        procs.start("envoy", [str(a.envoy), "-c", str(work / "envoy.yaml"), "--concurrency", "2",
                              "--disable-hot-restart", "--log-level", "warn"])
        base = ("127.0.0.1", ports["envoy"])

        def ready():
            conn = http.client.HTTPConnection(*base, timeout=2)
            status, _ = request(conn, "POST", "/v1/chat/completions", chat_body("gpt-4o-mini", "hi"))
            return status == 200
        wait_until("Envoy", ready)

        started = time.monotonic()
        say(f"small requests, 4 clients: {a.requests}")
        per = a.requests // 4
        run_threads(small_traffic, [(base, per, None, s) for s in range(4)])
        say("large bodies (100 KB to 8 MB), beside small requests")
        run_threads(lambda which, s: large_bodies(base) if which == "large"
                    else small_traffic(base, per // 2, None, s),
                    [("large", 10), ("small", 11)])

        say("live reload: spend limits on the memory store")
        cfg.write_text(config_yaml(work, ports, upstream, spend=True, keys=False))
        wait_until("the reloaded config",
                   lambda: "configuration reloaded" in (work / "extproc.log").read_text(errors="replace"))
        run_threads(small_traffic, [(base, per // 2, None, 10 + s) for s in range(4)])

        # Gateway keys apply at a restart: the second half runs with them,
        # as a platform team's gateway does. Each run leaves its own profile.
        say("restart with gateway keys and spend limits")
        code = procs.stop(extproc)
        if code != 0:
            raise SystemExit(f"pgo-train: the processor exited with {code}; see {work}/extproc.log")
        cfg.write_text(config_yaml(work, ports, upstream, spend=True, keys=True))
        extproc = procs.start("extproc-keys", [str(a.extproc), "--config", str(cfg)])

        def keys_required():
            conn = http.client.HTTPConnection(*base, timeout=2)
            status, _ = request(conn, "POST", "/v1/chat/completions", chat_body("gpt-4o-mini", "hi"))
            return status == 401
        wait_until("the processor with gateway keys", keys_required)
        run_threads(small_traffic, [(base, per, keys, 20 + s) for s in range(4)])
        for _ in range(5):
            conn = http.client.HTTPConnection("127.0.0.1", ports["admin"], timeout=5)
            status, _ = request(conn, "GET", "/metrics")
            expect(status, {200}, "/metrics")
        say(f"trained in {time.monotonic() - started:.0f} s; stopping the processor (it writes its profile)")
        code = procs.stop(extproc)
        if code != 0:
            raise SystemExit(f"pgo-train: the processor exited with {code}; see {work}/extproc.log")
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
