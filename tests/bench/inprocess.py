"""The ext_proc server's own cost per exchange, in-process, for two versions of extproc/ side by side.

Each round runs one version in a fresh subprocess: a real grpc.aio server
with the real servicer, driven by the real stub with the four messages of a
plain routed request (tests/inprocess.py), ``--requests`` exchanges with
``--concurrency`` in flight. Versions alternate round by round so that
machine noise hits both; the table gives the median and min–max of the
rounds, and the ratio of the medians. With ``--quota`` the admission stage
runs too (embedded store). Client and server share one process and loop, so
the figure is an upper bound on the server's part, the same for both. It is
CPU time of that process (``time.process_time``), which other work on a shared
machine disturbs far less than wall time.

    python -m tests.bench.inprocess --baseline /path/to/other/checkout [--rounds 3] [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent.parent


async def _run(requests: int, concurrency: int, quota: bool) -> float:
    from tests.inprocess import InProcessGateway, chat

    cfg = {
        "providers": {"openai": {"type": "openai", "base_url": "https://api.openai.example/v1",
                                 "api_key": {"env": "OPENAI_KEY"}}},
        "models": {"gpt": {"targets": [{"provider": "openai", "model": "gpt-4o"}]}},
    }
    if quota:
        cfg["quota"] = {"limits": {"org": {"usd_per_day": 1_000_000}}}
    answer = json.dumps({"id": "c", "object": "chat.completion", "model": "gpt-4o", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}}).encode()
    body = chat()
    with tempfile.TemporaryDirectory() as state:
        async with InProcessGateway(cfg, {"XDG_STATE_HOME": state}) as gw:
            async def one(n: int) -> None:
                await gw.plain_exchange(f"r{n}", body, answer)

            async def worker(k: int) -> None:
                for n in range(k, requests, concurrency):
                    await one(n)

            await asyncio.gather(*(worker(k) for k in range(min(concurrency, 20))))  # warm-up
            gw.records.clear()
            started = time.process_time()  # CPU time: what the exchanges cost, not what neighbours took
            await asyncio.gather(*(worker(k) for k in range(concurrency)))
            took = time.process_time() - started
            await gw.settled()
    return took / requests * 1e6  # CPU µs per exchange


def _child(args: argparse.Namespace) -> None:
    import extproc

    us = asyncio.run(_run(args.requests, args.concurrency, args.quota))
    print(json.dumps({"us": us, "extproc": str(Path(extproc.__file__).resolve().parent)}))


def _round(code: Path, args: argparse.Namespace) -> float:
    """One run of ``code``'s extproc/ (this checkout's tests drive it) in a fresh interpreter."""
    with tempfile.TemporaryDirectory() as shim:
        os.symlink(code / "extproc", Path(shim) / "extproc")
        env = {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{HERE}"}
        cmd = [sys.executable, "-m", "tests.bench.inprocess", "--child", "--requests", str(args.requests),
               "--concurrency", str(args.concurrency), *(["--quota"] if args.quota else [])]
        out = subprocess.run(cmd, env=env, cwd=shim, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert Path(result["extproc"]) == (code / "extproc").resolve(), f"ran {result['extproc']}, not {code}"
    return float(result["us"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--baseline", type=Path, help="another checkout whose extproc/ to compare with this one's")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--quota", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    versions = {"this checkout": HERE, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    got: dict[str, list[float]] = {name: [] for name in versions}
    for _ in range(args.rounds):
        for name, code in versions.items():
            got[name].append(_round(code, args))
    mode = "with the quota stage" if args.quota else "no quota"
    print(f"\nIn-process ext_proc exchange (4 messages), {args.requests} requests, {args.concurrency} in flight, "
          f"{mode}, {args.rounds} alternating rounds\n")
    print("| extproc/ | CPU µs per exchange, median | min–max |")
    print("|---|---:|---:|")
    for name, values in got.items():
        print(f"| {name} | {statistics.median(values):.0f} | {min(values):.0f}–{max(values):.0f} |")
    if args.baseline:
        ratio = statistics.median(got["this checkout"]) / statistics.median(got["baseline"])
        print(f"\nratio this / baseline: {ratio:.3f}")


if __name__ == "__main__":
    main()
