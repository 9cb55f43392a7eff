"""Reading the answer that reaches the client, whichever target gave it.

This runs in the router-level stage, after Envoy's retries are over. Envoy
names the answering target in a response header (``x-tollgate-target``, from
the chosen endpoint's metadata); the translator that prepared that target's
request turns the answer (whole, or SSE chunk by chunk) into OpenAI's shape
and reads its usage. An answer without that header is Envoy's own (no target
could be reached): it passes as it is.

With quotas on, ``x-ratelimit-*`` go on every answer, and a stream is metered
chunk by chunk: half a slice before the output outgrows what is held the
next slice is asked for in the background, and when that was refused the
stream ends at the boundary with an OpenAI error event (no ``[DONE]``) and
Envoy closes the upstream (``messages.cut_stream``). A chunk that still
reaches the gateway after that is counted, not sent. One the provider had
already put on the wire when the upstream closed is billed by the provider
and never seen here: the closer the stream's pace to the gateway's reaction
time, the likelier (see the README's quota section).
"""

from __future__ import annotations

import time
from collections.abc import Coroutine
from typing import Any, TypeAlias

from extproc.pipeline import messages
from extproc.pipeline.runtime import Runtime
from extproc.errors import GatewayError, QuotaExceeded
from extproc.pipeline.exchange import Exchange
from extproc.providers import sse
from extproc.providers.base import Translator
from extproc.quota.governor import Admission
from extproc.pipeline.upstream import TARGET_HEADER, parse_target_tag

Reply: TypeAlias = "messages.ProcessingResponse | tuple[messages.ProcessingResponse, ...]"


class Answer:
    __slots__ = ("gw", "translator", "streaming", "status", "cut")

    def __init__(self, gw: Runtime) -> None:
        self.gw = gw
        self.translator: Translator | None = None
        self.streaming = False
        self.status = 0
        self.cut = False  # a refused top-up ended this stream; later chunks are counted, not sent

    def on_headers(self, ex: Exchange, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        started = time.perf_counter()
        headers = messages.headers_of(req.response_headers)
        status = int(headers.get(":status", "0") or 0)
        self.status = ex.status = status
        out = {"x-request-id": ex.request_id}
        if ex.admission is not None:
            out.update(ex.admission.headers())
        tag = parse_target_tag(headers.get(TARGET_HEADER, ""))
        translator = ex.translators.get(tag[1]) if tag is not None and tag[0] == ex.alias else None
        if tag is None or translator is None:
            # Envoy's own answer (no target could be reached, or none answered in time): already OpenAI's shape
            ex.error = ex.error or "upstream_unavailable"
            if status >= 500 and ex.provider is not None:
                self.gw.metrics.upstream_error(ex.provider, 0)
            return messages.cont("response_headers", set_headers=out, remove_headers=[TARGET_HEADER])
        _alias, target, provider = self.gw.config.target(ex.alias, tag[1])
        self.translator = translator
        ex.provider, ex.target_model, ex.last_attempt_status = provider.name, target.model, status
        if status >= 500 or status == 429:
            self.gw.metrics.upstream_error(provider.name, status)
        out.update({
            "x-tollgate-cache": ex.cache.replace("_", "-"),  # a target answered: the lookup missed or bypassed
            "x-tollgate-provider": provider.name,
            "x-tollgate-model": target.model,
            "x-tollgate-attempts": str(ex.attempts),
        })
        remove = [TARGET_HEADER]
        mode = None
        if not req.response_headers.end_of_stream:
            remove.append("content-length")
            self.streaming = ex.stream and status == 200 and headers.get("content-type", "").startswith(
                "text/event-stream")
            if self.streaming:
                ex.streamed = True
                if ex.admission is not None:
                    translator.progress.text = []  # the translator now hands us the generated text
                out["content-type"] = "text/event-stream"
                mode = messages.STREAMED
        resp = messages.cont("response_headers", set_headers=out, remove_headers=remove, response_body_mode=mode)
        ex.response_seconds += time.perf_counter() - started
        return resp

    def on_body(self, ex: Exchange, req: messages.ProcessingRequest) -> Reply | Coroutine[Any, Any, Reply]:
        tr = self.translator
        if tr is None:  # Envoy's own answer
            return messages.cont("response_body")
        started = time.perf_counter()
        if self.streaming:
            resp = self._chunk(ex, tr, req.response_body)
        else:
            resp = self._whole(ex, tr, req.response_body)
        ex.response_seconds += time.perf_counter() - started
        return resp

    def _chunk(self, ex: Exchange, tr: Translator, body: messages.pb.HttpBody) -> Reply | Coroutine[Any, Any, Reply]:
        before = tr.progress.first_content
        out = tr.stream_chunk(body.body, body.end_of_stream)
        if tr.progress.first_content:
            now = time.monotonic()
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
        if ex.cache_state is not None and self.gw.cache is not None:  # what the client gets, for storing
            self.gw.cache.seen(ex, out if out is not None else body.body, whole=False, end=body.end_of_stream)
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

    async def _top_up(self, ex: Exchange, adm: Admission, chunk: bytes) -> Reply:
        """Reserve the next slice before passing ``chunk`` on; refused: end the stream after it."""
        started = time.perf_counter()
        try:
            await adm.top_up()
        except GatewayError as err:  # QuotaExceeded, or QuotaUnavailable when failing closed
            return self._cut(ex, err, chunk)
        finally:
            ex.response_seconds += time.perf_counter() - started
        return messages.stream_body(chunk)

    def _cut(self, ex: Exchange, err: GatewayError, chunk: bytes) -> Reply:
        self.cut = True
        ex.stream_failed = True
        ex.error = err.code or err.type
        if isinstance(err, QuotaExceeded):
            self.gw.metrics.quota_rejected(err.scope_kind, err.kind)
        tail = sse.error_event(f"{err.message}; the stream was ended here", err.type, err.code)
        return messages.cut_stream(chunk + tail, err.status)

    def _whole(self, ex: Exchange, tr: Translator, body: messages.pb.HttpBody) -> messages.ProcessingResponse:
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
                "x-tollgate-cache": ex.cache.replace("_", "-"),
            }
            micros = self.gw.cost_micros(ex) if 200 <= self.status < 300 else None
            if micros is not None:
                usage_headers["x-tollgate-cost-usd"] = f"{micros / 1_000_000:.6f}"
        if ex.cache_state is not None and self.gw.cache is not None:  # a complete 200 answer is stored
            self.gw.cache.seen(ex, out if out is not None else body.body, whole=True, end=True)
        return messages.cont("response_body", body=out, set_headers=usage_headers)
