"""How much does the Python ext_proc hop cost?

Three targets answer the same non-streaming chat completion (a ~2 KB prompt):

  (a) the fake provider itself,
  (b) Envoy alone, a plain route to the fake (no ext_proc),
  (c) the whole gateway (``tollgate run``: Envoy + the Python ext_proc server).

``wrk`` drives each at several concurrencies; CPU time is read from
/proc/PID/stat before and after every run. Streaming is measured on (b) and
(c) with an asyncio client that timestamps every chunk. The report (markdown)
goes to ``--out`` and to stdout.

    python -m tests.bench.run --out tests/bench/results.md          # about 3 minutes
    python -m tests.bench.run --quick --out /tmp/quick.md     # smoke test, under a minute

Every process started here is stopped again (try/finally); every port is free
and on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from extproc.config import Limits
from extproc.control.envoy_config import HCM_SETTINGS, circuit_breakers
from tests.harness import ENVOY, Gateway, free_port, wait_port, wait_ready

REPO = Path(__file__).resolve().parents[2]
FAKE = REPO / "tests" / "fake_provider.py"
TICK = os.sysconf("SC_CLK_TCK")

PROVIDER_KEY = "sk-bench-provider-4c1d"  # what the fake expects
CLIENT_KEY = "sk-bench-client-not-forwarded"  # what clients of the gateway send; the gateway swaps it
KEY_ENV = "BENCH_PROVIDER_KEY"
PLAIN_MODEL = "bench-plain"
STREAM_MODEL = "bench-stream"
STREAM_CHUNKS = 50
TOKEN_DELAY = 0.0012  # 50 chunks over ~60 ms
PROMPT_BYTES = 2048

# The targets we hold the gateway to.
GOAL_RPS_C16 = 1500.0
GOAL_ADDED_P50_C1_MS = 1.5
GOAL_PY_US_PER_REQ = 600.0
GOAL_STREAM_RATIO_C16 = 1.10
GOAL_PY_US_PER_CHUNK = 30.0
GOAL_RSS_MB = 150.0


# --------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    rest = text[text.rindex(")") + 2 :].split()  # fields from #3 (state) on
    return (int(rest[11]) + int(rest[12])) / TICK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    out: set[int] = set()
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out.update(int(x) for x in f.read_text().split())
    if out:
        return sorted(out)
    # Kernels without CONFIG_PROC_CHILDREN: scan every process's parent.
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                text = (d / "stat").read_text()
                if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
                    out.add(int(d.name))
    return sorted(out)


def descendants(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        for c in children(todo.pop()):
            seen.append(c)
            todo.append(c)
    return seen


def extproc_counters(admin_port: int) -> dict[str, int]:
    """Envoy's ext_proc counters summed over both filters (gateway + attempt)."""
    out = {"streams": 0, "msgs_sent": 0, "msgs_received": 0}
    names = {"streams_started": "streams", "stream_msgs_sent": "msgs_sent", "stream_msgs_received": "msgs_received"}
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats?filter=ext_proc", timeout=5) as r:
        for line in r.read().decode().splitlines():
            name, _, value = line.partition(": ")
            key = names.get(name.rsplit(".", 1)[-1])
            if key and value.strip().isdigit():
                out[key] += int(value)
    return out


def machine_ticks() -> list[int]:
    """The aggregate ``cpu`` line of /proc/stat: user nice system idle iowait irq softirq steal ..."""
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
    return total


# --------------------------------------------------------------------------- processes


def stop_process(p: subprocess.Popen[Any] | None, timeout: float = 10) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


