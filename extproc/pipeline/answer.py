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
from extproc.errors import GatewayError, GuardrailViolation, QuotaExceeded
from extproc.guardrails.stream import StreamGuard
from extproc.providers.inbound_anthropic import EventWriter, answer_body, from_openai_error
from extproc.pipeline.exchange import Exchange
from extproc.providers import sse
from extproc.providers.base import Translator
from extproc.quota.governor import Admission
from extproc.pipeline.upstream import REQUEST_ID_HEADER, RETRY_HEADER, TARGET_HEADER, parse_target_tag

Reply: TypeAlias = "messages.ProcessingResponse | tuple[messages.ProcessingResponse, ...]"


class Answer:
    __slots__ = ("gw", "translator", "streaming", "status", "cut", "guard", "reshape", "writer")

    def __init__(self, gw: Runtime) -> None:
        self.gw = gw
        self.translator: Translator | None = None
        self.streaming = False
        self.status = 0
        self.cut = False  # a refused top-up ended this stream; later chunks are counted, not sent
        self.guard: StreamGuard | None = None  # the guardrails' sliding window over a streamed answer
        self.reshape = False  # Envoy's own (OpenAI-shaped) error, for a client of Anthropic's API
        self.writer: EventWriter | None = None  # a stream for a client of Anthropic's API: its events, last

    def on_headers(self, ex: Exchange, req: messages.ProcessingRequest) -> messages.ProcessingResponse:
        started = time.perf_counter()
        headers = messages.headers_of(req.response_headers)
        status = int(headers.get(":status", "0") or 0)
        self.status = ex.status = status
        out = {"x-request-id": ex.request_id}
        if ex.guardrails is not None and ex.guardrails.header():
            out["x-tollgate-guardrails"] = ex.guardrails.header()
        if ex.admission is not None:
            out.update(ex.admission.headers())
        tag = parse_target_tag(headers.get(TARGET_HEADER, ""))
        translator = ex.translators.get(tag[1]) if tag is not None and tag[0] == ex.alias else None
        if tag is None or translator is None:
            return self._envoys_own(ex, req, out)
        _alias, target, provider = self.gw.config.target(ex.alias, tag[1])
        self.translator = translator
        ex.provider, ex.target_model, ex.last_attempt_status = provider.name, target.model, status
        if ex.outcomes:
            ex.outcomes[-1][1] = status
            out["x-tollgate-attempt-outcomes"] = ex.outcome_text()
        if status >= 500 or status == 429:
            self.gw.metrics.upstream_error(provider.name, status)
        out.update({
            "x-tollgate-cache": ex.cache.replace("_", "-"),  # a target answered: the lookup missed or bypassed
            "x-tollgate-provider": provider.name,
            "x-tollgate-model": target.model,
            "x-tollgate-attempts": str(ex.attempts),
        })
        remove = [TARGET_HEADER, REQUEST_ID_HEADER, RETRY_HEADER]
        mode = None
        if not req.response_headers.end_of_stream:
            remove.append("content-length")
            self.streaming = ex.stream and status == 200 and headers.get("content-type", "").startswith(
                "text/event-stream")
            if self.streaming:
                self._stream_starts(ex, translator)
                out["content-type"] = "text/event-stream"
                mode = messages.STREAMED
        resp = messages.cont("response_headers", set_headers=out, remove_headers=remove, response_body_mode=mode)
        ex.response_seconds += time.perf_counter() - started
        return resp

    def _envoys_own(self, ex: Exchange, req: messages.ProcessingRequest, out: dict[str, str]
                    ) -> messages.ProcessingResponse:
        """Envoy's own answer (no target could be reached, or none answered in time): already OpenAI's shape
        (reshaped for a client of Anthropic's API)."""
        ex.error = ex.error or "upstream_unavailable"
        if self.status >= 500 and ex.provider is not None:
            self.gw.metrics.upstream_error(ex.provider, 0)
        remove = [TARGET_HEADER, RETRY_HEADER, REQUEST_ID_HEADER]
        if ex.inbound == "anthropic" and self.status >= 400 and not req.response_headers.end_of_stream:
            self.reshape = True
            remove.append("content-length")
        return messages.cont("response_headers", set_headers=out, remove_headers=remove)

    def _stream_starts(self, ex: Exchange, translator: Translator) -> None:
        """A streamed answer begins: metering, the guardrails' window and the client's event writer set up."""
        ex.streamed = True
        if ex.admission is not None:
            translator.progress.text = []  # the translator now hands us the generated text
        if self.gw.guardrails is not None:
            self.guard = self.gw.guardrails.stream_guard(ex)
        if ex.inbound == "anthropic":
            self.writer = EventWriter(ex.alias, ex.admission.prompt.tokens if ex.admission else 0)

    def on_body(self, ex: Exchange, req: messages.ProcessingRequest) -> Reply | Coroutine[Any, Any, Reply]:
        tr = self.translator
        if tr is None:  # Envoy's own answer
            if self.reshape:
                return messages.cont("response_body", body=from_openai_error(self.status, req.response_body.body))
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
        if self.guard is not None and not self.cut:
            guarded = self._guarded(ex, self.guard, body.body if out is None else out, body.end_of_stream)
            if not isinstance(guarded, bytes):
                return guarded
            out = guarded
        self._note_progress(ex, tr, first_before=before)
        if ex.cache_state is not None and self.gw.cache is not None:  # what the client gets, for storing
            self.gw.cache.seen(ex, out if out is not None else body.body, whole=False, end=body.end_of_stream)
        adm, produced = ex.admission, tr.progress.text
        if adm is None or not produced:
            return messages.stream_body(b"") if self.cut else self._send(out, body.body)
        text = "".join(produced)
        produced.clear()
        step = adm.count_output(text)
        if self.cut:
            return messages.stream_body(b"")  # counted (the provider produced it), not sent
        if step == "go" or tr.progress.done or tr.progress.failed or body.end_of_stream:
            return self._send(out, body.body)
        chunk = body.body if out is None else out
        if step == "stop":
            return self._cut(ex, adm.refusal(), chunk)
        return self._top_up(ex, adm, chunk)

    def _send(self, out: bytes | None, raw: bytes) -> messages.ProcessingResponse:
        """Pass a chunk on (``None``: as it came), as Anthropic's events for a client of that API."""
        if self.writer is None:
            return messages.stream_body(out)
        usage = self.translator.usage if self.translator is not None else None
        return messages.stream_body(self.writer.feed(raw if out is None else out, usage))

    def _note_progress(self, ex: Exchange, tr: Translator, first_before: bool) -> None:
        """What the translator saw in this chunk, onto the exchange: token times, usage, failure, the model."""
        if tr.progress.first_content:
            now = time.monotonic()
            if not first_before:
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

    async def _top_up(self, ex: Exchange, adm: Admission, chunk: bytes) -> Reply:
        """Reserve the next slice before passing ``chunk`` on; refused: end the stream after it."""
        started = time.perf_counter()
        try:
            await adm.top_up()
        except GatewayError as err:  # QuotaExceeded, or QuotaUnavailable when failing closed
            return self._cut(ex, err, chunk)
        finally:
            ex.response_seconds += time.perf_counter() - started
        return self._send(chunk, chunk)

    def _cut(self, ex: Exchange, err: GatewayError, chunk: bytes) -> Reply:
        self.cut = True
        ex.stream_failed = True
        ex.error = err.code or err.type
        if isinstance(err, QuotaExceeded):
            self.gw.metrics.quota_rejected(err.scope_kind, err.kind)
        last = chunk + sse.error_event(f"{err.message}; the stream was ended here", err.type, err.code)
        if self.writer is not None:
            last = self.writer.feed(last, None)
        return messages.cut_stream(last, err.status)

    def _guarded(self, ex: Exchange, guard: StreamGuard, chunk: bytes, end: bool) -> bytes | Reply:
        """The chunk as the guardrails let it through (text held back, redacted), or the stream cut by a block."""
        out, rule = guard.feed(chunk, end)
        if rule is None and not end:
            return out
        assert self.gw.guardrails is not None
        self.gw.guardrails.stream_done(ex)
        return out if rule is None else self._cut(ex, GuardrailViolation(rule, "answer"), b"")

    def _whole(self, ex: Exchange, tr: Translator, body: messages.pb.HttpBody) -> messages.ProcessingResponse:
        out = tr.response(self.status, body.body)
        guard_headers = None
        if self.gw.guardrails is not None and 200 <= self.status < 300:
            out = self.gw.guardrails.check_answer(ex, body.body if out is None else out) or out
            if ex.guardrails is not None and ex.guardrails.header():
                guard_headers = {"x-tollgate-guardrails": ex.guardrails.header()}
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
        if guard_headers:
            usage_headers = {**(usage_headers or {}), **guard_headers}
        if ex.inbound == "anthropic":  # the client's shape, last: guardrails and cache read OpenAI's
            out = answer_body(self.status, body.body if out is None else out, tr.usage, ex.alias)
        return messages.cont("response_body", body=out, set_headers=usage_headers)
