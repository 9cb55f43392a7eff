"""The serving ext_proc worker's RSS at 70 % of the maximum rate, per way Envoy ends ext_proc streams.

    python -m tests.bench.memory --out tests/bench/memory.md [--minutes 10] [--window 30]
        [--pipelines full] [--closes reset,graceful]

One gateway (``tollgate run``) per pipeline and ``envoy.ext_proc_close`` value, side by side on the same
fake provider: ``base`` is auth none, no quotas, metrics and access log on; ``full`` adds JWT auth and
quotas on a local redis-server (each gateway its own key prefix, so its own ledger stream). ``reset`` is
Envoy's own default (every ext_proc stream still open when its request ends is cancelled), ``graceful``
what the rendered bootstrap does (half-close, the server ends the stream).

Each gateway's maximum is measured first (wrk, 16 connections, 5 s after a 2 s warm-up); then every
gateway is driven at 70 % of its own maximum (wrk paced per request, the soak's pacer) in back-to-back
windows, the gateways taking turns window by window so the machine's noise falls on all. After each
window the serving worker's RSS is read (not the supervisor's or the idle standby's). Reported: growth
from the end of the first window (the warm-up: caches, pools, first-use imports) to the end of the last,
per request served in between; the largest window against the warmed-up one (the goal: within 10 %);
failed requests by kind; the ext_proc streams Envoy opened and reset (its own counters); and for
``full``, the ledger records added against the requests served. Every process started here is stopped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis as redis_sync

from tests.bench.pipeline import PLAIN, UPSTREAM_KEY, configs
from tests.bench.run import KEY_ENV, CLIENT_KEY, chat_body, check_once, ensure_wrk, run_wrk, start_fake, \
    wrk_script, stop_process
from tests.bench.soak import PACER, paced_wrk, rss_mb
from tests.harness import Gateway
from tests.quota.redis_process import RedisProcess

FAILURES = ("non2xx", "err_timeout", "err_connect", "err_read", "err_write")  # wrk's counts (non2xx: >= 400)


@dataclass
class Subject:
    pipeline: str
    close: str
    gw: Gateway
    bearer: str
    prefix: str
    max_rps: float = 0.0
    windows: list[tuple[int, float]] = field(default_factory=list)  # (requests answered 2xx, RSS MB)
    failed: dict[str, int] = field(default_factory=dict)
    streams: dict[str, int] = field(default_factory=dict)  # Envoy's ext_proc cluster counters, whole run
    ledger_added: int | None = None

    @property
    def label(self) -> str:
        return f"{self.pipeline}, {self.close}"


def serving_worker(gw: Gateway) -> int:
    """The ext_proc child that listens (the warm standby listens on nothing)."""
    assert gw.proc is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kids = subprocess.run(["pgrep", "-P", str(gw.proc.pid), "-f", "extproc extproc"], capture_output=True,
                              text=True).stdout.split()
        listening = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
        serving = [int(p) for p in kids if f"pid={p}," in listening]
        if len(serving) == 1:
            return serving[0]
        time.sleep(0.2)
    raise RuntimeError("no serving worker found")


def ext_proc_streams(admin_port: int) -> dict[str, int]:
    url = f"http://127.0.0.1:{admin_port}/stats?filter=^cluster\\.tollgate_extproc\\.upstream_rq_(total|tx_reset)$"
    with urllib.request.urlopen(url, timeout=5) as r:
        stats = dict(line.split(": ", 1) for line in r.read().decode().splitlines() if ": " in line)
    return {"opened": int(stats["cluster.tollgate_extproc.upstream_rq_total"]),
            "reset": int(stats["cluster.tollgate_extproc.upstream_rq_tx_reset"])}


def ledger_length(redis: RedisProcess, prefix: str) -> int:
    client = redis_sync.Redis.from_url(redis.url)
    try:
        return int(client.xlen(f"{{{prefix}}}:usage"))
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=10.0, help="paced load per gateway (default 10)")
    ap.add_argument("--window", type=float, default=30.0, help="seconds per window")
    ap.add_argument("--pipelines", default="full")
    ap.add_argument("--closes", default="reset,graceful")
    args = ap.parse_args(argv)
    ensure_wrk()
    load_before = os.getloadavg()
    started = time.monotonic()
    subjects: list[Subject] = []
    with tempfile.TemporaryDirectory(prefix="tollgate-memory-") as name:
        tmp = Path(name)
        fake, port = start_fake(tmp, "openai-plain", ["--kind", "openai", "--api-key", UPSTREAM_KEY])
        pipelines = args.pipelines.split(",")
        redis = RedisProcess(tmp / "redis", appendonly=True, appendfsync="everysec").start() \
            if "full" in pipelines else None
        try:
            ports = {"openai-plain": port, "openai-paced": port, "anthropic-plain": port, "anthropic-paced": port}
            cfgs, token = configs(ports, tmp, redis.url if redis else "redis://127.0.0.1:1")
            for pipeline in pipelines:
                for close in args.closes.split(","):
                    d = tmp / f"{pipeline}-{close}"
                    d.mkdir()
                    prefix = f"mem{pipeline}{close}"
                    cfg: dict[str, Any] = {**cfgs[pipeline], "envoy": {"ext_proc_close": close}}
                    if "redis" in cfg:
                        cfg["redis"] = {**cfg["redis"], "key_prefix": prefix}
                    gw = Gateway(d, cfg, env={KEY_ENV: UPSTREAM_KEY, "XDG_STATE_HOME": str(d / "state")}).start()
                    subjects.append(Subject(pipeline, close, gw, token if pipeline == "full" else CLIENT_KEY, prefix))
            measure(subjects, tmp, redis, args.minutes, args.window)
        finally:
            for s in subjects:
                s.gw.stop()
            stop_process(fake)
            if redis is not None:
                redis.stop()
    text = render(subjects, load_before, os.getloadavg(), args.window, time.monotonic() - started)
    args.out.write_text(text)
    print(text)
    return 0


def measure(subjects: list[Subject], tmp: Path, redis: RedisProcess | None, minutes: float, window: float) -> None:
    body = chat_body(PLAIN, stream=False)
    paced: dict[str, Path] = {}
    ledger_before: dict[str, int] = {}
    for s in subjects:
        url = f"{s.gw.base_url}/chat/completions"
        status, _, obj = check_once(url, body, s.bearer)
        if status != 200:
            raise RuntimeError(f"{s.label} answered {status}: {str(obj)[:300]}")
        plain = wrk_script(tmp / f"wrk-{s.pipeline}.lua", body, s.bearer)
        paced[s.label] = tmp / f"wrk-{s.pipeline}-paced.lua"
        paced[s.label].write_text(plain.read_text() + PACER)
        run_wrk(url, plain, 16, 2)
        s.max_rps = run_wrk(url, plain, 16, 5)["rps"]
        print(f"  {s.label}: max {s.max_rps:.0f} req/s", file=sys.stderr, flush=True)
    time.sleep(3)  # the peak's settlements land before the ledger is counted
    for s in subjects:
        if redis is not None and s.pipeline == "full":
            ledger_before[s.label] = ledger_length(redis, s.prefix)
        s.streams = ext_proc_streams(s.gw.admin_port)
    for i in range(max(2, round(minutes * 60 / window))):
        for s in subjects:
            w = paced_wrk(f"{s.gw.base_url}/chat/completions", paced[s.label], 0.7 * s.max_rps, window)
            s.windows.append((int(w["requests"] - w["non2xx"]), rss_mb([serving_worker(s.gw)])))
            for kind in FAILURES:
                s.failed[kind] = s.failed.get(kind, 0) + int(w[kind])
            print(f"  window {i + 1} {s.label:16} {s.windows[-1][0]:6} served, RSS {s.windows[-1][1]:.1f} MB, "
                  f"failed {sum(int(w[k]) for k in FAILURES)}", file=sys.stderr, flush=True)
    for s in subjects:
        after = ext_proc_streams(s.gw.admin_port)
        s.streams = {k: after[k] - s.streams[k] for k in after}
    for s in subjects:
        if s.label in ledger_before and redis is not None:
            s.gw.stop()  # SIGTERM: every pending settlement is recorded before the gateway exits
            s.ledger_added = ledger_length(redis, s.prefix) - ledger_before[s.label]


def render(subjects: list[Subject], before: tuple[float, float, float], after: tuple[float, float, float],
           window: float, took: float) -> str:
    lines = [
        "# The serving ext_proc worker's RSS at 70 % of the maximum rate",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `python -m tests.bench.memory` in {took / 60:.0f} min: "
        f"windows of {window:g} s taken in turn, each gateway paced at 70 % of its own maximum (wrk c=16). "
        f"Load average before {before[0]:.2f} / {before[1]:.2f} / {before[2]:.2f}, after {after[0]:.2f} / "
        f"{after[1]:.2f} / {after[2]:.2f} (2 shared cores). `reset`: Envoy's default end of an ext_proc stream; "
        "`graceful`: what Tollgate renders (`envoy.ext_proc_close`).",
        "",
        "| pipeline, close | max req/s | paced req/s | served after warm-up | failed | ext_proc streams reset / opened "
        "| ledger records added | RSS after warm-up → last window (MB) | growth | largest window vs warm-up "
        "| bytes per request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in subjects:
        served = sum(n for n, _ in s.windows[1:])
        total = sum(n for n, _ in s.windows)
        first, last = s.windows[0][1], s.windows[-1][1]
        top = max(r for _, r in s.windows)
        per = (last - first) * 1e6 / served if served else 0.0
        failed = ", ".join(f"{n} {k}" for k, n in s.failed.items() if n) or "0"
        ledger = "–" if s.ledger_added is None else \
            f"{s.ledger_added:,} ({'=' if s.ledger_added == total else '≠'} {total:,} served)"
        lines.append(
            f"| {s.label} | {s.max_rps:,.0f} | {0.7 * s.max_rps:,.0f} | {served:,} | {failed} | "
            f"{s.streams.get('reset', 0):,} / {s.streams.get('opened', 0):,} | {ledger} | {first:.1f} → {last:.1f} | "
            f"{(last - first) / first * 100:+.1f} % | {(top - first) / first * 100:+.1f} % | {per:.0f} |")
    lines += ["", "Per window (served / RSS MB):", ""] + [
        f"- {s.label}: " + ", ".join(f"{n} / {r:.1f}" for n, r in s.windows) for s in subjects]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
