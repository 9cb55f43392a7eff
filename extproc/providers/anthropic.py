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
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from extproc.providers.settings import Provider, Target
from extproc.errors import BadRequest, UpstreamError
from extproc.providers import sse
from extproc.providers.base import StreamProgress, UpstreamRequest, Usage

Json = dict[str, Any]

_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_NO_CHOICE_PARAMS = ("logprobs", "top_logprobs", "logit_bias", "audio", "prediction", "web_search_options")

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic error type -> (OpenAI error type, OpenAI error code)
_ERROR_KINDS: dict[str, tuple[str, str | None]] = {
    "invalid_request_error": ("invalid_request_error", None),
    "authentication_error": ("authentication_error", None),
    "permission_error": ("permission_error", None),
    "not_found_error": ("invalid_request_error", "not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("requests", "rate_limit_exceeded"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
    "timeout_error": ("api_error", "timeout"),
    "api_error": ("api_error", None),
    "overloaded_error": ("api_error", "overloaded"),
}
_STATUS_KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_API_KEY = re.compile(r"sk-ant-[A-Za-z0-9_\-]+")


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> BadRequest:
    return BadRequest(message, param=param, code=code)


# --------------------------------------------------------------------------- request: messages


def _text_parts(content: object, where: str, *, allow_refusal: bool = False) -> list[str]:
    """The texts of a string or a list of text parts (other part types are refused)."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or a list of content parts", where)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif allow_refusal and kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise _bad(f"{where}[{i}] must be a text part ({{'type': 'text', 'text': ...}})", f"{where}[{i}]")
    return texts


def _data_url(url: str, where: str, allowed: frozenset[str]) -> Json:
    """A ``data:<type>;base64,<data>`` URL as an Anthropic base64 source."""
    head, comma, data = url.partition(",")
    media_type, *flags = head[len("data:") :].split(";")
    if not comma or "base64" not in flags:
        raise _bad(f"{where}: data URLs must be base64-encoded (data:<type>;base64,...)", where)
    if media_type not in allowed:
        raise _bad(
            f"{where}: media type {media_type!r} is not supported (use {', '.join(sorted(allowed))})",
            where,
            "unsupported_value",
        )
    return {"type": "base64", "media_type": media_type, "data": data}


def _image_block(part: Json, where: str) -> Json:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise _bad(f"{where}.image_url.url must be a non-empty string", f"{where}.image_url.url")
    if url.startswith("data:"):
        return {"type": "image", "source": _data_url(url, f"{where}.image_url.url", _IMAGE_TYPES)}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise _bad(f"{where}.image_url.url must be an http(s) URL or a base64 data URL", f"{where}.image_url.url")


def _file_block(part: Json, where: str) -> Json:
    file = part.get("file")
    data = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data, str) or not data.startswith("data:"):
        raise _bad(f"{where}: only inline PDF files (file.file_data as a data URL) are supported", where,
                   "unsupported_value")
    return {"type": "document", "source": _data_url(data, f"{where}.file.file_data", frozenset({"application/pdf"}))}


def _user_blocks(content: object, where: str) -> list[Json]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or a list of content parts", f"{where}.content")
    blocks = []
    for i, part in enumerate(content):
        at = f"{where}.content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"]:
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image_block(part, at))
        elif kind == "file":
            blocks.append(_file_block(part, at))
        else:
            raise _bad(f"{at}: content part type {kind!r} is not supported by Anthropic models", at,
                       "unsupported_value")
    return blocks


def _tool_use_block(call: object, where: str) -> Json:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(call, dict) or call.get("type", "function") != "function" or not isinstance(fn, dict):
        raise _bad(f"{where} must be a function tool call", where)
    if not isinstance(call.get("id"), str) or not isinstance(fn.get("name"), str):
        raise _bad(f"{where} needs an id and a function.name", where)
    arguments = fn.get("arguments") or "{}"
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise _bad(f"{where}.function.arguments must be a JSON object encoded as a string",
                   f"{where}.function.arguments")
    return {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": parsed}


def _assistant_blocks(message: Json, where: str) -> list[Json]:
    content = message.get("content")
    texts = [] if content is None else _text_parts(content, f"{where}.content", allow_refusal=True)
    blocks: list[Json] = [{"type": "text", "text": t} for t in texts if t]
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise _bad(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
    blocks.extend(_tool_use_block(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls))
    return blocks


def _tool_result_block(message: Json, where: str) -> Json:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise _bad(f"{where}.tool_call_id is required for tool messages", f"{where}.tool_call_id")
    block: Json = {"type": "tool_result", "tool_use_id": call_id}
    content = message.get("content")
    if isinstance(content, list):
        block["content"] = [{"type": "text", "text": t} for t in _text_parts(content, f"{where}.content") if t]
    elif content is not None:
        block["content"] = "".join(_text_parts(content, f"{where}.content"))
    if not block.get("content"):
        block.pop("content", None)
    return block


def _turn(message: object, where: str, system: list[str]) -> tuple[str, list[Json]] | None:
    """One OpenAI message as (Anthropic role, blocks); system text goes to ``system``."""
    if not isinstance(message, dict):
        raise _bad(f"{where} must be an object", where)
    role = message.get("role")
    if role in ("system", "developer"):
        system.append("\n".join(_text_parts(message.get("content"), f"{where}.content")))
        return None
    if role == "user":
        return "user", _user_blocks(message.get("content"), where)
    if role == "assistant":
        return "assistant", _assistant_blocks(message, where)
    if role == "tool":
        return "user", [_tool_result_block(message, where)]
    if role is None:
        raise _bad(f"{where}.role is required", f"{where}.role")
    raise _bad(f"{where}.role {role!r} is not supported (use system, developer, user, assistant or tool)",
               f"{where}.role")


def _compact(role: str, blocks: list[Json]) -> Json:
    if role == "user":
        blocks.sort(key=lambda b: b["type"] != "tool_result")  # stable: tool results first
    if len(blocks) == 1 and blocks[0]["type"] == "text":
        return {"role": role, "content": blocks[0]["text"]}
    return {"role": role, "content": blocks}


def convert_messages(messages: object) -> tuple[str | None, list[Json]]:
    """OpenAI ``messages`` as Anthropic's (system text, alternating turns)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    system: list[str] = []
    turns: list[tuple[str, list[Json]]] = []
    for i, message in enumerate(messages):
        turn = _turn(message, f"messages[{i}]", system)
        if turn is None or not turn[1]:
            continue
        if turns and turns[-1][0] == turn[0]:
            turns[-1][1].extend(turn[1])
        else:
            turns.append(turn)
    if not turns:
        raise _bad("messages must include a user or assistant message with content", "messages")
    text = "\n\n".join(s for s in system if s)
    return text or None, [_compact(role, blocks) for role, blocks in turns]


# --------------------------------------------------------------------------- request: parameters


def _number(body: Json, name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise _bad(f"{name} must be a number from {lo:g} to {hi:g}", name)
    return value


def _max_tokens(body: Json, default: int) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _bad(f"{name} must be a whole number of at least 1", name)
        return value
    return default


def _stop_sequences(stop: object) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _bad("stop must be a string or a list of strings", "stop")
    return [s for s in items if s]


def _reject_unsupported(body: Json) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad("n: Anthropic models return a single choice; n must be 1", "n", "unsupported_value")
    for name in _NO_CHOICE_PARAMS:
        if body.get(name):
            raise _bad(f"{name} is not supported by Anthropic models", name, "unsupported_parameter")
    if body.get("modalities") not in (None, ["text"]):
        raise _bad("modalities: Anthropic models answer with text only", "modalities", "unsupported_value")
    for name in ("functions", "function_call"):
        if name in body:
            raise _bad(f"{name} is deprecated and not supported here; use tools and tool_choice", name,
                       "unsupported_parameter")


def _tool(tool: object, where: str) -> Json:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
        raise _bad(f"{where}: only function tools are supported", where, "unsupported_value")
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise _bad(f"{where}.function.name is required", f"{where}.function.name")
    schema = fn.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(schema, dict):
        raise _bad(f"{where}.function.parameters must be a JSON schema object", f"{where}.function.parameters")
    out: Json = {"name": fn["name"], "input_schema": schema}
    if isinstance(fn.get("description"), str):
        out["description"] = fn["description"]
    return out


def _tool_choice(choice: object) -> Json | None:
    if choice is None:
        return None
    simple = {"auto": "auto", "none": "none", "required": "any"}
    if isinstance(choice, str) and choice in simple:
        return {"type": simple[choice]}
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(name, str) and name:
        return {"type": "tool", "name": name}
    raise _bad("tool_choice must be auto, none, required or {type: function, function: {name}}", "tool_choice")


def _add_tools(body: Json, out: Json) -> None:
    tools = body.get("tools")
    if not tools:
        return  # a tool_choice without tools has nothing to choose from
    if not isinstance(tools, list):
        raise _bad("tools must be a list", "tools")
    out["tools"] = [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]
    choice = _tool_choice(body.get("tool_choice"))
    if body.get("parallel_tool_calls") is False and (choice is None or choice["type"] != "none"):
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None:
        out["tool_choice"] = choice


def _output_format(fmt: object) -> Json | None:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind == "json_schema":
        spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _bad("response_format.json_schema.schema must be an object", "response_format")
        return {"type": "json_schema", "schema": schema}
    if kind == "json_object":
        raise _bad("response_format json_object is not supported by Anthropic models; use json_schema",
                   "response_format", "unsupported_value")
    raise _bad("response_format.type must be text or json_schema", "response_format")


def build_messages_request(body: Json, model: str, default_max_tokens: int) -> Json:
    """The Anthropic Messages request for an OpenAI chat-completions request."""
    _reject_unsupported(body)
    system, messages = convert_messages(body.get("messages"))
    out: Json = {"model": model, "max_tokens": _max_tokens(body, default_max_tokens), "messages": messages}
    if system:
        out["system"] = system
    temperature = _number(body, "temperature", 0, 2)
    if temperature is not None:
        out["temperature"] = min(temperature, 1.0)
    top_p = _number(body, "top_p", 0, 1)
    if top_p is not None:
        out["top_p"] = top_p
    if stops := _stop_sequences(body.get("stop")):
        out["stop_sequences"] = stops
    _add_tools(body, out)
    if (fmt := _output_format(body.get("response_format"))) is not None:
        out["output_config"] = {"format": fmt}
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream must be true or false", "stream")
    if stream:
        out["stream"] = True
    if isinstance(body.get("user"), str) and body["user"]:
        out["metadata"] = {"user_id": body["user"]}
    return out


# --------------------------------------------------------------------------- responses


def finish_reason(stop_reason: object) -> str:
    return _FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def usage_of(raw: object) -> Usage:
    """Anthropic usage counts as ours: prompt tokens include cache reads and writes."""
    fields = raw if isinstance(raw, dict) else {}

    def count(name: str) -> int:
        value = fields.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    cached, written = count("cache_read_input_tokens"), count("cache_creation_input_tokens")
    return Usage(count("input_tokens") + written + cached, count("output_tokens"), cached, written)


def openai_usage(usage: Usage) -> Json:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def chat_completion(message: Json, created: int) -> tuple[Json, Usage]:
    """An Anthropic ``message`` as an OpenAI ``chat.completion`` and its usage."""
    texts: list[str] = []
    calls: list[Json] = []
    for block in message.get("content") or []:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            arguments = _dumps(block.get("input") or {})
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": arguments}})
    reply: Json = {"role": "assistant", "content": "".join(texts) if texts else (None if calls else ""),
                   "refusal": None}
    if calls:
        reply["tool_calls"] = calls
    usage = usage_of(message.get("usage"))
    reason = finish_reason(message.get("stop_reason"))
    choice = {"index": 0, "message": reply, "logprobs": None, "finish_reason": reason}
    completion = {"id": f"chatcmpl-{message.get('id', '')}", "object": "chat.completion", "created": created,
                  "model": message.get("model"), "choices": [choice], "usage": openai_usage(usage)}
    return completion, usage


def error_kind(error_type: object, status: int) -> tuple[str, str | None]:
    """(OpenAI type, code) for an Anthropic error type, else for the HTTP status."""
    if isinstance(error_type, str) and error_type in _ERROR_KINDS:
        return _ERROR_KINDS[error_type]
    fallback = _STATUS_KINDS.get(status, "invalid_request_error" if 400 <= status < 500 else "api_error")
    return _ERROR_KINDS[fallback]


def _error_fields(body: bytes, status: int) -> tuple[str, str, str | None]:
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        kind, code = error_kind(None, status)
        return f"upstream returned HTTP {status}", kind, code or "upstream_error"
    kind, code = error_kind(error.get("type"), status)
    return _API_KEY.sub("sk-ant-***", error["message"]), kind, code


def openai_error(status: int, body: bytes) -> bytes:
    """An Anthropic error body (or any non-JSON body) in OpenAI's error shape."""
    message, kind, code = _error_fields(body, status)
    return _dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


# --------------------------------------------------------------------------- the translator


class AnthropicTranslator:
    """One upstream attempt against Anthropic's Messages API (see the module docstring)."""

    def __init__(self, provider: Provider, target: Target, endpoint: str, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.provider = provider
        self.target = target
        self.endpoint = endpoint
        self.usage: Usage | None = None
        self.progress = StreamProgress()
        self.response_model: str | None = None
        self._clock = clock
        self._parser = sse.SSEParser()
        self._closed = False  # message_stop, an error or a stream failure was handled
        self._tool_calls: dict[int, int] = {}  # Anthropic block index -> OpenAI tool call index
        self._usage_fields: Json = {}  # the latest of each cumulative Anthropic usage count
        self._usage_chunk = False  # the client asked for stream_options.include_usage
        self._set_identity(f"chatcmpl-{uuid.uuid4().hex}", target.model)

    # -- request and whole responses

    def request(self, body: dict[str, Any], raw: bytes) -> UpstreamRequest:
        if self.endpoint != "chat":
            raise BadRequest(f"the Anthropic backend of this model does not offer {self.endpoint}",
                             code="unsupported_endpoint")
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        payload = build_messages_request(body, self.target.model, self.provider.default_max_tokens)
        opts = body.get("stream_options")
        self._usage_chunk = isinstance(opts, dict) and opts.get("include_usage") is True
        headers = {"content-type": "application/json", "anthropic-version": self.provider.anthropic_version}
        return UpstreamRequest(self.provider.path_prefix + "/v1/messages", headers, _dumps(payload).encode())

    def response(self, status: int, body: bytes) -> bytes | None:
        if not 200 <= status < 300:
            return openai_error(status, body)
        try:
            message = json.loads(body)
        except ValueError:
            message = None
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            raise UpstreamError("the upstream answer is not an Anthropic message")
        completion, self.usage = chat_completion(message, int(self._clock()))
        self.response_model = completion["model"]
        return _dumps(completion).encode()

    # -- streams

    def stream_chunk(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        out: list[bytes] = []
        if not self._closed:
            for event in self._parser.feed(chunk):
                self._on_event(event, out)
                if self._closed:
                    break
        if end_of_stream and not self._closed:
            self._fail(out, "upstream stream ended before completion", "api_error", "stream_interrupted")
        return b"".join(out)

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
            message = _API_KEY.sub("sk-ant-***", str(error.get("message") or "upstream stream failed"))
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
            self.progress.first_content = True
            self.progress.content_chunks += 1

    def _on_message_start(self, message: Json, out: list[bytes]) -> None:
        model = message.get("model") or self.target.model
        self.response_model = model
        if message.get("id"):
            self._set_identity(f"chatcmpl-{message['id']}", model)
        self._merge_usage(message.get("usage"))
        self._emit(out, '{"role":"assistant","content":""}')

    def _merge_usage(self, raw: object) -> None:
        if isinstance(raw, dict):
            self._usage_fields.update((k, v) for k, v in raw.items() if v is not None)
            self.usage = usage_of(self._usage_fields)

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
        if self.progress.text is not None and text:
            self.progress.text.append(text)

    def _on_message_delta(self, data: Json, out: list[bytes]) -> None:
        self._merge_usage(data.get("usage"))
        stop_reason = (data.get("delta") or {}).get("stop_reason")
        self._emit(out, "{}", finish_reason(stop_reason))

    def _on_message_stop(self, out: list[bytes]) -> None:
        if self._usage_chunk:
            usage = self.usage or Usage()
            out.append(f"data: {self._usage_head}{_dumps(openai_usage(usage))}}}\n\n".encode())
        out.append(sse.DONE)
        self.progress.done = True
        self._closed = True

    def _fail(self, out: list[bytes], message: str, openai_type: str, code: str | None) -> None:
        out.append(sse.error_event(message, openai_type, code))
        self.progress.failed = True
        self._closed = True
