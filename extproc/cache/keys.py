"""What must match before two requests may share an answer.

A request is reduced to three things:

- its *scope*: namespace (the caller's team, or ``shared``), the alias, and a
  hash of everything besides the last user message that changes the answer
  (system prompt, earlier turns, tools, tool_choice, response_format, n, stop,
  seed, max tokens, a temperature bucket). Only entries of the same scope are
  ever compared;
- its *prompt*: the last user message, the only part compared semantically;
- its *exact key*: a hash of scope and the normalised prompt.

Requests the cache cannot answer faithfully are not planned at all (``Bypass``
with a reason): images or other non-text parts, a last turn that is not the
user's (tool results), ``n > 1``, logprobs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from extproc.cache.guards import normalise

SEP = "\x1f"
# request fields that change the answer; everything else (user, metadata, stream options…) does not
_CONTEXT_FIELDS = ("tools", "tool_choice", "functions", "function_call", "response_format", "n", "stop", "seed",
                   "max_tokens", "max_completion_tokens", "top_p", "frequency_penalty", "presence_penalty",
                   "logit_bias", "reasoning_effort", "modalities", "parallel_tool_calls")


@dataclass(frozen=True, slots=True)
class Bypass:
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    namespace: str
    alias: str
    scope: str  # namespace, alias and context hash: the FAISS partition
    prompt: str  # the last user message, normalised
    exact: str  # hash of scope + prompt


def temperature_bucket(t: Any) -> str:
    """Low temperatures answer alike; above 1 answers are meant to differ, so each 0.5 is its own bucket."""
    if t is None:
        return "default"
    try:
        v = float(t)
    except (TypeError, ValueError):
        return "invalid"
    if v <= 0.3:
        return "low"
    if v <= 1.0:
        return "mid"
    return f"high{int(v * 2)}"


def _text_of(content: Any) -> str | None:
    """A message's text; None when it holds anything but text (images, audio, files)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                return None
            parts.append(p["text"])
        return "\n".join(parts)
    return None


def plan(body: dict[str, Any], *, alias: str, namespace: str) -> Plan | Bypass:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return Bypass("no_messages")
    n = body.get("n")
    if n not in (None, 1):
        return Bypass("n")
    if body.get("logprobs") or body.get("top_logprobs"):
        return Bypass("logprobs")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return Bypass("last_turn")
    prompt = _text_of(last.get("content"))
    if prompt is None:
        return Bypass("non_text")
    prompt = normalise(prompt)
    if not prompt:
        return Bypass("empty")
    earlier = []
    for m in messages[:-1]:
        if not isinstance(m, dict):
            return Bypass("bad_message")
        text = _text_of(m.get("content")) if m.get("content") is not None else ""
        if text is None:
            return Bypass("non_text")
        earlier.append([m.get("role"), normalise(text), m.get("name"), m.get("tool_calls"), m.get("tool_call_id")])
    context = {k: body[k] for k in _CONTEXT_FIELDS if body.get(k) is not None}
    context["temperature"] = temperature_bucket(body.get("temperature"))
    context["messages"] = earlier
    digest = hashlib.blake2b(json.dumps(context, sort_keys=True, separators=(",", ":"), default=str).encode(),
                             digest_size=12).hexdigest()
    scope = SEP.join((namespace, alias, digest))
    exact = hashlib.blake2b(f"{scope}{SEP}{prompt}".encode(), digest_size=16).hexdigest()
    return Plan(namespace, alias, scope, prompt, exact)


def scope_parts(scope: str) -> tuple[str, str]:
    """(namespace, alias) of a scope."""
    ns, alias, _ = scope.split(SEP, 2)
    return ns, alias
