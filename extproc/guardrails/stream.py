"""Guarding a streamed answer as it flows: a sliding window over the SSE text.

Content events are held back until the text after them is at least
``window`` characters long and the word being written has ended (a secret is
one run without spaces, capped at ``MAX_WORD`` characters), and while a finding
touches the end of the text (a PEM block whose END has not come yet). Then the
held text is scanned as one: a secret split over any number of chunks is seen
whole before any part of it is released. ``redact`` rewrites the events that
hold the finding (merged into the first); ``block`` drops everything held and
the caller ends the stream with an OpenAI error event, no ``[DONE]``. Any
other event (finish reason, usage, ``[DONE]``) releases what is held first.

The lag this adds: ``window`` characters (64 by default) plus the unfinished
word, at most ``MAX_WORD``. Events pass through byte for byte unless a finding
is redacted in them.
"""

from __future__ import annotations

import json

from extproc.guardrails.engine import Engine, Redactor, Verdict
from extproc.guardrails.findings import Finding
from extproc.guardrails.settings import Policy

MAX_WORD = 4096


class StreamGuard:
    __slots__ = ("engine", "policy", "redactor", "window", "verdict", "_buf", "_held", "_text", "_counted")

    def __init__(self, engine: Engine, policy: Policy, redactor: Redactor, window: int) -> None:
        self.engine = engine
        self.policy = policy
        self.redactor = redactor
        self.window = window
        self.verdict = Verdict(policy.mode)
        self._buf = b""
        self._held: list[tuple[dict | None, bytes, str]] = []  # (event object, event bytes, its content text)
        self._text = ""
        self._counted: set[tuple[str, int]] = set()

    def feed(self, chunk: bytes, end: bool) -> tuple[bytes, str | None]:
        """What may reach the client now, and the rule that blocks the stream (None: go on)."""
        data = self._buf + chunk if self._buf else chunk
        parts = data.split(b"\n\n")
        self._buf = parts.pop() if not end else b""
        if end and parts and parts[-1] == b"":
            parts.pop()
        out: list[bytes] = []
        for raw in parts:
            if not raw.strip():
                continue
            ev = raw + b"\n\n"
            text, obj = _content(raw)
            if text is None:
                rule = self._release(out, final=True)
                if rule:
                    return b"", rule
                out.append(ev)
                continue
            self._held.append((obj, ev, text))
            self._text += text
        rule = self._release(out, final=end)
        if rule:
            return b"", rule
        if end and self._buf:
            out.append(self._buf)
        return b"".join(out), None

    def _release(self, out: list[bytes], final: bool) -> str | None:
        if not self._held:
            return None
        text = self._text
        found = self.engine.scan(text, self.policy, output=True)
        enforce = self.policy.mode == "enforce"
        for f in found:  # a blocking find ends the stream at once, even while it is still growing
            if enforce and self.policy.action(f.kind) == "block":
                self.verdict.add([f], self.policy)
                self._held, self._text = [], ""
                return f.kind
        n = len(text)
        limit = n if final else n - self.window
        if not final:
            cut = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
            if n - cut <= MAX_WORD:
                limit = min(limit, cut + 1)
        # release whole events only, and never part of a finding (nor one still growing at the end)
        bounds, at = [0], 0
        for _o, _e, t in self._held:
            at += len(t)
            bounds.append(at)
        while True:
            edge = max(b for b in bounds if b <= max(limit, 0))
            moved = [f.start for f in found if f.start < edge < f.end or (not final and f.end >= n and f.start < edge)]
            if not moved:
                break
            limit = min(moved)
        if edge <= 0:
            return None
        act = [f for f in found if f.end <= edge and self.policy.action(f.kind) != "off"]
        self.verdict.add(act, self.policy)
        self._emit(out, bounds.index(edge), edge, [f for f in act if enforce and self.policy.action(f.kind) == "redact"])
        return None

    def _emit(self, out: list[bytes], k: int, at: int, redact: list[Finding]) -> None:
        """Release the first ``k`` held events (``at`` characters), rewriting them when they hold a redaction."""
        released, self._held = self._held[:k], self._held[k:]
        self._text = self._text[at:]
        if not redact:
            out.extend(ev for _o, ev, _t in released)
            return
        # the released events become one, in the first event's shape, carrying the redacted text
        text = "".join(t for _o, _e, t in released)
        first = released[0][0]
        assert first is not None
        first["choices"][0]["delta"]["content"] = self.redactor.apply(text, redact, self.policy)
        out.append(b"data: " + json.dumps(first, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n")


def _content(raw: bytes) -> tuple[str | None, dict | None]:
    """The delta text of an OpenAI chunk event (None for every other event)."""
    if b'"content"' not in raw or b"data:" not in raw:
        return None, None
    line = next((ln for ln in raw.split(b"\n") if ln.startswith(b"data:")), b"")
    try:
        obj = json.loads(line[5:])
        delta = obj["choices"][0]["delta"]
        text = delta.get("content")
    except (ValueError, LookupError, TypeError, AttributeError):
        return None, None
    if not isinstance(text, str) or delta.get("tool_calls") or len(obj["choices"]) != 1:
        return None, None
    return text, obj
