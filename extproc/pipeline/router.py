"""The router-level exchange: read the request, check it, run the stages, read the answer.

Envoy sends this filter the request headers and the buffered request body.
It answers what it can itself (``/v1/models``, every error) with an
ImmediateResponse, and otherwise sets the internal routing header that selects
the alias's route (whose cluster lists the alias's targets in fallback order)
and clears the route cache.

The steps, in order (each a named method or stage; see ``base.py``)::

    request headers   authenticate    (auth.mode jwt: who is calling; 401/403)
                      endpoint        (path and method; /v1/models is answered here)
    request body      validate        (JSON, alias, the team may use it, parameters)
                      -- the Exchange is opened here --
                      STAGES, as build_stages lists them:
                        guard         (input guardrails; guardrails/stage.py)
                        cache         (response-cache lookup: a hit is answered here; cache/stage.py)
                        admit         (quota hold; admission.py)
                        route         (prepare the primary target, set the route)
    response          answer          (answer.py: translate, meter, usage headers)
    stream closed     settle          (Runtime.release: quota, metrics, access log)

**Adding a stage** is a module with a builder ``xxx_stage(rt) -> Stage | None``
(None when the feature is switched off, so it costs nothing per request) and
one line in ``build_stages``, in its place. A stage takes the ``Exchange`` and
returns None to go on, a ``ProcessingResponse`` to answer now (a cache hit),
or an awaitable of either; it refuses by raising a ``GatewayError``.

Preparing the primary target here (path, host, translated body, the
provider's key; ``upstream.prepare``) means Envoy's first attempt needs no gRPC
stream of its own; only a fallback runs the per-attempt stage (attempt.py).
Response processing is switched on from the headers stage, and only for a
request that will be routed: Envoy's own early replies (a 431 for oversized
headers, say) then never wait on this server.

Authentication costs a hash and a dict lookup for a token seen before; only a
token whose issuer keys must be fetched makes the headers stage a coroutine.
Likewise the body's stages run as plain calls until one of them has to wait.
The client's credentials are removed here already, and again by every
preparation of a target.

``POST /v1/messages`` (Anthropic's Messages API) takes the same path: its
body is turned into the OpenAI request every stage reads before validation
(``providers/inbound_anthropic.py``), the caller's ``x-api-key`` is read as
its bearer token, and every error, and the answer, leave in Anthropic's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import time
from urllib.parse import unquote
from collections.abc import Awaitable, Coroutine
from typing import Any

from extproc.auth.identity import Identity
from extproc.cache.stage import cache_stage
from extproc.credentials.vault import INBOUND_CREDENTIAL_HEADERS
from extproc.errors import BadRequest, Internal, MethodNotAllowed, NotFound, UpstreamError
from extproc.guardrails.stage import guard_stage
from extproc.pipeline import messages
from extproc.pipeline.admission import admit_stage
from extproc.pipeline.answer import Answer, Reply
from extproc.pipeline.base import Stage, Verdict
from extproc.pipeline.exchange import Exchange
from extproc.pipeline.observe import GRACE, OBSERVE_HEADER, Observer, observable
from extproc.pipeline.runtime import Runtime
from extproc.pipeline.upstream import PREPARED_HEADER, ROUTE_HEADER, prepare
from extproc.pipeline.validation import check_chat, check_content_type, check_embeddings, parse_json, resolve_alias
from extproc.providers.inbound_anthropic import models_list, reshape_answer, to_openai

INTERNAL_PREFIX = "x-tollgate-"

ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
    "/v1/models": "models",
    "/v1/messages": "messages",  # Anthropic's Messages API, served as chat
}


def build_stages(rt: Runtime) -> tuple[Stage, ...]:
    """The stages every valid request passes, in order; features switched off leave theirs out.

    Input guardrails and the cache lookup belong before ``admit_stage``, the
    guard first: a blocked prompt is never cached or charged, a cache hit is
    never charged, and the cache never sees a prompt the guard refused.
    """
    stages = (
        guard_stage(rt),
        cache_stage(rt),
        admit_stage(rt),
        Route(rt),
    )
    return tuple(s for s in stages if s is not None)


def run_stages(stages: tuple[Stage, ...], ex: Exchange) -> Reply | Coroutine[Any, Any, Reply]:
    """Run ``stages`` until one answers; plain calls until a stage has to wait (see the docstring)."""
    for i, stage in enumerate(stages):
        verdict = stage(ex)
        if verdict is None:
            continue
        if isinstance(verdict, messages.ProcessingResponse):
            return verdict
        return _resume(stages, i, verdict, ex)
    raise Internal("no stage answered this request")  # the route stage always answers


async def _resume(stages: tuple[Stage, ...], i: int, pending: Awaitable[Verdict], ex: Exchange) -> Reply:
    verdict = await pending
    while verdict is None:
        i += 1
        if i == len(stages):
            raise Internal("no stage answered this request")
        step = stages[i](ex)
        verdict = await step if inspect.isawaitable(step) else step
    return verdict


class Route:
    """The last stage: route to the alias, with the request ready for its primary target."""

    __slots__ = ("rt",)

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def __call__(self, ex: Exchange) -> messages.ProcessingResponse | Coroutine[Any, Any, messages.ProcessingResponse]:
        warming = self.rt.vault.warm_up(self.rt.config.models[ex.alias])  # Azure AD tokens not fetched yet
        if warming is not None:
            return self._after(warming, ex)
        return self.prepare_primary(ex)

    async def _after(self, warming: Coroutine[Any, Any, None], ex: Exchange) -> messages.ProcessingResponse:
        await warming
        return self.prepare_primary(ex)

    def prepare_primary(self, ex: Exchange) -> messages.ProcessingResponse:
        """Route to the alias, with the request ready for its primary target.

        Without a credential for the primary (an Azure AD token that could not
        be fetched), the request is routed unprepared: the per-attempt stage
        then runs for the primary too, answers 502, and Envoy moves on.
        """
        try:
            p = prepare(self.rt, ex, 0)
        except UpstreamError:
            return messages.cont("request_body", set_headers={ROUTE_HEADER: ex.alias}, clear_route_cache=True)
        ex.attempts = 1
        ex.body_rewritten = p.body is not None
        headers = {ROUTE_HEADER: ex.alias, PREPARED_HEADER: "1", **p.set_headers}
        if observable(self.rt, ex):  # its chunks pass at once; the meter filter reads them (observe.py)
            ex.observed = Observer()
            headers[OBSERVE_HEADER] = "1"
        return messages.cont("request_body", set_headers=headers, remove_headers=p.remove_headers, body=p.body,
                             clear_route_cache=True)


def _for_anthropic(resp: messages.ProcessingResponse, alias: str) -> messages.ProcessingResponse:
    """A stage's own answer (a cache hit), written in OpenAI's shape, for a client of Anthropic's API."""
    if resp.WhichOneof("response") != "immediate_response":
        return resp
    ir = resp.immediate_response
    content_type = next((h.header.raw_value.decode() for h in ir.headers.set_headers if h.header.key == "content-type"),
                        "application/json")
    ir.body = reshape_answer(ir.status.code, ir.body, content_type, alias)
    return resp


