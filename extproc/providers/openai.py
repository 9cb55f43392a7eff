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
from extproc.errors import BadRequest, error_body
from extproc.providers import sse
from extproc.providers.base import StreamProgress, UpstreamRequest, Usage

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


def _has_usage(data: str) -> bool:
    """Whether an event may carry usage; OpenAI sends ``"usage":null`` on every chunk once asked."""
    return '"usage":{' in data or '"usage": {' in data


class OpenAITranslator:
    """OpenAI chat completions and embeddings, passed through."""

    def __init__(self, provider: Provider, target: Target, endpoint: str) -> None:
        self.provider = provider
        self.target = target
        self.endpoint = endpoint
        self.usage: Usage | None = None
        self.progress = StreamProgress()
        self.response_model: str | None = None
        self._parser: sse.SSEParser | None = None
        self._strip_usage = False

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
    def response(self, status: int, body: bytes) -> bytes | None:
        try:
            obj = json.loads(body) if body else None
        except ValueError:
            obj = None
        if 200 <= status < 300:
            if isinstance(obj, dict):
                self.usage = usage_from(obj)
                model = obj.get("model")
                self.response_model = model if isinstance(model, str) else None
            return None
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            return None  # already OpenAI's error shape
        return error_body(f"upstream {self.provider.name} answered HTTP {status}", "api_error", "upstream_error")

    # -- streams
    def stream_chunk(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        parser = self._parser or self._new_parser()
        out: list[bytes] | None = [] if self._strip_usage else None
        for ev in parser.feed(chunk):
            keep = self._event(ev)
            if out is not None and keep:
                out.append(sse.encode(ev.data, ev.event))
        tail = b""
        if end_of_stream and not self.progress.done and not self.progress.failed:
            self.progress.failed = True
            tail = sse.error_event(f"upstream {self.provider.name} ended the stream before it was complete")
        if out is None:
            return chunk + tail if tail else None
        return b"".join(out) + tail

    def _new_parser(self) -> sse.SSEParser:
        self._parser = sse.SSEParser()
        return self._parser

    def _event(self, ev: sse.SSEEvent) -> bool:
        """Read one event; returns whether the client should see it."""
        data = ev.data
        if data == "[DONE]":
            self.progress.done = True
            return True
        metered = self.progress.text is not None  # metering needs the text: no shortcut then
        if self.progress.first_content and not metered and '"error"' not in data and not _has_usage(data):
            # the hot path once content flows: a substring test instead of a JSON parse per chunk
            if ('"content"' in data and '"content":null' not in data) or '"tool_calls"' in data:
                self.progress.content_chunks += 1
            return True
        try:
            obj = json.loads(data)
        except ValueError:
            return True
        if not isinstance(obj, dict):
            return True
        if "error" in obj and "choices" not in obj:
            self.progress.failed = True
            return True
        if self.response_model is None and isinstance(obj.get("model"), str):
            self.response_model = obj["model"]
        choices = obj.get("choices") or []
        if choices:
            self._delta(choices[0].get("delta") or {})
        u = usage_from(obj)
        if u is not None:
            self.usage = u
            if self._strip_usage and not choices:
                return False
        return True


    def _delta(self, delta: dict) -> None:
        if delta.get("content") or delta.get("tool_calls") or delta.get("refusal"):
            self.progress.first_content = True
            self.progress.content_chunks += 1
            _collect(delta, self.progress.text)


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
