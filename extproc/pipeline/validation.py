"""Parsing and checking client requests before anything reaches a provider.

Every problem becomes a ``BadRequest`` (or ``NotFound`` for an unknown alias)
that names the parameter, in OpenAI's error shape.
"""

from __future__ import annotations

import json
from numbers import Real
from typing import Any

from extproc.config import GatewayConfig
from extproc.errors import BadRequest, NotFound, PayloadTooLarge
from extproc.providers.registry import supports

MAX_OUTPUT_TOKENS = 1_000_000
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def parse_json(raw: bytes, limit: int) -> dict:
    if len(raw) > limit:
        raise PayloadTooLarge(f"request body is {len(raw)} bytes; the limit is {limit} bytes")
    if not raw:
        raise BadRequest("request body is empty; expected a JSON object", code="invalid_json")
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8", code="invalid_json") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply", code="invalid_json") from None
    except ValueError as e:
        raise BadRequest(f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    return obj


def resolve_alias(body: dict, cfg: GatewayConfig, endpoint: str) -> str:
    model = body.get("model")
    if model is None:
        raise BadRequest("you must provide a model parameter", param="model", code="missing_model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model must be a non-empty string", param="model", code="invalid_model")
    alias = cfg.models.get(model)
    if alias is None:
        names = sorted(cfg.models)
        shown = ", ".join(names[:50]) + (" …" if len(names) > 50 else "")
        raise NotFound(f"the model {model[:200]!r} does not exist on this gateway; available: {shown}", param="model")
    primary = cfg.providers[alias.targets[0].provider]
    if not supports(primary, endpoint):
        raise BadRequest(f"the model {model!r} does not serve {endpoint}", param="model", code="unsupported_endpoint")
    return model


def check_chat(body: dict) -> None:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages must be a non-empty array", param="messages", code="invalid_messages")
    for i, m in enumerate(msgs):
        _check_message(i, m)
    _check_parameters(body)


def _check_message(i: int, m: Any) -> None:
    if not isinstance(m, dict):
        raise BadRequest(f"messages[{i}] must be an object", param=f"messages[{i}]", code="invalid_messages")
    role = m.get("role")
    if role not in ROLES:
        raise BadRequest(
            f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}",
            param=f"messages[{i}].role",
            code="invalid_messages",
        )
    content = m.get("content")
    if content is None:
        if role == "assistant" and (m.get("tool_calls") or m.get("function_call")):
            return
        raise BadRequest(f"messages[{i}].content is required", param=f"messages[{i}].content", code="invalid_messages")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise BadRequest(
                    f"messages[{i}].content[{j}] must be an object with a type",
                    param=f"messages[{i}].content[{j}]",
                    code="invalid_messages",
                )
    elif not isinstance(content, str):
        raise BadRequest(
            f"messages[{i}].content must be a string or an array of parts",
            param=f"messages[{i}].content",
            code="invalid_messages",
        )


def _check_parameters(body: dict) -> None:
    _flag(body, "stream")
    for name in ("max_tokens", "max_completion_tokens"):
        _int(body, name, 1, MAX_OUTPUT_TOKENS)
    _int(body, "n", 1, 128)
    _number(body, "temperature", 0.0, 2.0)
    _number(body, "top_p", 0.0, 1.0)
    _number(body, "presence_penalty", -2.0, 2.0)
    _number(body, "frequency_penalty", -2.0, 2.0)
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise BadRequest("stream_options must be an object", param="stream_options")
        if not body.get("stream"):
            raise BadRequest("stream_options is only allowed when stream is true", param="stream_options")
        _flag(opts, "include_usage", "stream_options.include_usage")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop))
    ):
        raise BadRequest("stop must be a string or an array of at most 4 strings", param="stop")
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise BadRequest("tools must be an array of objects", param="tools")


def check_embeddings(body: dict) -> None:
    inp = body.get("input")
    ok = (
        (isinstance(inp, str) and inp)
        or (isinstance(inp, list) and inp and all(isinstance(x, str) for x in inp))
        or (isinstance(inp, list) and inp and all(isinstance(x, int) and not isinstance(x, bool) for x in inp))
        or (isinstance(inp, list) and inp and all(isinstance(x, list) and x for x in inp))
    )
    if not ok:
        raise BadRequest("input must be a non-empty string, array of strings or array of token arrays", param="input")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise BadRequest("encoding_format must be float or base64", param="encoding_format")
    _int(body, "dimensions", 1, 65536)


def _flag(obj: dict, name: str, label: str | None = None) -> None:
    v = obj.get(name)
    if v is not None and not isinstance(v, bool):
        raise BadRequest(f"{label or name} must be true or false", param=label or name)


def _int(obj: dict, name: str, lo: int, hi: int) -> None:
    v: Any = obj.get(name)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadRequest(f"{name} must be a whole number from {lo} to {hi}; got {str(v)[:40]}", param=name,
                         code="invalid_value")


def _number(obj: dict, name: str, lo: float, hi: float) -> None:
    v: Any = obj.get(name)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, Real) or not lo <= float(v) <= hi:
        raise BadRequest(f"{name} must be a number from {lo} to {hi}", param=name, code="invalid_value")
