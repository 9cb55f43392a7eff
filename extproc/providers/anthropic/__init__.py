"""OpenAI chat completions in front, Anthropic's Messages API behind.

Requests go out as ``POST {base path}/v1/messages`` with ``anthropic-version``
set; the key is injected elsewhere. Answers, whole or streamed, come back in
OpenAI's ``chat.completion`` / ``chat.completion.chunk`` shapes.

Mapping decisions (the ones a client can notice):

- ``system`` and ``developer`` messages, wherever they appear, become the one
  top-level ``system`` text (messages joined by a blank line).
- Consecutive messages of one role are merged (Anthropic requires turns to
  alternate); ``tool`` messages become ``tool_result`` blocks of a user turn,
  placed before any other block of that turn, as Anthropic requires.
- ``temperature`` above 1 is clamped to 1.0 (Anthropic's maximum) rather than
  rejected, so that a request written for OpenAI still works when it falls
  back to Claude; values outside OpenAI's own 0..2 range are rejected.
- ``response_format`` ``json_schema`` becomes ``output_config.format`` (models
  without structured outputs answer with a 400, translated as usual);
  ``json_object`` has no Anthropic equivalent and is rejected.
- Rejected with a 400 naming the parameter: ``n`` > 1, ``logprobs``,
  ``top_logprobs``, ``logit_bias``, ``audio``, non-text ``modalities``,
  ``prediction``, ``web_search_options`` and the legacy ``functions`` /
  ``function_call``.
- Ignored, having no Anthropic counterpart and no effect on the answer's shape:
  ``seed``, ``presence_penalty``, ``frequency_penalty``, ``reasoning_effort``,
  ``store``, ``metadata``, ``service_tier``, ``stream_options``.
- A stream ends with a usage chunk (``choices: []``) before ``[DONE]`` when the
  client asked for it (``stream_options.include_usage``), as OpenAI does.

The package is split along the translator's three jobs: ``request`` (the
mapping above), ``response`` (whole answers, usage and errors) and ``stream``
(the event stream); ``AnthropicTranslator`` ties them together for one attempt.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from extproc.errors import BadRequest, UpstreamError
from extproc.providers.anthropic.request import build_messages_request, convert_messages
from extproc.providers.anthropic.response import chat_completion, error_kind, openai_error, usage_of
from extproc.providers.anthropic.shapes import dumps
from extproc.providers.anthropic.stream import AnthropicStream
from extproc.providers.base import ChunkResult, Translated, UpstreamRequest
from extproc.providers.settings import Provider, Target

__all__ = ["AnthropicTranslator", "build_messages_request", "chat_completion", "convert_messages", "error_kind",
           "openai_error", "usage_of"]


class AnthropicTranslator:
    """One upstream attempt against Anthropic's Messages API (see the package docstring)."""

    def __init__(self, provider: Provider, target: Target, endpoint: str, *,
                 clock: Callable[[], float] = time.time, meter_text: bool = False) -> None:
        self.provider = provider
        self.target = target
        self.endpoint = endpoint
        self._clock = clock
        self._meter_text = meter_text
        self._usage_chunk = False  # the client asked for stream_options.include_usage
        self._stream: AnthropicStream | None = None

    def request(self, body: dict[str, Any], raw: bytes) -> UpstreamRequest:
        if self.endpoint != "chat":
            raise BadRequest(f"the Anthropic backend of this model does not offer {self.endpoint}",
                             code="unsupported_endpoint")
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object", code="invalid_value")
        payload = build_messages_request(body, self.target.model, self.provider.default_max_tokens)
        opts = body.get("stream_options")
        self._usage_chunk = isinstance(opts, dict) and opts.get("include_usage") is True
        headers = {"content-type": "application/json", "anthropic-version": self.provider.anthropic_version}
        return UpstreamRequest(self.provider.path_prefix + "/v1/messages", headers, dumps(payload).encode())

    def response(self, status: int, body: bytes) -> Translated:
        if not 200 <= status < 300:
            return Translated(openai_error(status, body))
        try:
            message = json.loads(body)
        except ValueError:
            message = None
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            raise UpstreamError("the upstream answer is not an Anthropic message")
        completion, usage = chat_completion(message, int(self._clock()))
        return Translated(dumps(completion).encode(), usage, completion["model"])

    def stream_chunk(self, chunk: bytes, end_of_stream: bool) -> ChunkResult:
        if self._stream is None:
            self._stream = AnthropicStream(self.target.model, self._clock, usage_chunk=self._usage_chunk,
                                           meter_text=self._meter_text)
        return self._stream.feed(chunk, end_of_stream)
