"""Anthropic's event stream as OpenAI ``chat.completion.chunk`` events, piece by piece.

One ``AnthropicStream`` per attempt holds what the events have shown so far
(usage counts, tool call indexes, the completion's identity) and answers each
piece with a ``ChunkResult``; nothing outside reads its fields.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

from extproc.providers import sse
from extproc.providers.anthropic.response import API_KEY, error_kind, finish_reason, openai_usage, usage_of
from extproc.providers.anthropic.shapes import Json, dumps as _dumps
from extproc.providers.base import ChunkResult, Usage, new_chunk_result


class AnthropicStream:
    """The stream state of one attempt (see the package docstring for the mapping)."""

    __slots__ = ("_target_model", "_clock", "_parser", "_closed", "_tool_calls", "_usage_fields", "_usage_chunk", "_usage", "_model",
                 "_done", "_failed", "_first_content", "_content_chunks", "_text", "_usage_head", "_choice_head")

    def __init__(self, model: str, clock: Callable[[], float], *, usage_chunk: bool, meter_text: bool) -> None:
        self._target_model = model
        self._clock = clock
        self._parser = sse.SSEParser()
        self._closed = False  # message_stop, an error or a stream failure was handled
        self._tool_calls: dict[int, int] = {}  # Anthropic block index -> OpenAI tool call index
        self._usage_fields: Json = {}  # the latest of each cumulative Anthropic usage count
        self._usage_chunk = usage_chunk  # the client asked for stream_options.include_usage
        self._usage: Usage | None = None
        self._model: str | None = None
        self._done = False
        self._failed = False
        self._first_content = False
        self._content_chunks = 0
        self._text: list[str] | None = [] if meter_text else None  # generated text, for metering
        self._set_identity(f"chatcmpl-{uuid.uuid4().hex}", model)

    def feed(self, chunk: bytes, end_of_stream: bool) -> ChunkResult:
        out: list[bytes] = []
        if not self._closed:
            for event in self._parser.feed(chunk):
                self._on_event(event, out)
                if self._closed:
                    break
        if end_of_stream and not self._closed:
            self._fail(out, "upstream stream ended before completion", "api_error", "stream_interrupted")
        text = self._text
        produced = ""
        if text:
            produced = "".join(text)
            text.clear()
        return new_chunk_result(ChunkResult, (b"".join(out), self._usage, self._model, produced, self._done,
                                              self._failed, self._first_content, self._content_chunks))

    def _on_event(self, event: sse.SSEEvent, out: list[bytes]) -> None:
        try:
            data = json.loads(event.data)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            self._fail(out, "upstream sent a malformed stream event", "api_error", "upstream_error")
            return
        kind = data.get("type") or event.event
        if kind == "content_block_delta":
            self._on_delta(data, out)
        elif kind == "content_block_start":
            self._on_block_start(data, out)
        elif kind == "message_start":
            self._on_message_start(data.get("message") or {}, out)
        elif kind == "message_delta":
            self._on_message_delta(data, out)
        elif kind == "message_stop":
            self._on_message_stop(out)
        elif kind == "error":
            raw = data.get("error")
            error: Json = raw if isinstance(raw, dict) else {}
            openai_type, code = error_kind(error.get("type"), 500)
            message = API_KEY.sub("sk-ant-***", str(error.get("message") or "upstream stream failed"))
            self._fail(out, message, openai_type, code or "stream_interrupted")
        # ping, content_block_stop and event types added later carry nothing to forward

    def _set_identity(self, completion_id: str, model: str) -> None:
        head = (f'{{"id":{_dumps(completion_id)},"object":"chat.completion.chunk",'
                f'"created":{int(self._clock())},"model":{_dumps(model)},')
        self._usage_head = head + '"choices":[],"usage":'
        self._choice_head = head + '"choices":[{"index":0,"delta":'

    def _emit(self, out: list[bytes], delta: str, finish: str | None = None, content: bool = False) -> None:
        reason = "null" if finish is None else f'"{finish}"'
        out.append(f'data: {self._choice_head}{delta},"logprobs":null,"finish_reason":{reason}}}]}}\n\n'.encode())
        if content:
            self._first_content = True
            self._content_chunks += 1

    def _on_message_start(self, message: Json, out: list[bytes]) -> None:
        model = message.get("model") or self._target_model
        self._model = model
        if message.get("id"):
            self._set_identity(f"chatcmpl-{message['id']}", model)
        self._merge_usage(message.get("usage"))
        self._emit(out, '{"role":"assistant","content":""}')

    def _merge_usage(self, raw: object) -> None:
        if isinstance(raw, dict):
            self._usage_fields.update((k, v) for k, v in raw.items() if v is not None)
            self._usage = usage_of(self._usage_fields)

    def _on_block_start(self, data: Json, out: list[bytes]) -> None:
        block = data.get("content_block") or {}
        kind = block.get("type")
        if kind == "text" and block.get("text"):
            self._emit(out, f'{{"content":{_dumps(block["text"])}}}', content=True)
            self._produced(block["text"])
        elif kind == "tool_use":
            self._produced(str(block.get("name") or ""))
            index = self._tool_calls[data.get("index", -1)] = len(self._tool_calls)
            call = {"index": index, "id": block.get("id"), "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""}}
            self._emit(out, f'{{"tool_calls":[{_dumps(call)}]}}', content=True)

    def _on_delta(self, data: Json, out: list[bytes]) -> None:
        delta = data.get("delta") or {}
        kind = delta.get("type")
        if kind == "text_delta":
            if text := delta.get("text"):
                self._emit(out, f'{{"content":{_dumps(text)}}}', content=True)
                self._produced(text)
        elif kind == "thinking_delta":
            self._produced(str(delta.get("thinking") or ""))  # billed as output, though not forwarded
        elif kind == "input_json_delta":
            index = self._tool_calls.get(data.get("index", -1))
            fragment = delta.get("partial_json")
            if isinstance(fragment, str):
                self._produced(fragment)
            if index is not None and fragment:
                args = f'{{"tool_calls":[{{"index":{index},"function":{{"arguments":{_dumps(fragment)}}}}}]}}'
                self._emit(out, args, content=True)
        # thinking, signature and citation deltas have no chat-completions counterpart (thinking is metered)

    def _produced(self, text: str) -> None:
        if self._text is not None and text:
            self._text.append(text)

    def _on_message_delta(self, data: Json, out: list[bytes]) -> None:
        self._merge_usage(data.get("usage"))
        stop_reason = (data.get("delta") or {}).get("stop_reason")
        self._emit(out, "{}", finish_reason(stop_reason))

    def _on_message_stop(self, out: list[bytes]) -> None:
        if self._usage_chunk:
            usage = self._usage or Usage()
            out.append(f"data: {self._usage_head}{_dumps(openai_usage(usage))}}}\n\n".encode())
        out.append(sse.DONE)
        self._done = True
        self._closed = True

    def _fail(self, out: list[bytes], message: str, openai_type: str, code: str | None) -> None:
        out.append(sse.error_event(message, openai_type, code))
        self._failed = True
        self._closed = True
