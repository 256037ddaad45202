#!/usr/bin/env python3
"""Measures what ai-gateway-extproc costs on top of plain Envoy, in one run.

A: Envoy alone, proxying to a fast local upstream (nginx: a fixed chat
   completion, and an SSE variant). Its bootstrap is the one
   `ai-gateway-extproc envoy-config` renders, minus the ext_proc filter and the
   routing header match, so the two differ by the processor only.
B: the same Envoy with ai-gateway-extproc (release build), as rendered.
Both run one Envoy worker (--concurrency 1).

Measured: throughput at saturation (oha, 32 connections), latency at fixed
rates, the processor's CPU time per request and peak RSS, the added time to
first byte of streams, RSS with 1,000 concurrent streams, and key reload
latency (file change -> first request carrying the new key) over 20
rotations. Writes a table to bench/RESULTS.md.

Run it with scripts/bench.sh (which installs and builds what is missing).
"""
import argparse
import datetime
import http.client
import json
import os
import pathlib
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The processor as shipped: scripts/pgo.sh's build (profile-guided, or plain
# where it cannot be; target/pgo/kind says which). BENCH_EXTPROC runs another
# build (a change's before and after, alternating, when one run's noise is
# larger than the change).
EXTPROC = pathlib.Path(os.environ.get("BENCH_EXTPROC", ROOT / "target/pgo/ai-gateway-extproc"))


def build_kind():
    """How the processor under test was built, for the results' header."""
    if "BENCH_EXTPROC" in os.environ:
        return f"BENCH_EXTPROC={EXTPROC}"
    kind = ROOT / "target/pgo/kind"
    return f"{kind.read_text().strip()} build" if kind.exists() else "unknown build"
FAKE_UPSTREAM = ROOT / "target/release/examples/fake_upstream"
NULL_EXTPROC = ROOT / "target/release/examples/null_extproc"
SPEND_COST = ROOT / "target/release/examples/spend_cost"
ENVOY = ROOT / ".venv/bin/envoy"
# The real executable behind the .venv launcher, for valgrind.
ENVOY_EXE = next(iter(sorted((ROOT / ".venv/lib").glob("python3*/site-packages/envoy/_bin/envoy"))), ENVOY)

CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi."}]})
CHAT_STREAM = json.dumps({"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True},
                          "messages": [{"role": "user", "content": "Hi."}]})
COMPLETION = ('{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini",'
              '"choices":[{"index":0,"message":{"role":"assistant","content":"Hello there."},"finish_reason":"stop"}],'
              '"usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}}')
SSE = "".join(
    f"data: {json.dumps(e)}\n\n" for e in [
        {"model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None},
        {"model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "Hello"}}], "usage": None},
        {"model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": " there."}}], "usage": None},
        {"model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None},
        {"model": "gpt-4o-mini", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}},
    ]
) + "data: [DONE]\n\n"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx_escape(text):
    return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


class Processes:
    """Every process the run starts, stopped at the end whatever happens."""

    def __init__(self, workdir):
        # Logs apart from configs and keys: the processor watches the
        # directories of its config and key files, and a busy log file
        # there would cost it CPU on every line written.
        self.logdir = workdir / "logs"
        self.logdir.mkdir()
        self.procs = []

    def start(self, name, args, env=None):
        log = open(self.logdir / f"{name}.log", "wb")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append((name, p))
        return p

    def stop(self, p):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for _, p in reversed(self.procs):
            self.stop(p)


def wait_http(url, timeout=30.0, method="GET", body=None, headers=None, up=lambda status: status < 500):
    deadline = time.monotonic() + timeout
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1] if url.count("/") > 2 else "/"
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection(host, int(port), timeout=2)
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            r.read()
            if up(r.status):
                return r.status
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"bench: {url} did not answer within {timeout}s")


def start_nginx(procs, workdir, tls=None, name="nginx"):
    """The upstream: answers every request at once with a chat completion,
    or an SSE stream when `x-bench-stream: 1`. `tls`: (cert, key) files, to
    serve HTTPS with HTTP/2 and HTTP/1.1 offered by ALPN."""
    port = free_port()
    d = workdir if name == "nginx" else workdir / name
    (d / "logs").mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    listen = f"127.0.0.1:{port} reuseport"
    ssl = ""
    if tls:
        listen += " ssl http2"
        ssl = f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/logs/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/nginx-body;
  client_body_buffer_size 1m;
  client_max_body_size 64m;
  keepalive_requests 10000000;
  map $http_x_bench_stream $bench_body {{
    default '{nginx_escape(COMPLETION)}';
    "1" '{nginx_escape(SSE)}';
  }}
  map $http_x_bench_stream $bench_type {{
    default application/json;
    "1" text/event-stream;
  }}
  server {{
    listen {listen};
    {ssl}
    location / {{
      default_type "";
      add_header Content-Type $bench_type always;
      add_header X-Seen-Authorization $http_authorization always;
      return 200 $bench_body;
    }}
  }}
}}
""")
    procs.start(name, [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-p", str(d)])
    if not tls:
        wait_http(f"http://127.0.0.1:{port}/v1/chat/completions")
    else:
        deadline = time.monotonic() + 10
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if time.monotonic() > deadline:
                raise SystemExit("bench: the TLS upstream did not start")
            time.sleep(0.05)
    return port


def http2_rows(procs, workdir, a, alternate):
    """HTTP/2 to a provider that offers it by ALPN (the rendered default
    for https backends) against HTTP/1.1 to the same provider."""
    d = workdir / "tls"
    d.mkdir()
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    port = start_nginx(procs, workdir, tls=(cert, key), name="nginx-tls")
    urls, exts, admins = [], [], []
    for name in ("h1", "h2"):
        cfg, _ = gateway_config(workdir, port, "uds", name=f"tls-{name}")
        text = cfg.read_text().replace(f'url: "http://127.0.0.1:{port}"', f'url: "https://localhost:{port}", ca_file: "{cert}"')
        cfg.write_text(text)
        bootstrap = render(cfg)
        if name == "h1":
            bench = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "bench")
            opts = bench["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            opts.pop("auto_config")
            opts["explicit_http_config"] = {"http_protocol_options": {}}
        admin = free_port()
        bootstrap["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}}
        admins.append(admin)
        exts.append(start_extproc(procs, cfg, f"tls-{name}"))
        urls.append(start_envoy(procs, workdir, f"tls-{name}", bootstrap))
    for u in urls:
        oha(u, 2, a.connections, CHAT)
    rows = []
    for label, body, stream in (("chat", CHAT, False), ("stream", CHAT_STREAM, True)):
        (h1, h2), _ = alternate(urls, body=body, stream=stream)
        rows.append((f"HTTPS provider, HTTP/1.1 (A) and HTTP/2 by ALPN (B): {label} throughput (req/s)",
                     f"{h1['rps']:,.0f}", f"{h2['rps']:,.0f}", f"{h2['rps'] / h1['rps']:.2f}", ""))
    ttfb = interleaved_ttfb(urls, 200 * a.rounds)
    (a50, a99), (b50, b99) = ((statistics.median(ttfb[u]), percentile(ttfb[u], 99)) for u in urls)
    rows.append(("HTTPS provider, HTTP/1.1 (A) and HTTP/2 (B): stream time to first byte p50 / p99 (ms)",
                 f"{a50:.2f} / {a99:.2f}", f"{b50:.2f} / {b99:.2f}", f"{b50 - a50:+.2f} ms p50", ""))

    def upstream_stat(admin, stat):
        c = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
        c.request("GET", f"/stats?filter=^cluster.bench.{stat}$")
        text = c.getresponse().read().decode()
        return int(text.split(":")[1]) if ":" in text else 0
    (c1, c2) = (upstream_stat(p, "upstream_cx_total") for p in admins)
    (v1, v2) = (upstream_stat(p, "upstream_cx_http2_total") for p in admins)
    rows.append((f"HTTPS provider: TLS connections opened to it over all the runs above ({a.connections} client "
                 "connections; HTTP/2 ones in parentheses)", f"{c1:,} ({v1})", f"{c2:,} ({v2})", "", ""))
    return rows


def gateway_config(workdir, upstream_port, transport, name="b", extra=""):
    keys = workdir / f"keys-{name}"
    keys.mkdir(exist_ok=True)
    key = keys / "apiKey"
    key.write_text("sk-bench-0\n")
    conf = workdir / f"conf-{name}"
    conf.mkdir(exist_ok=True)
    if transport == "uds":
        extproc = f'listen: "unix:{workdir}/{name}.sock"'
    else:
        # TCP needs a shared secret Envoy presents on every stream.
        secret = conf / "extproc-secret"
        secret.write_text("bench-extproc-secret-0123456789abcdef0123\n")
        extproc = f'listen: "127.0.0.1:{free_port()}", secret_file: "{secret}"'
    cfg = conf / "gateway.yaml"
    cfg.write_text(f"""
extproc: {{{extproc}}}
admin: {{listen: "127.0.0.1:{free_port()}"}}
envoy: {{listen: "127.0.0.1:{free_port()}"}}
backends:
  - {{name: bench, url: "http://127.0.0.1:{upstream_port}", api_key_file: "{key}"}}
