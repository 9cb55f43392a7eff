"""The gRPC ext_proc server: one small exchange object per Envoy stream.

``Process`` only dispatches: it reads a message, calls the processor's method
for that phase (``base.dispatch``), and writes exactly one answer (or, to end a streamed answer
early, that answer followed by an ImmediateResponse: ``messages.cut_stream``). A ``GatewayError`` becomes an
ImmediateResponse here and nowhere else; any other exception is logged and
answered with a 500 in the same shape, so one broken exchange never touches
another. Which filter a stream comes from is told by the gRPC metadata Envoy
sends (``x-tollgate-filter: gateway | attempt | outcome``): every routed
request has a ``gateway`` stream; only a fallback attempt opens an ``attempt``
stream, and only an attempt that failed an ``outcome`` stream. Errors take
the shape of the API the client speaks (OpenAI's, or Anthropic's on
``/v1/messages``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.errors import GatewayError, Internal
from extproc.pipeline import messages
from extproc.pipeline.attempt import AttemptExchange
from extproc.pipeline.base import Processor, dispatch
from extproc.pipeline.observe import MeterExchange
from extproc.pipeline.outcome import OutcomeExchange
from extproc.pipeline.relay import RELAYED_KEY, NotOwned, Peers, owned_request_id
from extproc.pipeline.router import RouterExchange, build_stages
from extproc.pipeline.runtime import Runtime

log = logging.getLogger("tollgate.server")

FILTER_METADATA_KEY = "x-tollgate-filter"


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, gw: Runtime, peers: Peers | None = None) -> None:
        self.gw = gw
        self.stages = build_stages(gw)  # once: the router-level stages, in order
        self.active = 0
        self.peers = peers or Peers((), [])  # the other workers (extproc.workers > 1): see relay.py

    def processor(self, role: str) -> Processor:
        """A new processor for one stream of the filter named ``role``."""
        if role == "attempt":
            return AttemptExchange(self.gw)
        if role == "outcome":
            return OutcomeExchange(self.gw)
        if role == "meter":
            return MeterExchange(self.gw)
        return RouterExchange(self.gw, self.stages)

    async def Process(  # noqa: N802 - the gRPC method name
        self, request_iterator: AsyncIterator[messages.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[messages.ProcessingResponse]:
        role, relayed = "gateway", False
        for key, value in context.invocation_metadata() or ():
            if key == FILTER_METADATA_KEY:
                role = value
            elif key == RELAYED_KEY:
                relayed = True
        requests = request_iterator
        if role != "gateway" and (relayed or self.peers):
            first = await anext(request_iterator, None)
            if first is None:
                return
            rid = owned_request_id(role, first)
            if rid is not None and rid not in self.gw.exchanges:
                if relayed:  # asked by a peer: not ours, and never passed on again
                    await context.abort(grpc.StatusCode.NOT_FOUND, "this worker does not hold the request")
                try:
                    async for answer in self.peers.relay(role, first, request_iterator):
                        yield answer
                    return
                except NotOwned:
                    pass  # nobody holds it: answered below, as a request the gateway lost track of
            requests = _prepend(first, request_iterator)
        async for answer in self._serve(self.processor(role), requests):
            yield answer

    async def _serve(
        self, ex: Processor, requests: AsyncIterator[messages.ProcessingRequest]
    ) -> AsyncIterator[messages.ProcessingResponse]:
        self.active += 1
        try:
            async for req in requests:
                phase = req.WhichOneof("request")
                try:
                    resp = dispatch(ex, phase, req)
                    if inspect.isawaitable(resp):  # stages that wait on I/O (JWKS, Redis) are coroutines
                        resp = await resp
                    if req.observability_mode:  # Envoy waits for no answer (observe.py)
                        if req.response_body.end_of_stream:
                            break  # ending the call here frees Envoy's side at once, not after its deferred close
                        continue
                    last = resp[-1] if isinstance(resp, tuple) else resp
                    if isinstance(resp, tuple):
                        for part in resp:
                            yield part
                    else:
                        yield resp
                except GatewayError as refusal:
                    self._note_error(ex, refusal)
                    last = messages.error_response(refusal, _request_id(ex), _anthropic(ex))
                    yield last
                except Exception:
                    log.exception("exchange failed in %s (request %s)", phase, ex.request_id or "?")
                    failure = Internal("the gateway failed to process this request")
                    self._note_error(ex, failure)
                    last = messages.error_response(failure, _request_id(ex), _anthropic(ex))
                    yield last
                if _final(req, phase, last):
                    break  # ours to end: see _final
        finally:
            self.active -= 1
            ex.close()

    def _note_error(self, ex: Processor, err: GatewayError) -> None:
        log.info("request %s refused: %s %s", ex.request_id or "-", err.status, err.code or err.type)
        exchange = ex.exchange
        if exchange is not None:
            exchange.status, exchange.error = err.status, err.code or err.type
        elif isinstance(ex, RouterExchange):
            self.gw.metrics.refused(err.status, err.code or err.type)


def _final(req: messages.ProcessingRequest, phase: str, answer: messages.ProcessingResponse) -> bool:
    """Whether Envoy has nothing more to send on this stream once ``answer`` is sent.

    Then the server ends the stream itself, at once, instead of waiting for Envoy. With the generated
    config Envoy half-closes the stream and waits for that end (``envoy.ext_proc_close: graceful``);
    with ``reset`` it resets a stream still open when its HTTP exchange ends, and a reset costs grpcio
    (aio) ~80-120 bytes of native memory that are never freed (grpc/grpc#43360; README, "Memory").
    Ending it here keeps the graceful close short and the reset's cost at its smallest.
    """
    if answer.HasField("immediate_response"):
        return True  # the request ends here: Envoy sends nothing more
    if phase == "response_body":
        return req.response_body.end_of_stream
    if phase == "response_headers":
        return req.response_headers.end_of_stream
    return phase == "response_trailers"


async def _prepend(
    first: messages.ProcessingRequest, rest: AsyncIterator[messages.ProcessingRequest]
) -> AsyncIterator[messages.ProcessingRequest]:
    yield first
    async for req in rest:
        yield req


def _anthropic(ex: Processor) -> bool:
    """Whether the client speaks Anthropic's API: its errors then take that shape."""
    if isinstance(ex, RouterExchange):
        return ex.inbound == "anthropic"
    return ex.exchange is not None and ex.exchange.inbound == "anthropic"


def _request_id(ex: Processor) -> dict[str, str]:
    rid = ex.request_id
    return {"x-request-id": rid} if rid else {}


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


async def start_server(
    gw: Runtime, worker: int = 0
) -> tuple[grpc.aio.Server, ExternalProcessor, health.HealthServicer]:
    """Serve ext_proc as worker ``worker`` of ``extproc.workers``, on that worker's address."""
    cfg = gw.config
    options = grpc_options(2 * cfg.limits.max_request_bytes + (1 << 20))
    server = grpc.aio.server(options=options)
    peers = Peers([cfg.extproc.worker(i) for i in range(cfg.workers) if i != worker], options)
    processor = ExternalProcessor(gw, peers)
    pb_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = cfg.extproc.worker(worker)
    bound = server.add_insecure_port(address.grpc_target)
    if not address.unix_socket and bound == 0:
        raise OSError(f"cannot listen on {address.grpc_target}")
    await server.start()
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    return server, processor, health_servicer


async def _set_health(h: health.HealthServicer, status: int) -> None:
    result = h.set("", status)
    if asyncio.iscoroutine(result):
        await result
    result = h.set("envoy.service.ext_proc.v3.ExternalProcessor", status)
    if asyncio.iscoroutine(result):
        await result


async def drain(server: grpc.aio.Server, h: health.HealthServicer, grace: float) -> None:
    """Stop taking new streams and let in-flight ones finish within ``grace`` seconds."""
    await _set_health(h, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace)


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
