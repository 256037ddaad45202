#!/usr/bin/env python3
"""Where a stream's first byte goes, between Envoy and its processor.

The processor's own histogram times each phase from the message's decode to
its answer; Envoy's access log times each phase's round trip. Neither says
what happens in between: the kernel's wake-ups, tonic's framing, Envoy's
reading of the answer. This takes the two processes' system calls instead
(perf's `raw_syscalls` tracepoints, one clock for both) during sequential
streams, one per setup in turn as `bench.py`'s first-byte row takes them, and
splits each of the stream's messages to the processor into:

  wake   Envoy's write of the message -> the processor's epoll_wait returns
  read   -> the processor's read of it returns
  own    -> the processor starts writing the answer (decode, decide, encode)
  write  the answer's write
  back   -> Envoy's read of the answer returns
  total  Envoy's write -> Envoy's read

and gives Envoy's own span from the client's request read to the first write
back to the client (medians and deciles). Messages are numbered in the
order Envoy sends them in a stream: 1 request headers, 2 request body,
3 response headers (with the first body chunk when they arrive together).

The tracepoints cost each system call a microsecond or two, alike for every
setup: compare setups within a run, not with bench.py's figures.

Setups (each with one worker thread and its own Envoy): `nokeys` the
gateway without gateway keys, `key` with a key without limits, `limits` with
a key whose limits no run reaches (memory store), `floor` the null
processor. Every request carries `Authorization: Bearer`.

usage: bench/syscall_phases.py [--streams N] [--setups nokeys,key,limits,floor]
Needs `perf` (Debian: linux-perf) and root or perf_event_paranoid <= 1 for
tracepoints; the rest as bench.py (run scripts/bench.sh once first).
bench/RESULTS.md entry 68 is its first use.
"""
import argparse
import bisect
import collections
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import bench as b

READS = {0, 19, 45, 47}  # read, readv, recvfrom, recvmsg
WRITES = {1, 20, 44, 46}  # write, writev, sendto, sendmsg
EPOLL_WAIT = 232
# HTTP/2 control frames Envoy writes on the processor's connection
# (RST_STREAM and WINDOW_UPDATE are 13 bytes, PING 17, SETTINGS ack 9):
# not messages.
CONTROL_FRAME_MAX = 17
LINE = re.compile(r"^\s*(\S.*?)\s+(\d+)/(\d+)\s+([\d.]+):\s+raw_syscalls:sys_(enter|exit):"
                  r"\s+NR (\d+) (?:\((\w+)|= (-?\d+))")


def start_setups(procs, work, up, names):
    """Starts each setup's processor and Envoy: {name: (url, processor pid,
    Envoy pid)}."""
    out = {}
    for name in names:
        if name == "floor":
            bootstrap = b.start_null_extproc(procs, work, up, name, threads=1)
            pid = procs.procs[-1][1].pid
            url = b.start_envoy(procs, work, name, bootstrap)
        else:
            limits = {"nokeys": None, "key": "{}", "limits": b.BENCH_LIMITS}
            if name not in limits:
                raise SystemExit(f"syscall_phases: unknown setup {name!r}")
            extra = "" if limits[name] is None else b.keyed_gateway_extra(work, name, limits[name])
            cfg, _ = b.gateway_config(work, up, "uds", name=name, extra=extra)
            pid = b.start_extproc(procs, cfg, name, ["--worker-threads", "1"]).pid
            url = b.start_envoy(procs, work, name, b.render(cfg))
        out[name] = (url, pid, procs.procs[-1][1].pid)
    return out


def parse(text):
    """{(pid, thread name, tid): [(enter, exit, syscall, first arg, return)]}."""
    pending, calls = {}, collections.defaultdict(list)
    for line in text.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        comm, pid, tid, t, kind, nr, arg0, ret = m.groups()
        thread = (int(pid), comm.strip(), int(tid))
        if kind == "enter":
            pending[thread] = (float(t), int(nr), int(arg0, 16))
        elif thread in pending and pending[thread][1] == int(nr):
            t0, nr0, fd = pending.pop(thread)
            calls[thread].append((t0, float(t), nr0, fd, int(ret)))
    return calls


def busiest(calls, pid, prefix):
    threads = [t for t in calls if t[0] == pid and t[1].startswith(prefix)]
    if not threads:
        raise SystemExit(f"syscall_phases: no {prefix}* thread of pid {pid} in the trace")
    return calls[max(threads, key=lambda t: len(calls[t]))]


