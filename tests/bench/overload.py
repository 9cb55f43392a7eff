"""Overload: many more concurrent connections than the Python server can serve, side by side with and
without admission control in front of it.

    python -m tests.bench.overload --out tests/bench/overload.md [--conns 500] [--seconds 5]

One fake provider (its own process), one gateway per variant (started one after the other, each
measured alone), and a closed-loop client (its own process, asyncio on raw HTTP/1.1 keep-alive
connections) holding ``--conns`` connections, each sending the next chat request as soon as the last
one was answered. Every answer is classified by status and timed; a refusal must be a clean OpenAI
error with Retry-After. What reached the provider is read from Envoy's upstream counters.

The machine is shared (two cores; other sessions run tests): the client, the fake, Envoy and the
Python server all compete for the same CPUs, which is the point (overload), and the noise is large. A
refused client waits for Retry-After before its next request, as the SDKs do.

Where a slow refusal's time goes: the refusal times are the client's, so two more columns split them.
Envoy's own time for each refusal (first request byte read to last response byte written) comes from an
access log added to the rendered bootstrap for this bench only (so the gateway runs split: Envoy, then
``tollgate extproc``, the same server ``tollgate run`` supervises); the client's own event-loop lag is
measured by a task that sleeps 10 ms and records how late it wakes. What neither explains is time the
request waited for an Envoy worker to be scheduled at all. Two variants try to give Envoy the CPU first:
the Python server at ``nice 10``, and one Envoy worker instead of two.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


async def _lag(until: float, out: list[float]) -> None:
    """How late this client's own event loop wakes up: a delay every measured time may include."""
    while time.monotonic() < until:
        at = time.perf_counter()
        await asyncio.sleep(0.01)
        out.append(time.perf_counter() - at - 0.01)


async def _drive(port: int, conns: int, seconds: float) -> tuple[list[tuple[int, float, bool, str]], list[float]]:
    body = json.dumps({"model": PLAIN_MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
    out: list[tuple[int, float, bool, str]] = []
    lag: list[float] = []
    until = time.monotonic() + seconds
    await asyncio.gather(_lag(until, lag), *(_connection(port, request, until, out) for _ in range(conns)))
    return out, lag


def runqueue_wait(pid: int | str, prefix: str = "") -> float:
    """Seconds the threads of ``pid`` (those whose name starts with ``prefix``) spent runnable but waiting
    for a CPU, so far (the kernel's schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().startswith(prefix):
                total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):  # a thread that ended meanwhile
            continue
    return total / 1e9


def client_main(port: int, conns: int, seconds: float) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    waited = runqueue_wait("self")
    results, lag = asyncio.run(_drive(port, conns, seconds))
    json.dump({"results": results, "lag": lag, "waited": runqueue_wait("self") - waited}, sys.stdout)


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
    assert gw.envoy is not None
    envoy_waited, started = runqueue_wait(gw.envoy.pid, "wrk:"), time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tests.bench.overload", "--client", str(gw.port), str(conns),
                           str(seconds)], capture_output=True, cwd=REPO, check=True, timeout=seconds + 120)
    answer = json.loads(proc.stdout)
    results, lag = answer["results"], answer["lag"]
    envoy_waited = runqueue_wait(gw.envoy.pid, "wrk:") - envoy_waited
    elapsed = time.monotonic() - started  # the client's start-up included: Envoy waits then too
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
        "load": os.getloadavg()[0],
        # share of the run each Envoy worker (on average) and the client spent waiting for a CPU
        "envoy_wait": envoy_waited / gw.envoy_concurrency / elapsed, "client_wait": answer["waited"] / seconds,
        "lag_p50": pct(lag, 50), "lag_p99": pct(lag, 99), "lag_max": max(lag, default=0.0),
        **envoy_side(gw),
    }


def envoy_side(gw: Gateway) -> dict[str, float]:
    """Envoy's own time for each refusal (first byte in to last byte out), from its access log."""
    path = gw.tmp / "envoy-access.log"
    time.sleep(1.5)  # Envoy writes its access log out once a second
    refused = []
    if path.exists():
        details: set[str] = set()
        for line in path.read_text().splitlines():
            code, duration, detail = line.split()[:3]
            details.add(f"{code} {detail}")
            if code == "503" and "timeout" not in detail:  # not an ext_proc message timeout
                refused.append(int(duration) / 1000)
        print("Envoy's details:", sorted(details), file=sys.stderr)
    return {"envoy_refused_p50": pct(refused, 50), "envoy_refused_p99": pct(refused, 99),
            "envoy_refused_max": max(refused, default=0.0)}


class MeasuredGateway(Gateway):
    """The gateway as `tollgate run` renders it, with one addition for measuring: Envoy's own access log
    (status and duration of every request). Started split (Envoy, then `tollgate extproc`), so the rendered
    bootstrap can take it; the Python server is the same."""

    def __init__(self, *args: Any, nice: int = 0, concurrency: int = 2, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.envoy_concurrency = concurrency
        self.extproc_prefix = ("nice", "-n", str(nice)) if nice else ()

    def start_extproc(self) -> None:
        import yaml

        rendered = self.tmp / "envoy.yaml"
        boot = yaml.safe_load(rendered.read_text())
        hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(self.tmp / "envoy-access.log"),
            "log_format": {"text_format_source": {"inline_string": "%RESPONSE_CODE% %DURATION% %RESPONSE_CODE_DETAILS%\n"}}}}]
        rendered.write_text(yaml.safe_dump(boot, sort_keys=False))
        super().start_extproc()


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


