"""Streams at concurrency 8 with one ext_proc worker against two: the first token and a saturated Python process.

    python -m tests.bench.streams_workers [--rounds 4] [--streams 80] [--out tests/bench/streams_workers.md]

At c=8, eight paced streams send ~6,700 chunks a second and each is a round trip to the Python
server, which is then busy all the time: a new stream's messages queue behind the others' chunks.
This puts the base and the full pipeline (JWT, Redis quotas, metrics, access log) beside the same
configurations with ``extproc.workers: 2``, on one paced fake (50 chunks 1.2 ms apart), the order
rotated every round; the fake alone is measured in the same rounds. First token added = the
target's median time to the first content event minus the fake's. CPU per chunk: every Python
process of the gateway (workers and standby), Envoy, and redis-server for the full pipeline.

Every process started here is stopped again; every port is free and on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from tests.bench.pipeline import PACED, UPSTREAM_KEY, configs, gateway_pids
from tests.bench.run import (
    CLIENT_KEY, KEY_ENV, STREAM_CHUNKS, TOKEN_DELAY, StreamStats, Target, chat_body, start_fake, stop_process,
    stream_batch,
)
from tests.harness import Gateway
from tests.quota.redis_process import RedisProcess

CONNS = 8
SETTLE = 15.0  # seconds for every gateway's warm standby to finish starting before anything is measured


async def rounds(targets: list[Target], direct: Target, per_round: int, n: int) -> dict[str, list[StreamStats]]:
    bodies = {t.key: chat_body(PACED if t is not direct else "gpt-4o-mini", stream=True) for t in [direct, *targets]}
    for t in [direct, *targets]:  # warm-up, not counted
        await stream_batch(t, CONNS, CONNS, bodies[t.key], None)
    out: dict[str, list[StreamStats]] = {t.key: [] for t in [direct, *targets]}
    everyone = [direct, *targets]
    for r in range(n):
        for t in everyone[r % len(everyone):] + everyone[: r % len(everyone)]:
            st = StreamStats(t.key, CONNS)
            await stream_batch(t, CONNS, per_round, bodies[t.key], st)
            out[t.key].append(st)
    return out


def render(got: dict[str, list[StreamStats]], n: int, per_round: int, load: tuple[str, str], took: float) -> str:
    direct = got["fake (direct)"]

    def ttft(sts: list[StreamStats]) -> list[float]:
        return [statistics.median(s.ttft) * 1000 for s in sts if s.ttft]

    d_rounds = ttft(direct)
    lines = [
        "# Streams at c=8, one ext_proc worker against two (`python -m tests.bench.streams_workers`)", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} in {took:.0f} s; {n} rotated rounds of {per_round} streams "
        f"per target at concurrency {CONNS}; {STREAM_CHUNKS} chunks paced {TOKEN_DELAY * 1000:g} ms apart; load average "
        f"{load[0]} at the start, {load[1]} at the end, 2 shared cores.", "",
        "| target | first token added ms, median of rounds (min–max) | total p50 ms | Python CPU µs/chunk | "
        "all CPU µs/chunk (Envoy + Python + redis) | failed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, sts in got.items():
        added = [t - d for t, d in zip(ttft(sts), d_rounds)]
        total = [x * 1000 for s in sts for x in s.total]
        chunks = max(1, sum(len(s.ttft) for s in sts) * STREAM_CHUNKS)
        py = sum(s.cpu.get("python", 0.0) for s in sts) / chunks * 1e6
        everything = sum(sum(v for k, v in s.cpu.items() if k != "fake") for s in sts) / chunks * 1e6
        failed = sum(len(s.failures) for s in sts)
        cell = "-" if key == "fake (direct)" else f"{statistics.median(added):.2f} ({min(added):.2f}–{max(added):.2f})"
        cpu = ("-", "-") if key == "fake (direct)" else (f"{py:.0f}", f"{everything:.0f}")
        lines.append(f"| {key} | {cell} | {statistics.median(total):.1f} | {cpu[0]} | {cpu[1]} | {failed} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--streams", type=int, default=80, help="streams per target and round")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    started = time.monotonic()
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="tollgate-streams-workers-") as name:
        tmp = Path(name)
        redis = RedisProcess(tmp / "redis").start()
        fake, fake_pid, gateways = None, 0, []
        try:
            fake, port = start_fake(tmp, "paced", ["--kind", "openai", "--api-key", UPSTREAM_KEY, "--chunks",
                                                   str(STREAM_CHUNKS), "--token-delay", str(TOKEN_DELAY)])
            fake_pid = fake.pid
            ports = {k: port for k in ("openai-plain", "openai-paced", "anthropic-plain", "anthropic-paced")}
            cfgs, token = configs(ports, tmp, redis.url)
            targets: list[Target] = []
            for key in ("base", "full"):
                for workers in (1, 2):
                    d = tmp / f"gw-{key}-{workers}"
                    d.mkdir()
                    cfg = {**cfgs[key], **({"extproc_workers": workers} if workers > 1 else {})}
                    gw = Gateway(d, cfg, env={KEY_ENV: UPSTREAM_KEY, "XDG_STATE_HOME": str(d / "state")}).start()
                    gateways.append(gw)
                    roles = {**gateway_pids(gw), "fake": [fake_pid]}
                    if key == "full":
                        roles["redis"] = [redis.proc.pid] if getattr(redis, "proc", None) else []
                    base = gw.base_url.removesuffix("/v1")
                    label = f"{key}, {workers} worker{'s' if workers > 1 else ''}"
                    targets.append(Target(label, label, base, base, token if key == "full" else CLIENT_KEY, roles))
            time.sleep(SETTLE)
            for gw, t in zip(gateways, targets, strict=True):  # read again: the standby may have replaced a worker
                t.roles.update(gateway_pids(gw))
            direct = Target("fake (direct)", "fake (direct)", f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}",
                            UPSTREAM_KEY, {"fake": [fake_pid]})
            got = asyncio.run(rounds(targets, direct, args.streams, args.rounds))
        finally:
            for gw in gateways:
                gw.stop()
            stop_process(fake)
            redis.stop()
    text = render(got, args.rounds, args.streams, (load_start, " ".join(f"{x:.2f}" for x in os.getloadavg())),
                  time.monotonic() - started)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
