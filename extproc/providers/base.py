"""The translator interface every backend schema implements.

A translator is made for one upstream attempt and keeps that attempt's stream
state; it is never shared between exchanges. The client side is always the
OpenAI chat-completions schema; a translator turns the client's request into
its backend's request and the backend's answer (whole or streamed as SSE)
back into OpenAI's shape, reading token usage on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Usage:
    """Token usage in OpenAI's terms: ``prompt_tokens`` includes the cached ones and the cache writes."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens read from the provider's prompt cache
    cache_write_tokens: int = 0  # prompt tokens written to it (Anthropic bills these above the input price)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class UpstreamRequest:
    """What to send upstream for this attempt.

    ``path`` is the full path with query; ``headers`` are set (or replaced);
    ``body`` is ``None`` when the client's bytes go out unchanged.
    """

    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None


@dataclass
class StreamProgress:
    """What the translator learnt from the stream so far (read by metrics and quotas)."""

    first_content: bool = False  # a chunk with generated content has passed
    done: bool = False  # the backend signalled a clean end ([DONE] / message_stop)
    failed: bool = False  # the backend sent an error event mid-stream
    content_chunks: int = 0  # chunks that carried generated content
    text: list[str] | None = None  # when a list: generated text (content, tool arguments) is appended, for metering


class Translator(Protocol):
    usage: Usage | None
    progress: StreamProgress
    response_model: str | None

    def request(self, body: dict, raw: bytes) -> UpstreamRequest:
        """Turn the parsed OpenAI request into this backend's request."""

    def response(self, status: int, body: bytes) -> bytes | None:
        """Translate a whole (non-streamed) response body; ``None`` keeps it as is.

        Non-2xx bodies are turned into OpenAI's error shape.
        """

    def stream_chunk(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        """Translate one piece of an SSE body; ``None`` keeps the bytes as they are.

        Pieces split events at arbitrary points: partial events are kept until
        they are complete. At ``end_of_stream`` without a clean end, the result
        ends with an OpenAI-style error event and no ``[DONE]``.
        """
