"""Cuts: what Envoy 1.40 delivers to the client when a provider's connection breaks mid-stream, per way of
placing an ext_proc filter on the response body.

    python -m tests.bench.cuts --out tests/bench/cuts.md [--runs 10]

Why a harness of its own: the question is about Envoy, not about Tollgate's stages, so each variant runs a
real Envoy (the venv's, 1.40) with one ext_proc filter configured the way under test, beside a minimal
pass-through processor (this file, grpc.aio: it answers every body message at once and changes nothing,
the fastest answer a processor can give) and a raw provider (this file, asyncio on a socket: an SSE answer
of ``CHUNKS`` events, one HTTP chunk each, 20 ms apart, then the TCP connection aborted ``gap`` ms after the
last one; with gap 0 the abort follows the last write directly, so Envoy reads both in one go). The client
is a raw socket that counts the SSE events it received and whether the chunked body ended properly.

Variants (each alone, one after the other):

* ``no ext_proc``: the router alone, the reference for what Envoy itself delivers;
* ``STREAMED``: the mode Tollgate uses; each chunk waits for the processor's answer;
* ``STREAMED, 1 ms per chunk``: the same with a processor that spends 1 ms on a chunk (real work);
* ``FULL_DUPLEX_STREAMED``: the processor returns the body in its own time (``streamed_response``);
* ``BUFFERED_PARTIAL``: Envoy buffers up to the buffer limit, then sends;
* ``STREAMED, observability_mode``: chunks are sent to the processor and passed on at once, without
  waiting (nothing can be changed then);
* ``STREAMED, upstream filter``: the ext_proc filter in the router's upstream filter chain (per attempt)
  instead of the connection manager's;
* ``STREAMED, retry on reset``: the route retries on ``reset`` (Envoy never retries once the response began).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from tests.harness import ENVOY, free_port, wait_port, wait_ready

CHUNKS = 5
PACE = 0.02  # seconds between the provider's events
_T = "type.googleapis.com/"


# --------------------------------------------------------------------------- the raw provider


def event(i: int) -> bytes:
    data = json.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]})
    return f"data: {data}\n\n".encode()


class RawProvider:
    """An SSE answer of CHUNKS events, then the connection aborted ``gap`` seconds after the last one."""

    def __init__(self) -> None:
        self.port = free_port()
        self.gap = 0.0
        self.dropped_by_envoy = 0
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(5)

    async def _serve(self) -> None:
        self.server = await asyncio.start_server(self._answer, "127.0.0.1", self.port)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            for i in range(CHUNKS):
                e = event(i)
                writer.write(b"%x\r\n%s\r\n" % (len(e), e))
                if i < CHUNKS - 1:
                    await writer.drain()
                    await asyncio.sleep(PACE)
            if self.gap:
                await writer.drain()
                await asyncio.sleep(self.gap)
        except ConnectionError:  # Envoy gave up on this answer first (counted by the client)
            self.dropped_by_envoy += 1
        writer.transport.abort() if not writer.transport.get_write_buffer_size() else writer.transport.close()


# --------------------------------------------------------------------------- the pass-through processor


class PassThrough(pb_grpc.ExternalProcessorServicer):
    def __init__(self, duplex: bool, work: float) -> None:
        self.duplex = duplex
        self.work = work

    async def Process(self, requests: AsyncIterator[pb.ProcessingRequest],  # noqa: N802 - gRPC's name
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProcessingResponse]:
        async for req in requests:
            out = pb.ProcessingResponse()
            kind = req.WhichOneof("request")
            if kind == "response_body":
                if self.work:
                    await asyncio.sleep(self.work)
                out.response_body.SetInParent()
                if self.duplex:
                    streamed = out.response_body.response.body_mutation.streamed_response
                    streamed.body = req.response_body.body
                    streamed.end_of_stream = req.response_body.end_of_stream
            elif kind in ("request_headers", "response_headers", "request_body", "request_trailers",
                          "response_trailers"):
                getattr(out, kind).SetInParent()
            yield out


def processor_main(port: int, duplex: bool, work: float) -> None:
    async def serve() -> None:
        server = grpc.aio.server()
        pb_grpc.add_ExternalProcessorServicer_to_server(PassThrough(duplex, work), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


# --------------------------------------------------------------------------- Envoy, per variant


def ext_proc(port_mode: str, observe: bool) -> dict[str, Any]:
    mode = {"request_header_mode": "SKIP", "response_header_mode": "SKIP", "request_body_mode": "NONE",
            "response_body_mode": port_mode, "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SEND" if port_mode == "FULL_DUPLEX_STREAMED" else "SKIP"}
    return {"name": "envoy.filters.http.ext_proc", "typed_config": {
        "@type": _T + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "processor"}},
        "failure_mode_allow": False, "message_timeout": "1s", "processing_mode": mode,
        "observability_mode": observe}}


def bootstrap(variant: dict[str, Any], listen: int, admin: int, processor: int, provider: int) -> dict[str, Any]:
    router: dict[str, Any] = {"@type": _T + "envoy.extensions.filters.http.router.v3.Router"}
    filters: list[dict[str, Any]] = []
    if variant.get("mode"):
        f = ext_proc(variant["mode"], variant.get("observe", False))
        if variant.get("upstream"):
            router["upstream_http_filters"] = [f, {"name": "envoy.filters.http.upstream_codec", "typed_config": {
                "@type": _T + "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}}]
        else:
            filters.append(f)
    filters.append({"name": "envoy.filters.http.router", "typed_config": router})
    route: dict[str, Any] = {"cluster": "provider", "timeout": "10s"}
    if variant.get("retry"):
        route["retry_policy"] = {"retry_on": "reset,connect-failure", "num_retries": 1}
    h2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}

    def cluster(name: str, port: int, extra: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "type": "STATIC", "connect_timeout": "1s", **extra, "load_assignment": {
            "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}}}]}]}}

    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                           "filter_chains": [{"filters": [{
                               "name": "envoy.filters.network.http_connection_manager", "typed_config": {
                                   "@type": _T + "envoy.extensions.filters.network.http_connection_manager.v3."
                                   "HttpConnectionManager",
                                   "stat_prefix": "cuts", "http_filters": filters,
                                   "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
                                       {"match": {"prefix": "/"}, "route": route}]}]}}}]}]}],
            "clusters": [cluster("provider", provider, {}),
                         cluster("processor", processor, {"typed_extension_protocol_options": h2})],
        },
    }


# --------------------------------------------------------------------------- the client


def fetch(port: int) -> tuple[int, bool]:
    """(SSE events received, whether the chunked body ended with its last chunk)."""
    body = b'{"stream": true}'
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(body), body))
        raw = b""
        try:
            while chunk := s.recv(65536):
                raw += chunk
                if raw.endswith(b"\r\n0\r\n\r\n"):
                    break
        except ConnectionResetError:
            pass
    if not raw.startswith(b"HTTP/1.1 200"):
        print("not a 200:", raw[:300], file=sys.stderr)
    return raw.count(b"data: "), raw.endswith(b"\r\n0\r\n\r\n")


VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("no ext_proc (reference)", {}),
    ("STREAMED (Tollgate's mode)", {"mode": "STREAMED"}),
    ("STREAMED, 1 ms of work per chunk", {"mode": "STREAMED", "work": 0.001}),
    ("FULL_DUPLEX_STREAMED", {"mode": "FULL_DUPLEX_STREAMED", "duplex": True}),
    ("BUFFERED_PARTIAL", {"mode": "BUFFERED_PARTIAL"}),
    ("STREAMED, observability_mode", {"mode": "STREAMED", "observe": True}),
    ("STREAMED, as an upstream filter", {"mode": "STREAMED", "upstream": True}),
    ("STREAMED, retry_on reset", {"mode": "STREAMED", "retry": True}),
]
GAPS = (0.0, 0.002, 0.010, 0.050)


def run_variant(variant: dict[str, Any], provider: RawProvider, runs: int, tmp: Path) -> dict[float, list[tuple[int, bool]]]:
    listen, admin, processor = free_port(), free_port(), free_port()
    proc = None
    if variant.get("mode"):
        proc = subprocess.Popen([sys.executable, "-m", "tests.bench.cuts", "--processor", str(processor),
                                 "1" if variant.get("duplex") else "0", str(variant.get("work", 0.0))])
    cfg = tmp / "envoy.json"
    cfg.write_text(json.dumps(bootstrap(variant, listen, admin, processor, provider.port)))
    envoy = subprocess.Popen([ENVOY, "-c", str(cfg), "--disable-hot-restart", "--concurrency", "2", "-l", "error"],
                             stdout=(tmp / "envoy.log").open("ab"), stderr=subprocess.STDOUT)
    try:
        wait_ready(admin, watch=(envoy,))
        if proc is not None:
            wait_port(processor)
        fetch(listen)  # warm: Envoy's first gRPC connection to the processor

        out: dict[float, list[tuple[int, bool]]] = {}
        for gap in GAPS:
            provider.gap = gap
            out[gap] = [fetch(listen) for _ in range(runs)]
        return out
    finally:
        for p in (envoy, proc):
            if p is not None:
                p.terminate()
                p.wait(10)


def table(results: list[tuple[str, dict[float, list[tuple[int, bool]]]]], runs: int) -> str:
    head = "| variant | " + " | ".join(f"gap {g * 1000:.0f} ms" for g in GAPS) + " |"
    lines = [head, "|---" * (len(GAPS) + 1) + "|"]
    for name, by_gap in results:
        cells = []
        for gap in GAPS:
            got = by_gap[gap]
            whole = sum(1 for n, _ in got if n == CHUNKS)
            ended = sum(1 for _, end in got if end)
            counts = sorted({n for n, _ in got if n != CHUNKS})
            cell = f"{whole}/{runs}" + (f" (others: {', '.join(map(str, counts))})" if counts else "")
            cells.append(cell + (f", {ended} ended cleanly" if ended else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--processor", nargs=3)
    a = ap.parse_args()
    if a.processor:
        processor_main(int(a.processor[0]), a.processor[1] == "1", float(a.processor[2]))
        return
    provider = RawProvider()
    results = []
    with tempfile.TemporaryDirectory() as d:
        for name, variant in VARIANTS:
            results.append((name, run_variant(variant, provider, a.runs, Path(d))))
            print(name, provider.dropped_by_envoy, {g: [n for n, _ in r] for g, r in results[-1][1].items()}, file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    ended = sum(end for _, by_gap in results for got in by_gap.values() for _, end in got)
    text = (f"# Cuts: SSE events the client received of the {CHUNKS} the provider sent before aborting its "
            f"connection\n\nGenerated {time.strftime('%Y-%m-%d %H:%M %Z')} by `python -m tests.bench.cuts` "
            f"({a.runs} runs a cell; load average {load:.1f} on {os.cpu_count()} cores). A cell: runs in which "
            f"all {CHUNKS} events arrived (and the counts seen otherwise). Runs whose chunked body ended properly "
            f"(a clean end, where an error event could follow): {ended} of "
            f"{len(results) * len(GAPS) * a.runs}; Envoy resets the client's stream.\n\n"
            + table(results, a.runs) + "\n")
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
