"""The do-nothing ext_proc server of ``tests.bench.memory_noop``: CONTINUE to every message.

    python tests/bench/memory_noop_server.py PORT END_ITSELF(0|1)

Run as a script, it imports grpcio, the Envoy protos and nothing of Tollgate's, so it runs on whichever
grpcio release comes first on ``PYTHONPATH`` (the generated stubs' version check is bypassed by a generic
handler). With END_ITSELF=1 it ends each stream after the last message Envoy sends for a request, as
Tollgate's server does; with 0 it waits for Envoy to end it.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb


def answer(req: Any) -> tuple[Any, bool]:
    """CONTINUE for the message's phase, and whether it is the last Envoy sends."""
    phase = req.WhichOneof("request")
    out = pb.ProcessingResponse()
    getattr(out, phase).SetInParent()
    last = ((phase == "response_body" and req.response_body.end_of_stream)
            or (phase == "response_headers" and req.response_headers.end_of_stream))
    return out, last


async def serve(port: int, end_itself: bool) -> None:
    async def process(requests: Any, context: Any) -> Any:
        async for req in requests:
            out, last = answer(req)
            yield out
            if end_itself and last:
                break

    handler = grpc.method_handlers_generic_handler("envoy.service.ext_proc.v3.ExternalProcessor", {
        "Process": grpc.stream_stream_rpc_method_handler(
            process, request_deserializer=pb.ProcessingRequest.FromString,
            response_serializer=pb.ProcessingResponse.SerializeToString)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"grpcio {grpc.__version__}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    coro = serve(int(sys.argv[1]), sys.argv[2] == "1")
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)
