"""Several ext_proc workers behind one Envoy: a stream that lands on the wrong one is relayed to its owner.

With ``extproc.workers: N`` Envoy balances every gRPC stream across N
processes on its own. A plain request is one ``gateway`` stream, so it stays
in one process from its headers to its last chunk. A fallback ``attempt`` and
a failed attempt's ``outcome`` stream are separate streams of the same
request, and may land on another worker than the one holding the request's
exchange (its parsed body, the keys it tried, its quota hold, the outcomes
the answer stage reads back).

Why a relay and not a handoff in headers: the state flows both ways (an
attempt records what it tried and when it was sent; an outcome records how it
failed; the gateway stream reads both when the answer comes), and the parsed
request can be megabytes. Carrying it in headers would cost every request;
the relay costs nothing on the paths that carry the load (no fallback: no
second stream at all) and one local gRPC hop for a fallback that landed on
the other worker. The owner is found by asking the peers in turn with the
stream's first message: a worker that does not hold the request refuses a
relayed stream with ``NOT_FOUND`` before doing anything, and never relays it
further (no loops). A relayed stream carries ``x-tollgate-relayed`` in its
gRPC metadata; that metadata comes only from Envoy (the filter role) or from
a peer on a loopback address or a socket in the runtime directory, never from
an HTTP client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.config import Address
from extproc.pipeline import messages
from extproc.pipeline.upstream import REQUEST_ID_HEADER, RETRY_HEADER

log = logging.getLogger("tollgate.relay")

RELAYED_KEY = "x-tollgate-relayed"


class NotOwned(Exception):
    """No peer holds the request: the stream is answered here (as a request the gateway lost track of)."""


def owned_request_id(role: str, first: messages.ProcessingRequest) -> str | None:
    """The request id whose exchange a stream of ``role`` needs, from its first message (None: it needs none)."""
    if role == "attempt" and first.HasField("request_headers"):
        return messages.headers_of(first.request_headers).get("x-request-id", "")
    if role == "outcome" and first.HasField("response_headers"):
        headers = messages.headers_of(first.response_headers)
        if RETRY_HEADER in headers:  # a key slot passed over: answered without the exchange
            return None
        return headers.get(REQUEST_ID_HEADER, "")
    return None


class Peers:
    """Channels to the other workers of this gateway, opened on first use and kept."""

    def __init__(self, addresses: Sequence[Address], options: list[tuple[str, int]]) -> None:
        self._addresses = list(addresses)
        self._options = options
        self._stubs: dict[str, pb_grpc.ExternalProcessorStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def __bool__(self) -> bool:
        return bool(self._addresses)

    def _stub(self, a: Address) -> pb_grpc.ExternalProcessorStub:
        target = a.grpc_target
        stub = self._stubs.get(target)
        if stub is None:
            channel = grpc.aio.insecure_channel(target, options=self._options)
            self._channels.append(channel)
            stub = self._stubs[target] = pb_grpc.ExternalProcessorStub(channel)
        return stub

    async def relay(
        self, role: str, first: messages.ProcessingRequest,
        rest: AsyncIterator[messages.ProcessingRequest],
    ) -> AsyncIterator[messages.ProcessingResponse]:
        """The owner's answers to this stream's messages; raises ``NotOwned`` if no peer holds the request."""
        for address in self._addresses:
            call = self._stub(address).Process(metadata=(("x-tollgate-filter", role), (RELAYED_KEY, "1")))
            try:
                await call.write(first)
                answer = await call.read()
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    continue  # not this one's (or it is down): ask the next
                raise
            if answer is grpc.aio.EOF:
                continue
            log.info("relayed %s %s stream to the worker on %s", "an" if role[0] in "aeiou" else "a", role,
                     address.grpc_target)
            yield answer
            pump = asyncio.get_running_loop().create_task(_forward(rest, call))
            try:
                while (answer := await call.read()) is not grpc.aio.EOF:
                    yield answer
            finally:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await pump
            return
        raise NotOwned()

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


async def _forward(rest: AsyncIterator[messages.ProcessingRequest], call: grpc.aio.StreamStreamCall) -> None:
    async for req in rest:
        await call.write(req)
    await call.done_writing()
