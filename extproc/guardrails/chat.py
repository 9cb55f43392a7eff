"""Where the text of a request and of an answer lives, so every part is scanned and can be rewritten.

A request's texts: every message's content (a string, or the ``text`` of each
text part), its role, and each tool call's ``function.arguments``; for
embeddings, ``input`` (a string or a list of strings). An answer's texts: each
choice's ``message.content`` and tool-call arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Slot:
    holder: dict[str, Any] | list[Any]
    key: str | int
    role: str | None

    @property
    def text(self) -> str:
        return self.holder[self.key]  # type: ignore[index]

    def set(self, value: str) -> None:
        self.holder[self.key] = value  # type: ignore[index]


def request_slots(body: dict[str, Any], endpoint: str) -> list[Slot]:
    out: list[Slot] = []
    if endpoint == "embeddings":
        inp = body.get("input")
        if isinstance(inp, str):
            out.append(Slot(body, "input", None))
        elif isinstance(inp, list):
            out.extend(Slot(inp, i, None) for i, v in enumerate(inp) if isinstance(v, str))
        return out
    for msg in body.get("messages") or ():
        if isinstance(msg, dict):
            role = msg.get("role")
            _message(msg, role if isinstance(role, str) else "user", out)
    return out


def answer_slots(body: dict[str, Any]) -> list[Slot]:
    out: list[Slot] = []
    for choice in body.get("choices") or ():
        if isinstance(choice, dict) and isinstance(choice.get("message"), dict):
            _message(choice["message"], "assistant", out)
    return out


def _message(msg: dict[str, Any], role: str, out: list[Slot]) -> None:
    content = msg.get("content")
    if isinstance(content, str):
        out.append(Slot(msg, "content", role))
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(Slot(part, "text", role))
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            out.append(Slot(fn, "arguments", role))