models:
  - {{name: "*", backend: bench}}
{extra}""")
    return cfg, key


def render(cfg):
    # The static bootstrap: the same resources the processor serves over xDS,
    # inline, so the variants below can edit them and the null processor
    # (which serves no xDS) gets the same listener, routes and clusters.
    out = subprocess.run([str(EXTPROC), "envoy-config", "--static", "--config", str(cfg)], check=True,
                         capture_output=True, text=True)
    return yaml.safe_load(out.stdout)


def plain_envoy(bootstrap):
    """The rendered bootstrap without the processor: Envoy alone."""
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    backend = routes[0]
    backend["match"] = {"prefix": "/"}
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [backend]
    bootstrap["static_resources"]["clusters"] = [
        c for c in bootstrap["static_resources"]["clusters"] if c["name"] != "ai-gateway-extproc"]
    # A port of its own: Envoy binds with SO_REUSEPORT, so sharing B's port
    # would silently split the load between A and B.
    bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = free_port()
    return bootstrap


def start_envoy(procs, workdir, name, bootstrap):
    path = workdir / f"envoy-{name}.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    procs.start(f"envoy-{name}", [str(ENVOY), "-c", str(path), "--concurrency", "1", "--disable-hot-restart",
                                  "--log-level", "error"])
    listen = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]
    url = f"http://127.0.0.1:{listen['port_value']}"
    wait_http(url + "/v1/chat/completions", method="POST", body=CHAT, headers={"content-type": "application/json"})
    return url


def start_extproc(procs, cfg, name, args=()):
    # Default log level (info): one log line per request, as in production.
    p = procs.start(f"extproc-{name}", [str(EXTPROC), "--config", str(cfg), *args])
    admin = yaml.safe_load(cfg.read_text())["admin"]["listen"]
    wait_http(f"http://{admin}/healthz")
    return p


def filter_config(bootstrap):
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return next(f["typed_config"] for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")


def variant(bootstrap, name):
    """Bootstrap variants, to measure what a design choice costs."""
    ext = filter_config(bootstrap)
    mode = ext["processing_mode"]
    if name == "no-response-phases":
        # Upper bound of this design: no usage counting, no upstream status.
        mode["response_header_mode"] = "SKIP"
        mode["response_body_mode"] = "NONE"
    elif name == "skip-response-headers":
        # Response body streamed from the start, status as an attribute.
        mode["response_header_mode"] = "SKIP"
        mode["response_body_mode"] = "STREAMED"
        ext["response_attributes"] = ["response.code"]
    else:
        raise SystemExit(f"bench: unknown variant {name}")
    bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = free_port()
    return bootstrap


def start_null_extproc(procs, workdir, upstream_port, name, threads=None):
    """Envoy + the null processor (examples/null_extproc.rs): the floor;
    `threads`: its worker threads (default: one, as the gateway's)."""
    cfg, _ = gateway_config(workdir, upstream_port, "uds", name=name)
    listen = yaml.safe_load(cfg.read_text())["extproc"]["listen"]
    env = dict(os.environ, AI_GATEWAY_WORKER_THREADS=str(threads)) if threads else None
    procs.start(f"null-extproc-{name}", [str(NULL_EXTPROC), listen, "bench"], env=env)
    wait_for_socket(listen, 10, "the null processor")
    return render(cfg)


def wait_for_socket(listen, timeout, what):
    """Waits until the Unix socket of `listen` ("unix:PATH") exists."""
    sock = pathlib.Path(listen.removeprefix("unix:"))
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} did not start")
        time.sleep(0.05)


def latency_rows(procs, workdir, up, a, alternate, threads=(1, 2)):
    """The latency and throughput targets alone, for each processor
    worker-thread count in `threads`: the gateway against the null processor
    with as many threads. Chat at saturation, chat at 1,000 req/s, and a
    stream's time to first byte. Throughput and p50 compare each gateway
    with its floor in adjacent pairs; streams are taken from Envoy alone
    and every gateway and floor, one each per round. The same three again for a gateway
    with spend control on (the memory store), with the fewest threads.
    Every request carries `Authorization: Bearer`, as every OpenAI client
    sends one: the gateway's credential hygiene is part of what it adds,
    and a floor without the header would be spared a header's cost that
    the gateway pays (bench/RESULTS.md entry 68)."""
    urls_b, urls_f = {}, {}
    for n in threads:
        cfg, _ = gateway_config(workdir, up, "uds", name=f"lat{n}")
        start_extproc(procs, cfg, f"lat{n}", ["--worker-threads", str(n)])
        urls_b[n] = start_envoy(procs, workdir, f"latb{n}", render(cfg))
        urls_f[n] = start_envoy(procs, workdir, f"latf{n}",
                                start_null_extproc(procs, workdir, up, f"latfloor{n}", threads=n))
    url_a = start_envoy(procs, workdir, "lata", plain_envoy(render(cfg)))
    # The same targets with spend control on (the memory store), with the
    # fewest threads: a gateway key with limits no run reaches, against the
    # floor with as many threads.
    cfg_l, _ = gateway_config(workdir, up, "uds", name="latlimits",
                              extra=keyed_gateway_extra(workdir, "latlimits", BENCH_LIMITS))
    few = min(threads)
    start_extproc(procs, cfg_l, "latlimits", ["--worker-threads", str(few)])
    url_l = start_envoy(procs, workdir, "latl", render(cfg_l))
    auth = (f"authorization: Bearer {BENCH_KEY}",)
    limited = f"{few} worker thread(s), limits on (memory store)"
    urls = [url_a, *urls_b.values(), *urls_f.values()]
    for url in [*urls, url_l]:
        oha(url, 2, a.connections, CHAT, headers=auth)
    rows = []

    # Envoy alone, for the rows' context only.
    alone = alternate([url_a], body=CHAT, headers=auth)[0][0]
    alone_1k = alternate([url_a], body=CHAT, rate=1000, headers=auth)[0][0]
    # Gateway and floor in adjacent slots, each pair in the other order
    # from the last (BF, FB, ...), and the median of the pairs' ratios (or
    # differences): the machine's drifts, which moved whole runs by 20 %
    # and more (entry 65), then fall on both sides of a pair alike. The
    # medians of runs taken 10 s apart let a drift decide the row.
    # Each gateway against the floor with as many threads: (its label,
    # its URL, the floor's).
    setups = [*((f"{n} worker thread(s)", urls_b[n], urls_f[n]) for n in threads),
              (limited, url_l, urls_f[few])]
    for label, url_b, url_f in setups:
        pairs = paired(url_b, url_f, 2 * a.rounds, a, body=CHAT, headers=auth)
        ratios = sorted(gw["rps"] / fl["rps"] for gw, fl in pairs)
        b = statistics.median(p[0]["rps"] for p in pairs)
        f = statistics.median(p[1]["rps"] for p in pairs)
        context = "" if url_b == url_l else f"; Envoy alone {alone['rps']:,.0f}"
        rows.append((f"{label}: chat throughput (req/s), floor (A) and gateway (B), "
                     f"{len(pairs)} adjacent pairs{context}", f"{f:,.0f}", f"{b:,.0f}",
                     f"B/A {statistics.median(ratios):.2f} (pairs {ratios[0]:.2f} to {ratios[-1]:.2f})", "≥ 0.95"))
    base = alone_1k["p50"]
    for label, url_b, url_f in setups:
        pairs = paired(url_b, url_f, 2 * a.rounds, a, body=CHAT, rate=1000, headers=auth)
        diffs = sorted(gw["p50"] - fl["p50"] for gw, fl in pairs)
        b = statistics.median(p[0]["p50"] for p in pairs) - base
        f = statistics.median(p[1]["p50"] for p in pairs) - base
        rows.append((f"{label}: chat at 1,000 req/s, p50 added to Envoy alone's {base:.2f} ms: "
                     f"floor (A) and gateway (B), {len(pairs)} adjacent pairs", f"{f:+.2f} ms", f"{b:+.2f} ms",
                     f"{statistics.median(diffs):+.2f} ms (pairs {diffs[0]:+.2f} to {diffs[-1]:+.2f})",
                     "≤ +0.05 ms"))
    ttfb = interleaved_ttfb(urls + [url_l], 200 * a.rounds, headers=dict.fromkeys([*urls, url_l], auth))
    p50 = {u: statistics.median(v) for u, v in ttfb.items()}
    base = p50[url_a]
    for label, url_b, url_f in setups:
        b, f = p50[url_b] - base, p50[url_f] - base
        rows.append((f"{label}: stream time to first byte, p50 added to Envoy alone's {base:.2f} ms: "
                     f"floor (A) and gateway (B)", f"{f:+.2f} ms", f"{b:+.2f} ms", f"{b - f:+.2f} ms", "≤ +0 ms"))
    return rows


def paired(url_b, url_f, pairs, a, **kw):
    """`pairs` load runs of B and F back to back, which of the two goes
    first alternating: [(B's result, F's result), ...]."""
    out = []
    for i in range(pairs):
        order = (url_b, url_f) if i % 2 == 0 else (url_f, url_b)
        r = {u: oha(u, a.seconds, a.connections, **kw) for u in order}
        out.append((r[url_b], r[url_f]))
    return out


def response_observer(bootstrap):
    """The performance issue's first candidate, on the floor: the ext_proc
    filter keeps the request phases, and a second one after it sees the
    response in `observability_mode` (Envoy sends the response messages and
    does not wait for answers, nor apply them). `observability_mode` is a
    whole filter's setting, so the response side is a second gRPC stream."""
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    at = next(i for i, f in enumerate(filters) if f["name"] == "envoy.filters.http.ext_proc")
    requests = filters[at]["typed_config"]
    observer = json.loads(json.dumps(requests))
    requests["processing_mode"].update(response_header_mode="SKIP", response_body_mode="NONE")
    observer["processing_mode"].update(request_header_mode="SKIP", request_body_mode="NONE")
    observer["observability_mode"] = True
    observer.pop("send_body_without_waiting_for_header_response", None)
    # Envoy holds an observer's stream open after the request ends, for
    # `deferred_close_timeout` (5 s by default): at 4,000 req/s that is
    # 20,000 open streams, and the processor cluster's limit of 20,000
    # turned the rest into 500s (seen). 200 ms keeps the count low enough
    # to measure the best case.
    observer["deferred_close_timeout"] = "0.2s"
    filters.insert(at + 1, {"name": "ai-gateway.response-observer", "typed_config": observer})
    bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = free_port()
    return bootstrap


PHASE_FIELDS = (("request headers", "request_header_latency_us"), ("request body", "request_body_total_latency_us"),
                ("response headers", "response_header_latency_us"), ("response body", "response_body_total_latency_us"))


