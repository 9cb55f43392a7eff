"""What each feature costs: the gateway with one feature switched on or off, side by side.

    python -m tests.bench.features --out tests/bench/features.md [--quick]

One fake provider; one gateway per variant, all started at once; wrk at concurrency 16 against
each in turn, for several rounds (the order rotates every round), so that the machine's noise
falls on every variant alike. Reported: median req/s and p50 of each, and the ratio to the base.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench.run import (
    CLIENT_KEY, KEY_ENV, PLAIN_MODEL, PROVIDER_KEY, chat_body, ensure_wrk, machine_facts, run_wrk, start_fake,
    stop_process, wrk_script,
)
from tests.harness import Gateway
from tests.quota.redis_process import RedisProcess


def variants(fake_port: int, tmp: Path, redis_url: str) -> dict[str, tuple[dict[str, Any], str]]:
    """name -> (gateway config, the bearer the client sends)."""
    from tests.fake_idp import FakeIdP

    base = {
        "providers": {"plain": {"type": "openai", "base_url": f"http://127.0.0.1:{fake_port}/v1",
                                "api_key": {"env": KEY_ENV}}},
        "models": {PLAIN_MODEL: {"targets": [{"provider": "plain", "model": PLAIN_MODEL}]}},
    }
    idp = FakeIdP()
    jwks = tmp / "jwks.json"
    jwks.write_text(json.dumps(idp.jwks()))
    token = idp.mint(iss="https://bench.idp", aud="tollgate", sub="bench-user", groups=["bench"],
                     exp=int(time.time()) + 3600)
    auth = {
        **base,
        "teams": {"bench": {"models": ["*"]}},
        "auth": {"mode": "jwt", "deny_list": {"file": str(tmp / "deny.json")},
                 "issuers": [{"issuer": "https://bench.idp", "audience": "tollgate", "jwks_file": str(jwks),
                              "claims": {"teams": "groups"}}]},
    }
    quota = {
        "prices": {PLAIN_MODEL: {"input": 2.5, "output": 10}},
        "limits": {"org": {"usd_per_day": 1_000_000},
                   "aliases": {"*": {"tokens_per_minute": 1_000_000_000}}},
    }
    return {
        "base (auth none, metrics on)": (base, CLIENT_KEY),
        "quotas: embedded store": ({**base, "quota": quota}, CLIENT_KEY),
        "quotas: Redis on loopback": ({**base, "redis": {"url": redis_url}, "quota": quota}, CLIENT_KEY),
        "auth: jwt (cached token)": (auth, token),
        "metrics off": ({**base, "metrics": {"port": 0}}, CLIENT_KEY),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    seconds, rounds, conns = (2.0, 2, 16) if args.quick else (5.0, 4, 16)
    wrk = ensure_wrk()
    facts = machine_facts(wrk)
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="tollgate-features-") as name:
        tmp = Path(name)
        fake, port = start_fake(tmp, "plain", [])
        redis = RedisProcess(tmp / "redis").start()
        gateways: dict[str, tuple[Gateway, Path]] = {}
        try:
            body = chat_body(PLAIN_MODEL, stream=False)
            for i, (label, (config, bearer)) in enumerate(variants(port, tmp, redis.url).items()):
                d = tmp / f"gw{i}"
                d.mkdir()
                gw = Gateway(d, config, env={KEY_ENV: PROVIDER_KEY}).start()
                gateways[label] = (gw, wrk_script(tmp / f"wrk{i}.lua", body, bearer))
                results[label] = []
            labels = list(gateways)
            for r in range(rounds):
                order = labels[r % len(labels):] + labels[: r % len(labels)]
                for label in order:
                    gw, script = gateways[label]
                    url = f"{gw.base_url}/chat/completions"
                    run_wrk(url, script, conns, 1.0)  # warm-up
                    w = run_wrk(url, script, conns, seconds)
                    if w["non2xx"]:
                        raise RuntimeError(f"{label}: {int(w['non2xx'])} non-2xx answers")
                    results[label].append(w)
                    print(f"  round {r + 1} {label:32} {w['rps']:7,.0f} req/s", file=sys.stderr, flush=True)
        finally:
            for gw, _ in gateways.values():
                gw.stop()
            stop_process(fake)
            redis.stop()
    base_label = next(iter(results))
    base_rps = statistics.median(w["rps"] for w in results[base_label])
    lines = [
        "# What each feature costs (`python -m tests.bench.features`)", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; wrk at concurrency {conns}, {rounds} rounds of "
        f"{seconds:.0f} s per variant, order rotated every round; medians. Non-streaming, ~2 KB prompt.", "",
        "| variant | req/s | p50 ms | ratio to base |", "|---|---:|---:|---:|",
    ]
    for label, ws in results.items():
        rps = statistics.median(w["rps"] for w in ws)
        p50 = statistics.median(w["p50_us"] for w in ws) / 1000
        lines.append(f"| {label} | {rps:,.0f} | {p50:.2f} | {rps / base_rps:.2f} |")
    lines += ["", f"Machine: {facts.get('CPU', '?')}, {facts.get('nproc', '?')} cores, load at start "
              f"{facts.get('load average at start', '?')}."]
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
