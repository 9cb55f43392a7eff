"""OpenAI-schema backends: OpenAI itself, Azure OpenAI and the built-in demo.

The client already speaks this schema, so requests pass through unchanged
where nothing needs changing (the alias equals the backend model, usage was
asked for). Two things may change the body: the backend model name, and
``stream_options.include_usage``, which the gateway always asks for so that
every stream is metered; when the client did not ask for it, the extra usage
chunk is taken out again before the client sees it.
"""

from __future__ import annotations

import json

from extproc.providers.settings import Provider, Target
from extproc.errors import BadRequest, UpstreamError, error_body
from extproc.providers import sse
from extproc.providers.base import ChunkResult, Translated, UpstreamRequest, Usage, new_chunk_result

_PATHS = {"chat": "/chat/completions", "embeddings": "/embeddings"}


def usage_from(obj: dict) -> Usage | None:
    u = obj.get("usage")
    if not isinstance(u, dict):
        return None
    details = u.get("prompt_tokens_details") or {}
    return Usage(
        prompt_tokens=int(u.get("prompt_tokens") or 0),
        completion_tokens=int(u.get("completion_tokens") or 0),
        cached_tokens=int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0,
    )


def invalid_answer(provider: Provider, what: str) -> UpstreamError:
    """A 2xx answer the gateway cannot read: a 502, never passed on as a success."""
    return UpstreamError(f"upstream {provider.name} answered {what}", code="invalid_upstream_response")


def _has_usage(data: str) -> bool:
    """Whether an event may carry usage; OpenAI sends ``"usage":null`` on every chunk once asked."""
    return '"usage":{' in data or '"usage": {' in data


