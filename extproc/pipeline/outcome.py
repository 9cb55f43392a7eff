"""Each failed attempt's outcome: what it says about the key, and whether to move on.

Envoy retries on its own; a failed attempt never passes the router-level
stage. So an Envoy *upstream* filter hands this stage the response headers of
every attempt that did not plainly succeed (a status of 400 or more, or a 2xx
that is neither JSON nor an event stream); a matcher in Envoy skips it for
every other answer, so a request that succeeds opens no stream here. Envoy
holds the attempt's headers until this stage answers, so what it decides
applies before Envoy picks the next attempt:

* the outcome is recorded on the exchange (``x-tollgate-attempt-outcomes``,
  the access log);
* a 401 or 403 quarantines the key that attempt carried; a 429 with
  ``Retry-After`` cools it down (``credentials/key_pool.py``);
* the answer gets ``x-tollgate-retry`` when Envoy should try the next slot,
  for a 401/403 or an outcome the alias's ``fallback_on`` names: ``key`` when
  a key slot of this target follows (the same provider, another key),
  ``fallback`` when a later target does. Without it, this answer is the
  client's. Statuses are decided here; failures without an answer (refused
  connections, timeouts, resets) are retried by Envoy itself, as the policy
  was rendered (``control/envoy_config.py``).
"""

from __future__ import annotations

import logging

from extproc.errors import Internal
from extproc.pipeline import messages
from extproc.pipeline.exchange import Exchange
from extproc.pipeline.runtime import Runtime
from extproc.pipeline.upstream import REQUEST_ID_HEADER, RETRY_HEADER, TARGET_HEADER, key_slots, parse_slot

log = logging.getLogger("tollgate.outcome")

_ANSWER_TYPES = ("application/json", "text/event-stream")


def classify(status: int, content_type: str) -> str | None:
    """The ``fallback_on`` name of an attempt's outcome; None for one no policy retries (a client error)."""
    if status in (401, 403, 429):
        return str(status)
    if status >= 500:
        return "5xx"
    if 200 <= status < 300 and not content_type.lower().startswith(_ANSWER_TYPES):
        return "invalid_answer"
    return None


def retry_after(value: str) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds only; providers do not send dates)."""
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 < seconds <= 3600 else None


class OutcomeExchange:
    """The processor of one ``outcome`` stream (``base.Processor``): a single response-headers message."""

    __slots__ = ("gw",)

    def __init__(self, gw: Runtime) -> None:
        self.gw = gw

    @property
    def exchange(self) -> Exchange | None:  # nothing held between messages: one message per stream
        return None

    @property
    def request_id(self) -> str:
        return ""

    def on_request_headers(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        return messages.cont("request_headers")  # never asked for (the filter skips the request)

    def on_request_body(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        return messages.cont("request_body")

    def on_response_body(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        return messages.cont("response_body")

    def on_response_headers(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        headers = messages.headers_of(req.response_headers)
        remove = [REQUEST_ID_HEADER]
        if RETRY_HEADER in headers:  # a key slot passed over (attempt.py): already asks for the next slot
            return messages.cont("response_headers", remove_headers=remove)
        ex = self.gw.exchanges.get(headers.get(REQUEST_ID_HEADER, ""))
        tag = parse_slot(headers.get(TARGET_HEADER, ""))
        if ex is None or tag is None or tag[0] != ex.alias:
            raise Internal("the gateway lost track of this request")
        status = int(headers.get(":status", "0") or 0)
        decision = self.decide(ex, tag[1], tag[2], status, headers)
        ex.retry = decision
        if decision is None:
            return messages.cont("response_headers", remove_headers=remove)
        return messages.cont("response_headers", set_headers={RETRY_HEADER: decision}, remove_headers=remove)

    def decide(self, ex: Exchange, index: int, slot: int, status: int, headers: dict[str, str]) -> str | None:
        gw = self.gw
        alias, _target, provider = gw.config.target(ex.alias, index)
        if ex.outcomes:
            ex.outcomes[-1][1] = status
        outcome = classify(status, headers.get("content-type", ""))
        key = ex.key_slot if ex.target_index == index else None
        if key is not None and outcome in ("401", "403"):
            gw.vault.quarantine(provider.name, key, status, ex.request_id)
        elif key is not None and outcome == "429":
            wait = retry_after(headers.get("retry-after", ""))
            if wait is not None:
                gw.vault.cool_down(provider.name, key, wait)
        if outcome is None or (outcome not in alias.fallback_on and outcome not in ("401", "403")):
            return None
        if slot + 1 < key_slots(gw.vault.pool_size(provider.name)):
            return "key"  # Envoy's next slot is this target again: it gets another key (attempt.py)
        if outcome in alias.fallback_on and index + 1 < len(alias.targets):
            return "fallback"
        return None

    def close(self) -> None:
        return None
