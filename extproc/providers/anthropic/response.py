"""Anthropic's whole answers and errors in OpenAI's shapes: completions, usage, finish reasons, error kinds."""

from __future__ import annotations

import json
import re

from extproc.errors import error_object
from extproc.providers.anthropic.shapes import Json, dumps as _dumps
from extproc.providers.base import Usage

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
API_KEY = re.compile(r"sk-ant-[A-Za-z0-9_\-]+")


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
    return API_KEY.sub("sk-ant-***", error["message"]), kind, code


def openai_error(status: int, body: bytes) -> bytes:
    """An Anthropic error body (or any non-JSON body) in OpenAI's error shape."""
    message, kind, code = _error_fields(body, status)
    return _dumps(error_object(message, kind, code)).encode()