def start_fake(tmp: Path, name: str, extra: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log = (tmp / f"fake-{name}.log").open("ab")
    p = subprocess.Popen(
        [sys.executable, str(FAKE), "--kind", "openai", "--host", "127.0.0.1", "--port", str(port),
         "--api-key", PROVIDER_KEY, *extra],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )
    try:
        wait_port(port, 20)
    except TimeoutError:
        stop_process(p)
        raise
    return p, port


def plain_envoy_bootstrap(admin_port: int, routes: list[tuple[str, int, int]]) -> dict[str, Any]:
    """Envoy with no ext_proc: one listener per (name, listen port, upstream port), each
    a catch-all route to its one upstream. Limits and timeouts follow the rendered gateway
    config (extproc/control/envoy_config.py) so that only the ext_proc filters differ."""
    t = "type.googleapis.com/"
    breakers = circuit_breakers()
    listeners, clusters = [], []
    for name, listen, upstream in routes:
        hcm = {
            "@type": t + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": name,
            **HCM_SETTINGS,  # the gateway's own connection-manager settings: only the ext_proc filters differ
            "route_config": {
                "name": name,
                "virtual_hosts": [{
                    "name": name, "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": name, "timeout": "0s"}}],
                }],
            },
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": t + "envoy.extensions.filters.http.router.v3.Router",
                                 "suppress_envoy_headers": True},
            }],
        }
        listeners.append({
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
            "per_connection_buffer_limit_bytes": Limits().max_request_bytes,
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}],
        })
        clusters.append({
            "name": name,
            "type": "STATIC",
            "connect_timeout": "5s",
            "circuit_breakers": breakers,
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}}}]}]},
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": t + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "common_http_protocol_options": {"idle_timeout": "60s"},
            }},
        })
    return {
        "node": {"id": "bench-plain", "cluster": "bench-plain"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


# --------------------------------------------------------------------------- request bodies


def chat_body(model: str, stream: bool) -> bytes:
    """A chat request whose JSON is PROMPT_BYTES long (give or take a byte)."""
    sentence = ("The quick brown fox jumps over the lazy dog while the gateway counts tokens, "
                "checks quotas and forwards the request to the provider. ")

    def build(n: int) -> bytes:
        body: dict[str, Any] = {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a careful assistant. Answer briefly and cite nothing."},
                {"role": "user", "content": (sentence * 40)[:n]},
            ],
            "max_tokens": 256,
            "temperature": 0.2,
        }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return json.dumps(body, separators=(",", ":")).encode()

    base = len(build(0))
    return build(max(0, PROMPT_BYTES - base))


# --------------------------------------------------------------------------- wrk


WRK_FIELDS = ("requests", "duration_us", "bytes", "err_connect", "err_read", "err_write", "non2xx", "err_timeout",
              "p50_us", "p90_us", "p99_us", "p999_us", "mean_us", "max_us")


def wrk_script(path: Path, body: bytes, auth: str) -> Path:
    text = body.decode()
    level = "="
    while f"]{level}]" in text:
        level += "="
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = [{level}[{text}]{level}]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {auth}"\n'
        "\n"
        "function done(summary, latency, requests)\n"
        "  local e = summary.errors\n"
        "  io.write(string.format(\"BENCH_RESULT %d %d %d %d %d %d %d %d %.1f %.1f %.1f %.1f %.1f %.1f\\n\",\n"
        "    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,\n"
        "    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),\n"
        "    latency.mean, latency.max))\n"
        "end\n"
    )
    return path


def run_wrk(url: str, script: Path, conns: int, seconds: float) -> dict[str, float]:
    threads = min(conns, 2)
    cmd = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{max(1, round(seconds))}s", "--latency",
           "--timeout", "10s", "-s", str(script), url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    for line in r.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            values = [float(x) for x in line.split()[1:]]
            out = dict(zip(WRK_FIELDS, values))
            out["rps"] = out["requests"] / (out["duration_us"] / 1e6) if out["duration_us"] else 0.0
            return out
    raise RuntimeError(f"wrk gave no result (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk not found; installing it with apt-get", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, stdout=subprocess.DEVNULL)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is needed: apt-get install -y wrk")
    return found


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    key: str
    label: str
    base: str  # http://127.0.0.1:PORT (plain route)
    stream_base: str | None  # where the paced (streaming) fake is reached
    auth: str
    roles: dict[str, list[int]]  # role -> pids whose CPU counts for it
    script: Path | None = None
    extproc_admin: int | None = None  # the gateway's Envoy admin port, to count ext_proc messages

    def counters(self) -> dict[str, int]:
        return extproc_counters(self.extproc_admin) if self.extproc_admin else {}

    def cpu(self) -> dict[str, float]:
        return {role: cpu_of(pids) for role, pids in self.roles.items()}


@dataclass
class Run:
    target: str
    conns: int
    wrk: dict[str, float]
    cpu_us_per_req: dict[str, float]
    extproc: dict[str, float] = field(default_factory=dict)  # ext_proc streams/messages per request


@dataclass
class StreamStats:
    target: str
    conns: int
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds over all rounds
    extproc: dict[str, int] = field(default_factory=dict)  # ext_proc counter deltas over all rounds
    wall: float = 0.0


def check_once(url: str, body: bytes, auth: str) -> tuple[int, dict[str, str], dict[str, Any] | str]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"content-type": "application/json", "authorization": f"Bearer {auth}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            status, headers = r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, {}, e.read().decode(errors="replace")
    try:
        return status, headers, json.loads(raw)
    except ValueError:
        return status, headers, raw.decode(errors="replace")


# --------------------------------------------------------------------------- streaming client


async def one_stream(session: Any, url: str, body: bytes, auth: str, stats: StreamStats) -> None:
    headers = {"content-type": "application/json", "authorization": f"Bearer {auth}"}
    t0 = time.perf_counter()
    ttft = None
    content = 0
    done = False
    try:
        async with session.post(url, data=body, headers=headers) as r:
            if r.status != 200:
                stats.failures.append(f"HTTP {r.status}: {(await r.read())[:200]!r}")
                return
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                if line.startswith(b"data: [DONE]"):
                    done = True
                elif b'"content":"' in line and b'"content":""' not in line:
                    content += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        stats.failures.append(f"{type(e).__name__}: {e}")
        return
    total = time.perf_counter() - t0
    if not done or content != STREAM_CHUNKS or ttft is None:
        stats.failures.append(f"incomplete stream: done={done} content_chunks={content}")
        return
    stats.ttft.append(ttft)
    stats.total.append(total)


