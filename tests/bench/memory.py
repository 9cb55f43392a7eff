"""The serving ext_proc worker's RSS under sustained load, per allocator.

    python -m tests.bench.memory --out tests/bench/memory.md [--windows 8] [--window 15] [--allocators default,malloc]

One gateway per allocator (``tollgate run``, base config: auth none, no quotas, metrics and access log
on; ``default`` is Python's own small-object allocator, ``malloc`` sets ``PYTHONMALLOC=malloc``), each
driven by wrk at 16 connections in back-to-back windows, the gateways taking turns window by window so
the machine's noise falls on all. After each window the serving worker's RSS (not the supervisor's or
the standby's) is read. Growth is reported per request from the end of the first window (the warm-up:
caches, pools, first-use imports) to the end of the last, with the requests served in between. Every
process started here is stopped again.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.pipeline import PLAIN, UPSTREAM_KEY, configs
from tests.bench.run import CLIENT_KEY, KEY_ENV, chat_body, check_once, ensure_wrk, run_wrk, start_fake, \
    stop_process, wrk_script
from tests.bench.soak import rss_mb
from tests.harness import Gateway


def serving_worker(gw: Gateway) -> int:
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window", type=float, default=15.0, help="seconds per window")
    ap.add_argument("--allocators", default="default")
    args = ap.parse_args(argv)
    ensure_wrk()
    load_before = os.getloadavg()
    rows: dict[str, list[tuple[int, float]]] = {a: [] for a in args.allocators.split(",")}
    with tempfile.TemporaryDirectory(prefix="tollgate-memory-") as name:
        tmp = Path(name)
        fake, port = start_fake(tmp, "openai-plain", ["--kind", "openai", "--api-key", UPSTREAM_KEY])
        gateways: dict[str, Gateway] = {}
        try:
            ports = {"openai-plain": port, "openai-paced": port, "anthropic-plain": port, "anthropic-paced": port}
            cfg = configs(ports, tmp, "redis://127.0.0.1:1")[0]["base"]
            for allocator in rows:
                d = tmp / allocator
                d.mkdir()
                env = {KEY_ENV: UPSTREAM_KEY, **({"PYTHONMALLOC": allocator} if allocator != "default" else {})}
                gateways[allocator] = Gateway(d, cfg, env=env).start()
            body = chat_body(PLAIN, stream=False)
            script = wrk_script(tmp / "wrk.lua", body, CLIENT_KEY)
            pids = {}
            for allocator, gw in gateways.items():
                status, _, obj = check_once(f"{gw.base_url}/chat/completions", body, CLIENT_KEY)
                if status != 200:
                    raise RuntimeError(f"{allocator} answered {status}: {str(obj)[:300]}")
                pids[allocator] = serving_worker(gw)
            time.sleep(3)  # the standbys start 2 s after each gateway
            for w in range(args.windows):
                for allocator, gw in gateways.items():
                    got = run_wrk(f"{gw.base_url}/chat/completions", script, 16, args.window)
                    rows[allocator].append((int(got["requests"]), rss_mb([pids[allocator]])))
                    print(f"  window {w + 1} {allocator:8} {int(got['requests']):7} requests, "
                          f"RSS {rows[allocator][-1][1]:.1f} MB", file=sys.stderr, flush=True)
        finally:
            for gw in gateways.values():
                gw.stop()
            stop_process(fake)
    text = render(rows, load_before, os.getloadavg(), args.window)
    args.out.write_text(text)
    print(text)
    return 0


def render(rows: dict[str, list[tuple[int, float]]], before: tuple[float, float, float],
           after: tuple[float, float, float], window: float) -> str:
    lines = [
        "# The serving ext_proc worker's RSS under load",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `python -m tests.bench.memory`: base gateway, wrk c=16, "
        f"windows of {window:g} s taken in turn. Load average before {before[0]:.2f} / {before[1]:.2f} / "
        f"{before[2]:.2f}, after {after[0]:.2f} / {after[1]:.2f} / {after[2]:.2f} (2 shared cores).",
        "",
        "| allocator | requests after warm-up | RSS after warm-up → last window (MB) | growth | bytes per request |",
        "|---|---:|---:|---:|---:|",
    ]
    for allocator, got in rows.items():
        served = sum(n for n, _ in got[1:])
        first, last = got[0][1], got[-1][1]
        per = (last - first) * 1e6 / served if served else 0.0
        lines.append(f"| {allocator} | {served:,} | {first:.1f} → {last:.1f} | {(last - first) / first * 100:+.1f} % | "
                     f"{per:.0f} |")
    lines += ["", "Per window (requests / RSS MB): " + "; ".join(
        f"{a}: " + ", ".join(f"{n} / {r:.1f}" for n, r in got) for a, got in rows.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
