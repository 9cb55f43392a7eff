"""The router-level exchange: read the request, check it, pick the route.

Envoy sends this filter the request headers and the buffered request body.
It answers what it can itself (``/v1/models``, every error) with an
ImmediateResponse, and otherwise sets the internal routing header that selects
the alias's route (whose cluster lists the alias's targets in fallback order)
and clears the route cache.
"""

from __future__ import annotations

import json
import time

from extproc import messages
from extproc.app import Gateway
from extproc.errors import BadRequest, MethodNotAllowed, NotFound
from extproc.exchange import Exchange
from extproc.requests import check_chat, check_embeddings, parse_json, resolve_alias

ROUTE_HEADER = "x-tollgate-route"
INTERNAL_PREFIX = "x-tollgate-"

ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
    "/v1/models": "models",
}


class GatewayExchange:
    __slots__ = ("gw", "endpoint", "request_id", "exchange", "started")

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.endpoint: str | None = None
        self.request_id = ""
        self.exchange: Exchange | None = None
        self.started = time.monotonic()

    def on_request_headers(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        headers = messages.headers_of(req.request_headers)
        self.request_id = headers.get("x-request-id", "")
        path = headers.get(":path", "/").split("?", 1)[0].rstrip("/") or "/"
        method = headers.get(":method", "GET")
        endpoint = ENDPOINTS.get(path)
        if endpoint is None:
            raise NotFound(f"unknown path {path[:200]!r}; this gateway serves {', '.join(ENDPOINTS)}", code="unknown_url")
        if endpoint == "models":
            if method != "GET":
                raise MethodNotAllowed(f"{path} takes GET")
            return messages.immediate(200, self.models_body(), {"x-request-id": self.request_id})
        if method != "POST":
            raise MethodNotAllowed(f"{path} takes POST")
        if req.request_headers.end_of_stream:
            raise BadRequest("request body is empty; expected a JSON object", code="invalid_json")
        self.endpoint = endpoint
        internal = [k for k in headers if k.startswith(INTERNAL_PREFIX)]
        return messages.cont("request_headers", remove_headers=internal)

    def on_request_body(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        gw = self.gw
        body = parse_json(req.request_body.body, gw.config.limits.max_request_bytes)
        endpoint = self.endpoint or "chat"
        alias = resolve_alias(body, gw.config, endpoint)
        if endpoint == "chat":
            check_chat(body)
        else:
            check_embeddings(body)
        rid = self.request_id
        if not rid or rid in gw.exchanges:
            raise BadRequest("a request with this x-request-id is already in flight", code="duplicate_request_id")
        self.exchange = Exchange(rid, endpoint, alias, body, stream=bool(body.get("stream")), started_at=self.started)
        gw.exchanges.add(self.exchange)  # holds one reference until this stream closes
        return messages.cont("request_body", set_headers={ROUTE_HEADER: alias}, clear_route_cache=True)

    def models_body(self) -> bytes:
        created = 1_700_000_000
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": a.owned_by}
            for name, a in self.gw.config.models.items()
        ]
        return json.dumps({"object": "list", "data": data}).encode()

    def close(self) -> None:
        ex = self.exchange
        if ex is None:
            return
        self.gw.release(ex)
