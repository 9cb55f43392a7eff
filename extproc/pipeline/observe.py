"""Observed streams: chunks that pass at once and are read on the side (``stream_chunks: observe``).

By default every streamed chunk waits in Envoy until the gateway answers it
(STREAMED body mode): that is what lets the gateway translate, scrub, guard
and cut a stream, and it is also one gRPC round trip before each chunk moves
on, which is most of the first token's added time and of the Python CPU per
chunk (README, Performance). An alias with ``stream_chunks: observe`` gives
that up for its streams: Envoy's ``tollgate.meter`` filter runs in ext_proc's
observability mode, sending each chunk to this server without waiting for an
answer, and the gateway stream switches its own body processing off once the
answer's headers show a 200 event stream. The chunks are still read in full
here (usage, generated text, token times, the cache), on a second gRPC
stream that finds the exchange by its request id.

Only streams that pass unchanged can be observed: every target speaks
OpenAI's stream format (checked when the config loads), the client asked for
usage itself (``stream_options.include_usage``; otherwise the gateway must
remove the usage event it added), it speaks OpenAI's API, and no guardrails
are configured. What observing gives up, in exchange: the budget cut-off
mid-stream (the stream is counted, and billed by the provider's usage, but
never ended at the budget), the scrubbing of a credential echoed inside an
in-band error event (error *answers*, non-200, are still held and scrubbed),
the per-stream time bounds (``answer_timeout`` and ``min_bytes_per_second``
are Envoy's route timeout and idle timeout only), and Anthropic's or any
other translation. Envoy only sends a chunk to this server; it never waits.

Order: the meter filter sits after the gateway filter on the way in, so it
sees the answer first on the way back, and its chunks can reach this server
before the gateway stream's response headers are read. They wait in the
``Observer`` until the answer stage has seen the headers (``start``), or are
dropped when it decided not to observe (an error answer, Envoy's own reply).
The gateway stream closes when the HTTP stream ends; its settlement waits (at
most ``GRACE`` seconds) for the meter stream's last chunk.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from extproc.pipeline import messages

if TYPE_CHECKING:
    from extproc.pipeline.answer import Answer
    from extproc.pipeline.exchange import Exchange
    from extproc.pipeline.runtime import Runtime

OBSERVE_HEADER = "x-tollgate-observe"  # request: the meter filter reads this exchange's answer
GRACE = 2.0  # seconds a closed gateway stream waits for the meter stream's last chunk


def observable(rt: Runtime, ex: Exchange) -> bool:
    """Whether ``ex``'s answer may pass unheld (see the module docstring)."""
    if not ex.stream or ex.inbound != "openai" or rt.guardrails is not None:
        return False
    if rt.config.models[ex.alias].stream_chunks != "observe":
        return False
    opts = ex.body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


class Observer:
    """An observed exchange's chunks, from the meter stream to the gateway stream's answer stage."""

    __slots__ = ("answer", "pending", "ignored", "done")

    def __init__(self) -> None:
        self.answer: Answer | None = None  # set once the answer stage has read the headers and observes
        self.pending: list[tuple[bytes, bool]] = []  # chunks that came before that
        self.ignored = False  # the answer is not observed (an error, Envoy's own reply): chunks are dropped
        self.done = asyncio.Event()  # the meter stream saw the end of the answer, or ended

    def feed(self, ex: Exchange, body: bytes, end: bool) -> None:
        if self.answer is not None:
            self.answer.observe(ex, body, end)
        elif not self.ignored:
            self.pending.append((body, end))
        if end:
            self.done.set()

    def start(self, ex: Exchange, answer: Answer) -> None:
        self.answer = answer
        pending, self.pending = self.pending, []
        for body, end in pending:
            answer.observe(ex, body, end)

    def ignore(self) -> None:
        self.ignored = True
        self.pending = []


class MeterExchange:
    """The processor of one ``meter`` stream (``base.Processor``): observability messages, never answered."""

    __slots__ = ("gw", "ex", "observer", "request_id", "looked")

    def __init__(self, gw: Runtime) -> None:
        self.gw = gw
        self.ex: Exchange | None = None
        self.observer: Observer | None = None
        self.request_id = ""
        self.looked = False

    @property
    def exchange(self) -> Exchange | None:
        return self.ex

    def on_request_headers(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        return messages.cont("request_headers")  # never sent (the filter skips the request)

    def on_request_body(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        return messages.cont("request_body")

    def on_response_headers(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        return messages.cont("response_headers")

    def on_response_body(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        if not self.looked:  # the first chunk carries the request id (the filter's response attribute)
            self.looked = True
            self.request_id = _request_id(req)
            self.ex = self.gw.exchanges.get(self.request_id)
            self.observer = self.ex.observed if self.ex is not None else None
        if self.observer is not None and self.ex is not None:
            self.observer.feed(self.ex, req.response_body.body, req.response_body.end_of_stream)
        return _UNANSWERED  # the server sends nothing back for an observability message

    def close(self) -> None:
        if self.observer is not None:
            self.observer.done.set()  # ended, with or without the answer's end: nothing more will come


REQUEST_ID_ATTRIBUTE = "request.headers['x-request-id']"
_UNANSWERED = messages.cont("response_body")


def _request_id(req: messages.ProcessingRequest) -> str:
    attrs: Any = req.attributes
    if "envoy.filters.http.ext_proc" not in attrs:
        return ""
    fields = attrs["envoy.filters.http.ext_proc"].fields
    return fields[REQUEST_ID_ATTRIBUTE].string_value if REQUEST_ID_ATTRIBUTE in fields else ""
