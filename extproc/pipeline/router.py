"""The router-level exchange: read the request, check it, route it, read the answer.

Envoy sends this filter the request headers and the buffered request body.
It answers what it can itself (``/v1/models``, every error) with an
ImmediateResponse, and otherwise sets the internal routing header that selects
the alias's route (whose cluster lists the alias's targets in fallback order)
and clears the route cache.

It also prepares the request for the alias's primary target (path, host,
translated body, the provider's key; ``upstream.prepare``), so Envoy's first
attempt needs no gRPC stream of its own; only a fallback runs the per-attempt
stage (attempt.py). And it reads the answer, whichever target gave it
(answer.py). Response processing is switched on from the headers stage, and
only for a request that will be routed: Envoy's own early replies (a 431 for
oversized headers, say) then never wait on this server.

With ``auth.mode: jwt`` the headers stage authenticates the caller first (a
token seen before costs a hash and a dict lookup; only a token whose issuer
keys must be fetched makes the stage a coroutine), and the body stage checks
that the caller's team may use the resolved alias. The client's credentials
are removed here already, and again by every preparation of a target.

With quotas on, the body stage then admits the request (``metering.admit``:
count the prompt, reserve its worst case in every scope in one store call)
before it is routed; a refusal is a 429 and nothing reaches a provider.

``POST /v1/messages`` (Anthropic's Messages API) takes the same path: its
body is turned into the OpenAI request every stage reads before validation
(``providers/inbound_anthropic.py``), the caller's ``x-api-key`` is read as
its bearer token, and every error, and the answer, leave in Anthropic's shape.
"""

from __future__ import annotations

import json
import time
from urllib.parse import unquote
from collections.abc import Coroutine
from typing import Any

from extproc.pipeline import messages

from extproc.pipeline import admission as metering
from extproc.pipeline.answer import Answer, Reply
from extproc.pipeline.runtime import Runtime
from extproc.auth.identity import Identity
from extproc.credentials.vault import INBOUND_CREDENTIAL_HEADERS
from extproc.errors import BadRequest, MethodNotAllowed, NotFound, UpstreamError
from extproc.pipeline.exchange import Exchange
from extproc.pipeline.validation import check_chat, check_embeddings, parse_json, resolve_alias
from extproc.pipeline.upstream import PREPARED_HEADER, ROUTE_HEADER, prepare
from extproc.providers.inbound_anthropic import models_list, to_openai

INTERNAL_PREFIX = "x-tollgate-"

ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
    "/v1/models": "models",
    "/v1/messages": "messages",  # Anthropic's Messages API, served as chat
}


