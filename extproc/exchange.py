"""What the gateway knows about one HTTP exchange, shared by its two filters.

The router-level ("gateway") filter creates an ``Exchange`` when it has read
the request; each upstream attempt finds it by Envoy's request id, adds what
it learns (target, status, usage, token timings), and the gateway filter
writes the access log when its stream ends. Both filters' gRPC streams come to
this one process, so a dictionary is enough.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from extproc.providers.base import Usage


@dataclass(slots=True)
class Exchange:
    request_id: str
    endpoint: str  # "chat" | "embeddings"
    alias: str
    body: dict
    stream: bool = False
    principal: str | None = None  # who is calling (set by authentication)
    team: str | None = None  # which team the call is charged to
    received_at: float = field(default_factory=time.monotonic)  # full request read
    attempts: int = 0
    provider: str | None = None
    model: str | None = None  # the backend model that answered
    status: int | None = None
    usage: Usage | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    content_chunks: int = 0
    stream_failed: bool = False
    error: str | None = None
    holders: int = 1  # the gateway stream, plus each attempt stream while it runs


class Exchanges:
    """Live exchanges by request id."""

    def __init__(self) -> None:
        self._live: dict[str, Exchange] = {}

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._live

    def add(self, ex: Exchange) -> None:
        self._live[ex.request_id] = ex

    def get(self, request_id: str) -> Exchange | None:
        return self._live.get(request_id)

    def release(self, ex: Exchange) -> bool:
        """Drop one holder; True when that was the last, and the exchange is over.

        The gateway stream can close before the answering attempt has read the
        response body (Envoy ends it once the response headers pass), so the
        exchange ends when both are done, whichever is last.
        """
        ex.holders -= 1
        if ex.holders > 0:
            return False
        self._live.pop(ex.request_id, None)
        return True