def with_phase_latencies(bootstrap):
    """Envoy's access log also gets the ext_proc filter's own round-trip
    time per phase (its filter state): from sending a message to the
    processor to taking its answer, as Envoy measures it."""
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    fmt = hcm["access_log"][0]["typed_config"]["log_format"]["json_format"]
    for _, field in PHASE_FIELDS:
        fmt[field] = f"%FILTER_STATE(envoy.filters.http.ext_proc:FIELD:{field})%"
    return bootstrap


def phase_latencies(logfile, n, timeout=30.0):
    """Medians of the last `n` access log lines' phase round trips (µs).
    Envoy writes its log in batches: wait until `n` lines are there."""
    deadline = time.monotonic() + timeout
    while True:
        rows = []
        for line in logfile.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if all(str(row.get(f, "-")).isdigit() for _, f in PHASE_FIELDS):
                rows.append(row)
        if len(rows) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if len(rows) < n:
        raise SystemExit(f"bench: {logfile.name} has {len(rows)} lines with phase latencies, not {n}")
    rows = rows[-n:]
    return {name: statistics.median(int(r[f]) for r in rows) for name, f in PHASE_FIELDS}


def phase_rows(procs, workdir, up, a):
    """Where a stream's time to first byte goes, phase by phase: Envoy's
    own round trip to the processor for each of the four messages, the
    gateway against the null processor, `rounds` × 300 streams each, one
    at a time in turn."""
    cfg, _ = gateway_config(workdir, up, "uds", name="phases")
    start_extproc(procs, cfg, "phases")
    url_b = start_envoy(procs, workdir, "phases-b", with_phase_latencies(render(cfg)))
    url_f = start_envoy(procs, workdir, "phases-f",
                        with_phase_latencies(start_null_extproc(procs, workdir, up, "phases-floor")))
    n = 300 * a.rounds
    ttfb = interleaved_ttfb([url_b, url_f], n)
    b = phase_latencies(procs.logdir / "envoy-phases-b.log", n)
    f = phase_latencies(procs.logdir / "envoy-phases-f.log", n)
    rows = [(f"stream: {name} round trip as Envoy measures it, p50 (µs)", f"{f[name]:.0f}", f"{b[name]:.0f}",
             f"{b[name] - f[name]:+.0f} µs", "") for name, _ in PHASE_FIELDS]
    tb, tf = statistics.median(ttfb[url_b]), statistics.median(ttfb[url_f])
    rows.append(("stream: time to first byte, p50 (ms)", f"{tf:.2f}", f"{tb:.2f}", f"{tb - tf:+.2f} ms", "≤ +0 ms"))
    return rows


def observer_rows(procs, workdir, up, a, alternate):
    """The null processor as the gateway uses Envoy (A) against the same
    processor with the response phases in a second filter in observability
    mode (B): what the candidate can win at best, before any processor
    work. Envoy's instructions per request, throughput, p50 at 1,000
    req/s and a stream's time to first byte, alternating."""
    url_e = start_envoy(procs, workdir, "obs-alone", plain_envoy(render(gateway_config(workdir, up, "uds", "obsa")[0])))
    now = start_null_extproc(procs, workdir, up, "obs-now")
    split = response_observer(start_null_extproc(procs, workdir, up, "obs-split"))
    ia = envoy_instructions(procs, workdir, "obs-now", json.loads(json.dumps(now)), a.instruction_requests)
    ib = envoy_instructions(procs, workdir, "obs-split", json.loads(json.dumps(split)), a.instruction_requests)
    url_a = start_envoy(procs, workdir, "obs-now", now)
    url_b = start_envoy(procs, workdir, "obs-split", split)
    urls = [url_e, url_a, url_b]
    for u in urls:
        oha(u, 2, a.connections, CHAT)
    r = dict(zip(urls, alternate(urls, body=CHAT)[0]))
    lat = dict(zip(urls, alternate(urls, body=CHAT, rate=1000)[0]))
    ttfb = interleaved_ttfb(urls, 200 * a.rounds)
    t = {u: statistics.median(v) for u, v in ttfb.items()}
    base, tbase = lat[url_e]["p50"], t[url_e]
    return [
        ("null processor, all phases in one filter (A) / response phases in an observability-mode filter (B): "
         "Envoy instructions per request", f"{ia / 1000:,.0f} k", f"{ib / 1000:,.0f} k", f"B/A {ib / ia:.3f}", ""),
        (f"the same: chat throughput (req/s); Envoy alone {r[url_e]['rps']:,.0f}", f"{r[url_a]['rps']:,.0f}",
         f"{r[url_b]['rps']:,.0f}", f"B/A {r[url_b]['rps'] / r[url_a]['rps']:.2f}", ""),
        (f"the same: chat at 1,000 req/s, p50 added to Envoy alone's {base:.2f} ms",
         f"{lat[url_a]['p50'] - base:+.2f} ms", f"{lat[url_b]['p50'] - base:+.2f} ms",
         f"{lat[url_b]['p50'] - lat[url_a]['p50']:+.2f} ms", ""),
        (f"the same: stream time to first byte, p50 added to Envoy alone's {tbase:.2f} ms",
         f"{t[url_a] - tbase:+.2f} ms", f"{t[url_b] - tbase:+.2f} ms", f"{t[url_b] - t[url_a]:+.2f} ms", ""),
    ]


def instruction_rows(procs, workdir, up, n, counts):
    """Envoy's instructions per request under callgrind: Envoy alone, the
    gateway as configured by default, the gateway with
    `envoy.usage_metadata`, and the null processor with the same phases.
    The gateway and the floor are counted `counts` times, alternating, and
    the medians shown (one build's counts differ by up to about 4 k)."""
    def config(name, extra_envoy=""):
        cfg, _ = gateway_config(workdir, up, "uds", name=name)
        if extra_envoy:
            text = cfg.read_text()
            line = next(l for l in text.splitlines() if l.startswith("envoy: {"))
            cfg.write_text(text.replace(line, line[:-1] + f", {extra_envoy}}}"))
        start_extproc(procs, cfg, name)
        return cfg

    cfg = config("cgb")
    cfg_usage = config("cgbu", "usage_metadata: true")
    ia = envoy_instructions(procs, workdir, "a", plain_envoy(render(cfg)), n)
    b, usage, floor = [], [], []
    for k in range(counts):
        b.append(envoy_instructions(procs, workdir, f"b{k}", render(cfg), n))
        usage.append(envoy_instructions(procs, workdir, f"bu{k}", render(cfg_usage), n))
        floor.append(envoy_instructions(procs, workdir, f"floor{k}",
                                        start_null_extproc(procs, workdir, up, f"cgfloor{k}"), n))
        print(f"bench: instructions, count {k + 1}: gateway {b[-1]:,.0f}, with usage metadata {usage[-1]:,.0f}, "
              f"floor {floor[-1]:,.0f}", file=sys.stderr, flush=True)
    ib, iu, i_f = (statistics.median(x) for x in (b, usage, floor))
    # The processor's side: one count each (it repeats within ~1 %).
    pb = processor_instructions(procs, workdir, up, "pcg", False, n)
    pf = processor_instructions(procs, workdir, up, "pcgfloor", True, n)
    print(f"bench: processor instructions per stream: gateway {pb:,.0f}, null {pf:,.0f}", file=sys.stderr, flush=True)
    k = lambda v: f"{v / 1000:,.0f} k"
    spread = lambda x: f" (counts {', '.join(f'{v / 1000:,.1f}' for v in x)} k)" if len(x) > 1 else ""
    return [
        ("chat: Envoy instructions per request (callgrind)" + spread(b), k(ia), k(ib), f"A/B {ia / ib:.2f}", ""),
        ("floor: Envoy instructions per request with the null processor, same phases" + spread(floor), k(ia),
         k(i_f), f"A/B {ia / i_f:.2f}", ""),
        ("gateway / null processor, Envoy instructions per request (A: floor, B: gateway)", k(i_f), k(ib),
         f"{ib / i_f:.3f}", "≤ 1.05"),
        ("the same with `envoy.usage_metadata: true` (token counts in Envoy's access log)" + spread(usage), k(i_f),
         k(iu), f"{iu / i_f:.3f}", ""),
        ("processor's own instructions per streamed chat, all threads (callgrind; A: null processor, "
         "B: gateway)", k(pf), k(pb), f"{(pb - pf) / 1000:+,.0f} k", ""),
    ]


def processor_instructions(procs, workdir, up, name, null, streams):
    """The processor's own instructions per sequential stream (a streamed
    chat: four phases, usage read from the events), counted by callgrind
    over every thread: the gateway (`null` false) or the null processor.
    Deterministic like Envoy's count, and it names our code: the
    callgrind file stays in the work directory for `callgrind_annotate`."""
    cfg, _ = gateway_config(workdir, up, "uds", name=name)
    out = workdir / f"callgrind-proc-{name}.out"
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    if null:
        listen = yaml.safe_load(cfg.read_text())["extproc"]["listen"]
        p = procs.start(f"proc-cg-{name}", valgrind + [str(NULL_EXTPROC), listen, "bench"])
        wait_for_socket(listen, 120, "the null processor under callgrind")
    else:
        p = procs.start(f"proc-cg-{name}", valgrind + [str(EXTPROC), "--config", str(cfg)])
        wait_http(f"http://{yaml.safe_load(cfg.read_text())['admin']['listen']}/healthz", timeout=120)
    url = start_envoy(procs, workdir, f"proc-cg-{name}", render(cfg))
    ttfb_samples(url, 50)  # warm-up: the connection, first-use allocations
    subprocess.run(["callgrind_control", "--zero", str(p.pid)], check=True, capture_output=True)
    ttfb_samples(url, streams)
    total = dumped_instructions(p, workdir, f"callgrind-proc-{name}.out")
    procs.stop(p)
    return total / streams