def ms3(x: float) -> str:
    return "-" if x != x else f"{x * 1000:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="tests/bench/overload.md")
    ap.add_argument("--conns", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--only", help="run only the variants whose name contains this")
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
        "128, Python server at nice 10": {"nice": 10},
        "128, Envoy concurrency 1": {"concurrency": 1},
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        fake, fake_port = start_fake(tmp, "overload", [])
        try:
            for name, envoy in variants.items():
                if args.only and args.only not in name:
                    continue
                d = tmp / re.sub(r"\W+", "_", name)
                d.mkdir()
                knobs = {k: envoy.pop(k) for k in ("nice", "concurrency") if k in envoy}
                gw = MeasuredGateway(d, config(fake_port, **envoy), env={KEY_ENV: PROVIDER_KEY}, split=True,
                                     **knobs).start()
                try:
                    time.sleep(1)
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
        f"Machine: {facts.get('CPU', '?')} ({facts.get('nproc', '?')} cores), shared with other sessions "
        "(noise is large; the last column is the load average right after each variant).", "",
        "| variant | answers | 200 | refused at once (503 `gateway_unavailable`) | message timeouts (503 "
        "`gateway_overloaded`, were 504) | 504 | other | unclean | reached provider | served p50 / p99 ms "
        "| refused p50 / p99 / max ms | Envoy's own time for a refusal p50 / p99 / max ms "
        "| client loop lag p50 / p99 / max ms | time waiting for a CPU: an Envoy worker / the client | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        others = r["total"] - r["served"] - r["refused"] - r["timed_out"] - r["counts"].get(504, 0)
        lines.append(
            f"| {name} | {r['total']} | {r['served']} | {r['refused']} | {r['timed_out']} | {r['counts'].get(504, 0)} "
            f"| {others} | {r['unclean']} "
            f"| {r['reached']} | {ms(r['served_p50'])} / {ms(r['served_p99'])} "
            f"| {ms(r['refused_p50'])} / {ms(r['refused_p99'])} / {ms(r['refused_max'])} "
            f"| {ms3(r['envoy_refused_p50'])} / {ms3(r['envoy_refused_p99'])} / {ms3(r['envoy_refused_max'])} "
            f"| {ms(r['lag_p50'])} / {ms(r['lag_p99'])} / {ms(r['lag_max'])} "
            f"| {r['envoy_wait']:.0%} / {r['client_wait']:.0%} | {r['load']:.1f} |")
    lines += ["", "`-1`: the connection failed or was reset (counted, never expected). 'unclean': a non-200 answer "
              "that is not an OpenAI error, or a 429/503 without Retry-After.", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