class RouterExchange:
    __slots__ = ("gw", "endpoint", "request_id", "exchange", "started", "identity", "answer", "inbound")

    def __init__(self, gw: Runtime) -> None:
        self.gw = gw
        self.endpoint: str | None = None
        self.request_id = ""
        self.exchange: Exchange | None = None
        self.started = time.monotonic()
        self.identity: Identity | None = None
        self.answer = Answer(gw)
        self.inbound = "openai"  # the client's schema; errors are written in it

    def on_request_headers(
        self, req: messages.ProcessingRequest
    ) -> messages.ProcessingResponse | Coroutine[Any, Any, messages.ProcessingResponse]:
        headers = messages.headers_of(req.request_headers)
        self.request_id = headers.get("x-request-id", "")
        eos = req.request_headers.end_of_stream
        path = headers.get(":path", "").split("?", 1)[0].rstrip("/")
        if path == "/v1/messages" or (path.startswith("/v1/models") and "anthropic-version" in headers):
            self.inbound = "anthropic"  # the model list is shared; its errors follow the SDK that asked
            if "authorization" not in headers and headers.get("x-api-key"):  # Anthropic's own credential header
                headers = {**headers, "authorization": "Bearer " + headers["x-api-key"]}
        auth = self.gw.auth
        if auth is not None:
            who = auth.authenticate(headers, self.request_id)
            if not isinstance(who, Identity):
                return self._after_authentication(who, headers, eos)
            self.identity = who
        return self._route_headers(headers, eos)

    async def _after_authentication(
        self, pending: Coroutine[Any, Any, Identity], headers: dict[str, str], eos: bool
    ) -> messages.ProcessingResponse:
        self.identity = await pending
        return self._route_headers(headers, eos)

    def _route_headers(self, headers: dict[str, str], eos: bool) -> messages.ProcessingResponse:
        path = headers.get(":path", "/").split("?", 1)[0].rstrip("/") or "/"
        method = headers.get(":method", "GET")
        endpoint = ENDPOINTS.get(path)
        if endpoint is None and path.startswith("/v1/models/"):
            return self._one_model(path.removeprefix("/v1/models/"), method)
        if endpoint is None:
            raise NotFound(f"unknown path {path[:200]!r}; this gateway serves {', '.join(ENDPOINTS)}", code="unknown_url")
        if endpoint == "models":
            if method != "GET":
                raise MethodNotAllowed(f"{path} takes GET")
            if self.identity is not None and self.gw.auth is not None:
                self.gw.auth.authorize(self.identity, None, self.request_id)
            return messages.immediate(200, self.models_body(), {"x-request-id": self.request_id})
        if method != "POST":
            raise MethodNotAllowed(f"{path} takes POST")
        if eos:
            raise BadRequest("request body is empty; expected a JSON object", code="invalid_json")
        self.endpoint = endpoint
        drop = [k for k in headers if k.startswith(INTERNAL_PREFIX) or k in INBOUND_CREDENTIAL_HEADERS]
        # This request will be routed: read its answer (see the module docstring).
        return messages.cont("request_headers", remove_headers=drop, response_body_mode=messages.BUFFERED)

    def on_request_body(
        self, req: messages.ProcessingRequest
    ) -> messages.ProcessingResponse | Coroutine[Any, Any, messages.ProcessingResponse]:
        gw = self.gw
        body = parse_json(req.request_body.body, gw.config.limits.max_request_bytes)
        endpoint = self.endpoint or "chat"
        raw = req.request_body.body
        if endpoint == "messages":  # in the OpenAI shape from here on; answered in Anthropic's
            body = to_openai(body)
            endpoint = "chat"
            raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        alias = resolve_alias(body, gw.config, endpoint)
        ident = self.identity
        if ident is not None and gw.auth is not None:
            gw.auth.authorize(ident, alias, self.request_id)
        if endpoint == "chat":
            check_chat(body)
        else:
            check_embeddings(body)
        rid = self.request_id
        if not rid or rid in gw.exchanges:
            raise BadRequest("a request with this x-request-id is already in flight", code="duplicate_request_id")
        self.exchange = ex = Exchange(rid, endpoint, alias, body, stream=bool(body.get("stream")),
                                      started_at=self.started, raw_body=raw, inbound=self.inbound)
        if ident is not None:
            ex.principal, ex.team, ex.tier = ident.principal, ident.team, ident.tier
        gw.exchanges.add(ex)  # holds one reference until this stream closes
        if gw.governor is not None:
            return self._admit_then_route(ex)
        return self._route(ex)

    async def _admit_then_route(self, ex: Exchange) -> messages.ProcessingResponse:
        gw = self.gw
        assert gw.governor is not None
        models = [t.model for t in gw.config.models[ex.alias].targets]  # counted as the first, held at the dearest
        await metering.admit(gw.governor, gw.metrics, ex, models, gw.spawn)
        resp = self._route(ex)
        return resp if isinstance(resp, messages.ProcessingResponse) else await resp

    def _route(self, ex: Exchange) -> messages.ProcessingResponse | Coroutine[Any, Any, messages.ProcessingResponse]:
        warming = self.gw.vault.warm_up(self.gw.config.models[ex.alias])  # Azure AD tokens not fetched yet
        if warming is not None:
            return self._route_after(warming, ex)
        return self._prepare_primary(ex)

    async def _route_after(self, warming: Coroutine[Any, Any, None], ex: Exchange) -> messages.ProcessingResponse:
        await warming
        return self._prepare_primary(ex)

    def _prepare_primary(self, ex: Exchange) -> messages.ProcessingResponse:
        """Route to the alias, with the request ready for its primary target.

        Without a credential for the primary (an Azure AD token that could not
        be fetched), the request is routed unprepared: the per-attempt stage
        then runs for the primary too, answers 502, and Envoy moves on.
        """
        try:
            p = prepare(self.gw, ex, 0)
        except UpstreamError:
            return messages.cont("request_body", set_headers={ROUTE_HEADER: ex.alias}, clear_route_cache=True)
        ex.attempts = 1
        ex.body_rewritten = p.body is not None
        return messages.cont("request_body", set_headers={ROUTE_HEADER: ex.alias, PREPARED_HEADER: "1", **p.set_headers},
                             remove_headers=p.remove_headers, body=p.body, clear_route_cache=True)

    def on_response_headers(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        if self.exchange is None:
            return messages.cont("response_headers")
        return self.answer.on_headers(self.exchange, req)

    def on_response_body(self, req: messages.ProcessingRequest) -> Reply | Coroutine[Any, Any, Reply]:
        if self.exchange is None:
            return messages.cont("response_body")
        return self.answer.on_body(self.exchange, req)

    def _visible(self) -> list[dict]:
        models = self.gw.config.models
        names = list(models)
        if self.identity is not None and self.gw.auth is not None:
            names = self.gw.auth.visible(self.identity, names)
        return models_list([{"id": name, "object": "model", "created": 1_700_000_000,
                             "owned_by": models[name].owned_by} for name in names])["data"]

    def models_body(self) -> bytes:
        return json.dumps(models_list(self._visible())).encode()

    def _one_model(self, name: str, method: str) -> messages.ProcessingResponse:
        """``GET /v1/models/{id}``: one alias, in the shape both SDKs read (``models.retrieve``)."""
        if method != "GET":
            raise MethodNotAllowed("/v1/models/{id} takes GET")
        if self.identity is not None and self.gw.auth is not None:
            self.gw.auth.authorize(self.identity, None, self.request_id)
        name = unquote(name)
        found = next((m for m in self._visible() if m["id"] == name), None)
        if found is None:
            raise NotFound(f"the model {name[:200]!r} does not exist on this gateway", param="model")
        return messages.immediate(200, json.dumps(found).encode(), {"x-request-id": self.request_id})

    def close(self) -> None:
        ex = self.exchange
        if ex is None:
            return
        self.gw.release(ex)
