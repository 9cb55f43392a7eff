"""The one decision: which detectors fire on a text, and what the policy does about it.

The live path (the router and answer stages) and ``tollgate guardrails score``
both call ``Engine.scan`` and ``decide``; there is no second implementation to
drift. Detectors run only for rules the policy has on; injection runs only on
what a user or a tool wrote (``roles``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import ahocorasick

from extproc.guardrails import pii, secrets
from extproc.guardrails.findings import Finding, drop_overlaps
from extproc.guardrails.injection import injections
from extproc.guardrails.settings import SEVERITY, GuardrailSettings, Policy

INJECTION_ROLES = frozenset({"user", "tool", "function", None})  # None: a bare text (score, embeddings input)


class Engine:
    def __init__(self, settings: GuardrailSettings) -> None:
        self.settings = settings
        self._regions = tuple(settings.phone_regions)
        self._patterns = [(c.name, c.pattern) for c in settings.custom if c.pattern is not None]
        self._words: ahocorasick.Automaton | None = None
        listed = [(c.name, w) for c in settings.custom for w in c.words]
        if listed:
            self._words = ahocorasick.Automaton()
            for name, w in listed:
                self._words.add_word(w, (name, len(w)))
            self._words.make_automaton()

    def scan(self, text: str, policy: Policy, *, role: str | None = None, output: bool = False) -> list[Finding]:
        """Every finding of every rule the policy has on (shadow included), in text order, overlaps resolved."""
        on = policy.rules
        found: list[Finding] = []
        if on.get("private_key", "off") != "off":
            found.extend(secrets.private_keys(text))
        if on.get("credential", "off") != "off":
            found.extend(secrets.credentials(text))
        self._personal(text, on, found)
        for name, rx in self._patterns:
            if on.get(name, "off") != "off":
                found.extend(Finding(name, "custom_pattern", m.start(), m.end(), m.group()) for m in rx.finditer(text)
                             if m.end() > m.start())
        if self._words is not None:
            found.extend(self._listed(text, on))
        found = drop_overlaps(found)
        if not output and role in INJECTION_ROLES and on.get("injection", "off") != "off":
            found.extend(injections(text))  # spans a phrase, never redacted: kept apart from the overlap rule
        return found

    def _personal(self, text: str, on: dict[str, str] | Any, found: list[Finding]) -> None:
        wins = pii.windows(text)
        if on.get("national_id", "off") != "off":  # some formats have fewer than 7 digits in a row
            found.extend(pii.national_ids(text, self.settings.locales, wins))
        if wins:
            if on.get("card", "off") != "off":
                found.extend(pii.cards(text, wins))
            if on.get("iban", "off") != "off":
                found.extend(pii.ibans(text, wins))
            if on.get("phone", "off") != "off":
                found.extend(pii.phones(text, self._regions, wins))
        if on.get("email", "off") != "off" and "@" in text:
            found.extend(pii.emails(text))

    def _listed(self, text: str, on: dict[str, str] | object) -> Iterable[Finding]:
        assert self._words is not None
        low = text.lower()
        rules = on if isinstance(on, dict) else {}
        for end, (name, size) in self._words.iter(low):
            start = end - size + 1
            if rules.get(name, "off") == "off":
                continue
            if (start and low[start - 1].isalnum()) or (end + 1 < len(low) and low[end + 1].isalnum()):
                continue  # whole words only
            yield Finding(name, "custom_words", start, end + 1, low[start:end + 1])


@dataclass
class Verdict:
    """What the policy makes of the findings of one request or answer."""

    mode: str
    fired: dict[str, int] = field(default_factory=dict)  # rule -> findings
    actions: dict[str, str] = field(default_factory=dict)  # rule -> its action
    blocked_by: str | None = None  # the first blocking rule (enforce mode only)

    @property
    def action(self) -> str:
        """The strongest action the policy calls for ("allow" when nothing fired, or only rules that are off)."""
        best = max((SEVERITY[a] for a in self.actions.values()), default=0)
        return {0: "allow", 1: "flag", 2: "redact", 3: "block"}[best]

    def add(self, findings: Iterable[Finding], policy: Policy) -> None:
        for f in findings:
            a = policy.action(f.kind)
            if a == "off":
                continue
            self.fired[f.kind] = self.fired.get(f.kind, 0) + 1
            self.actions[f.kind] = a
            if a == "block" and self.blocked_by is None and self.mode == "enforce":
                self.blocked_by = f.kind

    def header(self) -> str:
        """``x-tollgate-guardrails``: the actions taken (``shadow-`` prefixed when only counted), rules only."""
        prefix = "shadow-" if self.mode == "shadow" else ""
        return ", ".join(f"{prefix}{a}:{r}" for r, a in sorted(self.actions.items()))


class Redactor:
    """Stable placeholders within one request: the same value is the same ``[CARD_1]`` in every message."""

    __slots__ = ("_seen", "_counts")

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], str] = {}
        self._counts: dict[str, int] = {}

    def placeholder(self, kind: str, key: str) -> str:
        k = (kind, key)
        p = self._seen.get(k)
        if p is None:
            n = self._counts.get(kind, 0) + 1
            self._counts[kind] = n
            p = self._seen[k] = f"[{kind.upper()}_{n}]"
        return p

    def apply(self, text: str, findings: list[Finding], policy: Policy) -> str:
        """``text`` with every finding whose rule redacts replaced by its placeholder."""
        parts: list[str] = []
        at = 0
        for f in findings:
            if f.kind == "injection" or policy.action(f.kind) != "redact" or f.start < at:
                continue
            parts.append(text[at:f.start])
            parts.append(self.placeholder(f.kind, f.key or _norm(text[f.start:f.end])))
            at = f.end
        if not parts:
            return text
        parts.append(text[at:])
        return "".join(parts)


def _norm(v: str) -> str:
    return re.sub(r"\s+", "", v)
