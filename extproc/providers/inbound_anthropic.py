"""Anthropic's Messages API as a way *in*: ``POST /v1/messages`` from Claude-style clients.

Inside the gateway every request is an OpenAI chat-completions request: the
stages (authentication, validation, quotas, routing, fallback, metering,
metrics, the ledger) and every backend translator speak that one schema. So
an Anthropic request is turned into the OpenAI shape as early as possible
(``to_openai``, before validation) and the answer back into Anthropic's as late
as possible: after the backend translator, the guardrails and the cache have
read it in OpenAI's shape, ``answer.py`` hands the client ``answer_body`` (a
whole message or an error) or an ``EventWriter``'s events. So the guardrails
check, and the cache stores, one shape whichever API the client speaks.

An Anthropic target then runs the round trip Anthropic → OpenAI → Anthropic;
that costs a little CPU per event, and buys one code path for every stage.

Streams: OpenAI chunks become ``message_start``, ``content_block_start`` /
``_delta`` / ``_stop`` per text or tool-use block, ``message_delta`` with the
stop reason and usage, and ``message_stop``; an in-band error becomes an
``error`` event (and no ``message_stop``). Chunks split events anywhere: the
SSE parser keeps the partial tail, so the output does not depend on where the
provider's bytes were cut.
"""

from __future__ import annotations

import json
from typing import Any

from extproc.errors import BadRequest
from extproc.errors import anthropic_error_body as error_body
from extproc.errors import anthropic_error_object
from extproc.providers import sse
from extproc.providers.base import Usage

# OpenAI finish_reason -> Anthropic stop_reason
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
         "content_filter": "refusal"}


# --------------------------------------------------------------------------- errors


def from_openai_error(status: int, body: bytes) -> bytes:
    """An OpenAI-shaped error body (ours, or a provider's as its translator left it) in Anthropic's shape."""
    message = f"upstream answered HTTP {status}"
    try:
        obj = json.loads(body) if body else None
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        m = obj["error"].get("message")
        if isinstance(m, str) and m:
            message = m
    return error_body(status, message)


# --------------------------------------------------------------------------- request: Anthropic -> OpenAI


def _bad(message: str, param: str) -> BadRequest:
    return BadRequest(message, param=param, code="invalid_request")


