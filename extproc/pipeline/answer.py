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
from extproc.credentials.scrub import scrubber_for
from extproc.errors import GatewayError, GuardrailViolation, QuotaExceeded, UpstreamError
from extproc.guardrails.stream import StreamGuard
from extproc.providers.inbound_anthropic import EventWriter, answer_body, from_openai_error
from extproc.pipeline.exchange import Exchange
from extproc.providers import sse
from extproc.providers.base import ChunkResult, Translated, Translator, Usage
from extproc.quota.governor import Admission
from extproc.pipeline.upstream import REQUEST_ID_HEADER, RETRY_HEADER, TARGET_HEADER, parse_target_tag

Reply: TypeAlias = "messages.ProcessingResponse | tuple[messages.ProcessingResponse, ...]"


class Answer:
    __slots__ = ("gw", "translator", "streaming", "status", "cut", "guard", "reshape", "writer", "scrub", "invalid",
                 "ended", "bytes", "since", "deadline", "min_rate", "grace", "usage", "content_seen", "observing")

    def __init__(self, gw: Runtime) -> None:
        self.gw = gw
        self.translator: Translator | None = None
        self.streaming = False
        self.status = 0
        self.cut = False  # a refused top-up ended this stream; later chunks are counted, not sent
        self.guard: StreamGuard | None = None  # the guardrails' sliding window over a streamed answer
        self.reshape = False  # Envoy's own (OpenAI-shaped) error, for a client of Anthropic's API
        self.writer: EventWriter | None = None  # a stream for a client of Anthropic's API: its events, last
        self.scrub = scrubber_for(())  # the exchange's injected credentials, taken out of everything passed on
        self.invalid: str | None = None  # why a 2xx answer cannot be passed on (known from its headers)
        self.ended = False  # the answer's last byte reached this stage
        self.bytes = 0  # of the stream, as the provider sent them
        self.since = 0.0  # the stream's headers arrived (monotonic)
        self.deadline = 0.0  # the whole answer must be done by then (monotonic)
        self.min_rate = 0.0  # bytes per second a stream must keep up on average, once past ``grace``
        self.grace = 0.0
        self.usage: Usage | None = None  # the stream's usage so far, from the translator's latest result
        self.content_seen = False  # the translator's results have shown generated content
        self.observing = False  # the stream's chunks pass unheld and arrive through the meter stream (observe.py)

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
        self.scrub = scrubber_for(ex.secrets)
        ex.provider, ex.target_model, ex.last_attempt_status = provider.name, target.model, status
        if ex.outcomes:
            ex.outcomes[-1][1] = status
            out["x-tollgate-attempt-outcomes"] = ex.outcome_text()
        if status >= 500 or status == 429:
            self.gw.metrics.upstream_error(provider.name, status)
        if 200 <= status < 300:
            self.invalid = _unreadable(ex, headers, req.response_headers.end_of_stream)
            if self.invalid is not None and req.response_headers.end_of_stream:
                raise self._invalid(ex, provider.name)
        out.update(self.scrub.headers(headers))
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
            self.streaming = ex.stream and self.invalid is None and status == 200
            if self.streaming:
                self._stream_starts(ex)
                self._bounds(ex)
                out["content-type"] = "text/event-stream"
                mode = messages.STREAMED
                if ex.observed is not None:  # read on the side: this stream stops sending the body
                    self.observing = True
                    mode = messages.NONE
        if self.observing:
            ex.observed.start(ex, self)
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

    def _stream_starts(self, ex: Exchange) -> None:
        """A streamed answer begins: the guardrails' window and the client's event writer set up.

        Metering needs the generated text: the translator was made with
        ``meter_text`` when the exchange holds an admission (``upstream.prepare``).
        """
        ex.streamed = True
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
        self.ended = req.response_body.end_of_stream
        if self.streaming:
            resp = self._chunk(ex, tr, req.response_body)
        else:
            resp = self._whole(ex, tr, req.response_body)
        ex.response_seconds += time.perf_counter() - started
        return resp

    def _chunk(self, ex: Exchange, tr: Translator, body: messages.pb.HttpBody) -> Reply | Coroutine[Any, Any, Reply]:
        res = tr.stream_chunk(body.body, body.end_of_stream)
        first_before, self.content_seen = self.content_seen, res.first_content
        out = self._scrubbed_chunk(body.body, res.body)
        if self.guard is not None and not self.cut:
            guarded = self._guarded(ex, self.guard, body.body if out is None else out, body.end_of_stream)
            if not isinstance(guarded, bytes):
                return guarded
            out = guarded
        self._note_progress(ex, res, first_before)
        if ex.cache_state is not None and self.gw.cache is not None:  # what the client gets, for storing
            self.gw.cache.seen(ex, out if out is not None else body.body, whole=False, end=body.end_of_stream)
        adm, produced = ex.admission, res.text
        if not self.cut and (late := self._too_slow(res, body)) is not None:
            if adm is not None and produced:  # what this last chunk carries reaches the client: it counts
                adm.count_output(produced)
            return self._cut(ex, late, body.body if out is None else out)
        if adm is None or not produced:
            return messages.stream_body(b"") if self.cut else self._send(out, body.body)
        step = adm.count_output(produced)
        if self.cut:
            return messages.stream_body(b"")  # counted (the provider produced it), not sent
        if step == "go" or res.done or res.failed or body.end_of_stream:
            return self._send(out, body.body)
        chunk = body.body if out is None else out
        if step == "stop":
            return self._cut(ex, adm.refusal(), chunk)
        return self._top_up(ex, adm, chunk)

    def observe(self, ex: Exchange, body: bytes, end: bool) -> None:
        """One chunk of an observed stream, already on its way to the client: read it, change nothing.

        The same reading as ``_chunk`` (usage, generated text, token times, the
        cache), without what needs the chunk held: no scrubbing, no guardrails,
        no cut at the budget or the time bounds (observe.py says what that gives up).
        """
        tr = self.translator
        if tr is None or self.cut:
            return
        started = time.perf_counter()
        self.ended = self.ended or end
        res = tr.stream_chunk(body, end)
        first_before, self.content_seen = self.content_seen, res.first_content
        self._note_progress(ex, res, first_before)
        if ex.cache_state is not None and self.gw.cache is not None:
            self.gw.cache.seen(ex, body, whole=False, end=end)
        if ex.admission is not None and res.text:
            ex.admission.count_output(res.text)  # counted, and the next slice asked for ahead; never cut
        ex.response_seconds += time.perf_counter() - started

    def _bounds(self, ex: Exchange) -> None:
        alias = self.gw.config.models[ex.alias]
        self.since = time.monotonic()
        self.deadline = ex.received_at + alias.answer_timeout
        self.min_rate, self.grace = alias.min_bytes_per_second, alias.first_byte_timeout

    def _too_slow(self, res: ChunkResult, body: messages.pb.HttpBody) -> GatewayError | None:
        """The stream's time bounds: the whole-answer deadline, and the minimum average rate.

        Checked as each chunk arrives, so a trickling provider (a byte a
        second keeps Envoy's idle timeout from ever firing) is cut with an
        error event; a silent one is Envoy's (``first_byte_timeout``).
        """
        self.bytes += len(body.body)
        if body.end_of_stream or res.done or res.failed:
            return None
        now = time.monotonic()
        if now > self.deadline:
            return GatewayError("the answer did not complete within the model's answer_timeout", status=504,
                                code="answer_timeout")
        elapsed = now - self.since
        if self.min_rate and elapsed > self.grace and self.bytes < self.min_rate * elapsed:
            return GatewayError(f"the provider sent {self.bytes} bytes in {elapsed:.0f} s, below the model's "
                                f"min_bytes_per_second ({self.min_rate:g})", status=504, code="upstream_too_slow")
        return None

    def on_close(self, ex: Exchange) -> None:
        """The exchange's stream is over: a stream that never saw its end was reset (see the README's cuts).

        Envoy resets the client's stream when the provider's connection breaks
        mid-answer (or the client left); either way the answer failed, and the
        access log and metrics say so.
        """
        if self.streaming and not self.ended and not self.cut and not ex.stream_failed:
            ex.stream_failed = True
            ex.error = ex.error or "stream_reset"

    def _scrubbed_chunk(self, raw: bytes, out: bytes | None) -> bytes | None:
        """Translators pass on whole events only, so a credential cannot straddle two chunks."""
        if not self.scrub:
            return out
        data = raw if out is None else out
        clean = self.scrub.exact(data)
        if b'"error"' in clean:
            clean = self.scrub.body(clean)
        return out if clean is data else clean

    def _invalid(self, ex: Exchange, provider: str) -> UpstreamError:
        """A 2xx the gateway cannot read becomes a 502: billed as a failed answer (nothing), counted as one."""
        ex.last_attempt_status = 502
        ex.error = "invalid_upstream_response"
        self.gw.metrics.upstream_error(provider, 502)
        return UpstreamError(f"upstream {provider} answered {self.invalid}", code="invalid_upstream_response")

    def _read_whole(self, ex: Exchange, tr: Translator, body: bytes) -> Translated:
        """The translated whole answer, scrubbed; an unreadable 2xx raises the 502."""
        ok = 200 <= self.status < 300
        if ok and self.invalid is not None:
            raise self._invalid(ex, ex.provider or "?")
        try:
            result = tr.response(self.status, body)
        except UpstreamError:
            if ok:
                ex.last_attempt_status = 502
                self.gw.metrics.upstream_error(ex.provider or "?", 502)
            raise
        if not self.scrub:
            return result
        out = result.body
        data = body if out is None else out
        clean = self.scrub.exact(data) if ok else self.scrub.body(data)
        return result if clean is data else Translated(clean, result.usage, result.model)

    def _send(self, out: bytes | None, raw: bytes) -> messages.ProcessingResponse:
        """Pass a chunk on (``None``: as it came), as Anthropic's events for a client of that API."""
        if self.writer is None:
            return messages.stream_body(out)
        return messages.stream_body(self.writer.feed(raw if out is None else out, self.usage))

    def _note_progress(self, ex: Exchange, res: ChunkResult, first_before: bool) -> None:
        """What the translator saw up to this chunk, onto the exchange: token times, usage, failure, the model."""
        if res.first_content:
            now = time.monotonic()
            if not first_before:
                ex.first_token_at = now
            ex.last_token_at = now
        ex.content_chunks = res.content_chunks
        if res.usage is not None:
            ex.usage = self.usage = res.usage
        if res.failed and not self.cut:
            ex.stream_failed = True
            ex.error = ex.error or "stream_interrupted"
        ex.answer_complete = res.done
        if res.model:
            ex.response_model = res.model

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
        result = self._read_whole(ex, tr, body.body)
        out = result.body
        guard_headers = None
        if self.gw.guardrails is not None and 200 <= self.status < 300:
            out = self.gw.guardrails.check_answer(ex, body.body if out is None else out) or out
            if ex.guardrails is not None and ex.guardrails.header():
                guard_headers = {"x-tollgate-guardrails": ex.guardrails.header()}
        if result.model:
            ex.response_model = result.model
        if 200 <= self.status < 300:
            ex.first_token_at = ex.last_token_at = time.monotonic()
            ex.answer_complete = True
        else:
            ex.error = f"upstream_{self.status}"
        usage_headers = None
        if result.usage is not None:
            ex.usage = u = result.usage
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
            out = answer_body(self.status, body.body if out is None else out, result.usage, ex.alias)
        return messages.cont("response_body", body=out, set_headers=usage_headers)


def _unreadable(ex: Exchange, headers: dict[str, str], empty: bool) -> str | None:
    """Why a 2xx answer cannot be what the client asked for, judged by its headers; None when it may be."""
    ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if empty:
        return "an empty body"
    if ex.stream:
        if ctype != "text/event-stream":
            return f"a stream request with {ctype or 'no content-type'} instead of an event stream"
        return None
    if ctype != "application/json" and not ctype.endswith("+json"):
        return f"with content-type {ctype or '(none)'} instead of JSON"
    return None