def dumped_instructions(p, workdir, stem, timeout=60):
    """Has callgrind (running as `p`, writing `stem`.N files) dump its
    counters and returns the instructions counted since the last zeroing."""
    before = set(workdir.glob(f"{stem}*"))
    subprocess.run(["callgrind_control", "--dump", str(p.pid)], check=True, capture_output=True)
    deadline = time.monotonic() + timeout
    while True:
        dumps = [f for f in workdir.glob(f"{stem}*") if f not in before and f.stat().st_size]
        totals = [line for f in dumps for line in f.read_text(errors="replace").splitlines()
                  if line.startswith(("summary:", "totals:"))]
        if totals:
            return int(totals[0].split()[1])
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: callgrind wrote no dump ({stem})")
        time.sleep(0.2)


def envoy_instructions(procs, workdir, name, bootstrap, requests, body=CHAT):
    """Envoy's instructions per request, counted by callgrind: unlike CPU
    time, the count repeats run after run whatever the neighbours do."""
    bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = free_port()
    path = workdir / f"envoy-cg-{name}.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    out = workdir / f"callgrind-{name}.out"
    p = procs.start(f"envoy-cg-{name}", ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                                         str(ENVOY_EXE), "-c", str(path), "--concurrency", "1",
                                         "--disable-hot-restart", "--log-level", "error"])
    port = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/v1/chat/completions", timeout=300, method="POST", body=body,
              headers={"content-type": "application/json"})

    def load(n):
        args = [os.environ.get("OHA", "oha"), "-n", str(n), "-c", "4", "--no-tui", "--output-format", "json",
                "-m", "POST", "-H", "content-type: application/json", "-d", body, url + "/v1/chat/completions"]
        r = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
        if set(r.get("statusCodeDistribution", {})) != {"200"}:
            raise SystemExit(f"bench: failed requests under callgrind: {r.get('statusCodeDistribution')}")

    load(50)  # warm-up: connections, pools
    subprocess.run(["callgrind_control", "--zero", str(p.pid)], check=True, capture_output=True)
    load(requests)
    total = dumped_instructions(p, workdir, f"callgrind-{name}.out", timeout=30)
    procs.stop(p)
    return total / requests


def oha(url, seconds, connections, body, stream=False, rate=None, headers=(), expect="200"):
    args = [os.environ.get("OHA", "oha"), "-z", f"{seconds}s", "-c", str(connections), "--no-tui",
            "--output-format", "json", "-m", "POST", "-H", "content-type: application/json", "-d", body,
            url + "/v1/chat/completions"]
    for h in headers:
        args[1:1] = ["-H", h]
    if stream:
        args[1:1] = ["-H", "x-bench-stream: 1"]
    if rate:
        args[1:1] = ["-q", str(rate)]
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    r = json.loads(out.stdout)
    codes = r.get("statusCodeDistribution", {})
    bad = {k: v for k, v in codes.items() if k != expect}
    if bad or r["summary"]["successRate"] < 0.999:
        raise SystemExit(f"bench: failed requests against {url}: {codes} {r['summary']}")
    p = r["latencyPercentiles"]
    return {"rps": r["summary"]["requestsPerSec"], "p50": p["p50"] * 1000, "p99": p["p99"] * 1000,
            "n": sum(codes.values())}


def cpu_seconds(pid):
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid):
    """CPU time of a process's live threads, in nanoseconds from the
    scheduler (`/proc/PID/task/*/schedstat`), not in the 10 ms ticks of
    `/proc/PID/stat`: a body row spends a few ms per request, which ticks
    cannot tell apart. Time of threads that ended is not counted, so use it
    only around work done by long-lived threads."""
    total = 0
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e9


def phase_seconds(admin, phase):
    """The processor's own time for one ext_proc phase so far, from its
    `ai_gateway_extproc_phase_duration_seconds` histogram: (sum of
    seconds, messages). The timer runs from a decoded message to its
    answer, so a body's receive (HTTP/2, tonic) is outside it and its
    reading (the model, the decision, the answer) inside."""
    c = http.client.HTTPConnection(*admin.split(":"), timeout=5)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    found = {}
    for line in text.splitlines():
        for part in ("sum", "count"):
            if line.startswith(f'ai_gateway_extproc_phase_duration_seconds_{part}{{phase="{phase}"}}'):
                found[part] = float(line.rsplit(None, 1)[1])
    if len(found) != 2:
        raise SystemExit(f"bench: no {phase} phase timer in the processor's metrics at {admin}")
    return found["sum"], found["count"]


def peak_rss_mib(pid, field="VmHWM"):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stream_connection(url):
    host, port = url.split("//")[1].split(":")
    return http.client.HTTPConnection(host, int(port))


def first_byte_ms(conn, headers=()):
    """One stream on `conn`: the time to its first body byte, in ms.
    `headers`: more request headers, as `name: value` strings."""
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=CHAT_STREAM,
                 headers={"content-type": "application/json", "x-bench-stream": "1",
                          **dict(h.split(": ", 1) for h in headers)})
    r = conn.getresponse()
    r.read(1)
    ms = (time.perf_counter() - t0) * 1000
    body = r.read()
    if r.status != 200:
        # A refusal is fast: timing it would flatter the setup.
        raise SystemExit(f"bench: a stream got {r.status}: {body[:200]!r}")
    return ms


def ttfb_samples(url, n):
    """Times to the first body byte of `n` sequential streams, in ms."""
    conn = stream_connection(url)
    samples = [first_byte_ms(conn) for _ in range(n)]
    conn.close()
    return samples


def interleaved_ttfb(urls, n, warmup=50, headers=None):
    """Times to the first body byte of `n` sequential streams through each
    of `urls`, in ms: one stream per URL in each round, so that every setup
    meets the machine in the same state. Taken in blocks of 200 or 300 per
    URL instead, two copies of one build differed by up to 110 µs; taken
    this way, by 10 to 40 (bench/RESULTS.md entry 50).
    Each round's order is shuffled (a fixed seed, so runs are alike), and
    no setup follows itself: the stream before moves a stream's first byte.
    A fixed rotation had each setup follow the same one nearly always, and
    the setup after Envoy alone gained 20 to 40 µs over one after a
    processor's (entry 68).
    `headers`: more request headers for some URLs, {url: ("name: value", ...)}."""
    headers = headers or {}
    conns = {u: stream_connection(u) for u in urls}
    try:
        for u, conn in conns.items():
            for _ in range(warmup):
                first_byte_ms(conn, headers.get(u, ()))
        samples = {u: [] for u in urls}
        rng = random.Random(n)
        last = None
        for _ in range(n):
            order = list(urls)
            rng.shuffle(order)
            if order[0] == last and len(order) > 1:
                order[0], order[-1] = order[-1], order[0]
            for u in order:
                samples[u].append(first_byte_ms(conns[u], headers.get(u, ())))
            last = order[-1]
        return samples
    finally:
        for conn in conns.values():
            conn.close()


def sequential_ms(url, n, expect=200, body=CHAT):
    """Latencies of `n` chat requests sent one at a time on one connection,
    in ms: the cost of each step without queueing behind other requests."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port))
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
        r = conn.getresponse()
        r.read()
        samples.append((time.perf_counter() - t0) * 1000)
        if r.status != expect:
            raise SystemExit(f"bench: {url} answered {r.status}, not {expect}")
    conn.close()
    return samples


def percentile(samples, p):
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


KEY_LAYOUTS = ("rename", "in-place", "kubelet", "symlink")


def key_reload_ms(url, key_file, rotations, layout="rename"):
    """File change → first request with the new key, for one way of
    publishing a key: `rename` (mv over the file), `in-place` (truncate and
    write, as editors and cp do), `kubelet` (a Secret volume's `..data`
    symlink swap), `symlink` (the file is a link into another directory,
    whose target is rewritten in place: Vault Agent, CSI stores)."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port))
    d = key_file.parent
    elsewhere = d.parent / f"{d.name}-agent" / "tars-key"

    def publish(i, new):
        if layout == "rename":
            tmp = key_file.with_suffix(".tmp")
            tmp.write_text(new + "\n")
            os.rename(tmp, key_file)
        elif layout == "in-place":
            with open(key_file, "w") as f:
                f.write(new + "\n")
        elif layout == "kubelet":
            version = d / f"..v{i}"
            version.mkdir()
            (version / key_file.name).write_text(new + "\n")
            tmp = d / "..data_tmp"
            os.symlink(version.name, tmp)
            os.rename(tmp, d / "..data")
        elif layout == "symlink":
            with open(elsewhere, "w") as f:
                f.write(new + "\n")

    def applied(new, limit=5):
        t0 = time.perf_counter()
        while True:
            conn.request("POST", "/v1/chat/completions", body=CHAT, headers={"content-type": "application/json"})
            r = conn.getresponse()
            r.read()
            if r.getheader("x-seen-authorization") == f"Bearer {new}":
                return (time.perf_counter() - t0) * 1000
            if time.perf_counter() - t0 > limit:
                raise SystemExit(f"bench: key {new} ({layout}) not applied after {limit} s")

    # Lay the file out, and wait until the gateway reads it that way.
    key_file.unlink()
    if layout == "kubelet":
        publish(0, f"sk-bench-{layout}-0")
        os.symlink(f"..data/{key_file.name}", key_file)
    elif layout == "symlink":
        elsewhere.parent.mkdir(exist_ok=True)
        elsewhere.write_text(f"sk-bench-{layout}-0\n")
        os.symlink(elsewhere, key_file)
    else:
        key_file.write_text(f"sk-bench-{layout}-0\n")
    applied(f"sk-bench-{layout}-0", limit=10)
    samples = []
    for i in range(1, rotations + 1):
        new = f"sk-bench-{layout}-{i}"
        publish(i, new)
        samples.append(applied(new))
        time.sleep(0.2)
    conn.close()
    return statistics.median(samples), max(samples)