class OpenAITranslator:
    """OpenAI chat completions and embeddings, passed through."""

    def __init__(self, provider: Provider, target: Target, endpoint: str, *, meter_text: bool = False) -> None:
        self.provider = provider
        self.target = target
        self.endpoint = endpoint
        self._usage: Usage | None = None
        self._model: str | None = None
        self._done = False  # [DONE] was seen
        self._failed = False  # an error event, a broken protocol or an early end
        self._first_content = False
        self._content_chunks = 0
        self._text: list[str] | None = [] if meter_text else None  # generated text, for metering
        self._parser: sse.SSEParser | None = None
        self._strip_usage = False
        self._closed = False  # the stream broke: nothing after that reaches the client

    # -- request
    def path(self) -> str:
        return self.provider.path_prefix + _PATHS[self.endpoint]

    def request(self, body: dict, raw: bytes) -> UpstreamRequest:
        changed = False
        if body.get("model") != self.target.model:
            body = {**body, "model": self.target.model}
            changed = True
        if self.endpoint == "chat" and body.get("stream"):
            opts = body.get("stream_options")
            if not (isinstance(opts, dict) and opts.get("include_usage") is True):
                body = {**body, "stream_options": {**(opts if isinstance(opts, dict) else {}), "include_usage": True}}
                self._strip_usage = True
                changed = True
        out = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() if changed else None
        return UpstreamRequest(self.path(), {"content-type": "application/json"}, out)

    # -- whole responses
    def response(self, status: int, body: bytes) -> Translated:
        try:
            obj = json.loads(body) if body else None
        except ValueError:
            obj = None
        if 200 <= status < 300:
            expected = "choices" if self.endpoint == "chat" else "data"
            if not isinstance(obj, dict) or not isinstance(obj.get(expected), list):
                raise invalid_answer(self.provider, f"HTTP {status} with a body that is not an OpenAI {self.endpoint} "
                                     "answer (not JSON, cut short, or without " + expected + ")")
            model = obj.get("model")
            return Translated(None, usage_from(obj), model if isinstance(model, str) else None)
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            return Translated(None)  # already OpenAI's error shape (the answer stage scrubs it)
        return Translated(error_body(f"upstream {self.provider.name} answered HTTP {status}", "api_error",
                                     "upstream_error"))

    # -- streams
    def stream_chunk(self, chunk: bytes, end_of_stream: bool) -> ChunkResult:
        """Pass complete events on; a partial one is held until its end arrives.

        When the chunk ends on an event boundary and nothing was held (the
        usual case: providers flush whole events), the bytes pass unchanged
        (``None``); otherwise the complete events are written out again. So
        what reaches the client is always whole events, which is what lets a
        credential echoed in an error event be found, and a cut never leave
        half an event behind. A data line that is not JSON ends the stream
        with an error event: the provider is not speaking this protocol.
        """
        if self._closed:
            return self._result(b"")
        parser = self._parser or self._new_parser()
        rebuild = self._strip_usage or parser.pending
        events = parser.feed(chunk)
        rebuild = rebuild or parser.pending
        out: list[bytes] = []
        for i, ev in enumerate(events):
            keep = self._event(ev)
            if keep is None:  # not an OpenAI event
                if not rebuild:
                    out = [sse.encode(e.data, e.event) for e in events[:i]]
                rebuild = True
                out.append(self._broken("sent a stream event that is not JSON"))
                break
            if rebuild and keep:
                out.append(sse.encode(ev.data, ev.event))
        tail = b""
        if end_of_stream and not self._done and not self._failed:
            tail = self._broken("ended the stream before it was complete")
        if not rebuild:
            return self._result(chunk + tail if tail else None)
        return self._result(b"".join(out) + tail)

    def _result(self, body: bytes | None) -> ChunkResult:
        text = self._text
        produced = ""
        if text:
            produced = "".join(text)
            text.clear()
        return new_chunk_result(ChunkResult, (body, self._usage, self._model, produced, self._done, self._failed,
                                              self._first_content, self._content_chunks))

    def _broken(self, what: str) -> bytes:
        self._failed = True
        self._closed = True
        return sse.error_event(f"upstream {self.provider.name} {what}", "api_error",
                               "stream_interrupted" if "ended" in what else "invalid_upstream_response")

    def _new_parser(self) -> sse.SSEParser:
        self._parser = sse.SSEParser()
        return self._parser

    def _event(self, ev: sse.SSEEvent) -> bool | None:
        """Read one event; returns whether the client should see it, None when it is not an OpenAI event."""
        data = ev.data
        if data == "[DONE]":
            self._done = True
            return True
        metered = self._text is not None  # metering needs the text: no shortcut then
        if (self._first_content and not metered and data[:1] == "{" and '"error"' not in data
                and not _has_usage(data)):
            # the hot path once content flows: a substring test instead of a JSON parse per chunk
            if ('"content"' in data and '"content":null' not in data) or '"tool_calls"' in data:
                self._content_chunks += 1
            return True
        try:
            obj = json.loads(data)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        if "error" in obj and "choices" not in obj:
            self._failed = True
            return True
        if self._model is None and isinstance(obj.get("model"), str):
            self._model = obj["model"]
        choices = obj.get("choices") or []
        if choices:
            self._delta(choices[0].get("delta") or {})
        u = usage_from(obj)
        if u is not None:
            self._usage = u
            if self._strip_usage and not choices:
                return False
        return True


    def _delta(self, delta: dict) -> None:
        if delta.get("content") or delta.get("tool_calls") or delta.get("refusal"):
            self._first_content = True
            self._content_chunks += 1
            _collect(delta, self._text)


def _collect(delta: dict, out: list[str] | None) -> None:
    """The generated text of one delta: content, refusal, tool call names and arguments."""
    if out is None:
        return
    for key in ("content", "refusal"):
        if isinstance(delta.get(key), str) and delta[key]:
            out.append(delta[key])
    calls = delta.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            out.extend(v for k in ("name", "arguments") if isinstance(v := fn.get(k), str) and v)


class AzureOpenAITranslator(OpenAITranslator):
    """Azure OpenAI: the deployment is in the path, the API version in the query."""

    def path(self) -> str:
        p = self.provider
        return f"{p.path_prefix}/openai/deployments/{self.target.model}{_PATHS[self.endpoint]}?api-version={p.api_version}"

    def request(self, body: dict, raw: bytes) -> UpstreamRequest:
        if self.endpoint == "chat" and body.get("stream"):
            return super().request(body, raw)  # usage injection may be needed
        return UpstreamRequest(self.path(), {"content-type": "application/json"}, None)


def reject_embeddings(provider: Provider) -> None:
    raise BadRequest(f"provider {provider.name} ({provider.type}) does not offer embeddings", code="unsupported_endpoint")
