"""The ext_proc server's CPU per streamed chunk, server process only, for two versions side by side.

Each round starts one version's ext_proc server in its own process (the real
servicer and runtime, uvloop, as ``tollgate run`` serves it) and drives it
from this process over real gRPC with the messages Envoy sends for a streamed
chat answer: request headers, the body, the response headers, then one message
per SSE event (50 content deltas, the usage event, ``[DONE]``) and the empty
end of stream. The CPU time of the server process alone (``/proc``) is divided
by the response-body messages, so the figure is what one chunk costs the
Python hop, gRPC included, with the exchange's other three messages spread
over its chunks. Versions alternate round by round so that machine noise hits
both; the table gives the median and min–max of the rounds and the ratio.

    python -m tests.bench.chunks [--baseline /path/to/other/checkout] [--rounds 5] [--streams 200] [--quota]
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
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent.parent
CHUNKS = 50

CONFIG = {
    "providers": {"openai": {"type": "openai", "base_url": "https://api.openai.example/v1",
                             "api_key": {"env": "OPENAI_KEY"}}},
    "models": {"gpt": {"targets": [{"provider": "openai", "model": "gpt-4o"}]}},
    "metrics": {"port": 0},
}


def events() -> list[bytes]:
    """The provider's stream as Envoy hands it over from a paced provider: one event per body message."""
    def event(obj: dict) -> bytes:
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}
    out = [event({**head, "choices": [{"index": 0, "delta": {"content": f"word{i} "}, "finish_reason": None}]})
           for i in range(CHUNKS)]
    out.append(event({**head, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": CHUNKS,
                                                       "total_tokens": 9 + CHUNKS}}))
    out.append(b"data: [DONE]\n\n")
    return out


def _serve(port: int, quota: bool, state: str) -> None:
    """The child: one ext_proc server on ``port`` until stdin closes."""
    import grpc
    import yaml
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    from extproc.config import parse_config
    from extproc.control.supervisor import use_uvloop
    from extproc.pipeline.runtime import build_runtime
    from extproc.pipeline.server import ExternalProcessor, grpc_options
    from tests.helpers import KEYS

    cfg = dict(CONFIG)
    if quota:
        cfg["quota"] = {"limits": {"org": {"usd_per_day": 1_000_000}}}
    env = {**KEYS, "XDG_STATE_HOME": state}
    config = parse_config(yaml.safe_dump(cfg), source="<bench>", env=env)

    async def run() -> None:
        rt = build_runtime(config, env)
        server = grpc.aio.server(options=grpc_options(8 << 20))
        pb_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(rt), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop(None)
        await rt.close()

    use_uvloop()
    asyncio.run(run())


async def _drive(port: int, streams: int, concurrency: int, pid: int) -> float:
    """Stream exchanges against the server at ``port``; its CPU µs per response-body message."""
    import grpc

    from tests.bench.run import cpu_of
    from tests.inprocess import Stream, body_message, chat, headers_message, request_headers

    evs = events()
    body = chat(stream=True)
    answer_headers = {":status": "200", "content-type": "text/event-stream", "x-tollgate-target": "gpt#0"}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

        from extproc.pipeline.server import FILTER_METADATA_KEY

        stub = pb_grpc.ExternalProcessorStub(channel)

        async def one(n: int) -> None:
            s = Stream(stub.Process(metadata=((FILTER_METADATA_KEY, "gateway"),)))
            await s.send(request_headers(request_id=f"r{n}"))
            await s.send(body_message("request_body", body))
            await s.send(headers_message("response_headers", answer_headers))
            for ev in evs:
                await s.send(body_message("response_body", ev, end_of_stream=False))
            await s.send(body_message("response_body", b"", end_of_stream=True))
            await s.close()

        async def worker(k: int, total: int, base: int) -> None:
            for n in range(k, total, concurrency):
                await one(base + n)

        await asyncio.gather(*(worker(k, 2 * concurrency, 0) for k in range(concurrency)))  # warm-up
        await asyncio.sleep(0.2)  # settlements of the warm-up finish
        before = cpu_of([pid])
        await asyncio.gather(*(worker(k, streams, 1000) for k in range(concurrency)))
        await asyncio.sleep(0.2)
        took = cpu_of([pid]) - before
    return took / (streams * (len(evs) + 1)) * 1e6


def _round(code: Path, args: argparse.Namespace) -> float:
    from tests.harness import free_port, wait_port

    port = free_port()
    with tempfile.TemporaryDirectory() as shim, tempfile.TemporaryDirectory() as state:
        os.symlink(code / "extproc", Path(shim) / "extproc")
        env = {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{HERE}"}
        cmd = [sys.executable, "-m", "tests.bench.chunks", "--serve", str(port), "--state", state,
               *(["--quota"] if args.quota else [])]
        child = subprocess.Popen(cmd, env=env, cwd=shim, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            wait_port(port)
            return asyncio.run(_drive(port, args.streams, args.concurrency, child.pid))
        finally:
            assert child.stdin is not None
            child.stdin.close()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--baseline", type=Path, help="another checkout whose extproc/ to compare with this one's")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--quota", action="store_true", help="with the quota stage (embedded store): metered streams")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--state", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        _serve(args.serve, args.quota, args.state)
        return
    versions = {"this checkout": HERE, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    got: dict[str, list[float]] = {name: [] for name in versions}
    for i in range(args.rounds):
        order = list(versions.items())
        for name, code in order if i % 2 == 0 else reversed(order):
            got[name].append(_round(code, args))
    load = os.getloadavg()
    mode = "metered (quota stage, embedded store)" if args.quota else "not metered (no quota)"
    print(f"\nServer CPU per streamed chunk, {CHUNKS + 2} events a stream, {args.streams} streams, "
          f"{args.concurrency} in flight, {mode}, {args.rounds} alternating rounds; "
          f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    print("| extproc/ | µs per chunk, median | min–max |")
    print("|---|---:|---:|")
    for name, values in got.items():
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f}–{max(values):.1f} |")
    if args.baseline:
        ratio = statistics.median(got["this checkout"]) / statistics.median(got["baseline"])
        print(f"\nratio this / baseline: {ratio:.3f}")


if __name__ == "__main__":
    main()
