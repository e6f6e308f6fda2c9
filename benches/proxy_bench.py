#!/usr/bin/env python3
"""Driver of benches/proxy_bench.sh (run that, not this: it builds and installs first).

Starts the mock Gemini, nginx (a plain reverse proxy with upstream keep-alive) and
budget-proxy on loopback, drives each with wrk (same body, same duration) at 1, 64 and 256
connections, measures a streaming response (alt=sse, 20 chunks 5 ms apart) through each,
idle RSS and the RSS with 10,000 idle keep-alive connections, and prints one table, the
ratios and PASS/FAIL lines for the targets of issue 5. Standard library only.
"""

import argparse
import json
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = os.path.join(ROOT, "benches")
CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY = json.dumps(
    {
        "contents": [{"role": "user", "parts": [{"text": "Write a haiku about budgets."}]}],
        "generationConfig": {"maxOutputTokens": 256, "temperature": 0.2},
    },
    separators=(",", ":"),
)
MODEL_PATH = "/v1beta/models/gemini-2.5-flash:generateContent"
SSE_PATH = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
STREAM_CHUNKS = 20
STREAM_DELAY_MS = 5

children = []  # Popen objects to stop at exit


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} at start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


def start(cmd, what, port, **kw):
    log(f"  starting {what}: {' '.join(cmd)}")
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, **kw)
    children.append(p)
    wait_port(port, p, what)
    return p


def stop(p):
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def cleanup():
    for p in reversed(children):
        try:
            stop(p)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


# --- /proc ----------------------------------------------------------------------------


def pids_of(p):
    """The process and its direct children (nginx master + workers)."""
    pids = [p.pid]
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == p.pid:
                pids.append(int(d))
        except OSError:
            pass
    return pids


def cpu_ticks(p):
    total = 0
    for pid in pids_of(p):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass
    return total


def ctx_switches(p):
    """Context switches (voluntary + involuntary) of every thread of the process and children."""
    total = 0
    for pid in pids_of(p):
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if "ctxt_switches:" in line:
                            total += int(line.split()[1])
        except OSError:
            pass
    return total


def status_kib(p, key):
    """Sum of a /proc/PID/status field (kB) over the process and its children."""
    total = 0
    for pid in pids_of(p):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


# --- the set-up -------------------------------------------------------------------------