def key_reload_rows(url, key):
    rows = []
    for layout in KEY_LAYOUTS:
        r50, rmax = key_reload_ms(url, key, 20, layout)
        rows.append((f"key reload ({layout}): file change → first request with the new key (20 rotations)", "",
                     f"p50 {r50:.1f} ms, max {rmax:.1f} ms", "", "p50 ≤ 100 ms, max ≤ 1 s"))
    return rows


def xds_rows(procs, workdir, up):
    """Config edit → Envoy serving it, over xDS with the dynamic bootstrap:
    each edit adds a backend (a new cluster and route) and a model for it;
    timed from the config file's rename to the first answer for that model
    (before it, the processor answers 404 `model_not_found`, or Envoy has
    no route or cluster yet)."""
    cfg, _ = gateway_config(workdir, up, "uds", name="xds")
    # No catch-all: a new model is answered only once its rule and backend
    # are in force (with "*" it would be answered from the start).
    cfg.write_text(cfg.read_text().replace('{name: "*", backend: bench}', '{name: "gpt-4o-mini", backend: bench}'))
    ext = start_extproc(procs, cfg, "xds")
    bootstrap = workdir / "envoy-xds.yaml"
    out = subprocess.run([str(EXTPROC), "envoy-config", "--config", str(cfg)], check=True, capture_output=True,
                         text=True)
    bootstrap.write_text(out.stdout)
    procs.start("envoy-xds", [str(ENVOY), "-c", str(bootstrap), "--concurrency", "1", "--disable-hot-restart",
                              "--log-level", "error"])
    listen = yaml.safe_load(cfg.read_text())["envoy"]["listen"]
    url = f"http://{listen}"
    wait_http(url + "/v1/chat/completions", method="POST", body=CHAT, headers={"content-type": "application/json"})
    key = workdir / "keys-xds" / "apiKey"
    host, port = listen.split(":")
    conn = http.client.HTTPConnection(host, int(port))
    samples = []
    for i in range(1, 21):
        text = cfg.read_text()
        text = text.replace("backends:\n", f'backends:\n  - {{name: added-{i}, url: "http://127.0.0.1:{up}", '
                                           f'api_key_file: "{key}"}}\n', 1)
        text = text.replace("models:\n", f'models:\n  - {{name: "m-{i}", backend: added-{i}}}\n', 1)
        tmp = cfg.with_suffix(".tmp")
        tmp.write_text(text)
        body = CHAT.replace('"gpt-4o-mini"', f'"m-{i}"')
        t0 = time.perf_counter()
        os.rename(tmp, cfg)
        while True:
            conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
            r = conn.getresponse()
            answer = r.read()
            if r.status == 200:
                break
            if r.status != 404 or b'"model_not_found"' not in answer:
                raise SystemExit(f"bench: model m-{i} answered {r.status} {answer[:200]!r} during the edit "
                                 "(only the processor's 404 model_not_found before, 200 after)")
            if time.perf_counter() - t0 > 10:
                raise SystemExit(f"bench: model m-{i} not served 10 s after the edit (last status {r.status})")
        samples.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.2)
    conn.close()
    return [
        ("config edit adding a backend and a model → first answer for it, over xDS (20 edits)", "",
         f"p50 {statistics.median(samples):.0f} ms, max {max(samples):.0f} ms", "", "≤ 1 s"),
        ("processor RSS after the 20 edits (each encodes Envoy's resources; peak in parentheses)", "",
         f"{peak_rss_mib(ext.pid, 'VmRSS'):.1f} MiB ({peak_rss_mib(ext.pid):.1f})", "", ""),
    ]


def concurrent_streams_rss(procs, workdir, streams):
    """Peak processor RSS while `streams` streams are open at once (a
    fresh processor each time, so each peak is its own)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * streams + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    name = f"streams-{streams}"
    port = free_port()
    env = dict(os.environ, FAKE_UPSTREAM_STREAM_INTERVAL_MS="300")
    procs.start(f"fake-upstream-{name}", [str(FAKE_UPSTREAM), f"127.0.0.1:{port}"], env=env)
    wait_http(f"http://127.0.0.1:{port}/v1/models")
    cfg, _ = gateway_config(workdir, port, "uds", name=name)
    ext = start_extproc(procs, cfg, name)
    url = start_envoy(procs, workdir, name, render(cfg))
    before = peak_rss_mib(ext.pid)
    # Each stream lasts about 1.8 s (6 pauses of 300 ms): with `streams`
    # workers for 6 s, that many are open together. The client speaks
    # HTTP/2, 100 streams per connection: over HTTP/1.1 Envoy needs two
    # sockets per stream, and 10,000 streams need more than the 20,000
    # files a process may open on the benchmark machines (Envoy then
    # answers 503). Each stream is still one ext_proc stream and one
    # upstream request, which is what is measured.
    per_connection = 100
    args = [os.environ.get("OHA", "oha"), "-z", "6s", "--http2", "-c", str(max(1, streams // per_connection)),
            "-p", str(per_connection), "--no-tui", "--output-format", "json",
            "-m", "POST", "-H", "content-type: application/json", "-d", CHAT_STREAM, url + "/v1/chat/completions"]
    out = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
    codes = out.get("statusCodeDistribution", {})
    if set(codes) != {"200"}:
        raise SystemExit(f"bench: concurrent streams failed: {codes}")
    return before, peak_rss_mib(ext.pid), sum(codes.values())


def stream_rows(procs, workdir):
    """Processor RSS with 1,000, 5,000 and 10,000 streams open at once, and
    what each stream adds."""
    rows, points = [], []
    for n in (1000, 5000, 10000):
        if points:
            # Each level leaves 2 x n sockets in TIME_WAIT for a minute; the
            # next level would run out of loopback ports (measured: 503s
            # from connections Envoy could not open, not from the gateway).
            time.sleep(65)
        before, peak, total = concurrent_streams_rss(procs, workdir, n)
        points.append((n, peak))
        rows.append((f"processor RSS with {n:,} concurrent streams ({total:,} streams)", "",
                     f"{peak:.1f} MiB (idle {before:.1f})", "", "≤ 32 MiB" if n == 1000 else ""))
    (n0, p0), (n1, p1) = points[0], points[-1]
    rows.append(("processor memory per open stream (slope from 1,000 to 10,000)", "",
                 f"{(p1 - p0) * 1024 / (n1 - n0):.1f} KiB", "", ""))
    return rows


BENCH_KEY = "gw-bench-0123456789abcdef"
# Limits no run can reach: what is measured is their cost, not a refusal.
BENCH_LIMITS = ("{requests_per_minute: 1000000000, tokens_per_minute: 1000000000000, "
                "tokens_per_day: 1000000000000, usd_per_day: 1000000000}")


def start_redis(procs, workdir):
    port = free_port()
    redis = shutil.which("redis-server") or "/usr/bin/redis-server"
    procs.start("redis", [redis, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                          "--dir", str(workdir)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    raise SystemExit("bench: redis-server did not start")


def redis_usec_per_call(url):
    """Redis's own CPU time per script call so far (INFO commandstats)."""
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as c:
        c.sendall(b"INFO commandstats\r\n")
        data = b""
        while b"cmdstat_evalsha" not in data or not data.endswith(b"\r\n"):
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
    for line in data.decode().splitlines():
        if line.startswith("cmdstat_evalsha:"):
            fields = dict(f.split("=") for f in line.split(":", 1)[1].split(","))
            return float(fields["usec_per_call"])
    return float("nan")


def keyed_gateway_extra(workdir, name, limits, store="memory"):
    """The config lines of a gateway whose clients present the bench key
    (with `limits`, a YAML mapping) and whose spend control uses `store`;
    writes the key file under `workdir`."""
    keys = workdir / f"client-keys-{name}"
    keys.mkdir()
    (keys / "keys.yaml").write_text(f"keys:\n  - {{name: bench, key: {BENCH_KEY}, limits: {limits}}}\n")
    return (f'client_keys: {{file: "{keys / "keys.yaml"}"}}\n'
            f'spend: {{store: "{store}", prices: [{{model: "*", input: 0.15, output: 0.6}}]}}\n')


