"""One upstream attempt: translate, authenticate, and read the answer.

This runs as an Envoy *upstream* filter, once per attempt, after the router
has chosen the target: on fallback from an OpenAI model to an Anthropic one,
the second attempt is translated and authenticated for Anthropic. Envoy tells
us the chosen target through the endpoint metadata (``tollgate.target`` =
``ALIAS#INDEX``) and the exchange through the request id.

With quotas on, the attempt sends the admission's output cap (a non-streamed
request without one), adds ``x-ratelimit-*`` to the response headers, and
meters a stream chunk by chunk: half a slice before the output outgrows what
is held it asks for the next slice in the background, and when that was
refused it ends the stream at the boundary with an OpenAI error event (no
``[DONE]``) and has Envoy close the upstream (``messages.cut_stream``). A
chunk that still reaches the gateway after that is counted, not sent. One
the provider had already put on the wire when the upstream closed is billed
by the provider and never seen here: the closer the stream's pace to the
gateway's reaction time, the likelier (see the README's quota section).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Coroutine
from typing import Any, TypeAlias

from extproc import messages
from extproc.app import Gateway
from extproc.config import ModelAlias, Provider, Target
from extproc.credentials import INBOUND_CREDENTIAL_HEADERS
from extproc.errors import GatewayError, Internal, QuotaExceeded
from extproc.exchange import Exchange
from extproc.gateway import ROUTE_HEADER
from extproc.providers import sse
from extproc.providers.base import Translator
from extproc.providers.registry import make_translator
from extproc.quota.governor import Admission

ATTR_NS = "envoy.filters.http.ext_proc"
HOST_METADATA = "xds.upstream_host_metadata"
REQUEST_ID = "request.id"
_TARGET = re.compile(r'key: "target" value \{ string_value: "([^"#]+)#(\d+)" \}')

Answer: TypeAlias = "messages.ProcessingResponse | tuple[messages.ProcessingResponse, ...]"

# Headers a provider must not see from the client: credentials, and encodings we could not read.
_DROP = (*INBOUND_CREDENTIAL_HEADERS, "accept-encoding", "anthropic-version", "anthropic-beta", ROUTE_HEADER)


def target_tag(alias: str, index: int) -> str:
    return f"{alias}#{index}"


def cap_field(provider: Provider) -> str:
    """Where this backend reads the output cap: ``max_tokens`` is refused by OpenAI's reasoning models,
    ``max_completion_tokens`` unknown to Azure API versions before 2024-09-01 (Anthropic reads either)."""
    if provider.type == "azure_openai" and (provider.api_version or "") < "2024-09-01":
        return "max_tokens"
    return "max_completion_tokens"


class AttemptExchange:
    __slots__ = ("gw", "exchange", "alias", "target", "provider", "translator", "streaming", "status", "body", "cut")

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
        self.cut = False  # a refused top-up ended this stream; later chunks are counted, not sent

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
        body = ex.body
        cap = ex.admission.output_cap if ex.admission is not None else None
        if cap is not None:
            body = {**body, cap_field(provider): cap}
        up = translator.request(body, b"")
        if up.body is None and body is not ex.body:  # the translator keeps it as is, but it is not the client's
            up.body = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
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
        if ex.admission is not None:
            out.update(ex.admission.headers())
        if req.response_headers.end_of_stream:
            resp = messages.cont("response_headers", set_headers=out)
        else:
            self.streaming = (
                ex.stream and status == 200 and headers.get("content-type", "").startswith("text/event-stream")
            )
            if self.streaming:
                ex.streamed = True
                if ex.admission is not None and self.translator is not None:
                    self.translator.progress.text = []  # the translator now hands us the generated text
                out["content-type"] = "text/event-stream"
                resp = messages.cont("response_headers", set_headers=out, remove_headers=["content-length"],
                                     response_body_mode=messages.STREAMED)
            else:
                resp = messages.cont("response_headers", set_headers=out, remove_headers=["content-length"])
        ex.response_seconds += time.perf_counter() - started
        return resp

    def on_response_body(self, req: messages.ProcessingRequest) -> Answer | Coroutine[Any, Any, Answer]:
        ex, tr = self.exchange, self.translator
        if ex is None or tr is None:
            raise Internal("response body for an attempt that was never set up")
        started = time.perf_counter()
        if self.streaming:
            resp = self._stream_chunk(ex, tr, req.response_body)
        else:
            resp = self._whole_body(ex, tr, req.response_body)
        ex.response_seconds += time.perf_counter() - started
        return resp

    def _stream_chunk(
        self, ex: Exchange, tr: Translator, body: messages.pb.HttpBody
    ) -> Answer | Coroutine[Any, Any, Answer]:
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
        if tr.progress.failed and not self.cut:
            ex.stream_failed = True
            ex.error = ex.error or "stream_interrupted"
        ex.answer_complete = tr.progress.done
        if tr.response_model:
            ex.response_model = tr.response_model
        adm, produced = ex.admission, tr.progress.text
        if adm is None or not produced:
            return messages.stream_body(b"" if self.cut else out)
        text = "".join(produced)
        produced.clear()
        step = adm.count_output(text)
        if self.cut:
            return messages.stream_body(b"")  # counted (the provider produced it), not sent
        if step == "go" or tr.progress.done or tr.progress.failed or body.end_of_stream:
            return messages.stream_body(out)
        chunk = body.body if out is None else out
        if step == "stop":
            return self._cut(ex, adm.refusal(), chunk)
        return self._top_up(ex, adm, chunk)

    async def _top_up(self, ex: Exchange, adm: Admission, chunk: bytes) -> Answer:
        """Reserve the next slice before passing ``chunk`` on; refused: end the stream after it."""
        started = time.perf_counter()
        try:
            await adm.top_up()
        except GatewayError as err:  # QuotaExceeded, or QuotaUnavailable when failing closed
            return self._cut(ex, err, chunk)
        finally:
            ex.response_seconds += time.perf_counter() - started
        return messages.stream_body(chunk)

    def _cut(self, ex: Exchange, err: GatewayError, chunk: bytes) -> Answer:
        self.cut = True
        ex.stream_failed = True
        ex.error = err.code or err.type
        if isinstance(err, QuotaExceeded):
            self.gw.metrics.quota_rejected(err.scope_kind, err.kind)
        tail = sse.error_event(f"{err.message}; the stream was ended here", err.type, err.code)
        return messages.cut_stream(chunk + tail, err.status)

    def _whole_body(self, ex: Exchange, tr: Translator, body: messages.pb.HttpBody) -> messages.ProcessingResponse:
        out = tr.response(self.status, body.body)
        if tr.response_model:
            ex.response_model = tr.response_model
        if 200 <= self.status < 300:
            ex.first_token_at = ex.last_token_at = time.monotonic()
            ex.answer_complete = True
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
            micros = self.gw.cost_micros(ex) if 200 <= self.status < 300 else None
            if micros is not None:
                usage_headers["x-tollgate-cost-usd"] = f"{micros / 1_000_000:.6f}"
        return messages.cont("response_body", body=out, set_headers=usage_headers)

    def close(self) -> None:
        ex = self.exchange
        if ex is None:
            return
        if not self.status and self.provider is not None:  # refused, reset or timed out before any answer
            self.gw.metrics.upstream_error(self.provider.name, 0)
        self.gw.release(ex)