class Bench:
    def __init__(self, args, tmp):
        self.args = args
        self.tmp = tmp
        self.mock_port = free_port()
        self.nginx_port = free_port()
        self.proxy_port = free_port()
        self.admin_port = free_port()
        self.base_port = free_port()
        self.base_admin_port = free_port()
        self.mock = None
        self.nginx = None
        self.proxy = None
        self.baseline = None
        self.agents = []

    # mock ---------------------------------------------------------------------------
    def start_mock(self, stream=False):
        stop(self.mock)
        cmd = [self.args.mock_bin, "--port", str(self.mock_port)]
        if stream:
            cmd += ["--chunks", str(STREAM_CHUNKS), "--chunk-delay-ms", str(STREAM_DELAY_MS)]
        # The mock records every request in memory: a fresh one per run keeps that out of
        # the numbers.
        self.mock = start(cmd, "mock", self.mock_port, stdout=subprocess.DEVNULL)

    # nginx --------------------------------------------------------------------------
    def start_nginx(self):
        with open(os.path.join(BENCHES, "nginx.conf.template")) as f:
            conf = f.read()
        user_line = ""
        if os.geteuid() == 0:
            import pwd

            user_line = f"user {pwd.getpwuid(os.geteuid()).pw_name};"
        conf = (
            conf.replace("@USER_LINE@", user_line)
            .replace("@TMP@", self.tmp)
            .replace("@MOCK_PORT@", str(self.mock_port))
            .replace("@NGINX_PORT@", str(self.nginx_port))
        )
        path = os.path.join(self.tmp, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        cmd = [self.args.nginx, "-p", self.tmp, "-c", path, "-e", os.path.join(self.tmp, "nginx-error.log")]
        self.nginx = start(cmd, "nginx", self.nginx_port)

    # budget-proxy -------------------------------------------------------------------
    def budgets_file(self):
        with open(os.path.join(ROOT, "config", "budgets.json")) as f:
            cfg = json.load(f)
        # The shipped agents, with budgets that a benchmark cannot exhaust (admission still
        # runs: reserve, check, settle, per request).
        cfg["default"]["max_tokens"] = 10**15
        for a in cfg["agents"].values():
            a["max_tokens"] = 10**15
        self.agents = list(cfg["agents"].keys())
        path = os.path.join(self.tmp, "budgets.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        return path

    def start_proxy(self, state_name="state", baseline=False):
        port, admin = (self.base_port, self.base_admin_port) if baseline else (self.proxy_port, self.admin_port)
        cmd = [
            self.args.baseline_bin if baseline else self.args.proxy_bin,
            "serve",
            "--config", self.budgets_file(),
            "--listen", f"127.0.0.1:{port}",
            "--admin-listen", f"127.0.0.1:{admin}",
            "--upstream", f"http://127.0.0.1:{self.mock_port}",
            "--state-dir", os.path.join(self.tmp, state_name + ("-baseline" if baseline else "")),
            "--watch-config", "false",
        ] + ([] if baseline else self.args.proxy_arg)
        env = dict(os.environ, BUDGET_PROXY_LOG="error")
        env.pop("BUDGET_PROXY_ADMIN_TOKEN", None)
        p = start(cmd, "baseline" if baseline else "budget-proxy", port, env=env)
        if baseline:
            self.baseline = p
        else:
            self.proxy = p

    def target(self, name):
        return {
            "direct": (self.mock_port, "direct", None),
            "nginx": (self.nginx_port, "prefixed", self.nginx),
            "budget-proxy": (self.proxy_port, "prefixed", self.proxy),
            "baseline": (self.base_port, "prefixed", self.baseline),
        }[name]


# --- wrk ------------------------------------------------------------------------------


def run_wrk(port, mode, agents, conns, secs):
    cmd = [
        "wrk", "-t", "1", "-c", str(conns), "-d", f"{secs}s", "--timeout", "5s",
        "-s", os.path.join(BENCHES, "wrk_report.lua"),
        f"http://127.0.0.1:{port}", "--", mode, ",".join(agents), BODY,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60)
    for line in out.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            return json.loads(line[len("WRK_JSON "):])
    raise SystemExit(f"wrk gave no result:\n{out.stdout}\n{out.stderr}")


def measure(bench, name, conns, secs, warm):
    port, mode, proc = bench.target(name)
    bench.start_mock()
    run_wrk(port, mode, bench.agents, conns, warm)  # warm-up: pools, caches, page faults
    t0 = cpu_ticks(proc) if proc else 0
    c0 = ctx_switches(proc) if proc else 0
    r = run_wrk(port, mode, bench.agents, conns, secs)
    ticks = (cpu_ticks(proc) - t0) if proc else None
    switches = (ctx_switches(proc) - c0) if proc else None
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    res = {
        "rps": r["requests"] / (r["duration_us"] / 1e6),
        "p50": r["p50"], "p99": r["p99"], "p999": r["p999"],
        "errors": errors, "requests": r["requests"],
        "cpu10k": (ticks / CLK_TCK) / r["requests"] * 10_000 if proc and r["requests"] else None,
        "hwm": status_kib(proc, "VmHWM") / 1024 if proc else None,
        "cs": switches / r["requests"] if proc and r["requests"] else None,
    }
    log(f"    {name:>12} c={conns:<3} {res['rps']:9.0f} req/s p50 {res['p50']} us p99 {res['p99']} us "
        f"p99.9 {res['p999']} us errors {errors}"
        + (f" cpu/10k {res['cpu10k']:.3f} s" if res["cpu10k"] is not None else ""))
    return res


# --- streaming ------------------------------------------------------------------------


def http_request(method, path, body, host_port):
    b = body.encode()
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{host_port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(b)}\r\n\r\n"
    ).encode() + b


class Dechunk:
    """Incremental chunked-transfer decoder (or Content-Length) over a byte stream."""

    def __init__(self, headers):
        h = headers.lower()
        self.chunked = b"transfer-encoding: chunked" in h
        self.remaining = None
        for line in h.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                self.remaining = int(line.split(b":")[1])
        self.buf = b""
        self.done = False

    def feed(self, data):
        if not self.chunked:
            self.remaining -= len(data)
            self.done = self.remaining <= 0
            return data
        self.buf += data
        out = b""
        while True:
            i = self.buf.find(b"\r\n")
            if i < 0:
                return out
            size = int(self.buf[:i].split(b";")[0], 16)
            if size == 0:
                self.done = True
                return out
            if len(self.buf) < i + 2 + size + 2:
                return out
            out += self.buf[i + 2:i + 2 + size]
            self.buf = self.buf[i + 2 + size + 2:]


def stream_once(sock, port, agent_prefix):
    """One alt=sse request; returns (first-byte s, [event arrival s], coalesced events)."""
    t0 = time.perf_counter()
    sock.sendall(http_request("POST", agent_prefix + SSE_PATH, BODY, port))
    head = b""
    first_byte = None
    while b"\r\n\r\n" not in head:
        d = sock.recv(65536)
        if not d:
            raise RuntimeError("connection closed in headers")
        if first_byte is None:
            first_byte = time.perf_counter() - t0
        head += d
    head, rest = head.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"stream answered {head.splitlines()[0]!r}")
    dec = Dechunk(head)
    events, coalesced, text = [], 0, b""
    data = rest
    while True:
        now = time.perf_counter() - t0
        text += dec.feed(data)
        n = 0
        while b"\r\n\r\n" in text:
            _, text = text.split(b"\r\n\r\n", 1)
            events.append(now)
            n += 1
        coalesced += max(0, n - 1)
        if dec.done:
            break
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("connection closed mid-stream")
    return first_byte, events, coalesced


