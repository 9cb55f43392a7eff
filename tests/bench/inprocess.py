"""The ext_proc server's own cost per exchange, in-process, for two versions of extproc/ side by side.

Each round runs one version in a fresh subprocess: a real grpc.aio server
with the real servicer, driven by the real stub with the four messages of a
plain routed request (tests/inprocess.py), ``--requests`` exchanges with
``--concurrency`` in flight. Versions alternate round by round so that
machine noise hits both; the table gives the median and min–max of the
rounds, and the ratio of the medians. With ``--quota`` the admission stage
runs too (embedded store). With ``--full`` the exchange is the pipeline users
run: a JWT checked against a JWKS file (the token cache's hit path after the
first), quotas on a redis-server started here, metrics recorded and the access
log written (to /dev/null). ``--profile FILE`` runs one child under cProfile
instead and writes its stats to FILE. Client and server share one process and loop, so
the figure is an upper bound on the server's part, the same for both. It is
CPU time of that process (``time.process_time``), which other work on a shared
machine disturbs far less than wall time.

    python -m tests.bench.inprocess --baseline /path/to/other/checkout [--rounds 3] [--requests 2000]
    python -m tests.bench.inprocess --full --profile /tmp/full.prof --requests 3000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent.parent


def _full(cfg: dict[str, Any], tmp: Path, redis_url: str) -> dict[str, str]:
    """Turn ``cfg`` into the full pipeline (as tests/bench/pipeline.py's ``full``); the client's headers."""
    from tests.fake_idp import FakeIdP
    from tests.harness import free_port

    idp = FakeIdP()
    jwks = tmp / "jwks.json"
    jwks.write_text(json.dumps(idp.jwks()))
    token = idp.mint(iss="https://bench.idp", aud="tollgate", sub="bench-user", groups=["bench"],
                     exp=int(time.time()) + 7200)
    cfg.update({
        "teams": {"bench": {"models": ["*"]}},
        "auth": {"mode": "jwt", "issuers": [{"issuer": "https://bench.idp", "audience": "tollgate",
                                             "jwks_file": str(jwks), "claims": {"teams": "groups"}}]},
        "redis": {"url": redis_url},
        "quota": {"limits": {"org": {"usd_per_day": 1_000_000},
                             "aliases": {"*": {"tokens_per_minute": 1_000_000_000}}}},
        "metrics": {"port": free_port()},
    })
    return {"authorization": f"Bearer {token}"}


def _devnull_log() -> logging.Logger:
    """An access log that formats and writes every record, as ``tollgate run``'s writer thread does."""
    log = logging.getLogger("tests.bench.inprocess.access")
    log.propagate = False
    log.setLevel(logging.INFO)
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the child
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    return log


async def _run(requests: int, concurrency: int, quota: bool, full: bool = False,
               profile: str | None = None) -> float:
    from tests.quota.redis_process import RedisProcess

    cfg: dict[str, Any] = {
        "providers": {"openai": {"type": "openai", "base_url": "https://api.openai.example/v1",
                                 "api_key": {"env": "OPENAI_KEY"}}},
        "models": {"gpt": {"targets": [{"provider": "openai", "model": "gpt-4o"}]}},
    }
    if quota:
        cfg["quota"] = {"limits": {"org": {"usd_per_day": 1_000_000}}}
    with tempfile.TemporaryDirectory() as state, contextlib.ExitStack() as stack:
        headers: dict[str, str] = {}
        if full:
            redis = stack.enter_context(RedisProcess(Path(state) / "redis"))
            headers = _full(cfg, Path(state), redis.url)
        return await _measure(cfg, state, headers, requests, concurrency, full, profile)


async def _measure(cfg: dict[str, Any], state: str, headers: dict[str, str], requests: int, concurrency: int,
                   full: bool, profile: str | None) -> float:
    from tests.inprocess import InProcessGateway, chat

    answer = json.dumps({"id": "c", "object": "chat.completion", "model": "gpt-4o", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}}).encode()
    body = chat()
    async with InProcessGateway(cfg, {"XDG_STATE_HOME": state}) as gw:
        if full:
            assert gw.runtime is not None
            gw.runtime.access_log = _devnull_log()

        async def one(n: int) -> None:
            await gw.plain_exchange(f"r{n}", body, answer, headers=headers)

        async def worker(k: int, total: int) -> None:
            for n in range(k, total, concurrency):
                await one(n)

        await asyncio.gather(*(worker(k, min(requests, 200)) for k in range(concurrency)))  # warm-up
        await gw.settled()
        gw.records.clear()
        prof = cProfile.Profile() if profile else None
        if prof:
            prof.enable()
        started = time.process_time()  # CPU time: what the exchanges cost, not what neighbours took
        await asyncio.gather(*(worker(k, requests) for k in range(concurrency)))
        await gw.settled()  # the settlements (background tasks) are part of each request's cost
        took = time.process_time() - started
        if prof:
            prof.disable()
            prof.dump_stats(profile)
    return took / requests * 1e6  # CPU µs per exchange


def _child(args: argparse.Namespace) -> None:
    import extproc

    us = asyncio.run(_run(args.requests, args.concurrency, args.quota, args.full, args.profile))
    print(json.dumps({"us": us, "extproc": str(Path(extproc.__file__).resolve().parent)}))


def _round(code: Path, args: argparse.Namespace) -> float:
    """One run of ``code``'s extproc/ (this checkout's tests drive it) in a fresh interpreter."""
    with tempfile.TemporaryDirectory() as shim:
        os.symlink(code / "extproc", Path(shim) / "extproc")
        env = {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{HERE}"}
        cmd = [sys.executable, "-m", "tests.bench.inprocess", "--child", "--requests", str(args.requests),
               "--concurrency", str(args.concurrency), *(["--quota"] if args.quota else []),
               *(["--full"] if args.full else [])]
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
    p.add_argument("--full", action="store_true", help="JWT auth + quotas on Redis + metrics + access log")
    p.add_argument("--profile", help="run this checkout once under cProfile and write the stats here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child or args.profile:
        _child(args)
        return
    versions = {"this checkout": HERE, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    got: dict[str, list[float]] = {name: [] for name in versions}
    for _ in range(args.rounds):
        for name, code in versions.items():
            got[name].append(_round(code, args))
    mode = ("full pipeline (JWT, quotas on Redis, metrics, access log)" if args.full
            else "with the quota stage" if args.quota else "no quota")
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