def phases(processor, envoy):
    """Per message number, the split described at the top; and Envoy's
    client-read -> client-write spans."""
    io = [c for c in envoy if c[2] in READS | WRITES and c[4] > 0]
    # The processor's connection is the one Envoy writes to most; the
    # client's is the one read right after Envoy resets a finished stream.
    extproc_fd = collections.Counter(c[3] for c in io if c[2] in WRITES).most_common(1)[0][0]
    client_fd = collections.Counter(
        n[3] for c, n in zip(io, io[1:])
        if c[3] == extproc_fd and c[2] in WRITES and c[4] == 13 and n[2] in READS).most_common(1)[0][0]
    reads, writes, woke = [], [], None
    for t0, t1, nr, _, ret in processor:
        if nr == EPOLL_WAIT:
            woke = t1
        elif nr in READS and ret > 0:
            reads.append((t1, woke))
        elif nr in WRITES and ret > 0:
            writes.append((t0, t1))
    read_at = [r[0] for r in reads]
    write_at = [w[0] for w in writes]
    answers = [c[1] for c in io if c[3] == extproc_fd and c[2] in READS]
    split = collections.defaultdict(lambda: collections.defaultdict(list))
    spans, start, number = [], None, 0
    for t0, t1, nr, fd, ret in io:
        if fd == client_fd and nr in READS and start is None:
            start, number = t1, 0
        elif fd == client_fd and nr in WRITES and start is not None:
            spans.append(t0 - start)
            start = None
        elif fd == extproc_fd and nr in WRITES and ret > CONTROL_FRAME_MAX and start is not None:
            number += 1
            i = bisect.bisect_right(read_at, t1)
            j = bisect.bisect_right(write_at, read_at[i]) if i < len(reads) else len(writes)
            k = bisect.bisect_right(answers, writes[j][1]) if j < len(writes) else len(answers)
            if k >= len(answers):
                continue
            got, woke = reads[i]
            woke = max(t1, woke or t1)
            parts = split[number]
            parts["wake"].append(woke - t1)
            parts["read"].append(got - woke)
            parts["own"].append(writes[j][0] - got)
            parts["write"].append(writes[j][1] - writes[j][0])
            parts["back"].append(answers[k] - writes[j][1])
            parts["total"].append(answers[k] - t1)
    return split, spans


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=600, help="traced streams per setup")
    p.add_argument("--setups", default="nokeys,key,limits,floor")
    a = p.parse_args()
    if not shutil.which("perf"):
        raise SystemExit("syscall_phases: needs perf (Debian: apt-get install linux-perf)")
    names = a.setups.split(",")
    work = pathlib.Path(tempfile.mkdtemp(prefix="syscall-phases-"))
    # Not in `work`: the processors watch their config's directory, and
    # perf's writes there would wake them.
    trace = pathlib.Path(tempfile.mkdtemp(prefix="syscall-trace-")) / "perf.data"
    procs = b.Processes(work)
    auth = (f"authorization: Bearer {b.BENCH_KEY}",)
    try:
        up = b.start_nginx(procs, work)
        setups = start_setups(procs, work, up, names)
        urls = [s[0] for s in setups.values()]
        headers = dict.fromkeys(urls, auth)
        b.interleaved_ttfb(urls, 200, headers=headers)
        pids = ",".join(str(pid) for s in setups.values() for pid in s[1:])
        perf = subprocess.Popen(["perf", "record", "-q", "-m", "4M", "-e", "raw_syscalls:sys_enter,raw_syscalls:sys_exit",
                                 "-p", pids, "-o", str(trace)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1)
        if perf.poll() is not None:
            raise SystemExit(f"syscall_phases: perf record failed: {perf.stderr.read().decode()[:500]}")
        ttfb = b.interleaved_ttfb(urls, a.streams, warmup=0, headers=headers)
        perf.send_signal(2)
        perf.wait()
        text = subprocess.run(["perf", "script", "--ns", "-i", str(trace), "-F", "pid,tid,comm,time,event,trace"],
                              capture_output=True, text=True, check=True).stdout
    finally:
        procs.stop_all()
    calls = parse(text)
    us = lambda xs: statistics.median(xs) * 1e6
    print(f"{a.streams} streams per setup, traced; medians in µs")
    print("setup    msg      n   wake   read    own  write   back  total")
    envoy_spans = {}
    for name, (url, pid, envoy_pid) in setups.items():
        split, spans = phases(busiest(calls, pid, "tokio-rt-worker"), busiest(calls, envoy_pid, "wrk:worker"))
        for number in sorted(split)[:3]:
            parts = split[number]
            print(f"{name:8} {number:3} {len(parts['total']):6} " + " ".join(f"{us(v):6.1f}" for v in parts.values()))
        envoy_spans[name] = (spans, ttfb[url])
    print("\nsetup    Envoy: client read -> first write back (µs): median  mean  deciles 1..9;  client's first byte p50")
    for name, (spans, samples) in envoy_spans.items():
        spans.sort()
        deciles = " ".join(f"{spans[len(spans) * q // 10] * 1e6:.0f}" for q in range(1, 10))
        print(f"{name:8} {us(spans):7.1f} {statistics.mean(spans) * 1e6:7.1f}  {deciles};  "
              f"{statistics.median(samples) * 1000:.0f}")


if __name__ == "__main__":
    sys.exit(main())