def measure_stream(bench, name, n):
    port, mode, _ = bench.target(name)
    prefix = "/agents/sage" if mode == "prefixed" else ""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for _ in range(3):  # warm-up
            stream_once(sock, port, prefix)
        firsts, series, coalesced = [], [], 0
        for _ in range(n):
            fb, ev, co = stream_once(sock, port, prefix)
            firsts.append(fb)
            series.append(ev)
            coalesced += co
    finally:
        sock.close()
    counts = {len(s) for s in series}
    if counts != {STREAM_CHUNKS}:
        raise SystemExit(f"{name}: expected {STREAM_CHUNKS} SSE events per stream, got {sorted(counts)}")
    per_chunk = [statistics.median(s[i] for s in series) for i in range(STREAM_CHUNKS)]
    ttfb = [s[0] for s in series]
    res = {
        "first_byte_p50": statistics.median(firsts) * 1e6,
        "ttfb_p50": statistics.median(ttfb) * 1e6,
        "ttfb_p99": sorted(ttfb)[min(len(ttfb) - 1, int(len(ttfb) * 0.99))] * 1e6,
        "per_chunk": per_chunk,
        "coalesced": coalesced,
        "streams": n,
    }
    log(f"    {name:>12} stream: first chunk p50 {res['ttfb_p50']:.0f} us, p99 {res['ttfb_p99']:.0f} us, "
        f"coalesced {coalesced}")
    return res


# --- idle connections -----------------------------------------------------------------


