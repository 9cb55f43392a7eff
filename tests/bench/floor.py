"""The floor under the Python hop: what the gRPC transport costs with (almost) no gateway logic.

Behind the same rendered Envoy config as the real gateway, this swaps the
``tollgate extproc`` process for a do-nothing ext_proc server that answers
exactly what the gateway answers for the benchmark's pass-through request
(route header, upstream path, authority and key) and nothing else: no JSON,
no logging, no metrics. Variants change how many gRPC streams and messages a
request costs, and which Python gRPC stack serves them:

  tollgate            the real ext_proc server (2 streams, 5 messages per request)
  grpcio 2s/5m        grpc.aio no-op, same protocol as the gateway
  grpcio 2s/3m        grpc.aio no-op; the attempt filter skips the response phases (mode override)
  grpcio 1s/2m        grpc.aio no-op; Envoy without the upstream (attempt) filter, the router-level
                      filter sets the key itself
  grpclib 2s/5m       the same on grpclib (pure-Python HTTP/2 on the event loop, no extra threads)
  grpclib 1s/2m

The pipeline bench (``tests.bench.pipeline``) runs two more no-op servers behind the gateway's own
rendered config, answering as its gateway stage does for a prepared primary target: ``g2`` (request
headers and body: the one-stream floor) and ``g4`` (the answer's headers and body too, as the gateway
reads every answer), so that the floor stands in the same run as the gateway it bounds.

    python -m tests.bench.floor --out tests/bench/floor.md [--quick]

Same rules as bench.run: everything on 127.0.0.1, free ports, every process stopped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from tests.bench.run import (
    CLIENT_KEY, KEY_ENV, PLAIN_MODEL, PROVIDER_KEY, chat_body, cpu_of, ensure_wrk, extproc_counters, machine_facts,
    run_wrk, start_fake, stop_process, wrk_script,
)
from tests.harness import ENVOY, TOLLGATE, Gateway, wait_port, wait_ready

ROUTE_HEADER = "x-tollgate-route"


# --------------------------------------------------------------------------- the no-op server


def _answer(role: str, variant: str, req: Any, authority: str, key: str, alias: str) -> Any:
    from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2

    from extproc.pipeline import messages

    mode = processing_mode_pb2.ProcessingMode
    phase = req.WhichOneof("request")
    if variant in ("g2", "g4"):
        return _as_gateway_stage(variant, phase, key, alias)
    if role == "gateway":
        if phase != "request_body":
            return messages.cont(phase)
        headers = {ROUTE_HEADER: alias}
        if variant == "1s":
            headers["authorization"] = f"Bearer {key}"  # no attempt filter: the only place to set it
        return messages.cont("request_body", set_headers=headers, clear_route_cache=True)
    if phase == "request_headers":
        headers = {":path": "/v1/chat/completions", ":authority": authority, "content-type": "application/json",
                   "authorization": f"Bearer {key}"}
        if variant == "3m":
            resp = messages.cont("request_headers", set_headers=headers, remove_headers=["x-api-key"])
            m = resp.mode_override
            m.request_header_mode, m.response_header_mode = mode.SEND, mode.SKIP
            m.request_body_mode, m.response_body_mode = mode.NONE, mode.NONE
            m.request_trailer_mode = m.response_trailer_mode = mode.SKIP
            return resp
        return messages.cont("request_headers", set_headers=headers, remove_headers=["x-api-key"],
                             request_body_mode=messages.NONE)
    if phase == "response_headers":
        return messages.cont("response_headers", set_headers={"x-tollgate-provider": "plain"},
                             remove_headers=["content-length"])
    return messages.cont(phase)


def _as_gateway_stage(variant: str, phase: str, key: str, alias: str) -> Any:
    """Behind the gateway's own rendered config (both filters, their matchers), answer as its gateway stage
    answers a prepared primary target, and nothing else. ``g2``: request headers and body only (the
    issue's one-stream floor); ``g4``: the answer's headers and body are asked for too, as the real
    gateway does to read every answer, so the no-op pays the same 4 messages."""
    from extproc.pipeline import messages
    from extproc.pipeline.upstream import PREPARED_HEADER

    if phase == "request_headers" and variant == "g4":
        return messages.cont(phase, response_body_mode=messages.BUFFERED)  # response headers SEND, body BUFFERED
    if phase == "request_body":
        # the upstream `attempt` filter is skipped for a prepared primary, so the key is set here
        return messages.cont(phase, set_headers={ROUTE_HEADER: alias, PREPARED_HEADER: "1",
                                                 "authorization": f"Bearer {key}"},
                             remove_headers=["x-api-key"], clear_route_cache=True)
    return messages.cont(phase)


def serve(stack: str, variant: str, port: int, authority: str, alias: str) -> None:
    import uvloop

    key = os.environ[KEY_ENV]

    async def with_grpcio() -> None:
        import grpc
        from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

        class Noop(pb_grpc.ExternalProcessorServicer):
            async def Process(self, requests: Any, context: Any) -> Any:  # noqa: N802
                role = dict(context.invocation_metadata() or ()).get("x-tollgate-filter", "gateway")
                async for req in requests:
                    yield _answer(role, variant, req, authority, key, alias)

        server = grpc.aio.server()
        pb_grpc.add_ExternalProcessorServicer_to_server(Noop(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    async def with_grpclib() -> None:
        from grpclib.const import Cardinality, Handler
        from grpclib.server import Server

        from extproc.pipeline import messages

        class Noop:
            async def process(self, stream: Any) -> None:
                role = stream.metadata.get("x-tollgate-filter", "gateway")
                async for req in stream:
                    await stream.send_message(_answer(role, variant, req, authority, key, alias))

            def __mapping__(self) -> dict[str, Handler]:
                return {"/envoy.service.ext_proc.v3.ExternalProcessor/Process": Handler(
                    self.process, Cardinality.STREAM_STREAM, messages.ProcessingRequest, messages.ProcessingResponse)}

        server = Server([Noop()])
        await server.start("127.0.0.1", port)
        await server.wait_closed()

    uvloop.run(with_grpcio() if stack == "grpcio" else with_grpclib())


# --------------------------------------------------------------------------- the comparison


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The gRPC floor under the Python ext_proc hop.")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "floor.md")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--conns", default="1,16")
    ap.add_argument("--serve", nargs=5, metavar=("STACK", "VARIANT", "PORT", "AUTHORITY", "ALIAS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        stack, variant, port, authority, alias = args.serve
        serve(stack, variant, int(port), authority, alias)
        return 0

    wrk = ensure_wrk()
    facts = machine_facts(wrk)
    duration = 2.0 if args.quick else 5.0
    rounds = 1 if args.quick else 2
    conc = [int(x) for x in args.conns.split(",")]
    started = time.monotonic()
    rows: dict[tuple[str, int], list[dict[str, float]]] = {}

    with tempfile.TemporaryDirectory(prefix="tollgate-floor-") as tmpname:
        tmp = Path(tmpname)
        fake: subprocess.Popen[bytes] | None = None
        envoy: subprocess.Popen[bytes] | None = None
        server: subprocess.Popen[bytes] | None = None
        try:
            fake, fake_port = start_fake(tmp, "plain", [])
            gdir = tmp / "gateway"
            gdir.mkdir()
            gw = Gateway(gdir, {
                "providers": {"plain": {"type": "openai", "base_url": f"http://127.0.0.1:{fake_port}/v1",
                                        "api_key": {"env": KEY_ENV}}},
                "models": {PLAIN_MODEL: {"targets": [{"provider": "plain", "model": PLAIN_MODEL}]}},
            }, env={KEY_ENV: PROVIDER_KEY})  # used for its ports, config file and env; never started
            two = tmp / "envoy-two-filters.yaml"
            two.write_bytes(subprocess.run([TOLLGATE, "render-envoy", "--config", str(gw.config_path)], check=True,
                                           capture_output=True, env=gw.env).stdout)
            boot = yaml.safe_load(two.read_text())
            hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            for f in hcm["http_filters"]:
                if f["name"] == "envoy.filters.http.router":
                    f["typed_config"].pop("upstream_http_filters", None)
            one = tmp / "envoy-one-filter.yaml"
            one.write_text(yaml.safe_dump(boot))

            noop = [sys.executable, "-m", "tests.bench.floor", "--serve"]
            tail = [str(gw.extproc_port), f"127.0.0.1:{fake_port}", PLAIN_MODEL]
            variants: list[tuple[str, list[str], Path]] = [
                ("tollgate", [TOLLGATE, "extproc", "--config", str(gw.config_path)], two),
                ("grpcio 2s/5m", noop + ["grpcio", "5m", *tail], two),
                ("grpcio 2s/3m", noop + ["grpcio", "3m", *tail], two),
                ("grpcio 1s/2m", noop + ["grpcio", "1s", *tail], one),
                ("grpclib 2s/5m", noop + ["grpclib", "5m", *tail], two),
                ("grpclib 1s/2m", noop + ["grpclib", "1s", *tail], one),
            ]
            script = wrk_script(tmp / "wrk.lua", chat_body(PLAIN_MODEL, stream=False), CLIENT_KEY)
            url = f"http://127.0.0.1:{gw.port}/v1/chat/completions"
            current: Path | None = None
            for rnd in range(rounds):
                for name, cmd, conf in (variants if rnd % 2 == 0 else list(reversed(variants))):
                    if conf != current:
                        stop_process(envoy)
                        envoy = subprocess.Popen(
                            [ENVOY, "-c", str(conf), "--disable-hot-restart", "--concurrency", "2", "-l", "warning"],
                            stdout=(tmp / "envoy.log").open("ab"), stderr=subprocess.STDOUT)
                        wait_ready(gw.admin_port)
                        wait_port(gw.port)
                        current = conf
                    server = subprocess.Popen(cmd, stdout=(tmp / "server.log").open("ab"), stderr=subprocess.STDOUT,
                                              env=gw.env, cwd=Path(__file__).resolve().parents[2])
                    try:
                        wait_port(gw.extproc_port)
                        for c in conc:
                            run_wrk(url, script, c, 1)
                            assert envoy is not None
                            pids = {"envoy": [envoy.pid], "python": [server.pid], "fake": [fake.pid]}
                            before = {k: cpu_of(v) for k, v in pids.items()}
                            cb = extproc_counters(gw.admin_port)
                            w = run_wrk(url, script, c, duration)
                            after = {k: cpu_of(v) for k, v in pids.items()}
                            ca = extproc_counters(gw.admin_port)
                            n = max(1.0, w["requests"])
                            row = {k: (after[k] - before[k]) / n * 1e6 for k in pids}
                            row.update(rps=w["rps"], p50=w["p50_us"] / 1000, bad=w["non2xx"] + w["err_read"],
                                       streams=(ca["streams"] - cb["streams"]) / n,
                                       msgs=(ca["msgs_sent"] - cb["msgs_sent"]) / n)
                            rows.setdefault((name, c), []).append(row)
                            print(f"  {name:14s} c{c:<3} {w['rps']:6,.0f} req/s  python {row['python']:6,.0f}µs  "
                                  f"envoy {row['envoy']:6,.0f}µs  non-2xx {int(row['bad'])}", file=sys.stderr, flush=True)
                    finally:
                        stop_process(server)
                        server = None
        finally:
            stop_process(server)
            stop_process(envoy)
            stop_process(fake)

    def mean(name: str, c: int, k: str) -> float:
        vals = [r[k] for r in rows.get((name, c), [])]
        return sum(vals) / len(vals) if vals else float("nan")

    names = list(dict.fromkeys(n for n, _ in rows))
    L = ["# The gRPC floor under the Python ext_proc hop", "",
         f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `python -m tests.bench.floor"
         f"{' --quick' if args.quick else ''}` in {time.monotonic() - started:.0f} s; {rounds} round(s) of "
         f"{duration:g} s wrk runs per variant and concurrency (order reversed every round), means shown.", "",
         "Same rendered Envoy config and fake provider as `tests.bench.run` (c); only the ext_proc server (and for the "
         "1-stream variants, the absence of the upstream attempt filter) differs. 's' = gRPC streams, 'm' = messages "
         "Envoy sends to Python per request. The no-op servers do no JSON, logging or metrics.", ""]
    for c in conc:
        L += [f"### {c} connection(s)", "",
              "| server | streams/req | msgs/req | req/s | p50 ms | Python CPU µs/req | Envoy CPU µs/req "
              "| fake CPU µs/req | non-2xx |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in names:
            L.append(f"| {name} | {mean(name, c, 'streams'):.2f} | {mean(name, c, 'msgs'):.2f} "
                     f"| {mean(name, c, 'rps'):,.0f} | {mean(name, c, 'p50'):.2f} | {mean(name, c, 'python'):,.0f} "
                     f"| {mean(name, c, 'envoy'):,.0f} | {mean(name, c, 'fake'):,.0f} | {int(mean(name, c, 'bad'))} |")
        L.append("")
    L += ["## Machine", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts.items()] + [""]
    report = "\n".join(L)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