def spend_cost(store, requests):
    """One admission and its settlement measured in-process (the processor's
    spend code alone, without Envoy or gRPC): examples/spend_cost.rs."""
    out = subprocess.run([str(SPEND_COST), store, str(requests)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def spend_rows(procs, workdir, up, a, alternate, rates):
    """A key with limits against the same key without: what spend control
    costs, with the memory store and with Redis on loopback."""
    redis_url = start_redis(procs, workdir)
    urls, exts = [], []
    for name, limits, store in (("nolimits", "{}", "memory"), ("memory", BENCH_LIMITS, "memory"),
                                ("redis", BENCH_LIMITS, redis_url)):
        extra = keyed_gateway_extra(workdir, name, limits, store)
        cfg, _ = gateway_config(workdir, up, "uds", name=f"spend-{name}", extra=extra)
        exts.append(start_extproc(procs, cfg, f"spend-{name}"))
        urls.append(start_envoy(procs, workdir, f"spend-{name}", render(cfg)))
    auth = (f"authorization: Bearer {BENCH_KEY}",)
    for url in urls:
        oha(url, 2, a.connections, CHAT, headers=auth)
    cpu0 = [cpu_seconds(e.pid) for e in exts]
    medians, runs = alternate(urls, body=CHAT, headers=auth)
    cpu = [(cpu_seconds(e.pid) - c0) / sum(r["n"] for r in runs[u]) * 1e6 for e, c0, u in zip(exts, cpu0, urls)]
    none, mem, red = medians
    rows = [
        ("spend (A: the same key without limits), memory store: chat throughput (req/s)", f"{none['rps']:,.0f}", f"{mem['rps']:,.0f}",
         f"{mem['rps'] / none['rps']:.2f}", ""),
        ("spend, Redis on loopback: chat throughput (req/s)", f"{none['rps']:,.0f}", f"{red['rps']:,.0f}",
         f"{red['rps'] / none['rps']:.2f}", "≥ 0.9"),
        ("spend, memory store: processor CPU per request", f"{cpu[0]:.0f} µs", f"{cpu[1]:.0f} µs",
         f"{cpu[1] - cpu[0]:+.1f} µs", "≤ +5 µs"),
        ("spend, Redis: processor CPU per request", f"{cpu[0]:.0f} µs", f"{cpu[2]:.0f} µs",
         f"{cpu[2] - cpu[0]:+.1f} µs", ""),
    ]
    redis_usec = redis_usec_per_call(redis_url)
    mem_alone = spend_cost("memory", 400_000)
    cost_redis = start_redis(procs, workdir)
    red_alone = spend_cost(cost_redis, 100_000)
    rows += [
        ("spend, memory store, in-process (examples/spend_cost.rs): CPU per admission + settlement",
         f"{mem_alone['cpu_us_without_limits']:.2f} µs", f"{mem_alone['cpu_us_with_limits']:.2f} µs",
         f"{mem_alone['cpu_us_with_limits'] - mem_alone['cpu_us_without_limits']:+.2f} µs", "≤ +5 µs"),
        ("spend, Redis, in-process: client CPU per admission (settlements ride along)",
         f"{red_alone['cpu_us_without_limits']:.2f} µs", f"{red_alone['cpu_us_with_limits']:.2f} µs",
         f"{red_alone['cpu_us_with_limits'] - red_alone['cpu_us_without_limits']:+.2f} µs", ""),
        ("spend, Redis: the server's own CPU per admission script (INFO commandstats)", "-", f"{redis_usec:.1f} µs",
         "", ""),
    ]
    for rate in rates:
        (none, mem, red), _ = alternate(urls, body=CHAT, rate=rate, headers=auth)
        rows.append((f"spend, Redis: chat at {rate:,} req/s p50 / p99 (ms)", f"{none['p50']:.2f} / {none['p99']:.2f}",
                     f"{red['p50']:.2f} / {red['p99']:.2f}", f"added {red['p50'] - none['p50']:+.2f} ms p50",
                     "≤ +0.1 ms" if rate == 1000 else ""))
        rows.append((f"spend, memory: chat at {rate:,} req/s p50 / p99 (ms)", f"{none['p50']:.2f} / {none['p99']:.2f}",
                     f"{mem['p50']:.2f} / {mem['p99']:.2f}", f"added {mem['p50'] - none['p50']:+.2f} ms p50", ""))
    return rows


def start_failing_upstream(procs, workdir):
    """An nginx that answers every request 503 at once: a provider that is
    down but answers fast."""
    port = free_port()
    d = workdir / "nginx-fail"
    (d / "logs").mkdir(parents=True)
    conf = d / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  client_body_buffer_size 1m;
  keepalive_requests 10000000;
  server {{
    listen 127.0.0.1:{port} reuseport;
    location / {{ default_type application/json; return 503 '{{"error":{{"message":"down","type":"server_error"}}}}'; }}
  }}
}}
""")
    procs.start("nginx-fail", [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-p", str(d)])
    wait_http(f"http://127.0.0.1:{port}/", up=lambda status: status == 503)
    return port


def chain_config(workdir, name, primary_port, fallback_port, binary=None, extra=""):
    """A gateway whose models go to `primary`, falling back to `fallback`
    (None: no fallback)."""
    keys = workdir / f"keys-{name}"
    keys.mkdir(exist_ok=True)
    (keys / "apiKey").write_text("sk-bench-0\n")
    conf = workdir / f"conf-{name}"
    conf.mkdir(exist_ok=True)
    fallback = f", fallbacks: [{{backend: second}}]" if fallback_port else ""
    second = (f'  - {{name: second, url: "http://127.0.0.1:{fallback_port}", api_key_file: "{keys / "apiKey"}"}}\n'
              if fallback_port else "")
    cfg = conf / "gateway.yaml"
    cfg.write_text(f"""