def read_response(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        d = sock.recv(65536)
        if not d:
            raise RuntimeError("closed")
        data += d
    head, body = data.split(b"\r\n\r\n", 1)
    dec = Dechunk(head)
    dec.feed(body)
    while not dec.done:
        d = sock.recv(65536)
        if not d:
            raise RuntimeError("closed")
        dec.feed(d)
    return head.split(b"\r\n", 1)[0]


def idle_connections(port, prefix, n, batch=200):
    """Open n keep-alive connections, make one request on each, keep them open."""
    socks = []
    req = (f"GET {prefix}/v1beta/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").encode()
    for start_i in range(0, n, batch):
        group = []
        for _ in range(min(batch, n - start_i)):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(req)
            group.append(s)
        for s in group:
            status = read_response(s)
            if b" 200 " not in status + b" ":
                raise SystemExit(f"idle connection request answered {status!r}")
        socks.extend(group)
    return socks


# --- report ---------------------------------------------------------------------------


def fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="3 s runs, fewer streams (development)")
    ap.add_argument("--duration", type=int, default=None, help="seconds per run (default 10, quick 3)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every run; the table shows medians")
    ap.add_argument("--fixed-order", action="store_true",
                    help="every round in the same order (direct, nginx, budget-proxy), as before the "
                         "fourteenth round of benches/README.md: to compare with those runs")
    ap.add_argument("--conns", default="1,64,256")
    ap.add_argument("--idle-conns", type=int, default=10_000)
    ap.add_argument("--proxy-bin", required=True)
    ap.add_argument("--mock-bin", required=True)
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    ap.add_argument("--proxy-arg", action="append", default=[], help="extra budget-proxy flag")
    ap.add_argument("--baseline-bin", default=None,
                    help="another budget-proxy build, measured in the same run as 'baseline' (before/after)")
    ap.add_argument("--proxy-label", default=None, help="what the budget-proxy build is (for the report)")
    ap.add_argument("--baseline-label", default=None, help="what the baseline build is (for the report)")
    args = ap.parse_args()
    secs = args.duration or (3 if args.quick else 10)
    warm = 1
    streams = 20 if args.quick else 100
    conns = [int(c) for c in args.conns.split(",")]
    targets = ["direct", "nginx", "budget-proxy"] + (["baseline"] if args.baseline_bin else [])

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    tmp = tempfile.mkdtemp(prefix="proxy-bench-")
    try:
        bench = Bench(args, tmp)
        log(f"temp dir {tmp}; {secs} s per run, {args.rounds} round(s), wrk -t1, body {len(BODY)} bytes")
        bench.start_mock()
        bench.start_nginx()
        bench.start_proxy()
        if args.baseline_bin:
            bench.start_proxy(baseline=True)
        # Idle RSS: after a few requests (lazy initialisation done), before any load.
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", bench.proxy_port))
            s.sendall(http_request("POST", "/agents/sage" + MODEL_PATH, BODY, bench.proxy_port))
            read_response(s)
            s.close()
        time.sleep(0.5)
        idle_rss = status_kib(bench.proxy, "VmRSS") / 1024
        nginx_idle_rss = status_kib(bench.nginx, "VmRSS") / 1024
        log(f"  idle RSS: budget-proxy {idle_rss:.1f} MiB, nginx (master + workers) {nginx_idle_rss:.1f} MiB")

        results = {(t, c): [] for t in targets for c in conns}
        for rnd in range(args.rounds):
            log(f"  round {rnd + 1}/{args.rounds}")
            for c in conns:
                # Direct first, then the proxies in an order that turns around every round
                # (nginx, budget-proxy, budget-proxy, nginx, ...): a machine that slows down
                # or speeds up during a round does not favour the one that always runs last.
                proxies = targets[1:] if rnd % 2 == 0 or args.fixed_order else targets[:0:-1]
                for t in [targets[0]] + proxies:
                    results[(t, c)].append(measure(bench, t, c, secs, warm))

        log("  streaming (alt=sse, 20 chunks 5 ms apart, one connection, sequential)")
        bench.start_mock(stream=True)
        stream = {t: measure_stream(bench, t, streams) for t in targets}
        after_load_rss = status_kib(bench.proxy, "VmRSS") / 1024

        # 10,000 idle keep-alive connections, on fresh processes (no heap left by the load).
        log(f"  {args.idle_conns} idle keep-alive connections")
        bench.start_mock()
        stop(bench.proxy)
        bench.start_proxy(state_name="state-idle")
        idle_targets = [("budget-proxy", bench.proxy), ("nginx", bench.nginx)]
        if args.baseline_bin:
            stop(bench.baseline)
            bench.start_proxy(state_name="state-idle", baseline=True)
            idle_targets.append(("baseline", bench.baseline))
        idle = {}
        for t, proc in idle_targets:
            port, mode, _ = bench.target(t)
            prefix = "/agents/sage" if mode == "prefixed" else ""
            before = status_kib(proc, "VmRSS") / 1024
            socks = idle_connections(port, prefix, args.idle_conns)
            time.sleep(1.0)
            idle[t] = (before, status_kib(proc, "VmRSS") / 1024)
            for s in socks:
                s.close()
            log(f"    {t}: RSS {idle[t][0]:.1f} MiB -> {idle[t][1]:.1f} MiB with {len(socks)} idle connections")
            time.sleep(0.5)
    finally:
        cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    # ---- the table ----
    def med(t, c, k):
        vals = [r[k] for r in results[(t, c)] if r[k] is not None]
        return statistics.median(vals) if vals else None

    def paired(c, k):
        """budget-proxy / nginx per round: the two ran minutes apart at most, so a load that
        changes between rounds moves both, which the ratio of the medians does not cancel."""
        return [b[k] / n[k] for b, n in zip(results[("budget-proxy", c)], results[("nginx", c)])
                if b[k] is not None and n[k]]

    print()
    print(f"budget-proxy benchmark: {secs} s per run, {args.rounds} round(s) (medians), wrk -t1, "
          f"POST generateContent, {len(BODY)}-byte body, {len(bench.agents)} agents by path prefix, "
          f"{os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}")
    print(f"budget-proxy: {args.proxy_label or args.proxy_bin}")
    if args.baseline_bin:
        print(f"baseline: {args.baseline_label or args.baseline_bin}")
    hdr = (f"{'conns':>5} {'target':<13} {'req/s':>9} {'spread':>7} {'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9} "
           f"{'errors':>7} {'CPU s/10k':>10} {'ctx sw/req':>10} {'peak RSS MiB':>13}")
    print(hdr)
    print("-" * len(hdr))
    for c in conns:
        for t in targets:
            rps = [r["rps"] for r in results[(t, c)]]
            spread = (max(rps) - min(rps)) / statistics.median(rps) * 100 if len(rps) > 1 else None
            errs = sum(r["errors"] for r in results[(t, c)])
            print(f"{c:>5} {t:<13} {med(t, c, 'rps'):>9.0f} {fmt(spread, '>6.1f') + ('%' if spread is not None else ''):>7} "
                  f"{med(t, c, 'p50'):>8.0f} {med(t, c, 'p99'):>8.0f} {med(t, c, 'p999'):>9.0f} {errs:>7} "
                  f"{fmt(med(t, c, 'cpu10k'), '>10.3f'):>10} {fmt(med(t, c, 'cs'), '>10.2f'):>10} "
                  f"{fmt(med(t, c, 'hwm'), '>13.1f'):>13}")
    print()
    print("ratios (budget-proxy / nginx | budget-proxy / direct):")
    print(f"{'conns':>5} {'req/s':>15} {'p50':>15} {'p99':>15} {'p99.9':>15} {'CPU/req vs nginx':>17}")
    for c in conns:
        def pair(k):
            return (f"{fmt(ratio(med('budget-proxy', c, k), med('nginx', c, k)), '.2f')} | "
                    f"{fmt(ratio(med('budget-proxy', c, k), med('direct', c, k)), '.2f')}")
        print(f"{c:>5} {pair('rps'):>15} {pair('p50'):>15} {pair('p99'):>15} {pair('p999'):>15} "
              f"{fmt(ratio(med('budget-proxy', c, 'cpu10k'), med('nginx', c, 'cpu10k')), '>17.2f')}")
    if args.rounds > 1:
        print()
        print("paired ratios, budget-proxy / nginx measured in the same round (median, min-max over rounds):")
        print(f"{'conns':>5} {'req/s':>22} {'CPU/req':>22}")
        for c in conns:
            cells = []
            for k in ("rps", "cpu10k"):
                rs = paired(c, k)
                cells.append(f"{statistics.median(rs):.3f} ({min(rs):.2f}-{max(rs):.2f})" if rs else "-")
            print(f"{c:>5} {cells[0]:>22} {cells[1]:>22}")
    if "baseline" in targets:
        print()
        print("budget-proxy / baseline (the same run):")
        print(f"{'conns':>5} {'req/s':>8} {'p50':>8} {'p99':>8} {'p99.9':>8} {'CPU/req':>8}")
        for c in conns:
            r = [fmt(ratio(med('budget-proxy', c, k), med('baseline', c, k)), '>8.2f')
                 for k in ('rps', 'p50', 'p99', 'p999', 'cpu10k')]
            print(f"{c:>5} " + " ".join(r))
    print()
    print(f"streaming (alt=sse, {STREAM_CHUNKS} chunks {STREAM_DELAY_MS} ms apart, {streams} streams each):")
    print(f"{'target':<13} {'first byte p50 us':>18} {'1st chunk p50 us':>17} {'1st chunk p99 us':>17} "
          f"{'added/chunk mean us':>20} {'added/chunk max us':>19} {'coalesced':>10}")
    for t in targets:
        s = stream[t]
        added = [a - b for a, b in zip(s["per_chunk"], stream["direct"]["per_chunk"])]
        s["added_mean"] = statistics.mean(added) * 1e6
        s["added_max"] = max(added) * 1e6
        print(f"{t:<13} {s['first_byte_p50']:>18.0f} {s['ttfb_p50']:>17.0f} {s['ttfb_p99']:>17.0f} "
              f"{s['added_mean']:>20.0f} {s['added_max']:>19.0f} {s['coalesced']:>10}")
    print()
    print(f"memory: budget-proxy idle RSS {idle_rss:.1f} MiB (nginx {nginx_idle_rss:.1f} MiB), "
          f"after the load {after_load_rss:.1f} MiB; with {args.idle_conns} idle keep-alive connections: "
          f"budget-proxy {idle['budget-proxy'][1]:.1f} MiB (fresh: {idle['budget-proxy'][0]:.1f}), "
          f"nginx {idle['nginx'][1]:.1f} MiB (master + workers)"
          + (f"; baseline {idle['baseline'][1]:.1f} MiB" if "baseline" in idle else ""))
    print()

    # ---- targets ----
    lines = []

    def check(ok, text):
        lines.append(("PASS" if ok else "FAIL") + "  " + text)

    for c in (64, 256):
        if c in conns:
            bp, ng = med("budget-proxy", c, "rps"), med("nginx", c, "rps")
            if args.rounds > 1:
                # With rounds, the verdict is the median of the paired ratios.
                rs = paired(c, "rps")
                r = statistics.median(rs)
                check(r >= 1.0, f"throughput at {c} connections >= nginx: paired ratio {r:.3f} "
                                f"(rounds {min(rs):.2f}-{max(rs):.2f}; medians {bp:.0f} vs {ng:.0f} req/s)")
            else:
                check(bp >= ng, f"throughput at {c} connections >= nginx: {bp:.0f} vs {ng:.0f} req/s ({bp / ng:.2f}x)")
    if 1 in conns:
        d50, n50, b50 = med("direct", 1, "p50"), med("nginx", 1, "p50"), med("budget-proxy", 1, "p50")
        if args.rounds > 1:
            # Paired: budget-proxy's p50 minus nginx's in the same round (direct's p50, the
            # same for both, cancels out).
            diffs = [b["p50"] - n["p50"] for b, n in zip(results[("budget-proxy", 1)], results[("nginx", 1)])]
            dd = statistics.median(diffs)
            check(dd <= 0, f"added p50 latency on 1 connection <= nginx's: {dd:+.0f} us against nginx, paired median "
                           f"(rounds {min(diffs):+.0f} to {max(diffs):+.0f} us; medians: added {b50 - d50:.0f} us vs "
                           f"{n50 - d50:.0f} us)")
        else:
            check(b50 - d50 <= n50 - d50,
                  f"added p50 latency on 1 connection <= nginx's: {b50 - d50:.0f} us vs {n50 - d50:.0f} us")
        d99, b99 = med("direct", 1, "p99"), med("budget-proxy", 1, "p99")
        check(b99 <= d99 + 250, f"p99 on 1 connection <= direct + 250 us: {b99:.0f} vs {d99:.0f} + 250 us")
    for c in conns:
        bc, nc = med("budget-proxy", c, "cpu10k"), med("nginx", c, "cpu10k")
        if bc is not None and nc:
            check(bc <= 1.2 * nc, f"CPU per request at {c} connections <= 1.2x nginx: {bc:.3f} vs {nc:.3f} s/10k ({bc / nc:.2f}x)")
    st, sd = stream["budget-proxy"], stream["direct"]
    check(st["ttfb_p50"] <= sd["ttfb_p50"] + 1000,
          f"streaming time to first chunk <= direct + 1 ms: {st['ttfb_p50']:.0f} vs {sd['ttfb_p50']:.0f} us (p50)")
    check(st["coalesced"] == 0,
          f"streaming chunks never coalesced: {st['coalesced']} of {STREAM_CHUNKS * streams} events arrived with another "
          f"(added delay per chunk: mean {st['added_mean']:.0f} us, max {st['added_max']:.0f} us)")
    check(idle_rss <= 20, f"idle RSS <= 20 MiB: {idle_rss:.1f} MiB")
    if args.idle_conns == 10_000:
        check(idle["budget-proxy"][1] <= 100,
              f"10000 idle keep-alive connections <= 100 MiB RSS: {idle['budget-proxy'][1]:.1f} MiB")
    else:
        lines.append(f"----  10000 idle keep-alive connections <= 100 MiB RSS: not checked "
                     f"(--idle-conns {args.idle_conns}: {idle['budget-proxy'][1]:.1f} MiB)")
    errs = sum(r["errors"] for rs in results.values() for r in rs)
    check(errs == 0, f"no errors in any run: {errs}")
    for line in lines:
        print(line)
    fails = sum(1 for line in lines if line.startswith("FAIL"))
    passes = sum(1 for line in lines if line.startswith("PASS"))
    print(f"targets: {passes} PASS, {fails} FAIL")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        cleanup()
