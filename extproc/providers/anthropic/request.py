"""OpenAI chat-completions requests as Anthropic Messages requests (the mapping is in the package docstring)."""

from __future__ import annotations

import json

from extproc.errors import BadRequest
from extproc.providers.anthropic.shapes import Json

_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_NO_CHOICE_PARAMS = ("logprobs", "top_logprobs", "logit_bias", "audio", "prediction", "web_search_options")


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