def _text_of(blocks: Any, param: str) -> str:
    """A string, or text blocks joined (Anthropic allows both for system prompts and tool results)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise _bad(f"{param} must be a string or an array of text blocks", param)
    parts = []
    for i, b in enumerate(blocks):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise _bad(f"{param}[{i}] must be a text block", f"{param}[{i}]")
        parts.append(b["text"])
    return "\n".join(parts)


def _image(block: dict, param: str) -> dict:
    src = block.get("source")
    if isinstance(src, dict) and src.get("type") == "base64":
        url = f"data:{src.get('media_type', 'image/png')};base64,{src.get('data', '')}"
    elif isinstance(src, dict) and src.get("type") == "url" and isinstance(src.get("url"), str):
        url = src["url"]
    else:
        raise _bad(f"{param}.source must be a base64 or url image source", f"{param}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def _user_turn(content: list, param: str) -> list[dict]:
    """One user turn: tool results become OpenAI ``tool`` messages, ahead of the remaining user parts."""
    out: list[dict] = []
    parts: list[dict] = []
    for i, b in enumerate(content):
        p = f"{param}[{i}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            parts.append({"type": "text", "text": b["text"]})
        elif kind == "image":
            parts.append(_image(b, p))
        elif kind == "tool_result" and isinstance(b.get("tool_use_id"), str):
            text = _text_of(b.get("content", ""), f"{p}.content") if b.get("content") is not None else ""
            if b.get("is_error"):
                text = f"[error] {text}"
            out.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": text})
        else:
            raise _bad(f"{p} must be a text, image or tool_result block", p)
    if parts:
        out.append({"role": "user", "content": parts})
    return out


def _assistant_turn(content: list, param: str) -> dict:
    texts: list[str] = []
    calls: list[dict] = []
    for i, b in enumerate(content):
        p = f"{param}[{i}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            texts.append(b["text"])
        elif kind == "tool_use" and isinstance(b.get("id"), str) and isinstance(b.get("name"), str):
            args = json.dumps(b.get("input") or {}, ensure_ascii=False, separators=(",", ":"))
            calls.append({"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": args}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # a backend of another schema cannot take a signed thought back
        else:
            raise _bad(f"{p} must be a text or tool_use block", p)
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        msg["tool_calls"] = calls
    elif msg["content"] is None:
        msg["content"] = ""
    return msg


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages: must be a non-empty array", "messages")
    out: list[dict] = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": _text_of(system, "system")})
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise _bad(f"{p}.role must be user or assistant", f"{p}.role")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
        elif isinstance(content, list) and content:
            if m["role"] == "user":
                out.extend(_user_turn(content, f"{p}.content"))
            else:
                out.append(_assistant_turn(content, f"{p}.content"))
        else:
            raise _bad(f"{p}.content must be a string or a non-empty array of blocks", f"{p}.content")
    return out


def _tools(body: dict, out: dict) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools: must be an array", "tools")
        fns = []
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise _bad(f"tools[{i}] must be an object with a name", f"tools[{i}]")
            fn = {"name": t["name"], "parameters": t.get("input_schema") or {"type": "object"}}
            if isinstance(t.get("description"), str):
                fn["description"] = t["description"]
            fns.append({"type": "function", "function": fn})
        out["tools"] = fns
    choice = body.get("tool_choice")
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool" and isinstance(choice.get("name"), str):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif kind in ("auto", "any", "none"):
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    else:
        raise _bad("tool_choice.type must be auto, any, tool or none", "tool_choice")
    if choice.get("disable_parallel_tool_use") is True:
        out["parallel_tool_calls"] = False


def to_openai(body: dict) -> dict:
    """An Anthropic Messages request as the OpenAI chat request every stage reads.

    Sampling parameters keep their meaning; ``top_k`` has no OpenAI
    counterpart and is dropped; ``max_tokens`` is required, as Anthropic's API
    requires it.
    """
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise _bad("max_tokens: Field required", "max_tokens")
    out: dict[str, Any] = {"model": body.get("model"), "messages": _messages(body), "max_tokens": max_tokens}
    for name in ("temperature", "top_p", "stream"):
        if body.get(name) is not None:
            out[name] = body[name]
    stops = body.get("stop_sequences")
    if stops is not None:
        if not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
            raise _bad("stop_sequences: must be an array of strings", "stop_sequences")
        if len(stops) > 4:
            raise _bad("stop_sequences: this gateway passes at most 4 (OpenAI-schema targets take no more)",
                       "stop_sequences")
        if stops:
            out["stop"] = stops
    if out.get("stream") is True:
        out["stream_options"] = {"include_usage": True}  # message_delta carries the usage
    meta = body.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("user_id"), str):
        out["user"] = meta["user_id"]
    _tools(body, out)
    return out


# --------------------------------------------------------------------------- answers: OpenAI -> Anthropic


def _usage(u: Usage | None) -> dict[str, int]:
    if u is None:
        return {"input_tokens": 0, "output_tokens": 0}
    cached = u.cached_tokens + u.cache_write_tokens
    return {"input_tokens": u.prompt_tokens - cached, "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": u.cache_write_tokens}


def _message_id(openai_id: Any) -> str:
    return f"msg_{openai_id}" if isinstance(openai_id, str) and openai_id else "msg_tollgate"


def _tool_input(arguments: Any) -> Any:
    try:
        value = json.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except ValueError:
        return {"_raw": arguments}
    return value if isinstance(value, dict) else {"_value": value}


def message_from_completion(obj: dict, usage: Usage | None, model: str) -> dict:
    """A whole OpenAI chat completion as an Anthropic message."""
    choice = (obj.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    content: list[dict] = []
    text = msg.get("content") or msg.get("refusal")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or "toolu_tollgate", "name": fn.get("name", ""),
                        "input": _tool_input(fn.get("arguments"))})
    return {
        "id": _message_id(obj.get("id")), "type": "message", "role": "assistant",
        "model": obj.get("model") or model, "content": content,
        "stop_reason": _STOP.get(choice.get("finish_reason") or "stop", "end_turn"), "stop_sequence": None,
        "usage": _usage(usage),
    }


_TEXT_DELTA = ('event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
               '"delta":{"type":"text_delta","text":%s}}\n\n')


class EventWriter:
    """OpenAI ``chat.completion.chunk`` events in, Anthropic Messages stream events out."""

    __slots__ = ("model", "input_estimate", "_parser", "_started", "_block", "_kind", "_tool", "_stop", "_usage",
                 "_finished")

    def __init__(self, model: str, input_estimate: int = 0) -> None:
        self.model = model
        self.input_estimate = input_estimate  # the gateway's own prompt count, for message_start (else 0)
        self._parser = sse.SSEParser()
        self._started = False
        self._block = -1  # index of the open content block; -1: none open yet
        self._kind: str | None = None  # "text" | "tool_use" while a block is open
        self._tool: int | None = None  # the OpenAI tool-call index the open tool_use block is for
        self._stop = "end_turn"
        self._usage: Usage | None = None
        self._finished = False

    def feed(self, data: bytes, usage: Usage | None) -> bytes:
        if usage is not None:  # the backend translator has read this whole piece already
            self._usage = usage
        out: list[bytes] = []
        for ev in self._parser.feed(data):
            if self._finished:
                break
            self._event(ev.data, out)
        return b"".join(out)

    def _event(self, data: str, out: list[bytes]) -> None:
        if data == "[DONE]":
            self._finish(out)
            return
        try:
            obj = json.loads(data)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        if isinstance(obj.get("error"), dict) and "choices" not in obj:
            err = obj["error"]
            status = 429 if err.get("code") in ("rate_limit_exceeded", "insufficient_quota") else 500
            message = err.get("message") if isinstance(err.get("message"), str) else "the stream failed"
            body = anthropic_error_object(status, message)
            out.append(sse.encode_json(body, "error"))
            self._finished = True
            return
        self._start(obj, out)
        for choice in obj.get("choices") or ():
            self._delta(choice.get("delta") or {}, out)
            if choice.get("finish_reason"):
                self._stop = _STOP.get(choice["finish_reason"], "end_turn")
                self._close(out)

    def _start(self, obj: dict, out: list[bytes]) -> None:
        if self._started:
            return
        self._started = True
        model = obj.get("model") if isinstance(obj.get("model"), str) else self.model
        out.append(sse.encode_json({"type": "message_start", "message": {
            "id": _message_id(obj.get("id")), "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.input_estimate, "output_tokens": 0}}}, "message_start"))

    def _open(self, kind: str, block: dict, out: list[bytes]) -> None:
        self._close(out)
        self._block += 1
        self._kind = kind
        out.append(sse.encode_json({"type": "content_block_start", "index": self._block, "content_block": block},
                                   "content_block_start"))

    def _close(self, out: list[bytes]) -> None:
        if self._kind is None:
            return
        out.append(sse.encode_json({"type": "content_block_stop", "index": self._block}, "content_block_stop"))
        self._kind = self._tool = None

    def _emit(self, delta: dict, out: list[bytes]) -> None:
        out.append(sse.encode_json({"type": "content_block_delta", "index": self._block, "delta": delta},
                                   "content_block_delta"))

    def _delta(self, delta: dict, out: list[bytes]) -> None:
        text = delta.get("content") or delta.get("refusal")
        if isinstance(text, str) and text:
            if self._kind != "text":
                self._open("text", {"type": "text", "text": ""}, out)
            # the event of nearly every chunk: written from a template (a third of the cost of a dict dump)
            out.append((_TEXT_DELTA % (self._block, json.dumps(text, ensure_ascii=False))).encode())
        for call in delta.get("tool_calls") or ():
            if not isinstance(call, dict):
                continue
            fn = call.get("function") or {}
            index = call.get("index", 0)
            if self._kind != "tool_use" or self._tool != index:
                self._open("tool_use", {"type": "tool_use", "id": call.get("id") or f"toolu_{index}",
                                        "name": fn.get("name") or "", "input": {}}, out)
                self._tool = index
            if isinstance(fn.get("arguments"), str) and fn["arguments"]:
                self._emit({"type": "input_json_delta", "partial_json": fn["arguments"]}, out)

    def _finish(self, out: list[bytes]) -> None:
        self._start({}, out)
        self._close(out)
        usage = _usage(self._usage)
        out.append(sse.encode_json({"type": "message_delta", "delta": {"stop_reason": self._stop,
                                                                        "stop_sequence": None},
                                    "usage": usage}, "message_delta"))
        out.append(sse.encode_json({"type": "message_stop"}, "message_stop"))
        self._finished = True


def answer_body(status: int, body: bytes, usage: Usage | None, model: str) -> bytes:
    """A whole answer as the client of ``/v1/messages`` gets it: a message, or an error in Anthropic's shape.

    ``body`` is what the backend translator (and the stages reading answers after it: guardrails, the
    cache) made of the provider's answer, in OpenAI's shape.
    """
    if not 200 <= status < 300:
        return from_openai_error(status, body)
    try:
        obj = json.loads(body)
    except ValueError:
        return error_body(502, "the provider's answer could not be read")
    if not isinstance(obj, dict):
        return error_body(502, "the provider's answer could not be read")
    return json.dumps(message_from_completion(obj, usage, model), ensure_ascii=False).encode()


def reshape_answer(status: int, body: bytes, content_type: str, model: str) -> bytes:
    """An answer a stage gave itself in OpenAI's shape (a cache hit: a completion, or a replayed stream),
    in Anthropic's."""
    if not 200 <= status < 300:
        return from_openai_error(status, body)
    if content_type.startswith("text/event-stream"):
        return EventWriter(model).feed(body, None)
    try:
        obj = json.loads(body)
    except ValueError:
        return body
    if not isinstance(obj, dict):
        return body
    u = obj.get("usage")
    if not isinstance(u, dict):
        u = {}
    usage = Usage(prompt_tokens=int(u.get("prompt_tokens") or 0), completion_tokens=int(u.get("completion_tokens") or 0))
    return json.dumps(message_from_completion(obj, usage, model), ensure_ascii=False).encode()


def models_list(entries: list[dict]) -> dict:
    """``GET /v1/models`` for both SDKs: OpenAI's fields and Anthropic's side by side in one answer."""
    data = [{**e, "type": "model", "display_name": e["id"], "created_at": "2023-11-14T22:13:20Z"} for e in entries]
    return {"object": "list", "data": data, "has_more": False,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
