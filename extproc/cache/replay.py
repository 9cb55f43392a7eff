"""A cached answer in the client's shape, and the answer read back for storing.

``replay`` builds what a hit returns: a chat completion, or for ``stream:
true`` the server-sent events an OpenAI stream consists of (role chunk,
content chunks, a finish chunk, a usage chunk when ``stream_options.
include_usage`` was asked, ``[DONE]``), always with a fresh id and created
time.

``Collector`` reads an answer on its way to the client (the OpenAI shape the
translators produce, whole or streamed) and keeps only what a cache entry
needs: the text, the model, and whether the answer is worth storing (a plain
``stop`` with no tool calls and exactly one choice).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from extproc.cache.entry import Answer
from extproc.providers.sse import SSEParser

CHUNK_CHARS = 48  # text per replayed content event: a stream that looks like one, in few events


def _usage(a: Answer) -> dict[str, int]:
    return {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
            "total_tokens": a.prompt_tokens + a.completion_tokens}


def replay_json(a: Answer, model: str) -> bytes:
    body = {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": a.content, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": _usage(a),
    }
    return json.dumps(body, separators=(",", ":")).encode()


def replay_sse(a: Answer, model: str, *, include_usage: bool) -> bytes:
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def event(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None,
              choices: bool = True) -> bytes:
        chunk: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                 "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": finish}] if choices else []}
        if include_usage:
            chunk["usage"] = usage
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    parts = [event({"role": "assistant", "content": ""})]
    text = a.content
    for i in range(0, len(text), CHUNK_CHARS):
        parts.append(event({"content": text[i:i + CHUNK_CHARS]}))
    parts.append(event({}, "stop"))
    if include_usage:
        parts.append(event({}, usage=_usage(a), choices=False))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


class Collector:
    """The text of one answer, fed as it reaches the client; ``answer()`` when it was a storable one."""

    __slots__ = ("parser", "text", "model", "finish", "storable", "done", "whole")

    def __init__(self) -> None:
        self.parser: SSEParser | None = None
        self.text: list[str] = []
        self.model = ""
        self.finish: str | None = None
        self.storable = True
        self.done = False
        self.whole = bytearray()

    def feed_whole(self, body: bytes) -> None:
        self.whole += body

    def feed_stream(self, chunk: bytes) -> None:
        if not self.storable:
            return
        if self.parser is None:
            self.parser = SSEParser()
        for ev in self.parser.feed(chunk):
            if ev.data.strip() == "[DONE]":
                self.done = True
                continue
            try:
                self._choice(json.loads(ev.data), "delta")
            except (ValueError, TypeError, AttributeError):
                self.storable = False

    def _choice(self, obj: dict[str, Any], part: str) -> None:
        if obj.get("error"):
            self.storable = False
            return
        self.model = obj.get("model") or self.model
        choices = obj.get("choices") or []
        if len(choices) > 1 or any(c.get("index", 0) != 0 for c in choices):
            self.storable = False
            return
        for c in choices:
            m = c.get(part) or {}
            if m.get("tool_calls") or m.get("function_call") or m.get("refusal"):
                self.storable = False
            if isinstance(m.get("content"), str):
                self.text.append(m["content"])
            if c.get("finish_reason"):
                self.finish = c["finish_reason"]

    def answer(self, prompt_tokens: int, completion_tokens: int, micro_usd: int) -> Answer | None:
        if self.whole:
            try:
                self._choice(json.loads(bytes(self.whole)), "message")
            except (ValueError, TypeError, AttributeError):
                return None
            self.whole.clear()
            self.done = True
        if not self.storable or not self.done or self.finish != "stop":
            return None
        text = "".join(self.text)
        if not text:
            return None
        return Answer(text, self.model, prompt_tokens, completion_tokens, micro_usd)