class RouterExchange:
    """The processor of one router-level stream (``base.Processor``)."""

    __slots__ = ("gw", "stages", "endpoint", "request_id", "exchange", "started", "identity", "answer",
                 "cache_control", "inbound")

    def __init__(self, gw: Runtime, stages: tuple[Stage, ...] | None = None) -> None:
        self.gw = gw
        self.stages = build_stages(gw) if stages is None else stages
        self.endpoint: str | None = None
        self.request_id = ""
        self.exchange: Exchange | None = None
        self.started = time.monotonic()
        self.identity: Identity | None = None
        self.answer = Answer(gw)
        self.cache_control = ""  # the client's Cache-Control (no-cache, no-store), for the cache stage
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
        return self._endpoint(headers, eos)

    async def _after_authentication(
        self, pending: Coroutine[Any, Any, Identity], headers: dict[str, str], eos: bool
    ) -> messages.ProcessingResponse:
        self.identity = await pending
        return self._endpoint(headers, eos)

    def _endpoint(self, headers: dict[str, str], eos: bool) -> messages.ProcessingResponse:
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
        check_content_type(headers.get("content-type"))
        if eos:
            raise BadRequest("request body is empty; expected a JSON object", code="invalid_json")
        self.endpoint = endpoint
        self.cache_control = headers.get("cache-control", "")
        drop = [k for k in headers if k.startswith(INTERNAL_PREFIX) or k in INBOUND_CREDENTIAL_HEADERS]
        # This request will be routed: read its answer (see the module docstring).
        return messages.cont("request_headers", remove_headers=drop, response_body_mode=messages.BUFFERED)

    def on_request_body(self, req: messages.ProcessingRequest) -> Reply | Coroutine[Any, Any, Reply]:
        ex = self._validate(req.request_body.body)
        reply = run_stages(self.stages, ex)
        if ex.inbound != "anthropic":
            return reply
        if isinstance(reply, messages.ProcessingResponse):
            return _for_anthropic(reply, ex.alias)
        if isinstance(reply, tuple):
            return reply
        return self._for_anthropic_later(reply, ex.alias)

    @staticmethod
    async def _for_anthropic_later(pending: Coroutine[Any, Any, Reply], alias: str) -> Reply:
        reply = await pending
        return _for_anthropic(reply, alias) if isinstance(reply, messages.ProcessingResponse) else reply

    def _validate(self, raw: bytes) -> Exchange:
        """Check the request and open its exchange: nothing is held and nothing counted before this passed."""
        gw = self.gw
        body = parse_json(raw, gw.config.limits.max_request_bytes)
        endpoint = self.endpoint or "chat"
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
        ex.cache_control = self.cache_control
        gw.exchanges.add(ex)  # holds one reference until this stream closes
        return ex

    def on_response_headers(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        ex = self.exchange
        if ex is None:
            return messages.cont("response_headers")
        try:
            return self.answer.on_headers(ex, req)
        finally:
            if ex.observed is not None and self.answer.observing is False:
                ex.observed.ignore()  # not observed after all (an error, Envoy's own reply): held as usual

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
        if ex.observed is not None and self.answer.observing and not ex.observed.done.is_set():
            self.gw.spawn(self._close_when_observed(ex))  # the meter stream's last chunks may still come
            return
        self.answer.on_close(ex)
        self.gw.release(ex)

    async def _close_when_observed(self, ex: Exchange) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(ex.observed.done.wait(), GRACE)
        self.answer.on_close(ex)
        self.gw.release(ex)
