"""A fallback attempt: translate and authenticate the request for the target Envoy chose.

This runs as an Envoy *upstream* filter, once per attempt, but Envoy skips it
for the primary target (index 0) when the router-level stage has already
prepared that one, so a first attempt costs no second gRPC stream. When GPT-4o
on OpenAI failed and Envoy's retry goes to Claude, this turns the request into
Anthropic's, from the parsed original, with Anthropic's key. Envoy names the
chosen target in a request header it fills from the endpoint metadata
(``x-tollgate-chosen: ALIAS#INDEX``); the exchange is found by its request id.
The answer is read by the router-level stage (``answer.py``), whichever target
gave it.

Envoy keeps the request as the router-level stage left it (the primary's path,
body and credential) for every retry; this stage replaces all of it, and when
its target takes the client's body unchanged but the primary's did not, it
sends the client's original bytes.

A key slot (``ALIAS#INDEX~K``, the same target once more) goes out with a
key of that provider this request has not tried yet. Envoy cannot be told to
pass over a slot (a reply from an upstream filter ends the whole request, it
is not retried), so a key slot is used whatever failed before it: a target on
a provider with a pool gets one more try per other key before the next one.
"""

from __future__ import annotations

import time

from extproc.pipeline import messages
from extproc.pipeline.runtime import Runtime
from extproc.errors import Internal
from extproc.pipeline.exchange import Exchange
from extproc.pipeline.outcome import classify
from extproc.pipeline.upstream import (
    CHOSEN_HEADER,
    PREPARED_HEADER,
    ROUTE_HEADER,
    parse_slot,
    prepare,
)


def fallback_reason(ex: Exchange) -> str:
    """Why the latest attempt failed, for the fallback metric: its outcome, or ``no_response``."""
    status = ex.outcomes[-1][1] if ex.outcomes else None
    if status is None:
        return "no_response"  # refused, timed out or reset: only Envoy saw it
    return classify(status, "application/json") or ("invalid_answer" if status < 300 else str(status))


class AttemptExchange:
    __slots__ = ("gw", "exchange", "body")

    def __init__(self, gw: Runtime) -> None:
        self.gw = gw
        self.exchange: Exchange | None = None
        self.body: bytes | None = None

    @property
    def request_id(self) -> str:
        return self.exchange.request_id if self.exchange is not None else ""

    def on_request_headers(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        headers = messages.headers_of(req.request_headers)
        ex = self.gw.exchanges.get(headers.get("x-request-id", ""))
        tag = parse_slot(headers.get(CHOSEN_HEADER, ""))
        if ex is None or tag is None or tag[0] != ex.alias:
            raise Internal("the gateway lost track of this request; it was not sent upstream")
        self.exchange = ex
        ex.holders += 1
        if tag[2]:  # a key slot: another key of the same target's provider
            ex.retry = "key"
        if ex.attempts:  # a retry: the previous attempt failed (outcome.py saw how, if it got an answer)
            self.gw.metrics.fallback(ex.alias, ex.provider, fallback_reason(ex))
            if ex.upstream_sent_at is not None:
                ex.failed_attempt_seconds += time.monotonic() - ex.upstream_sent_at
        ex.attempts += 1
        p = prepare(self.gw, ex, tag[1])
        body = p.body
        if body is None and ex.body_rewritten:
            body = ex.raw_body  # Envoy holds the primary's translation; this target takes the client's bytes
            p.set_headers["content-length"] = str(len(body))
        self.body = body
        remove = [*p.remove_headers, ROUTE_HEADER, PREPARED_HEADER, CHOSEN_HEADER]
        if body is None:
            # Nothing to change in the body: Envoy need not send it to us at all.
            return messages.cont("request_headers", set_headers=p.set_headers, remove_headers=remove,
                                 request_body_mode=messages.NONE, response_header_mode=messages.SKIP,
                                 response_body_mode=messages.NONE)
        return messages.cont("request_headers", set_headers=p.set_headers, remove_headers=remove)

    def on_request_body(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        return messages.cont("request_body", body=self.body)

    def on_response_headers(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        """Never asked for: the answer is read by the router-level stage (this filter's mode skips it)."""
        return messages.cont("response_headers")

    def on_response_body(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        return messages.cont("response_body")

    def close(self) -> None:
        ex = self.exchange
        if ex is None:
            return
        self.gw.release(ex)
