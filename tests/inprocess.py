"""The ext_proc server in-process: the real servicer on a grpc.aio server at port 0, the real stub as Envoy.

No Envoy and no provider: a test plays Envoy's side of the protocol, message
by message, exactly as Envoy sends them (request headers, the buffered
body, then the response headers and body that Envoy would have got from the
target it chose), and reads each answer. A phase-ordering or metering spec
then runs in milliseconds instead of a multi-second end-to-end run, while
everything from the gRPC framing down to the translators is the shipped
code. The runtime is the one ``tollgate run`` builds (``build_runtime``), from
a config dict; its access log is captured as parsed records.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import grpc
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.config import parse_config
from extproc.pipeline.runtime import Runtime, build_runtime
from extproc.pipeline.server import FILTER_METADATA_KEY, ExternalProcessor, grpc_options
from tests.helpers import KEYS


def headers_message(phase: str, headers: dict[str, str], *, end_of_stream: bool = False) -> pb.ProcessingRequest:
    """``request_headers`` or ``response_headers``, with values in ``raw_value`` as Envoy sends them."""
    req = pb.ProcessingRequest()
    part = getattr(req, phase)
    part.end_of_stream = end_of_stream
    for k, v in headers.items():
        part.headers.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
    return req


def body_message(phase: str, body: bytes, *, end_of_stream: bool = True) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest()
    part = getattr(req, phase)
    part.body = body
    part.end_of_stream = end_of_stream
    return req


def set_headers(resp: pb.ProcessingResponse, phase: str) -> dict[str, str]:
    """The headers an answer to ``phase`` sets (what Envoy would apply)."""
    common = getattr(resp, phase).response
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


def removed_headers(resp: pb.ProcessingResponse, phase: str) -> list[str]:
    return list(getattr(resp, phase).response.header_mutation.remove_headers)


def immediate_json(resp: pb.ProcessingResponse) -> tuple[int, dict[str, Any], dict[str, str]]:
    """An ImmediateResponse's status, JSON body and headers."""
    ir = resp.immediate_response
    headers = {h.header.key: h.header.raw_value.decode() for h in ir.headers.set_headers}
    return ir.status.code, json.loads(ir.body) if ir.body else {}, headers


class Stream:
    """One ext_proc stream, as one of Envoy's two filters opens it."""

    def __init__(self, call: Any) -> None:
        self.call = call

    async def send(self, req: pb.ProcessingRequest, *, answers: int = 1) -> pb.ProcessingResponse:
        """Send one message and read its answer (``answers=2`` for a stream cut: the chunk, then the stop)."""
        await self.call.write(req)
        got = [await self.call.read() for _ in range(answers)]
        for resp in got:
            assert resp is not grpc.aio.EOF, "the server ended the stream instead of answering"
        return got[-1] if answers == 1 else got  # type: ignore[return-value]

    async def close(self) -> None:
        """Envoy is done with the stream; waits until the server has closed its side."""
        await self.call.done_writing()
        assert await self.call.read() is grpc.aio.EOF, "the server answered a message nobody sent"


class InProcessGateway:
    """A runtime from ``config`` (a dict, as in the YAML), served by the real servicer on a free port."""

    def __init__(self, config: dict[str, Any], env: dict[str, str] | None = None) -> None:
        cfg = {"metrics": {"port": 0}, **config}
        self.config = parse_config(yaml.safe_dump(cfg), source="<in-process>", env={**KEYS, **(env or {})})
        self.env = {**KEYS, **(env or {})}
        self.records: list[dict[str, Any]] = []
        self.runtime: Runtime | None = None
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> InProcessGateway:
        rt = self.runtime = build_runtime(self.config, self.env)
        rt.access_log = self._capture()
        self.processor = ExternalProcessor(rt)
        self._server = grpc.aio.server(options=grpc_options(8 << 20))
        pb_grpc.add_ExternalProcessorServicer_to_server(self.processor, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.ExternalProcessorStub(self._channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._channel is not None and self._server is not None and self.runtime is not None
        await self._channel.close()
        await self._server.stop(None)
        await self.runtime.close()

    def _capture(self) -> logging.Logger:
        records = self.records

        class Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(json.loads(record.getMessage()))

        log = logging.getLogger(f"tests.inprocess.access.{uuid.uuid4().hex}")
        log.propagate = False
        log.setLevel(logging.INFO)
        log.addHandler(Collect())
        return log

    def open(self, role: str = "gateway") -> Stream:
        """A new stream from the ``gateway`` (router-level) or ``attempt`` (upstream) filter."""
        return Stream(self.stub.Process(metadata=((FILTER_METADATA_KEY, role),)))

    async def plain_exchange(self, request_id: str, body: bytes, answer: bytes, target: str = "gpt#0",
                             headers: dict[str, str] | None = None) -> None:
        """The four messages of a plain (non-streamed) request answered 200 by ``target``, as Envoy sends them."""
        s = self.open()
        await s.send(request_headers(request_id=request_id, **(headers or {})))
        await s.send(body_message("request_body", body))
        await s.send(headers_message("response_headers", {":status": "200", "content-type": "application/json",
                                                          "x-tollgate-target": target}))
        await s.send(body_message("response_body", answer))
        await s.close()

    async def settled(self) -> list[dict[str, Any]]:
        """The access-log records, once every exchange's settlement (a background task) has finished."""
        assert self.runtime is not None
        for _ in range(100):
            tasks = set(self.runtime._tasks)
            if not tasks and len(self.runtime.exchanges) == 0:
                return self.records
            if tasks:
                await asyncio.wait(tasks, timeout=5)
            else:
                await asyncio.sleep(0.001)
        raise AssertionError("exchanges were never settled")


def request_headers(path: str = "/v1/chat/completions", method: str = "POST", *, request_id: str = "req-1",
                    **extra: str) -> pb.ProcessingRequest:
    return headers_message("request_headers", {":path": path, ":method": method, "x-request-id": request_id,
                                               "content-type": "application/json", **extra})


def chat(model: str = "gpt", **fields: Any) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello there"}], **fields}).encode()
