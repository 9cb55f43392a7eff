"""Soak: the full pipeline with quotas at 70 % of its measured maximum, for minutes, on each store.

    python -m tests.bench.soak --minutes 10 --out tests/bench/soak.md   # the issue's run: ~22 minutes
    python -m tests.bench.soak --minutes 1 --out tests/bench/soak.md    # what `make bench` runs

For the embedded store (SQLite state file) and for a local redis-server (AOF on), each on a gateway of
its own (``tollgate run``: Envoy + the Python server; quotas on four limits that never refuse, metrics
and the access log on) answered by the fake provider in its own process:

1. the maximum: ``wrk`` at 16 connections for 5 s (after a 2 s warm-up);
2. the soak: ``wrk`` paced to 70 % of that rate (a LuaJIT ``delay()`` hands each request its time
   slot, so the rate holds whatever the latency), in back-to-back windows; each window stops sending
   1.5 s before it ends, so no request is in flight when ``wrk`` counts. After each window: its p99
   and the Python server's RSS;
3. SIGTERM, then the ledger is counted (SQLite rows / the Redis stream's length) against the
   requests ``wrk`` saw answered during the soak.

Reported per store: rate, served, errors (non-2xx, timeouts, socket errors), ledger records added,
RSS first window -> last, p99 first window -> last. Every process started here is stopped again.
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis as redis_sync

from tests.bench.pipeline import gateway_pids
from tests.bench.run import (
    CLIENT_KEY, KEY_ENV, PROVIDER_KEY, WRK_FIELDS, chat_body, check_once, ensure_wrk, machine_facts, run_wrk,
    start_fake, stop_process, wrk_script,
)
from tests.harness import Gateway
from tests.quota.redis_process import RedisProcess

MODEL = "soak"
QUOTA = {"limits": {"org": {"usd_per_day": 1_000_000},
                    "teams": {"*": {"usd_per_day": 100_000}},
                    "aliases": {"*": {"tokens_per_minute": 1_000_000_000, "requests_per_minute": 10_000_000}}}}

PACER = """
local ffi = require("ffi")
ffi.cdef[[ typedef struct { long tv_sec; long tv_nsec; } soak_ts; int clock_gettime(int, soak_ts *); ]]
local ts = ffi.new("soak_ts")
local function now_ms()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local interval, stop_after, slot, started
function init(args)
  interval = tonumber(args[1])   -- ms between two requests of this thread
  stop_after = tonumber(args[2]) -- ms after the first request: send nothing more
end
function delay()
  local t = now_ms()
  if slot == nil then
    slot, started = t, t
  end
  if t - started > stop_after then
    return 3600000
  end
  slot = slot + interval
  local d = slot - t
  if d < 0 then
    return 0
  end
  return d
