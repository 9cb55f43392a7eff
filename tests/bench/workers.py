"""One ext_proc worker against two (``extproc.workers``), side by side in one run.

    python -m tests.bench.workers --out tests/bench/workers.md [--quick]

The same gateway configs as tests/bench/pipeline.py (``base``: auth none, no
quotas; ``full``: JWT, quotas on a local redis-server, metrics, access log),
each started once with one worker and once with two, answering the same ~2 KB
chat prompt from one fake OpenAI. wrk at concurrency 16 (and 32), several
rounds, the order rotated every round so the machine's noise falls on every
target alike: median with the spread (min–max). CPU per request is Envoy +
every Python process of the gateway (+ redis-server for ``full``). The load
average is read before and after: on a shared machine it says how much of the
2 cores were really ours.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench.pipeline import PLAIN, UPSTREAM_KEY, Subject, configs, gateway_pids, measure, spread
from tests.bench.run import CLIENT_KEY, KEY_ENV, chat_body, check_once, ensure_wrk, machine_facts, start_fake, \
    stop_process, wrk_script
from tests.harness import Gateway
from tests.quota.redis_process import RedisProcess


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="short runs, for smoke-testing")
    args = ap.parse_args(argv)
    seconds, rounds = (2.0, 2) if args.quick else (5.0, 3)
    facts = machine_facts(ensure_wrk())
    load_before = os.getloadavg()
    started = time.monotonic()
    results: dict[int, list[Subject]] = {}
    with tempfile.TemporaryDirectory(prefix="tollgate-workers-") as name:
        tmp = Path(name)
        redis = RedisProcess(tmp / "redis").start()
        fake, port = start_fake(tmp, "openai-plain", ["--kind", "openai", "--api-key", UPSTREAM_KEY])
        gateways: list[Gateway] = []
        try:
            ports = {"openai-plain": port, "openai-paced": port, "anthropic-plain": port, "anthropic-paced": port}
            cfgs, token = configs(ports, tmp, redis.url)
            subjects: list[Subject] = []
            for key in ("base", "full"):
                for workers in (1, 2):
                    d = tmp / f"gw-{key}-{workers}"
                    d.mkdir()
                    cfg: dict[str, Any] = {**cfgs[key], "extproc_workers": workers}
                    gw = Gateway(d, cfg, env={KEY_ENV: UPSTREAM_KEY}).start()
                    gateways.append(gw)
                    roles = gateway_pids(gw)
                    if key == "full":
                        roles["redis"] = [redis.proc.pid] if getattr(redis, "proc", None) else []
                    base = gw.base_url.removesuffix("/v1")
                    subjects.append(Subject(f"{key} ×{workers}", base, None, token if key == "full" else CLIENT_KEY,
                                            PLAIN, PLAIN, roles))
            time.sleep(3)  # the standbys start 2 s after each gateway: not during a measurement
            scripts = {}
            for s in subjects:
                body = chat_body(s.plain_model, stream=False)
                status, _, obj = check_once(f"{s.base}/v1/chat/completions", body, s.bearer)
                if status != 200:
                    raise RuntimeError(f"{s.key} answered {status}: {str(obj)[:300]}")
                scripts[s.key] = wrk_script(tmp / f"wrk-{len(scripts)}.lua", body, s.bearer)
            for conns in (16, 32):
                for s in subjects:
                    s.rounds, s.cpu_us = [], []
                for r in range(rounds):
                    for s in subjects[r % len(subjects):] + subjects[: r % len(subjects)]:
                        measure(s, conns, seconds, scripts[s.key])
                        print(f"  c={conns} round {r + 1} {s.key:8} {s.rounds[-1]['rps']:8,.0f} req/s",
                              file=sys.stderr, flush=True)
                results[conns] = [_copy(s) for s in subjects]
        finally:
            for gw in gateways:
                gw.stop()
            stop_process(fake)
            redis.stop()
    text = render(results, facts, load_before, os.getloadavg(), seconds, rounds, time.monotonic() - started)
    args.out.write_text(text)
    print(text)
    return 0


def _copy(s: Subject) -> Subject:
    return Subject(s.key, s.base, s.stream_base, s.bearer, s.plain_model, s.stream_model, s.roles,
                   list(s.rounds), list(s.cpu_us))


def render(results: dict[int, list[Subject]], facts: dict[str, str], before: tuple[float, float, float],
           after: tuple[float, float, float], seconds: float, rounds: int, took: float) -> str:
    lines = [
        "# One ext_proc worker against two",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} in {took:.0f} s by `python -m tests.bench.workers`. "
        f"wrk, {rounds} rounds of {seconds:g} s per target, order rotated; median (min–max). CPU per request: "
        "Envoy + the gateway's Python processes (+ redis-server for full).",
        "",
        f"Machine: {facts.get('CPU', '?')}, {os.cpu_count()} cores, shared. Load average before "
        f"{before[0]:.2f} / {before[1]:.2f} / {before[2]:.2f}, after {after[0]:.2f} / {after[1]:.2f} / {after[2]:.2f}.",
        "",
        "| target | conc. | req/s | × one worker | CPU ms/req (Envoy + Python + Redis) | of which Python |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for conns, subjects in results.items():
        one: dict[str, float] = {}
        for s in subjects:
            rps = statistics.median(w["rps"] for w in s.rounds)
            kind = s.key.split()[0]
            one.setdefault(kind, rps)
            total = statistics.median(sum(c.values()) for c in s.cpu_us) / 1000
            python = statistics.median(c.get("python", 0.0) for c in s.cpu_us) / 1000
            lines.append(f"| {s.key} | {conns} | {spread([w['rps'] for w in s.rounds])} | {rps / one[kind]:.2f} | "
                         f"{total:.2f} | {python:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

