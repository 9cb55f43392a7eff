"""Overload: many more concurrent connections than the Python server can serve, side by side with and
without admission control in front of it.

    python -m tests.bench.overload --out tests/bench/overload.md [--conns 500] [--seconds 5]

One fake provider (its own process), one gateway per variant (started one after the other, each
measured alone), and a closed-loop client (its own process, asyncio on raw HTTP/1.1 keep-alive
connections) holding ``--conns`` connections, each sending the next chat request as soon as the last
one was answered. Every answer is classified by status and timed; a refusal must be a clean OpenAI
error with Retry-After. What reached the provider is read from Envoy's upstream counters.

The machine is shared (two cores; other sessions run tests): the client, the fake, Envoy and the
Python server all compete for the same CPUs, which is the point (overload), and the noise is large. A refused client waits for Retry-After before its next request, as the SDKs
do; the refusal times are the client's (its own event loop's lag included), not Envoy's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench.run import KEY_ENV, PLAIN_MODEL, machine_facts, ensure_wrk, start_fake, stop_process
from tests.harness import Gateway

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- the client (own process)


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:  # chunked
        body = b""
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            body += await reader.readexactly(size)
            await reader.readline()
    return status, headers, body


async def _connection(port: int, request: bytes, until: float, out: list[tuple[int, float, bool, str]]) -> None:
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while time.monotonic() < until:
        started = time.perf_counter()
        try:
            if conn is None:
                conn = await asyncio.open_connection("127.0.0.1", port)
            reader, writer = conn
            writer.write(request)
            status, headers, body = await _read_answer(reader)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            out.append((-1, time.perf_counter() - started, False, ""))
            conn = None
            continue
        clean, code = True, ""
        if status != 200:
            try:
                err = json.loads(body)["error"]
                clean = bool(err["message"]) and "type" in err and "code" in err
                code = str(err.get("code"))
            except (ValueError, KeyError, TypeError):
                clean = False
            if status in (429, 503):
                clean = clean and "retry-after" in headers
        out.append((status, time.perf_counter() - started, clean, code))
        if headers.get("connection") == "close":
            conn[1].close()
            conn = None
        if status in (429, 503):  # as the SDKs do: come back when told to
            await asyncio.sleep(min(float(headers.get("retry-after", "1") or 1), 1.0))


async def _drive(port: int, conns: int, seconds: float) -> list[tuple[int, float, bool, str]]:
    body = json.dumps({"model": PLAIN_MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
    out: list[tuple[int, float, bool, str]] = []
    until = time.monotonic() + seconds
    await asyncio.gather(*(_connection(port, request, until, out) for _ in range(conns)))
    return out


def client_main(port: int, conns: int, seconds: float) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    results = asyncio.run(_drive(port, conns, seconds))
    json.dump(results, sys.stdout)


# --------------------------------------------------------------------------- the runs


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def upstream_requests(gw: Gateway) -> int:
    stats = gw.admin("/stats?filter=upstream_rq_total")
    return sum(int(n) for n in re.findall(r"cluster\.target\S*\.upstream_rq_total: (\d+)", stats))


def measure(gw: Gateway, conns: int, seconds: float) -> dict[str, Any]:
    before = upstream_requests(gw)
    proc = subprocess.run([sys.executable, "-m", "tests.bench.overload", "--client", str(gw.port), str(conns),
                           str(seconds)], capture_output=True, cwd=REPO, check=True, timeout=seconds + 120)
    results = json.loads(proc.stdout)
    time.sleep(0.5)
    reached = upstream_requests(gw) - before
    by_status: dict[int, list[float]] = {}
    by_code: dict[str, list[float]] = {}
    unclean = 0
    for status, seconds_taken, clean, code in results:
        by_status.setdefault(status, []).append(seconds_taken)
        by_code.setdefault(code, []).append(seconds_taken)
        unclean += not clean
    served = len(by_status.get(200, []))
    refused = by_code.get("gateway_unavailable", [])  # the circuit breaker's refusals
    timed_out = by_code.get("gateway_overloaded", [])  # an ext_proc message timed out (was a 504)
    return {
        "total": len(results), "served": served, "reached": reached, "unclean": unclean,
        "counts": {s: len(ts) for s, ts in sorted(by_status.items())},
        "refused": len(refused), "timed_out": len(timed_out),
        "served_p50": pct(by_status.get(200, []), 50), "served_p99": pct(by_status.get(200, []), 99),
        "refused_p50": pct(refused, 50), "refused_p99": pct(refused, 99), "refused_max": max(refused, default=0.0),
    }


def config(fake_port: int, **envoy: Any) -> dict[str, Any]:
    return {
        "providers": {"plain": {"type": "openai", "base_url": f"http://127.0.0.1:{fake_port}/v1",
                                "api_key": {"env": KEY_ENV}}},
        "models": {PLAIN_MODEL: {"targets": [{"provider": "plain", "model": PLAIN_MODEL}]}},
        "quota": {"limits": {"org": {"tokens_per_minute": 10_000_000_000}},
                  "prices": {PLAIN_MODEL: {"input": 1.0, "output": 2.0}}},
        "envoy": envoy,
    }


def ms(x: float) -> str:
    return "-" if x != x else f"{x * 1000:.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="tests/bench/overload.md")
    ap.add_argument("--conns", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args(argv)
    if args.client:
        client_main(int(args.client[0]), int(args.client[1]), float(args.client[2]))
        return 0
    from tests.bench.run import PROVIDER_KEY

    variants = {
        "no admission limit (before)": {"max_exchanges": 1_000_000},
        "max_exchanges 256": {"max_exchanges": 256},
        "max_exchanges 128 (default)": {},
        "max_exchanges 64": {"max_exchanges": 64},
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        fake, fake_port = start_fake(tmp, "overload", [])
        try:
            for name, envoy in variants.items():
                d = tmp / re.sub(r"\W+", "_", name)
                d.mkdir()
                gw = Gateway(d, config(fake_port, **envoy), env={KEY_ENV: PROVIDER_KEY}).start()
                try:
                    time.sleep(3)  # the supervisor's standby starts 2 s after the gateway
                    rows.append((name, measure(gw, args.conns, args.seconds)))
                finally:
                    gw.stop()
                print(name, rows[-1][1], file=sys.stderr)
        finally:
            stop_process(fake)
    facts = machine_facts(ensure_wrk())
    lines = [
        "# Overload: admission control in front of the Python server", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `python -m tests.bench.overload`; "
        f"{args.conns} closed-loop connections for {args.seconds:g} s per variant against plain chat requests "
        "(quota on, memory store), fake provider in its own process. "
        f"Machine: {facts.get('cpu', '?')}, shared with other sessions (noise is large).", "",
        "| variant | answers | 200 | refused at once (503 `gateway_unavailable`) | message timeouts (503 "
        "`gateway_overloaded`, were 504) | 504 | other | unclean | reached provider | served p50 / p99 ms "
        "| refused p50 / p99 / max ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        others = r["total"] - r["served"] - r["refused"] - r["timed_out"] - r["counts"].get(504, 0)
        lines.append(
            f"| {name} | {r['total']} | {r['served']} | {r['refused']} | {r['timed_out']} | {r['counts'].get(504, 0)} "
            f"| {others} | {r['unclean']} "
            f"| {r['reached']} | {ms(r['served_p50'])} / {ms(r['served_p99'])} "
            f"| {ms(r['refused_p50'])} / {ms(r['refused_p99'])} / {ms(r['refused_max'])} |")
    lines += ["", "`-1`: the connection failed or was reset (counted, never expected). 'unclean': a non-200 answer "
              "that is not an OpenAI error, or a 429/503 without Retry-After.", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
