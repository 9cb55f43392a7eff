"""One upstream attempt: translate, authenticate, and read the answer.

This runs as an Envoy *upstream* filter, once per attempt, after the router
has chosen the target: on fallback from an OpenAI model to an Anthropic one,
the second attempt is translated and authenticated for Anthropic. Envoy tells
us the chosen target through the endpoint metadata (``tollgate.target`` =
``ALIAS#INDEX``) and the exchange through the request id.
"""

from __future__ import annotations

import re
import time

from extproc import messages
from extproc.app import Gateway
from extproc.config import ModelAlias, Provider, Target
from extproc.credentials import INBOUND_CREDENTIAL_HEADERS
from extproc.errors import Internal
from extproc.exchange import Exchange
from extproc.gateway import ROUTE_HEADER
from extproc.providers.base import Translator
from extproc.providers.registry import make_translator

ATTR_NS = "envoy.filters.http.ext_proc"
HOST_METADATA = "xds.upstream_host_metadata"
REQUEST_ID = "request.id"
_TARGET = re.compile(r'key: "target" value \{ string_value: "([^"#]+)#(\d+)" \}')

# Headers a provider must not see from the client: credentials, and encodings we could not read.
_DROP = (*INBOUND_CREDENTIAL_HEADERS, "accept-encoding", "anthropic-version", "anthropic-beta", ROUTE_HEADER)


def target_tag(alias: str, index: int) -> str:
    return f"{alias}#{index}"


class AttemptExchange:
    __slots__ = ("gw", "exchange", "alias", "target", "provider", "translator", "streaming", "status", "body")

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.exchange: Exchange | None = None
        self.alias: ModelAlias | None = None
        self.target: Target | None = None
        self.provider: Provider | None = None
        self.translator: Translator | None = None
        self.streaming = False
        self.status = 0
        self.body: bytes | None = None

    def on_request_headers(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        fields = req.attributes[ATTR_NS].fields
        rid = fields[REQUEST_ID].string_value
        ex = self.gw.exchanges.get(rid)
        m = _TARGET.search(fields[HOST_METADATA].string_value)
        if ex is None or m is None:
            raise Internal("the gateway lost track of this request; it was not sent upstream")
        alias, target, provider = self.gw.config.target(m.group(1), int(m.group(2)))
        self.exchange, self.alias, self.target, self.provider = ex, alias, target, provider
        now = time.monotonic()
        if ex.attempts:  # a retry: the previous target failed
            self.gw.metrics.fallback(ex.alias, ex.provider, ex.last_attempt_status)
            if ex.upstream_sent_at is not None:
                ex.failed_attempt_seconds += now - ex.upstream_sent_at
        ex.attempts += 1
        ex.holders += 1
        ex.provider, ex.target_model, ex.last_attempt_status = provider.name, target.model, None
        translator = make_translator(provider, target, ex.endpoint)
        self.translator = translator
        up = translator.request(ex.body, b"")
        self.body = up.body
        set_headers = {":path": up.path, ":authority": provider.authority, **up.headers, **self.gw.vault.headers(provider)}
        remove = [h for h in _DROP if h not in set_headers]
        ex.upstream_sent_at = time.monotonic()
        if up.body is None:
            # Nothing to change in the body: Envoy need not send it to us at all.
            return messages.cont(
                "request_headers", set_headers=set_headers, remove_headers=remove, request_body_mode=messages.NONE
            )
        set_headers["content-length"] = str(len(up.body))
        return messages.cont("request_headers", set_headers=set_headers, remove_headers=remove)

    def on_request_body(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        return messages.cont("request_body", body=self.body)

    def on_response_headers(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        ex, provider, target = self.exchange, self.provider, self.target
        if ex is None or provider is None or target is None:
            raise Internal("response for an attempt that was never set up")
        started = time.perf_counter()
        headers = messages.headers_of(req.response_headers)
        status = int(headers.get(":status", "0") or 0)
        self.status = status
        ex.status = ex.last_attempt_status = status
        if status >= 500 or status == 429:
            self.gw.metrics.upstream_error(provider.name, status)
        out = {
            "x-tollgate-provider": provider.name,
            "x-tollgate-model": target.model,
            "x-tollgate-attempts": str(ex.attempts),
            "x-request-id": ex.request_id,
        }
        if req.response_headers.end_of_stream:
            resp = messages.cont("response_headers", set_headers=out)
        else:
            self.streaming = (
                ex.stream and status == 200 and headers.get("content-type", "").startswith("text/event-stream")
            )
            if self.streaming:
                out["content-type"] = "text/event-stream"
                resp = messages.cont("response_headers", set_headers=out, remove_headers=["content-length"],
                                     response_body_mode=messages.STREAMED)
            else:
                resp = messages.cont("response_headers", set_headers=out, remove_headers=["content-length"])
        ex.response_seconds += time.perf_counter() - started
        return resp

    def on_response_body(self, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        ex, tr = self.exchange, self.translator
        if ex is None or tr is None:
            raise Internal("response body for an attempt that was never set up")
        started = time.perf_counter()
        resp = self._response_body(ex, tr, req.response_body)
        ex.response_seconds += time.perf_counter() - started
        return resp

    def _response_body(self, ex: Exchange, tr: Translator, body: messages.pb.HttpBody) -> messages.ProcessingResponse:
        if self.streaming:
            before = tr.progress.first_content
            out = tr.stream_chunk(body.body, body.end_of_stream)
            now = time.monotonic()
            if tr.progress.first_content:
                if not before:
                    ex.first_token_at = now
                ex.last_token_at = now
            ex.content_chunks = tr.progress.content_chunks
            if tr.usage is not None:
                ex.usage = tr.usage
            if tr.progress.failed:
                ex.stream_failed = True
                ex.error = ex.error or "stream_interrupted"
            if tr.response_model:
                ex.response_model = tr.response_model
            return messages.stream_body(out)
        out = tr.response(self.status, body.body)
        if tr.response_model:
            ex.response_model = tr.response_model
        if 200 <= self.status < 300:
            ex.first_token_at = ex.last_token_at = time.monotonic()
        else:
            ex.error = f"upstream_{self.status}"
        usage_headers = None
        if tr.usage is not None:
            ex.usage = u = tr.usage
            # a buffered body still holds the response headers, so what it cost can go in them
            usage_headers = {
                "x-tollgate-input-tokens": str(u.prompt_tokens),
                "x-tollgate-output-tokens": str(u.completion_tokens),
                "x-tollgate-cache": ex.cache,
            }
        return messages.cont("response_body", body=out, set_headers=usage_headers)

    def close(self) -> None:
        ex = self.exchange
        if ex is None:
            return
        if not self.status and self.provider is not None:  # refused, reset or timed out before any answer
            self.gw.metrics.upstream_error(self.provider.name, 0)
        self.gw.release(ex)
