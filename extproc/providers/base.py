"""The translator interface every backend schema implements.

A translator is made for one upstream attempt and keeps that attempt's stream
state; it is never shared between exchanges. The client side is always the
OpenAI chat-completions schema; a translator turns the client's request into
its backend's request and the backend's answer (whole or streamed as SSE)
back into OpenAI's shape, reading token usage on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol


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


@dataclass(frozen=True, slots=True)
class Translated:
    """A whole (non-streamed) answer, translated: what the answer stage reads, and all it reads.

    ``body`` is ``None`` when the backend's bytes reach the client unchanged.
    """

    body: bytes | None
    usage: Usage | None = None
    model: str | None = None  # the model the backend says answered


class ChunkResult(NamedTuple):
    """One piece of a streamed answer, translated, with what the stream has shown so far.

    Immutable like ``Translated``, but a named tuple rather than a frozen
    dataclass: one is made per streamed chunk, and a frozen dataclass's
    ``__init__`` (a guarded ``object.__setattr__`` per field) costs about
    0.8 µs, a quarter of the OpenAI pass-through's whole cost per chunk;
    translators build it with ``new_chunk_result`` (below).

    ``body`` is ``None`` when the piece passes unchanged. ``usage``, ``model``,
    ``first_content`` and ``content_chunks`` are the stream's totals up to this
    piece (usage is cumulative on both backends), so a stage never needs the
    translator's own state. ``text`` is the generated text this piece carried
    (content, refusals, tool names and arguments, thinking), filled only by a
    translator made with ``meter_text``: metering is the only reader, and the
    pass-through path skips the JSON parse without it.
    """

    body: bytes | None
    usage: Usage | None
    model: str | None
    text: str
    done: bool  # the backend signalled a clean end ([DONE] / message_stop)
    failed: bool  # the backend sent an error event, broke the protocol, or ended early
    first_content: bool  # a chunk with generated content has passed (in this piece or before)
    content_chunks: int  # chunks that carried generated content, so far


# ``new_chunk_result(ChunkResult, (body, usage, ...))``: the tuple made directly, without the named
# tuple's generated ``__new__`` (a Python call with eight keyword-capable arguments); about half the cost,
# on a path run once per streamed chunk. The fields go in declaration order.
new_chunk_result = tuple.__new__


class Translator(Protocol):
    """Made per attempt by ``registry.make_translator(provider, target, endpoint, meter_text=...)``."""

    def request(self, body: dict, raw: bytes) -> UpstreamRequest:
        """Turn the parsed OpenAI request into this backend's request."""

    def response(self, status: int, body: bytes) -> Translated:
        """Translate a whole (non-streamed) response body.

        Non-2xx bodies are turned into OpenAI's error shape.
        """

    def stream_chunk(self, chunk: bytes, end_of_stream: bool) -> ChunkResult:
        """Translate one piece of an SSE body.

        Pieces split events at arbitrary points: partial events are kept until
        they are complete. At ``end_of_stream`` without a clean end, the result
        ends with an OpenAI-style error event and no ``[DONE]``.
        """