end
"""


@dataclass
class Window:
    served: int
    errors: int
    p99_ms: float
    rss_mb: float
    kinds: str = ""  # the errors by kind: non-2xx answers, client timeouts (10 s), socket errors
    redis: str = ""  # redis-server during the window: CPU, append-only file size, rewrites, slow events


@dataclass
class Soak:
    store: str
    max_rps: float = 0.0
    rate: float = 0.0
    windows: list[Window] = field(default_factory=list)
    ledger_added: int = 0
    stop_seconds: float = 0.0

    @property
    def served(self) -> int:
        return sum(w.served for w in self.windows)

    @property
    def errors(self) -> int:
        return sum(w.errors for w in self.windows)


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def redis_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime (clock ticks of 10 ms)


class RedisWatch:
    """What redis-server did during a window: its CPU, its append-only file, its own latency events.

    The Redis soak's tail is compared with these to tell the gateway's work from Redis's persistence work
    (fsync, AOF rewrites forked as the file grows)."""

    def __init__(self, redis: RedisProcess) -> None:
        assert redis.proc is not None
        self.pid = redis.proc.pid
        self.client = redis_sync.Redis.from_url(redis.url)
        self.client.config_set("latency-monitor-threshold", 10)  # record every event that took >= 10 ms
        self.cpu = redis_cpu_seconds(self.pid)
        self.forks = self._forks()
        self.calls = self._script_calls()
        self.client.latency_reset()

    def _persistence(self) -> dict[str, Any]:
        return dict(self.client.info("persistence"))

    def _forks(self) -> int:  # each AOF rewrite is a fork (snapshots are off)
        return int(self.client.info("stats").get("total_forks", 0))

    def _script_calls(self) -> tuple[int, int]:
        """Script calls so far and the microseconds Redis spent in them (its own clock, whatever the load)."""
        stats = self.client.info("commandstats")
        calls = sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
        usec = sum(int(v["usec"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
        return calls, usec

    def window(self, seconds: float) -> str:
        cpu = redis_cpu_seconds(self.pid)
        info = self._persistence()
        events = self.client.execute_command("LATENCY", "LATEST")
        self.client.latency_reset()
        slow = ", ".join(f"{e[0].decode() if isinstance(e[0], bytes) else e[0]} max {e[3]} ms" for e in events)
        forks = self._forks()
        rewrites, self.forks = forks - self.forks, forks
        used = int(self.client.info("memory")["used_memory"]) / 2**20
        calls, usec = self._script_calls()
        per_call = (usec - self.calls[1]) / max(1, calls - self.calls[0])
        self.calls = (calls, usec)
        text = (f"CPU {100 * (cpu - self.cpu) / seconds:.0f} %, {per_call:.0f} µs per script call, AOF {int(info.get('aof_current_size', 0)) / 2**20:.0f} MB, "
                f"data {used:.0f} MB, {rewrites} rewrite(s), slow events: {slow or 'none'}")
        self.cpu = cpu
        return text


def paced_wrk(url: str, script: Path, rate: float, seconds: float, conns: int = 32) -> dict[str, float]:
    threads = 2
    interval = 1000.0 * threads / rate
    cmd = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{round(seconds)}s", "--latency", "--timeout", "10s",
           "-s", str(script), url, "--", f"{interval:.4f}", f"{(seconds - 1.5) * 1000:.0f}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    for line in r.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return dict(zip(WRK_FIELDS, (float(x) for x in line.split()[1:]), strict=True))
    raise RuntimeError(f"wrk gave no result (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")


def ledger_count(store: str, gw: Gateway, redis: RedisProcess) -> int:
    if store == "redis":
        client = redis_sync.Redis.from_url(redis.url)
        try:
            return int(client.xlen("{tollgate}:usage"))
        finally:
            client.close()
    path = gw.tmp / "state" / "tollgate" / "quota.sqlite3"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(db.execute("select count(*) from ledger").fetchone()[0])
    finally:
        db.close()


def soak(store: str, tmp: Path, fake_port: int, redis: RedisProcess, minutes: float, window_s: float) -> Soak:
    d = tmp / f"gw-{store}"
    d.mkdir()
    cfg: dict[str, Any] = {
        "providers": {"fake": {"type": "openai", "base_url": f"http://127.0.0.1:{fake_port}/v1",
                               "api_key": {"env": KEY_ENV}}},
        "models": {MODEL: {"targets": [{"provider": "fake", "model": "gpt-4o-mini"}]}},
        "quota": QUOTA,
    }
    if store == "redis":
        cfg["redis"] = {"url": redis.url}
    gw = Gateway(d, cfg, env={KEY_ENV: PROVIDER_KEY, "XDG_STATE_HOME": str(d / "state")}).start()
    result = Soak(store)
    try:
        url = f"{gw.base_url}/chat/completions"
        body = chat_body(MODEL, stream=False)
        status, _, obj = check_once(url, body, CLIENT_KEY)
        if status != 200:
            raise RuntimeError(f"{store}: the gateway answered {status}: {str(obj)[:300]}")
        plain = wrk_script(tmp / f"wrk-{store}.lua", body, CLIENT_KEY)
        paced = tmp / f"wrk-{store}-paced.lua"
        paced.write_text(plain.read_text() + PACER)
        run_wrk(url, plain, 16, 2)
        peak = run_wrk(url, plain, 16, 5)
        result.max_rps = peak["rps"]
        result.rate = 0.7 * peak["rps"]
        time.sleep(2)  # let the peak's settlements land before counting
        before = ledger_count(store, gw, redis)
        pids = gateway_pids(gw)["python"]
        watch = RedisWatch(redis) if store == "redis" else None
        for i in range(max(1, round(minutes * 60 / window_s))):
            w = paced_wrk(url, paced, result.rate, window_s)
            socket = int(w["err_connect"] + w["err_read"] + w["err_write"])
            errors = int(w["non2xx"] + w["err_timeout"]) + socket
            kinds = f"{int(w['non2xx'])} non-2xx, {int(w['err_timeout'])} timeouts, {socket} socket"
            result.windows.append(Window(int(w["requests"] - w["non2xx"]), errors, w["p99_us"] / 1000, rss_mb(pids),
                                         kinds, watch.window(window_s) if watch else ""))
            last = result.windows[-1]
            print(f"  {store} window {i + 1}: {last.served} served, {last.errors} errors ({kinds}), "
                  f"p99 {last.p99_ms:.1f} ms, RSS {last.rss_mb:.0f} MB {last.redis}", file=sys.stderr, flush=True)
        started = time.monotonic()
        code = gw.stop()  # SIGTERM: everything pending must be settled and recorded before it exits
        result.stop_seconds = time.monotonic() - started
        if code != 0:
            raise RuntimeError(f"{store}: the gateway exited with {code} on SIGTERM")
        result.ledger_added = ledger_count(store, gw, redis) - before
    finally:
        gw.stop()
    return result


def render(results: list[Soak], minutes: float, window_s: float, facts: dict[str, str], fsync: str) -> str:
    lines = [
        f"# Soak: {minutes:g} minutes at 70 % of the maximum, per store (`python -m tests.bench.soak`)", "",
        f"Machine: {facts.get('CPU', '?')}, {facts.get('nproc', '?')} cores, load average at start "
        f"{facts.get('load average at start', '?')} (at end {' '.join(Path('/proc/loadavg').read_text().split()[:3])}); "
        f"windows of {window_s:g} s; non-streaming ~2 KB chat prompt, quotas on 4 limits (requests, tokens, "
        f"two budgets), metrics and access log on; redis-server with appendonly yes, appendfsync {fsync}.", "",
        "| store | max req/s | soak req/s | served | errors | ledger records added | RSS first → last window (MB) "
        "| p99 first → last window (ms) |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        first, last = r.windows[0], r.windows[-1]
        growth = (last.rss_mb - first.rss_mb) / first.rss_mb * 100 if first.rss_mb else 0.0
        lines.append(
            f"| {r.store} | {r.max_rps:,.0f} | {r.rate:,.0f} | {r.served:,} | {r.errors} | {r.ledger_added:,} "
            f"({'=' if r.ledger_added == r.served else '≠'} served) | {first.rss_mb:.0f} → {last.rss_mb:.0f} "
            f"({growth:+.1f} %) | {first.p99_ms:.1f} → {last.p99_ms:.1f} (×{last.p99_ms / max(first.p99_ms, 1e-9):.2f}) |")
    for r in results:
        lines.append("")
        lines.append(f"{r.store} per window (served / errors / p99 ms / RSS MB): " + "; ".join(
            f"{w.served} / {w.errors}{f' ({w.kinds})' if w.errors else ''} / {w.p99_ms:.0f} / {w.rss_mb:.0f}"
            for w in r.windows))
        if any(w.redis for w in r.windows):
            lines.append("")
            lines.append(f"{r.store}: redis-server per window: " + "; ".join(
                f"{i + 1}) {w.redis}" for i, w in enumerate(r.windows)))
    lines += ["", "SIGTERM to exit, after the last window: " +
              ", ".join(f"{r.store} {r.stop_seconds:.1f} s" for r in results) + "."]
    return "\n".join(lines) + "\n"


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="soak duration per store (default 10)")
    ap.add_argument("--window", type=float, default=0.0, help="seconds per measuring window (default: a tenth)")
    ap.add_argument("--stores", default="embedded,redis")
    ap.add_argument("--appendfsync", default="everysec", choices=("everysec", "always", "no"),
                    help="redis-server's fsync policy (default everysec, what README and k8s/ advise)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):  # stopping the bench stops what it started (finally below)
        signal.signal(sig, _interrupt)
    window_s = args.window or max(10.0, args.minutes * 6)
    facts = machine_facts(ensure_wrk())
    results = []
    with tempfile.TemporaryDirectory(prefix="tollgate-soak-") as name:
        tmp = Path(name)
        fake, port = start_fake(tmp, "soak", [])
        redis = RedisProcess(tmp / "redis", appendonly=True, appendfsync=args.appendfsync).start()
        try:
            for store in args.stores.split(","):
                results.append(soak(store, tmp, port, redis, args.minutes, window_s))
        finally:
            redis.stop()
            stop_process(fake)
    text = render(results, args.minutes, window_s, facts, args.appendfsync)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