extproc: {{listen: "unix:{workdir}/{name}.sock"}}
admin: {{listen: "127.0.0.1:{free_port()}"}}
envoy: {{listen: "127.0.0.1:{free_port()}"}}
backends:
  - {{name: first, url: "http://127.0.0.1:{primary_port}", api_key_file: "{keys / "apiKey"}"}}
{second}models:
  - {{name: "*", backend: first{fallback}}}
{extra}""")
    # Static, as `render()`: an older binary (--baseline) renders only that.
    static = [] if binary else ["--static"]
    out = subprocess.run([str(binary or EXTPROC), "envoy-config", *static, "--config", str(cfg)], check=True,
                         capture_output=True, text=True)
    return cfg, yaml.safe_load(out.stdout)


def body_rows(procs, workdir, a):
    """Chat bodies of 1 KB to 8 MB, one request at a time: what the
    processor adds as contexts grow (the model is read without building a
    tree; Envoy buffers the body and sends it in one message)."""
    # The fake provider reads the whole body before it answers; nginx's
    # `return` answers first, and Envoy alone then resets a client still
    # sending a large body.
    port = free_port()
    procs.start("fake-upstream-bodies", [str(FAKE_UPSTREAM), f"127.0.0.1:{port}"])
    wait_http(f"http://127.0.0.1:{port}/v1/models")
    cfg, _ = gateway_config(workdir, port, "uds", name="bodies")
    ext = start_extproc(procs, cfg, "bodies")
    admin = yaml.safe_load(cfg.read_text())["admin"]["listen"]
    url_b = start_envoy(procs, workdir, "bodies", render(cfg))
    url_a = start_envoy(procs, workdir, "bodies-alone", plain_envoy(render(cfg)))
    # The floor: the null processor receives the same body in the same
    # message and answers without reading it. Its CPU is what receiving a
    # body over gRPC costs (HTTP/2 frames, tonic, prost's copy) before any
    # of the gateway's own work.
    url_f = start_envoy(procs, workdir, "bodies-floor", start_null_extproc(procs, workdir, port, "bodies-floor"))
    null = next(p for n, p in procs.procs if n == "null-extproc-bodies-floor")
    rows = []
    # Contexts in other languages than English are not ASCII: UTF-8
    # validation and the JSON scan meet multi-byte characters there.
    text = "Größe, naïve café; 你好，世界。"
    # What coding agents send: source files, whose newlines, quotes and
    # backslashes are escapes in JSON (one every 30 or so bytes here), and
    # every escape interrupts the string scan. A run of one letter is its
    # best case.
    code = "".join(f.read_text() for f in sorted((ROOT / "src").rglob("*.rs")))
    for size, n, words, kind in ((1_000, 300, "x", ""), (100_000, 200, "x", ""), (1_000_000, 60, "x", ""),
                                 (8_000_000, 15, "x", ""), (1_000_000, 60, text, " of non-ASCII text"),
                                 (1_000_000, 60, code, " of source code")):
        # As many characters as make `size` bytes with the JSON around them.
        content = (words * (size // len(words) + 1))[:(size - 64) * len(words) // len(words.encode())]
        body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]},
                          ensure_ascii=False).encode()
        # Escapes make the body longer than its text: trim the text to fit.
        content = content[:len(content) * size // len(body)]
        body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]},
                          ensure_ascii=False).encode()
        for u in (url_a, url_b, url_f):
            sequential_ms(u, 3, body=body)
        lat_a, lat_b, lat_f, cpu, cpu_f, own = [], [], [], [], [], []
        for _ in range(a.rounds):
            lat_a += sequential_ms(url_a, n, body=body)
            c0 = thread_cpu_seconds(ext.pid)
            t0, m0 = phase_seconds(admin, "request_body")
            lat_b += sequential_ms(url_b, n, body=body)
            cpu.append((thread_cpu_seconds(ext.pid) - c0) / n * 1e3)
            t1, m1 = phase_seconds(admin, "request_body")
            # One body message per request: any other count means the
            # timer did not see these requests, and a mean over nothing
            # would read as a met target.
            if m1 - m0 != n:
                raise SystemExit(f"bench: {n} requests, {m1 - m0:g} request bodies timed by the processor")
            own.append((t1 - t0) / n * 1e3)
            c0 = thread_cpu_seconds(null.pid)
            lat_f += sequential_ms(url_f, n, body=body)
            cpu_f.append((thread_cpu_seconds(null.pid) - c0) / n * 1e3)
        pa, pb, c = statistics.median(lat_a), statistics.median(lat_b), statistics.median(cpu)
        pf, cf = statistics.median(lat_f), statistics.median(cpu_f)
        o = statistics.median(own)
        mb = len(body) / 1e6
        label = (f"{size / 1e6:g} MB" if size >= 1_000_000 else f"{size / 1e3:g} KB") + kind
        rows.append((f"chat body {label}, one request at a time: p50 (ms); processor CPU per request",
                     f"{pa:.2f}", f"{pb:.2f}; CPU {c:.2f} ms",
                     f"added {pb - pa:+.2f} ms; CPU {c / mb:.2f} ms per MB", "< 0.5 ms per MB"))
        rows.append((f"floor: null processor, chat body {label}: p50 (ms); its CPU per request",
                     f"{pa:.2f}", f"{pf:.2f}; CPU {cf:.2f} ms",
                     f"added {pf - pa:+.2f} ms; CPU {cf / mb:.2f} ms per MB; gateway over floor {(c - cf) / mb:+.2f}", ""))
        # The words: the processor "reads the model and answers".
        # Its phase timer has that part alone, without the receive the
        # floor row above is made of.
        rows.append((f"chat body {label}: the processor's time from the body in hand to its answer "
                     "(request body phase timer, mean)", "", f"{o:.3f} ms", f"{o / mb:.3f} ms per MB",
                     "< 0.5 ms per MB (its own part)"))
    rows.append(("processor peak RSS after the 8 MB bodies (the null processor's)", "",
                 f"{peak_rss_mib(ext.pid):.1f} MiB ({peak_rss_mib(null.pid):.1f})", "", ""))
    return rows


def fallback_rows(procs, workdir, up, a, alternate, rates):
    """What fallback costs: a model without a chain (now, and before this
    change with --baseline), the same model on a chain whose first backend
    answers (the attempt pass, no retry), and a chain whose first backend
    fails fast (one retry), against that failing backend alone."""
    down = start_failing_upstream(procs, workdir)
    setups = [("plain", up, None, None), ("chain", up, up, None), ("retry", down, up, None), ("down", down, None, None)]
    # Ejection would take the failing backend out after a few requests:
    # kept off so that every request of "retry" fails over.
    no_ejection = "retry: {eject_after: 4000000000}\n"
    if a.baseline:
        setups.append(("before", up, None, a.baseline))
    urls, exts = {}, {}
    for name, primary, fallback, binary in setups:
        cfg, bootstrap = chain_config(workdir, f"fb-{name}", primary, fallback, binary,
                                      no_ejection if name == "retry" else "")
        exts[name] = procs.start(f"extproc-fb-{name}", [str(binary or EXTPROC), "--config", str(cfg)])
        admin = yaml.safe_load(cfg.read_text())["admin"]["listen"]
        wait_http(f"http://{admin}/healthz")
        path = workdir / f"envoy-fb-{name}.yaml"
        path.write_text(yaml.safe_dump(bootstrap))
        procs.start(f"envoy-fb-{name}", [str(ENVOY), "-c", str(path), "--concurrency", "1", "--disable-hot-restart",
                                         "--log-level", "error"])
        listen = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]
        urls[name] = f"http://127.0.0.1:{listen['port_value']}"
        wait_http(urls[name] + "/v1/chat/completions", method="POST", body=CHAT,
                  headers={"content-type": "application/json"}, up=lambda status: status in (200, 503))
    order = [n for n, *_ in setups]
    for n in order:
        oha(urls[n], 2, a.connections, CHAT, expect="503" if n == "down" else "200")
    saturating = [n for n in order if n in ("plain", "chain", "before")]
    cpu0 = {n: cpu_seconds(exts[n].pid) for n in saturating}
    medians, runs = alternate([urls[n] for n in saturating], body=CHAT)
    m = dict(zip(saturating, medians))
    cpu = {n: (cpu_seconds(exts[n].pid) - cpu0[n]) / sum(r["n"] for r in runs[urls[n]]) * 1e6 for n in saturating}
    rows = []
    if "before" in m:
        rows += [
            ("fallback: a model without a chain, before this change (A) and now (B): chat throughput (req/s)",
             f"{m['before']['rps']:,.0f}", f"{m['plain']['rps']:,.0f}", f"{m['plain']['rps'] / m['before']['rps']:.2f}", "≥ 1.0 (noise ±0.1)"),
            ("fallback: a model without a chain, before and now: processor CPU per request",
             f"{cpu['before']:.0f} µs", f"{cpu['plain']:.0f} µs", f"{cpu['plain'] - cpu['before']:+.1f} µs", ""),
        ]
    rows += [
        ("fallback: a model without a chain (A) and on a chain whose first backend answers (B): chat throughput (req/s)",
         f"{m['plain']['rps']:,.0f}", f"{m['chain']['rps']:,.0f}", f"{m['chain']['rps'] / m['plain']['rps']:.2f}", ""),
        ("fallback: the same, processor CPU per request (the attempt pass)", f"{cpu['plain']:.0f} µs",
         f"{cpu['chain']:.0f} µs", f"{cpu['chain'] - cpu['plain']:+.1f} µs", ""),
    ]
    # One request at a time: what each step costs without queueing.
    seq = {n: [] for n in order}
    for _ in range(a.rounds):
        for n in order:
            seq[n] += sequential_ms(urls[n], 300, expect=503 if n == "down" else 200)
    p50 = {n: statistics.median(v) for n, v in seq.items()}
    rows += [
        ("fallback, one request at a time, p50 (ms): no chain (A), chain whose first backend answers (B)",
         f"{p50['plain']:.2f}", f"{p50['chain']:.2f}", f"the attempt pass adds {p50['chain'] - p50['plain']:+.2f} ms", ""),
        ("fallback, one request at a time, p50 (ms): the failing backend alone (A), its chain with the fallback "
         "answering (B)", f"{p50['down']:.2f}", f"{p50['retry']:.2f}",
         f"the retry adds {p50['retry'] - p50['down']:+.2f} ms", "≤ +1 ms"),
        ("fallback, one request at a time, p50 (ms): chain, first answers (A), first fails fast then the next "
         "answers (B)", f"{p50['chain']:.2f}", f"{p50['retry']:.2f}",
         f"a failed attempt costs {p50['retry'] - p50['chain']:+.2f} ms", ""),
    ]
    if "before" in p50:
        rows.append(("fallback, one request at a time, p50 (ms): no chain, before (A) and now (B)",
                     f"{p50['before']:.2f}", f"{p50['plain']:.2f}", f"{p50['plain'] - p50['before']:+.2f} ms", ""))
    for rate in rates:
        lat, _ = alternate([urls[n] for n in order], body=CHAT, rate=rate, expect={urls["down"]: "503"})
        l = dict(zip(order, lat))
        if "before" in l:
            rows.append((f"fallback: no chain at {rate:,} req/s, before (A) and now (B): p50 / p99 (ms)",
                         f"{l['before']['p50']:.2f} / {l['before']['p99']:.2f}", f"{l['plain']['p50']:.2f} / {l['plain']['p99']:.2f}",
                         f"{l['plain']['p50'] - l['before']['p50']:+.2f} ms p50", "≤ +0 (noise)"))
        rows.append((f"fallback: chain, first backend answers, at {rate:,} req/s: p50 / p99 (ms); A: no chain",
                     f"{l['plain']['p50']:.2f} / {l['plain']['p99']:.2f}", f"{l['chain']['p50']:.2f} / {l['chain']['p99']:.2f}",
                     f"{l['chain']['p50'] - l['plain']['p50']:+.2f} ms p50", ""))
        rows.append((f"fallback: first backend fails fast (503), the next answers, at {rate:,} req/s: p50 / p99 (ms); "
                     "A: the failing backend alone (the client gets its 503)",
                     f"{l['down']['p50']:.2f} / {l['down']['p99']:.2f}", f"{l['retry']['p50']:.2f} / {l['retry']['p99']:.2f}",
                     f"the retry adds {l['retry']['p50'] - l['down']['p50']:+.2f} ms p50", "≤ +1 ms"))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5, help="duration of each load run")
    ap.add_argument("--rounds", type=int, default=3,
                    help="A and B alternate this many times per measure; medians are reported (the machine is noisy)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rates", default="500,1000,2000", help="fixed request rates for latency")
    ap.add_argument("--out", default=str(ROOT / "bench/RESULTS.md"))
    ap.add_argument("--variants", action="store_true",
                    help="also measure bootstrap variants (no response phases, response headers skipped)")
    ap.add_argument("--no-instructions", dest="instructions", action="store_false",
                    help="skip counting Envoy's instructions per request under callgrind (about 2 minutes)")
    ap.add_argument("--instruction-requests", type=int, default=400,
                    help="requests per callgrind count")
    ap.add_argument("--only", choices=["all", "spend", "fallback", "keys", "http2", "bodies", "streams", "xds",
                                       "instructions", "latency", "observer", "phases"],
                    default="all",
                    help="spend: only the spend-control rows (a key with limits vs without); "
                         "fallback: only the fallback rows; keys: only the key-reload rows, one per file layout; http2: only the HTTP/1.1 vs HTTP/2 rows against an HTTPS provider; "
                         "bodies: only the body-size rows; streams: only the concurrent-stream memory rows; "
                         "xds: only the config-edit-to-Envoy rows (dynamic bootstrap); "
                         "instructions: only Envoy's instructions per request under callgrind, --rounds counts each; "
                         "latency: only throughput, p50 at 1,000 req/s and time to first byte, one and two "
                         "processor worker threads against the floor; "
                         "observer: the null processor with the response phases in a second, observability-mode "
                         "filter against it as configured today; "
                         "phases: a stream's four ext_proc round trips as Envoy measures them, gateway against "
                         "the null processor")
    ap.add_argument("--baseline", type=pathlib.Path,
                    help="an older ai-gateway-extproc binary: the fallback rows compare a model without a chain "
                         "on it and on this one")
    a = ap.parse_args()
    rates = [int(r) for r in a.rates.split(",")]

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="aigw-bench-"))
    procs = Processes(workdir)
    rows = []
    def median_of(runs):
        return {k: statistics.median(r[k] for r in runs) for k in runs[0]}

    def alternate(urls, expect=None, **kw):
        """Runs each URL in turn, `rounds` times; medians per URL.
        `expect`: the status each URL answers, when not 200."""
        runs = {u: [] for u in urls}
        for _ in range(a.rounds):
            for u in urls:
                runs[u].append(oha(u, a.seconds, a.connections, expect=(expect or {}).get(u, "200"), **kw))
        return [median_of(runs[u]) for u in urls], runs

    try:
        up = start_nginx(procs, workdir)
        if a.only == "spend":
            rows += spend_rows(procs, workdir, up, a, alternate, [1000])
            raise _Done
        if a.only == "fallback":
            rows += fallback_rows(procs, workdir, up, a, alternate, [1000])
            raise _Done
        if a.only == "streams":
            rows += stream_rows(procs, workdir)
            raise _Done
        if a.only == "bodies":
            rows += body_rows(procs, workdir, a)
            raise _Done
        if a.only == "http2":
            rows += http2_rows(procs, workdir, a, alternate)
            raise _Done
        if a.only == "xds":
            rows += xds_rows(procs, workdir, up)
            raise _Done
        if a.only == "latency":
            rows += latency_rows(procs, workdir, up, a, alternate)
            raise _Done
        if a.only == "phases":
            rows += phase_rows(procs, workdir, up, a)
            raise _Done
        if a.only == "observer":
            rows += observer_rows(procs, workdir, up, a, alternate)
            raise _Done
        if a.only == "instructions":
            rows += instruction_rows(procs, workdir, up, a.instruction_requests, counts=a.rounds)
            raise _Done
        if a.only == "keys":
            cfg, key = gateway_config(workdir, up, "uds", name="keys")
            start_extproc(procs, cfg, "keys")
            rows += key_reload_rows(start_envoy(procs, workdir, "keys", render(cfg)), key)
            raise _Done
        cfg_uds, key = gateway_config(workdir, up, "uds", name="b")
        cfg_tcp, _ = gateway_config(workdir, up, "tcp", name="btcp")
        url_a = start_envoy(procs, workdir, "a", plain_envoy(render(cfg_uds)))
        ext_b = start_extproc(procs, cfg_uds, "b")
        url_b = start_envoy(procs, workdir, "b", render(cfg_uds))
        ext_t = start_extproc(procs, cfg_tcp, "btcp")
        url_t = start_envoy(procs, workdir, "btcp", render(cfg_tcp))

        # Warm-up: connections, pools, caches.
        for url in (url_a, url_b, url_t):
            oha(url, 2, a.connections, CHAT)

        def saturate(label, stream):
            body = CHAT_STREAM if stream else CHAT
            cpu0 = cpu_seconds(ext_b.pid)
            (ra, rb, rt), runs = alternate([url_a, url_b, url_t], body=body, stream=stream)
            cpu_us = (cpu_seconds(ext_b.pid) - cpu0) / sum(r["n"] for r in runs[url_b]) * 1e6
            rows.append((f"{label}: throughput at saturation (req/s)", f"{ra['rps']:,.0f}", f"{rb['rps']:,.0f}",
                         f"B/A {rb['rps'] / ra['rps']:.2f} (TCP: {rt['rps'] / ra['rps']:.2f})",
                         "≥ 0.5" if not stream else ""))
            rows.append((f"{label}: processor CPU per request", "", f"{cpu_us:.0f} µs", "", ""))

        saturate("chat", False)
        saturate("stream", True)
        # The floor: the same Envoy with a processor that does nothing. No
        # processor can cost less than the ext_proc mechanism itself.
        url_f = start_envoy(procs, workdir, "floor", start_null_extproc(procs, workdir, up, "floor"))
        floor_min = start_null_extproc(procs, workdir, up, "floormin")
        filter_config(floor_min)["processing_mode"]["response_header_mode"] = "SKIP"
        url_fm = start_envoy(procs, workdir, "floormin", floor_min)
        for url in (url_f, url_fm):
            oha(url, 2, a.connections, CHAT)
        (ra, rf, rfm), _ = alternate([url_a, url_f, url_fm], body=CHAT)
        rows.append(("floor: Envoy + a null processor, same phases: chat throughput (req/s)", f"{ra['rps']:,.0f}",
                     f"{rf['rps']:,.0f}", f"B/A {rf['rps'] / ra['rps']:.2f}", ""))
        rows.append(("floor: Envoy + a null processor, request phases only: chat throughput (req/s)",
                     f"{ra['rps']:,.0f}", f"{rfm['rps']:,.0f}", f"B/A {rfm['rps'] / ra['rps']:.2f}", ""))
        if a.variants:
            for name in ("no-response-phases", "skip-response-headers"):
                url_v = start_envoy(procs, workdir, name, variant(render(cfg_uds), name))
                oha(url_v, 2, a.connections, CHAT)
                (ra, rv), _ = alternate([url_a, url_v], body=CHAT)
                rows.append((f"variant {name}: chat throughput (req/s)", f"{ra['rps']:,.0f}", f"{rv['rps']:,.0f}",
                             f"B/A {rv['rps'] / ra['rps']:.2f}", ""))
        for rate in rates:
            (ra, rb, rf), _ = alternate([url_a, url_b, url_f], body=CHAT, rate=rate)
            target = " (≤ 0.2 / ≤ 1 at 1,000/s)" if rate == 1000 else ""
            rows.append((f"chat at {rate:,} req/s: latency p50 / p99 (ms)", f"{ra['p50']:.2f} / {ra['p99']:.2f}",
                         f"{rb['p50']:.2f} / {rb['p99']:.2f}",
                         f"added {rb['p50'] - ra['p50']:+.2f} / {rb['p99'] - ra['p99']:+.2f} ms", target.strip()))
            rows.append((f"floor: null processor, chat at {rate:,} req/s: latency p50 / p99 (ms)",
                         f"{ra['p50']:.2f} / {ra['p99']:.2f}", f"{rf['p50']:.2f} / {rf['p99']:.2f}",
                         f"added {rf['p50'] - ra['p50']:+.2f} / {rf['p99'] - ra['p99']:+.2f} ms", ""))
        # Sequential streams, A, B and the floor one at a time in turn.
        ttfb = interleaved_ttfb([url_a, url_b, url_f], 200 * a.rounds)
        (a50, a99), (b50, b99), (f50, f99) = (
            (statistics.median(ttfb[u]), percentile(ttfb[u], 99)) for u in (url_a, url_b, url_f))
        rows.append(("stream: time to first byte p50 / p99 (ms)", f"{a50:.2f} / {a99:.2f}", f"{b50:.2f} / {b99:.2f}",
                     f"added {b50 - a50:+.2f} / {b99 - a99:+.2f} ms", "p50 ≤ 0.3 ms"))
        rows.append(("floor: null processor, stream time to first byte p50 / p99 (ms)", f"{a50:.2f} / {a99:.2f}",
                     f"{f50:.2f} / {f99:.2f}", f"added {f50 - a50:+.2f} / {f99 - a99:+.2f} ms", ""))
        rows.append(("processor peak RSS after the runs above", "", f"{peak_rss_mib(ext_b.pid):.1f} MiB", "", ""))
        rows += key_reload_rows(url_b, key)
        rows += spend_rows(procs, workdir, up, a, alternate, [1000])
        rows += fallback_rows(procs, workdir, up, a, alternate, [1000])
        rows += http2_rows(procs, workdir, a, alternate)
        rows += body_rows(procs, workdir, a)
        before, peak, n = concurrent_streams_rss(procs, workdir, 1000)
        rows.append((f"processor RSS with 1,000 concurrent streams ({n:,} streams)", "",
                     f"{peak:.1f} MiB (idle {before:.1f})", "", "≤ 32 MiB"))
        if a.instructions:
            rows += instruction_rows(procs, workdir, up, a.instruction_requests, counts=1)
    except _Done:
        pass
    finally:
        procs.stop_all()

    write_results(a, rows)
    shutil.rmtree(workdir, ignore_errors=True)


class _Done(Exception):
    """A partial run (--only) is complete."""


def version(args):
    try:
        out = subprocess.run(args, capture_output=True, text=True)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "?"


def write_results(a, rows):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")), "0")
    if a.only == "spend":
        columns = "| measure | A: a gateway key without limits | B: the same key with limits | B vs A | target |"
    elif a.only == "phases":
        columns = "| measure | A: null processor | B: ai-gateway-extproc | B vs A | target |"
    elif a.only == "observer":
        columns = ("| measure | A: null processor, all phases in one filter | B: response phases in an observer filter "
                   "| B vs A | target |")
    elif a.only in ("fallback", "keys", "http2", "bodies", "streams", "xds", "instructions", "latency"):
        columns = "| measure | A | B | B vs A | target |"
    else:
        columns = "| measure | A: Envoy alone | B: Envoy + ai-gateway-extproc | B vs A | target |"
    table = [columns, "|---|---|---|---|---|"]
    table += [f"| {' | '.join(r)} |" for r in rows]
    title = "## Latest run" if a.only == "all" else f"## Latest {a.only} run"
    text = "\n".join([
        title,
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- machine: {os.cpu_count()} cores ({cpu}), {int(mem) // 1024 // 1024} GiB, {platform.system()} {platform.release()}",
        f"- Envoy: {version([str(ENVOY), '--version']).split('version: ')[-1]}; "
        f"processor: {version([str(EXTPROC), '--version'])}, {build_kind()}; load: {version([os.environ.get('OHA', 'oha'), '--version'])}; "
        f"upstream: {version(['nginx', '-v']) or 'nginx'}",
        f"- command: `scripts/bench.sh --seconds {a.seconds} --rounds {a.rounds} --connections {a.connections} --rates {a.rates}"
        f"{' --variants' if a.variants else ''}{' --only ' + a.only if a.only != 'all' else ''}"
        f"{' --baseline ' + a.baseline.name if a.baseline else ''}`",
        f"- each load run {a.seconds} s, {a.connections} connections (oha), one Envoy worker each; "
        + (f"throughput and p50: gateway (B) and floor (A) in {2 * a.rounds} adjacent pairs of runs, the first of "
           "each pair alternating, and the median of the pairs' ratios or differences "
           if a.only == "latency" else f"A and B alternate {a.rounds} times per measure and the medians are shown ")
        + "(time to first byte: sequential streams, one from each setup per round, each round's order shuffled); "
        "B uses a Unix socket to the processor (the TCP figure is B over TCP); the processor logs at info",
        "",
        *table,
        "",
    ])
    out = pathlib.Path(a.out)
    old = out.read_text() if out.exists() else ""
    # Keep the hand-written parts (the optimization log): replace only the
    # "Latest run" section.
    head, sep, rest = old.partition(title + "\n")
    tail = ""
    if sep:
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1:] if nxt >= 0 else ""
    elif "## Log of measured changes" in old:
        # A new section goes before the hand-written log.
        head, _, rest = old.partition("## Log of measured changes")
        tail = "## Log of measured changes" + rest
    elif not old:
        head = "# Benchmark results\n\nProduced by `scripts/bench.sh`; ratios B/A are the headline, as absolute numbers drift between machines.\n\n"
    out.write_text(head + text + ("\n" + tail if tail else ""))
    print(text)


if __name__ == "__main__":
    main()