async def stream_batch(target: Target, conns: int, n: int, body: bytes, stats: StreamStats | None) -> None:
    import aiohttp

    url = f"{target.stream_base}/v1/chat/completions"
    sink = stats or StreamStats(target.key, conns)
    connector = aiohttp.TCPConnector(limit=conns)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        left = n

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await one_stream(session, url, body, target.auth, sink)

        before, cb = target.cpu(), target.counters()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conns)))
        wall = time.perf_counter() - t0
        after, ca = target.cpu(), target.counters()
    if stats is not None:
        stats.wall += wall
        for role in before:
            stats.cpu[role] = stats.cpu.get(role, 0.0) + after[role] - before[role]
        for k in cb:
            stats.extproc[k] = stats.extproc.get(k, 0) + ca[k] - cb[k]


async def streaming(targets: list[Target], plan: list[tuple[int, int]], rounds: int, body: bytes) -> list[StreamStats]:
    out: list[StreamStats] = []
    for conns, total in plan:
        per_round = max(1, total // rounds)
        stats = {t.key: StreamStats(t.key, conns) for t in targets}
        for t in targets:  # warm-up, not counted
            await stream_batch(t, conns, max(conns, 4), body, None)
        for r in range(rounds):
            order = targets if r % 2 == 0 else list(reversed(targets))
            for t in order:
                await stream_batch(t, conns, per_round, body, stats[t.key])
        out.extend(stats[t.key] for t in targets)
    return out


# --------------------------------------------------------------------------- profiling (optional)


def start_py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        print("--profile: py-spy is not installed; skipping", file=sys.stderr)
        return None
    return subprocess.Popen(
        [exe, "record", "--nonblocking", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", "250",
         "--format", "raw", "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def summarize_collapsed(path: Path, top: int = 15) -> str:
    """Condense py-spy's collapsed stacks: how much of the sampled time is our code (extproc/), and
    which of our functions it is. Without --native, time inside grpc's Cython/C core and uvloop shows
    up as the event loop frame (``Runner.run``) or as grpc's poller thread (``Thread.run``)."""
    if not path.exists():
        return f"(no profile at {path})"
    total = 0
    ours = 0
    by_thread: dict[str, int] = {}
    incl: dict[str, int] = {}
    self_t: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        thread = "main thread" if any("runners.py" in f for f in frames) else (
            "grpc poller thread" if any("threading.py" in f for f in frames) else "other")
        by_thread[thread] = by_thread.get(thread, 0) + count
        app = [f for f in frames if "extproc/" in f and "extproc/cli.py" not in f]
        if app:
            ours += count
            self_t[frames[-1]] = self_t.get(frames[-1], 0) + count
            for f in set(app):
                incl[f] = incl.get(f, 0) + count
    if not total:
        return "(empty profile)"
    lines = [f"samples: {total} (py-spy --nonblocking, Python frames only)"]
    for k, v in sorted(by_thread.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {100 * v / total:5.1f}%  {k}")
    lines.append(f"  {100 * ours / total:5.1f}%  inside extproc/ code (and what it calls: json, protobuf, logging)")
    lines.append(f"  {100 * (total - ours) / total:5.1f}%  outside it: grpc.aio (Cython/C core), uvloop, asyncio")
    lines += ["", "incl %  extproc/ function"]
    for f, c in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * c / total:6.1f}  {f}")
    lines += ["", "self %  leaf frame under extproc/ code"]
    for f, c in sorted(self_t.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * c / total:6.1f}  {f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- report


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def machine_facts(wrk: str) -> dict[str, str]:
    cpu_model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    envoy_v = subprocess.run([ENVOY, "--version"], capture_output=True, text=True).stdout.strip()
    envoy_v = envoy_v.split("version:", 1)[-1].strip()
    wrk_v = subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.splitlines()
    mem = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "CPU": cpu_model,
        "memory": mem,
        "kernel": platform.release(),
        "load average at start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "Python": platform.python_version(),
        "Envoy": envoy_v,
        "wrk": (wrk_v[0].split(" Copyright")[0] if wrk_v else "?"),
        "grpcio": version_of("grpcio"),
        "protobuf": version_of("protobuf"),
        "aiohttp": version_of("aiohttp"),
        "uvloop": version_of("uvloop"),
    }


def f1(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:,.1f}"


def mark(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def render_report(facts: dict[str, str], args: argparse.Namespace, runs: list[Run], streams: list[StreamStats],
                  memory: dict[str, float], labels: dict[str, str], notes: list[str], wall: float,
                  profile_text: dict[str, str]) -> str:
    L: list[str] = []
    L.append("# Tollgate benchmark: the cost of the Python ext_proc hop")
    L.append("")
    L.append(f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `python -m tests.bench.run"
             f"{' --quick' if args.quick else ''}` in {wall:.0f} s."
             + (" **Quick mode: short runs, numbers are only indicative.**" if args.quick else ""))
    L.append("")
    L.append("Targets: " + "; ".join(f"({k}) {v}" for k, v in labels.items()) + ".")
    L.append("")

    by = {(r.target, r.conns): r for r in runs}
    conc = sorted({r.conns for r in runs})

    # -- goals first
    goals: list[tuple[str, str, str, bool]] = []
    c16 = by.get(("c", 16))
    if c16:
        goals.append((f"(c) throughput at c16 ≥ {GOAL_RPS_C16:,.0f} req/s", f"{c16.wrk['rps']:,.0f} req/s", "",
                      c16.wrk["rps"] >= GOAL_RPS_C16))
    if ("b", 1) in by and ("c", 1) in by:
        added = (by[("c", 1)].wrk["p50_us"] - by[("b", 1)].wrk["p50_us"]) / 1000
        goals.append((f"p50 added by (c) over (b) at c1 ≤ {GOAL_ADDED_P50_C1_MS} ms", f"{added:.2f} ms", "",
                      added <= GOAL_ADDED_P50_C1_MS))
    if c16:
        py = c16.cpu_us_per_req.get("python", float("nan"))
        worst = max((r.cpu_us_per_req.get("python", 0.0) for r in runs if r.target == "c"), default=py)
        goals.append((f"Python CPU per non-stream request ≤ {GOAL_PY_US_PER_REQ:.0f} µs (at c16)", f"{py:.0f} µs",
                      f"worst over c1/c16/c64: {worst:.0f} µs", py <= GOAL_PY_US_PER_REQ))
    sb = next((s for s in streams if s.target == "b" and s.conns == 16), None)
    sc = next((s for s in streams if s.target == "c" and s.conns == 16), None)
    if sb and sc and sb.total and sc.total:
        ratio = pct(sc.total, 50) / pct(sb.total, 50)
        goals.append((f"streaming p50 total time (c)/(b) at c16 ≤ {GOAL_STREAM_RATIO_C16:.2f}×", f"{ratio:.3f}×", "",
                      ratio <= GOAL_STREAM_RATIO_C16))
        chunks = (len(sc.total) + len(sc.failures)) * STREAM_CHUNKS
        per_chunk = sc.cpu.get("python", 0.0) / chunks * 1e6 if chunks else float("nan")
        goals.append((f"Python CPU per streamed chunk ≤ {GOAL_PY_US_PER_CHUNK:.0f} µs (at c16)", f"{per_chunk:.1f} µs",
                      "CPU of the whole request ÷ (requests × 50 chunks)", per_chunk <= GOAL_PY_US_PER_CHUNK))
    if "python" in memory:
        goals.append((f"sidecar (Python) RSS ≤ {GOAL_RSS_MB:.0f} MB", f"{memory['python']:.1f} MB", "after the load",
                      memory["python"] <= GOAL_RSS_MB))
    L.append("## Targets")
    L.append("")
    L.append("| target | measured | note | result |")
    L.append("|---|---:|---|---|")
    for name, value, note, ok in goals:
        L.append(f"| {name} | {value} | {note} | {mark(ok)} |")
    L.append("")

    # -- non-streaming
    L.append(f"## Non-streaming chat completions (~{PROMPT_BYTES / 1024:.0f} KB prompt, wrk, "
             f"{args.duration:g} s per run after {args.warmup:g} s warm-up)")
    L.append("")
    L.append("| conns | target | req/s | p50 ms | p99 ms | non-2xx | socket errors | Envoy CPU µs/req "
             "| Python CPU µs/req | fake CPU µs/req |")
    L.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in conc:
        for k in ("a", "b", "c"):
            r = by.get((k, c))
            if r is None:
                continue
            w = r.wrk
            errors = int(w["err_connect"] + w["err_read"] + w["err_write"] + w["err_timeout"])
            non2xx = int(w["non2xx"])
            cpu = r.cpu_us_per_req
            L.append(
                f"| {c} | ({k}) | {w['rps']:,.0f} | {w['p50_us'] / 1000:.2f} | {w['p99_us'] / 1000:.2f} "
                f"| {non2xx if non2xx == 0 else f'**{non2xx}**'} | {errors if errors == 0 else f'**{errors}**'} "
                f"| {f1(cpu.get('envoy', float('nan')))} | {f1(cpu.get('python', float('nan')))} "
                f"| {f1(cpu.get('fake', float('nan')))} |"
            )
    L.append("")
    L.append("| conns | (c)/(b) req/s | (c)/(a) req/s | p50 added (c)−(b) ms | p99 added (c)−(b) ms "
             "| Envoy CPU added µs/req | total CPU (c)/(b) per req |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|")
    for c in conc:
        a, b, cc = by.get(("a", c)), by.get(("b", c)), by.get(("c", c))
        if not (b and cc):
            continue
        tot_b = sum(b.cpu_us_per_req.values())
        tot_c = sum(cc.cpu_us_per_req.values())
        L.append(
            f"| {c} | {cc.wrk['rps'] / b.wrk['rps']:.3f} | "
            f"{(cc.wrk['rps'] / a.wrk['rps']) if a else float('nan'):.3f} | "
            f"{(cc.wrk['p50_us'] - b.wrk['p50_us']) / 1000:.2f} | {(cc.wrk['p99_us'] - b.wrk['p99_us']) / 1000:.2f} | "
            f"{cc.cpu_us_per_req['envoy'] - b.cpu_us_per_req['envoy']:,.0f} | {tot_c / tot_b:.2f} |"
        )
    L.append("")

    c_runs = [r for r in runs if r.target == "c" and r.extproc.get("msgs_sent")]
    if c_runs:
        L.append("Where (c) spends it: ext_proc traffic per request (Envoy's counters, both ext_proc filters) and CPU per "
                 "message Envoy sent to the Python server.")
        L.append("")
        L.append("| conns | gRPC streams/req | msgs to Python/req | Python CPU µs/msg | Envoy CPU over (b) µs/msg "
                 "| fake CPU (c)/(b) |")
        L.append("|---:|---:|---:|---:|---:|---:|")
        for r in sorted(c_runs, key=lambda r: r.conns):
            msgs = r.extproc["msgs_sent"]
            b = by.get(("b", r.conns))
            env_added = (r.cpu_us_per_req["envoy"] - b.cpu_us_per_req["envoy"]) / msgs if b else float("nan")
            fake_ratio = r.cpu_us_per_req["fake"] / b.cpu_us_per_req["fake"] if b else float("nan")
            L.append(f"| {r.conns} | {r.extproc['streams']:.2f} | {msgs:.2f} | {r.cpu_us_per_req['python'] / msgs:,.0f} "
                     f"| {env_added:,.0f} | {fake_ratio:.2f} |")
        L.append("")
        L.append("The fake does identical work per request in (b) and (c); its CPU per request still rises in (c). That "
                 "ratio is the inflation every process suffers from fewer requests per wake-up and more context "
                 "switches on this machine, so read the other per-request CPU numbers with it in mind.")
        L.append("")

    # -- streaming
    if streams:
        L.append(f"## Streaming ({STREAM_CHUNKS} chunks paced {TOKEN_DELAY * 1000:g} ms apart by the fake, "
                 "include_usage, asyncio + aiohttp client)")
        L.append("")
        L.append("| conns | target | ok / failed | TTFT p50 ms | TTFT p99 ms | total p50 ms | total p99 ms "
                 "| Envoy CPU µs/chunk | Python CPU µs/chunk | Python CPU µs/req |")
        L.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for s in streams:
            n = len(s.total) + len(s.failures)
            chunks = n * STREAM_CHUNKS
            env_c = s.cpu.get("envoy", float("nan")) / chunks * 1e6 if chunks else float("nan")
            py_c = s.cpu.get("python", float("nan")) / chunks * 1e6 if chunks else float("nan")
            py_r = s.cpu.get("python", float("nan")) / n * 1e6 if n else float("nan")
            failed = len(s.failures)
            L.append(
                f"| {s.conns} | ({s.target}) | {len(s.total)} / {failed if not failed else f'**{failed}**'} "
                f"| {pct(s.ttft, 50) * 1000:.2f} | {pct(s.ttft, 99) * 1000:.2f} "
                f"| {pct(s.total, 50) * 1000:.2f} | {pct(s.total, 99) * 1000:.2f} "
                f"| {f1(env_c)} | {f1(py_c)} | {f1(py_r)} |"
            )
        L.append("")
        L.append("| conns | total p50 (c)/(b) | TTFT p50 added ms | total p50 added ms |")
        L.append("|---:|---:|---:|---:|")
        for c in sorted({s.conns for s in streams}):
            b = next((s for s in streams if s.target == "b" and s.conns == c), None)
            cc = next((s for s in streams if s.target == "c" and s.conns == c), None)
            if b and cc and b.total and cc.total:
                L.append(f"| {c} | {pct(cc.total, 50) / pct(b.total, 50):.3f} "
                         f"| {(pct(cc.ttft, 50) - pct(b.ttft, 50)) * 1000:.2f} "
                         f"| {(pct(cc.total, 50) - pct(b.total, 50)) * 1000:.2f} |")
        L.append("")
        sc_all = [s for s in streams if s.target == "c" and s.extproc.get("msgs_sent")]
        if sc_all:
            L.append("| conns | (c) msgs to Python per stream | Python CPU µs/msg |")
            L.append("|---:|---:|---:|")
            for s in sc_all:
                n = len(s.total) + len(s.failures)
                msgs = s.extproc["msgs_sent"]
                L.append(f"| {s.conns} | {msgs / n:.1f} | {s.cpu.get('python', 0.0) / msgs * 1e6:,.0f} |")
            L.append("")
        fails = [f for s in streams for f in s.failures]
        if fails:
            L.append(f"Stream failures (first 5 of {len(fails)}): " + "; ".join(f"`{f}`" for f in fails[:5]))
            L.append("")

    # -- memory
    L.append("## Memory after the load (VmRSS)")
    L.append("")
    L.append("| process | RSS MB |")
    L.append("|---|---:|")
    names = {"python": "(c) Python ext_proc server (`tollgate run`)", "envoy_c": "(c) Envoy",
             "envoy_b": "(b) Envoy (no ext_proc)", "fake_plain": "fake provider (plain)",
             "fake_stream": "fake provider (paced)"}
    for k, v in memory.items():
        L.append(f"| {names.get(k, k)} | {v:.1f} |")
    L.append("")

    if notes:
        L.append("## Notes from this run")
        L.append("")
        L.extend(f"- {n}" for n in notes)
        L.append("")

    for name, text in profile_text.items():
        L.append(f"## py-spy profile: {name}")
        L.append("")
        L.append("```")
        L.append(text)
        L.append("```")
        L.append("")

    L.append("## How this was measured")
    L.append("")
    L.append(
        f"- One fake OpenAI provider process (`tests/fake_provider.py`, aiohttp + uvloop, no recording) answers the "
        f"non-streaming load; a second one, started with `--chunks {STREAM_CHUNKS} --token-delay {TOKEN_DELAY}`, "
        "answers the streams. Both check the provider key."
    )
    L.append(
        "- (b) is Envoy started from a bootstrap written by this script: one listener per fake, the HTTP connection "
        "manager with only the router, one static cluster per fake, the same buffer limit, timeouts, request-id "
        "and path options as the rendered gateway config, `--concurrency 2 --disable-hot-restart`."
    )
    L.append(
        "- (c) is `tollgate run` started by `tests/harness.py` (`Gateway`, uvloop on) with two openai-type providers "
        "pointing at the fakes and aliases equal to the backend model names, so request bodies pass through "
        "unchanged. Clients send a client key; the gateway replaces it with the provider key (a wrong key would "
        "show up as non-2xx)."
    )
    L.append(
        f"- Non-streaming: the same {PROMPT_BYTES}-byte JSON body for every target, `wrk --latency` with threads = "
        f"min(conns, 2), {args.warmup:g} s warm-up then {args.duration:g} s measured, per concurrency in the order "
        "(a), (b), (c). req/s, p50 and p99 come from wrk (a Lua `done()` hook prints them); non-2xx is wrk's status "
        "error count."
    )
    L.append(
        "- CPU: utime+stime from /proc/PID/stat (clock ticks of "
        f"1/{TICK} s) read right before and after each measured run, divided by the requests wrk completed. "
        "The Envoy of (c) is found as the child of the `tollgate run` process (/proc/PID/task/*/children); "
        "'Python' is the `tollgate run` process itself (the ext_proc server runs in it) plus any other descendant."
    )
    L.append(
        "- Streaming: (b) and (c) alternate in rounds (order flipped every round) for the same number of requests; "
        "TTFT is the time from sending the request to the first `data:` line with non-empty content, total is the "
        "time to the end of the body. A request counts only if it has all 50 content chunks and `[DONE]`. CPU per "
        "chunk = CPU delta ÷ (requests × 50), so it also carries the per-request work."
    )
    L.append(
        "- The machine is shared: load generator, Envoy, the Python server and the fake all run on the same "
        f"{facts.get('nproc', '?')} cores, so absolute req/s mostly measures who competes for CPU; the ratios and "
        "CPU µs per request are the numbers to compare. Per-request CPU is inflated at low load (every message "
        "wakes a cold process); the fake provider's CPU per request, identical work in (b) and (c), shows by how much."
    )
    L.append(
        "- `python -m tests.bench.floor` runs the same Envoy config with do-nothing ext_proc servers (grpc.aio and "
        "grpclib, 1 or 2 gRPC streams per request) to separate the gRPC transport's cost from the gateway's own code."
    )
    L.append("")
    L.append("## Machine")
    L.append("")
    L.append("| | |")
    L.append("|---|---|")
    for k, v in facts.items():
        L.append(f"| {k} | {v} |")
    L.append("")
    return "\n".join(L)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results.md")
    ap.add_argument("--quick", action="store_true", help="short runs, for smoke-testing")
    ap.add_argument("--conns", default="1,16,64", help="wrk concurrencies (default 1,16,64)")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="also record py-spy profiles of the Python server (c16 non-stream and c16 stream) into DIR")
    args = ap.parse_args(argv)
    args.duration = 2.0 if args.quick else 8.0
    args.warmup = 1.0
    stream_plan = [(1, 16), (16, 64)] if args.quick else [(1, 80), (16, 320)]
    stream_rounds = 2 if args.quick else 4
    conc = [int(x) for x in args.conns.split(",") if x.strip()]

    wrk = ensure_wrk()
    facts = machine_facts(wrk)
    started = time.monotonic()
    ticks_start = machine_ticks()
    notes: list[str] = []
    runs: list[Run] = []
    streams: list[StreamStats] = []
    memory: dict[str, float] = {}
    profile_text: dict[str, str] = {}
    labels = {
        "a": "fake provider directly",
        "b": "Envoy alone, plain route (no ext_proc)",
        "c": "full gateway: Envoy + Python ext_proc",
    }

    with tempfile.TemporaryDirectory(prefix="tollgate-bench-") as tmpname:
        tmp = Path(tmpname)
        fakes: list[subprocess.Popen[bytes]] = []
        envoy_b: subprocess.Popen[bytes] | None = None
        gw: Gateway | None = None
        try:
            p_plain, plain_port = start_fake(tmp, "plain", [])
            fakes.append(p_plain)
            p_stream, stream_port = start_fake(
                tmp, "stream", ["--chunks", str(STREAM_CHUNKS), "--token-delay", str(TOKEN_DELAY)])
            fakes.append(p_stream)

            # (b) Envoy with plain routes
            b_plain, b_stream, b_admin = free_port(), free_port(), free_port()
            boot = tmp / "envoy-plain.yaml"
            boot.write_text(yaml.safe_dump(plain_envoy_bootstrap(
                b_admin, [("plain", b_plain, plain_port), ("paced", b_stream, stream_port)])))
            envoy_b = subprocess.Popen(
                [ENVOY, "-c", str(boot), "--concurrency", "2", "--disable-hot-restart", "-l", "warning"],
                stdout=(tmp / "envoy-plain.log").open("ab"), stderr=subprocess.STDOUT,
            )
            wait_ready(b_admin)
            wait_port(b_plain)
            wait_port(b_stream)

            # (c) the gateway
            gdir = tmp / "gateway"
            gdir.mkdir()
            providers = {
                "plain": {"type": "openai", "base_url": f"http://127.0.0.1:{plain_port}/v1",
                          "api_key": {"env": KEY_ENV}},
                "paced": {"type": "openai", "base_url": f"http://127.0.0.1:{stream_port}/v1",
                          "api_key": {"env": KEY_ENV}},
            }
            models = {
                PLAIN_MODEL: {"targets": [{"provider": "plain", "model": PLAIN_MODEL}]},
                STREAM_MODEL: {"targets": [{"provider": "paced", "model": STREAM_MODEL}]},
            }
            gw = Gateway(gdir, {"providers": providers, "models": models}, env={KEY_ENV: PROVIDER_KEY})
            gw.start()
            assert gw.proc is not None
            kids = descendants(gw.proc.pid)
            envoy_c = [p for p in kids if comm(p) == "envoy"]
            if len(envoy_c) != 1:
                raise RuntimeError(f"expected one envoy under tollgate run, found {envoy_c} among {kids}")
            python_pids = [gw.proc.pid] + [p for p in kids if p not in envoy_c and p not in descendants(envoy_c[0])]
            if len(python_pids) > 1:
                notes.append(f"`tollgate run` had {len(python_pids) - 1} extra non-Envoy descendant(s); "
                             "their CPU is counted as Python.")

            targets = {
                "a": Target("a", labels["a"], f"http://127.0.0.1:{plain_port}", None, PROVIDER_KEY,
                            {"fake": [p_plain.pid]}),
                "b": Target("b", labels["b"], f"http://127.0.0.1:{b_plain}", f"http://127.0.0.1:{b_stream}",
                            PROVIDER_KEY, {"envoy": [envoy_b.pid], "fake": [p_plain.pid]}),
                "c": Target("c", labels["c"], f"http://127.0.0.1:{gw.port}", f"http://127.0.0.1:{gw.port}",
                            CLIENT_KEY, {"envoy": envoy_c, "python": python_pids, "fake": [p_plain.pid]},
                            extproc_admin=gw.admin_port),
            }

            rss_trail: list[tuple[float, float]] = []  # (requests (c) has served in measured runs, Python RSS MB)

            # sanity: one request through each target
            plain_body = chat_body(PLAIN_MODEL, stream=False)
            stream_body = chat_body(STREAM_MODEL, stream=True)
            for t in targets.values():
                status, headers, obj = check_once(f"{t.base}/v1/chat/completions", plain_body, t.auth)
                ok = status == 200 and isinstance(obj, dict) and obj.get("choices")
                if not ok:
                    raise RuntimeError(f"target ({t.key}) answered {status}: {str(obj)[:300]}")
                if t.key == "c" and headers.get("x-tollgate-provider") != "plain":
                    raise RuntimeError(f"the gateway did not route to the fake: {headers}")
                t.script = wrk_script(tmp / f"wrk-{t.key}.lua", plain_body, t.auth)
            notes.append(f"request body: {len(plain_body)} bytes (non-streaming), {len(stream_body)} bytes (streaming)")

            # -- non-streaming, wrk
            for c in conc:
                for key in ("a", "b", "c"):
                    t = targets[key]
                    url = f"{t.base}/v1/chat/completions"
                    assert t.script is not None
                    run_wrk(url, t.script, c, args.warmup)
                    before, cb = t.cpu(), t.counters()
                    w = run_wrk(url, t.script, c, args.duration)
                    after, ca = t.cpu(), t.counters()
                    n = max(1.0, w["requests"])
                    cpu = {role: (after[role] - before[role]) / n * 1e6 for role in before}
                    ext = {k: (ca[k] - cb[k]) / n for k in cb}
                    runs.append(Run(key, c, w, cpu, ext))
                    if key == "c":
                        done = sum(r.wrk["requests"] for r in runs if r.target == "c")
                        rss_trail.append((done, sum(rss_mb(p) for p in python_pids)))
                    print(f"  c{c:<3} ({key}) {w['rps']:8,.0f} req/s  p50 {w['p50_us'] / 1000:6.2f} ms  "
                          f"p99 {w['p99_us'] / 1000:6.2f} ms  non2xx {int(w['non2xx'])}  "
                          + "  ".join(f"{r} {v:,.0f}µs" for r, v in cpu.items()), file=sys.stderr, flush=True)
                    if w["non2xx"] or w["err_connect"] or w["err_read"] or w["err_write"] or w["err_timeout"]:
                        notes.append(f"({key}) at c{c}: {int(w['non2xx'])} non-2xx, "
                                     f"{int(w['err_connect'] + w['err_read'] + w['err_write'])} socket errors, "
                                     f"{int(w['err_timeout'])} timeouts")
            if args.profile:
                # An extra, unmeasured run: py-spy's own CPU must not leak into the table.
                args.profile.mkdir(parents=True, exist_ok=True)
                out = args.profile / "nonstream-c16.txt"
                spy = start_py_spy(python_pids[0], args.duration, out)
                if spy is not None:
                    t = targets["c"]
                    assert t.script is not None
                    run_wrk(f"{t.base}/v1/chat/completions", t.script, 16, args.duration + 1)
                    spy.wait(60)
                    profile_text["(c) non-streaming, c16"] = summarize_collapsed(out)

            # -- streaming
            st = [targets["b"], targets["c"]]
            for t in st:  # streams use the paced fake: swap the fake whose CPU we read
                t.roles = {**t.roles, "fake": [p_stream.pid]}

            async def stream_all() -> list[StreamStats]:
                out = await streaming(st, stream_plan, stream_rounds, stream_body)
                if args.profile:
                    # A separate c16 batch on (c) only, after the measured ones, so py-spy stays out of the table.
                    args.profile.mkdir(parents=True, exist_ok=True)
                    spy = start_py_spy(python_pids[0], 4, args.profile / "stream-c16.txt")
                    if spy is not None:
                        deadline = time.monotonic() + 5
                        while time.monotonic() < deadline:
                            await stream_batch(targets["c"], 16, 64, stream_body, None)
                        spy.wait(60)
                        profile_text["(c) streaming, c16"] = summarize_collapsed(args.profile / "stream-c16.txt")
                return out

            try:
                import uvloop

                streams = uvloop.run(stream_all())
            except ImportError:
                streams = asyncio.run(stream_all())
            for s in streams:
                print(f"  stream c{s.conns:<3} ({s.target}) ok {len(s.total)} failed {len(s.failures)}  "
                      f"ttft p50 {pct(s.ttft, 50) * 1000:.2f} ms  total p50 {pct(s.total, 50) * 1000:.2f} ms",
                      file=sys.stderr, flush=True)

            # -- memory after the load
            memory["python"] = sum(rss_mb(p) for p in python_pids)
            if len(rss_trail) >= 2:
                (n0, r0), (n1, r1) = rss_trail[0], rss_trail[-1]
                trail = ", ".join(f"{mb:.1f} MB after {n:,.0f}" for n, mb in rss_trail)
                notes.append(f"Python RSS after each non-streaming (c) run: {trail} requests — "
                             f"{(r1 - r0) * 1024 * 1024 / max(n1 - n0, 1):,.0f} bytes per request after the first run "
                             "(a steady climb here means memory grows with traffic; check with a longer soak).")
            memory["envoy_c"] = rss_mb(envoy_c[0])
            memory["envoy_b"] = rss_mb(envoy_b.pid)
            memory["fake_plain"] = rss_mb(p_plain.pid)
            memory["fake_stream"] = rss_mb(p_stream.pid)

            errors = [line for line in gw.log().splitlines()
                      if "Traceback" in line or "exchange failed" in line or "ERROR" in line]
            if errors:
                notes.append(f"the gateway log has {len(errors)} error line(s), first: `{errors[0][:200]}`")
        finally:
            if gw is not None:
                gw.stop()
            stop_process(envoy_b)
            for p in fakes:
                stop_process(p)

    ticks = [b - a for a, b in zip(ticks_start, machine_ticks())]
    if sum(ticks):
        busy = 1 - (ticks[3] + ticks[4]) / sum(ticks)
        steal = ticks[7] / sum(ticks) if len(ticks) > 7 else 0.0
        facts["CPU busy / steal during the run"] = f"{busy:.0%} / {steal:.1%}"
    report = render_report(facts, args, runs, streams, memory, labels, notes, time.monotonic() - started,
                           profile_text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
