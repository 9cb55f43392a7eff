"""The two shapes everything on the data path is built from: processors and stages.

A **processor** handles one Envoy ext_proc stream (one HTTP request as one
filter sees it). It has a method per phase Envoy sends us and a ``close``;
``server.py`` calls them by an explicit table (``dispatch``), so a new phase
or a misspelt handler is a type error, not a silently skipped message. The
router-level processor (``router.RouterExchange``), the fallback-attempt
processor (``attempt.AttemptExchange``) and the failed-attempt processor
(``outcome.OutcomeExchange``) are the implementations.

A **stage** is one step the router-level processor runs on a parsed, valid
request, in the order ``router.build_stages`` lists them (guard → cache →
admit → route). It is a callable taking the ``Exchange`` and returning:

- ``None``: carry on with the next stage;
- a ``ProcessingResponse``: answer Envoy with it, and run no later stage
  (a cache hit answers with an ImmediateResponse; the route stage always
  answers, with the routing headers);
- an awaitable of either, when the stage waits on I/O (a store, an IdP).

To refuse, a stage raises a ``GatewayError``: ``server.py`` turns it into the
client's ImmediateResponse. Stages are built once per runtime (a builder that
returns ``None`` when its feature is switched off, so a disabled feature costs
nothing per request) and keep no per-request state on themselves: whatever a
later step needs goes on the ``Exchange``.

Both kinds of method may return a coroutine instead of a value: most
requests need no I/O, and a plain call is several times cheaper than
creating and awaiting a coroutine on this hot path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeAlias

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.pipeline.exchange import Exchange

Reply: TypeAlias = "pb.ProcessingResponse | tuple[pb.ProcessingResponse, ...]"
"""One answer to one message; a tuple only to end a stream early (``messages.cut_stream``)."""

MaybeAwaitable: TypeAlias = "Reply | Awaitable[Reply]"

Verdict: TypeAlias = "pb.ProcessingResponse | None"
"""What a stage decides: answer now (a response), or let the next stage run (None)."""

Stage: TypeAlias = Callable[[Exchange], "Verdict | Awaitable[Verdict]"]


class Processor(Protocol):
    """One ext_proc stream: one method per phase, then ``close`` exactly once."""

    def on_request_headers(self, req: pb.ProcessingRequest) -> MaybeAwaitable: ...

    def on_request_body(self, req: pb.ProcessingRequest) -> MaybeAwaitable: ...

    def on_response_headers(self, req: pb.ProcessingRequest) -> MaybeAwaitable: ...

    def on_response_body(self, req: pb.ProcessingRequest) -> MaybeAwaitable: ...

    @property
    def exchange(self) -> Exchange | None:
        """The exchange this stream works on, once known (errors are recorded on it)."""
        ...

    @property
    def request_id(self) -> str:
        """Envoy's x-request-id of the stream, once the headers were read ("" before)."""
        ...

    def close(self) -> None:
        """The stream ended (normally, or reset by Envoy); release what it holds."""
        ...


def dispatch(p: Processor, phase: str | None, req: pb.ProcessingRequest) -> MaybeAwaitable:
    """Call ``p``'s handler for ``phase``; a phase we never ask for is passed on unchanged.

    Trailers are never requested (every mode override sets them to SKIP), but
    Envoy's protocol allows them, and an unanswered message stalls the stream.
    """
    if phase == "request_headers":
        return p.on_request_headers(req)
    if phase == "request_body":
        return p.on_request_body(req)
    if phase == "response_headers":
        return p.on_response_headers(req)
    if phase == "response_body":
        return p.on_response_body(req)
    resp = pb.ProcessingResponse()
    if phase in ("request_trailers", "response_trailers"):
        getattr(resp, phase).SetInParent()
    return resp
