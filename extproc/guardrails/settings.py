"""The ``guardrails:`` section of the gateway config, typed and validated at load.

``config.py`` hands the parsed mapping to ``parse_guardrails``; a ``ValueError``
names the bad key (``guardrails.rules.card: …``) for config.py to report with
its line. Example::

    guardrails:
      mode: enforce              # or shadow: evaluate and count, act on nothing
      output: true               # check answers too (streamed ones with a sliding window)
      locales: [us, gb]          # national ID formats (us, gb, ca, in, br, es, it, fr, de)
      phone_regions: [US, GB]    # how numbers without +country are read
      rules:                     # block | redact | flag | off, per rule
        private_key: block
        credential: redact
        card: redact
        iban: redact
        national_id: redact
        email: flag
        phone: flag
        injection: flag          # block | flag | off (an injection cannot be redacted)
      custom:
        - {name: codename, words: [bluebird, nightjar], action: block}
        - {name: ticket, pattern: 'TCK-[0-9]{6}', action: redact}
      teams:                     # a team's policy: the org's with these changes
        research: {mode: shadow}
      aliases:
        gpt-4o: {rules: {injection: block}}

A request's policy is the org default, then its alias's changes, then its
team's (the team wins where both set a rule).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from extproc.guardrails.pii import LOCALES

ACTIONS = ("block", "redact", "flag", "off")
SEVERITY = {"off": 0, "flag": 1, "redact": 2, "block": 3}
BUILTIN_RULES = ("private_key", "credential", "card", "iban", "national_id", "email", "phone", "injection")
MODES = ("enforce", "shadow")

DEFAULT_RULES: Mapping[str, str] = {
    "private_key": "block", "credential": "redact", "card": "redact", "iban": "redact", "national_id": "redact",
    "email": "flag", "phone": "flag", "injection": "flag",
}
# what `tollgate guardrails score` runs without --config: every detector on, every locale, injections blocked
SCORE_RULES: Mapping[str, str] = {
    "private_key": "block", "credential": "block", "card": "redact", "iban": "redact", "national_id": "redact",
    "email": "redact", "phone": "redact", "injection": "block",
}


@dataclass(frozen=True, slots=True)
class CustomRule:
    name: str
    action: str
    pattern: re.Pattern[str] | None = None
    words: tuple[str, ...] = ()


@dataclass(frozen=True)
class Policy:
    mode: str = "enforce"
    rules: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_RULES))

    def action(self, rule: str) -> str:
        return self.rules.get(rule, "off")


@dataclass(frozen=True)
class GuardrailSettings:
    policy: Policy = field(default_factory=Policy)
    output: bool = True
    locales: tuple[str, ...] = ("us",)
    phone_regions: tuple[str, ...] = ("US",)
    custom: tuple[CustomRule, ...] = ()
    teams: Mapping[str, Policy] = field(default_factory=dict)
    aliases: Mapping[str, Policy] = field(default_factory=dict)
    offload_chars: int = 65536  # texts at least this long are scanned in a worker thread, off the event loop
    stream_window: int = 64  # characters of streamed text held back (plus the word being written)

    def policy_for(self, team: str | None, alias: str | None) -> Policy:
        p = self.policy
        for scope in (self.aliases.get(alias or ""), self.teams.get(team or "")):
            if scope is not None:
                p = scope
        return p

    @property
    def rule_names(self) -> tuple[str, ...]:
        return BUILTIN_RULES + tuple(c.name for c in self.custom)


def score_settings() -> GuardrailSettings:
    return GuardrailSettings(policy=Policy(rules=dict(SCORE_RULES)), locales=LOCALES,
                             phone_regions=("US", "GB", "DE", "FR", "IN", "CA", "AU"))


_KEYS = {"mode", "output", "locales", "phone_regions", "rules", "custom", "teams", "aliases", "offload_chars",
         "stream_window"}
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


def parse_guardrails(data: Any, where: str = "guardrails", *, reader: Any = None, teams: set[str] | None = None,
                     aliases: set[str] | None = None) -> GuardrailSettings:
    """The section, validated; a bad key raises ``reader.fail`` (the key and its line), or without a reader a
    ValueError that starts with the key's path."""
    try:
        return _parse(data, where, teams, aliases)
    except ValueError as e:
        if reader is None:
            raise
        key, _, message = str(e).partition(": ")
        raise reader.fail(key, message) from None


def _parse(data: Any, where: str, teams: set[str] | None, aliases: set[str] | None) -> GuardrailSettings:
    m = _mapping(data, where, _KEYS)
    custom = tuple(_custom(v, f"{where}.custom[{i}]") for i, v in enumerate(_list(m.get("custom"), f"{where}.custom")))
    names = set(BUILTIN_RULES)
    for i, c in enumerate(custom):
        if c.name in names:
            raise ValueError(f"{where}.custom[{i}].name: {c.name!r} is already a rule")
        names.add(c.name)
    base_rules = dict(DEFAULT_RULES)
    base_rules.update({c.name: c.action for c in custom})
    org = _policy(m, where, Policy(rules=base_rules), names)
    scoped: dict[str, dict[str, Policy]] = {}
    for section, known in (("teams", teams), ("aliases", aliases)):
        out: dict[str, Policy] = {}
        for name, spec in _mapping(m.get(section), f"{where}.{section}", None).items():
            path = f"{where}.{section}.{name}"
            if known is not None and str(name) not in known:
                raise ValueError(f"{path}: unknown {section[:-1]} {name!r}")
            out[str(name)] = _policy(_mapping(spec, path, {"mode", "rules"}), path, org, names)
        scoped[section] = out
    locales = _strings(m.get("locales", ["us"]), f"{where}.locales")
    for i, loc in enumerate(locales):
        if loc not in LOCALES:
            raise ValueError(f"{where}.locales[{i}]: unknown locale {loc!r} (known: {', '.join(LOCALES)})")
    regions = _strings(m.get("phone_regions", ["US"]), f"{where}.phone_regions")
    for i, r in enumerate(regions):
        if not re.fullmatch(r"[A-Z]{2}", r):
            raise ValueError(f"{where}.phone_regions[{i}]: use a two-letter region code such as US")
    output = m.get("output", True)
    if not isinstance(output, bool):
        raise ValueError(f"{where}.output: expected true or false")
    return GuardrailSettings(policy=org, output=output, locales=locales, phone_regions=regions, custom=custom,
                             teams=scoped["teams"], aliases=scoped["aliases"],
                             offload_chars=_int(m.get("offload_chars"), f"{where}.offload_chars", 65536, 1024, 1 << 26),
                             stream_window=_int(m.get("stream_window"), f"{where}.stream_window", 64, 16, 4096))


def _policy(m: Mapping[str, Any], where: str, base: Policy, names: set[str]) -> Policy:
    mode = m.get("mode", base.mode)
    if mode not in MODES:
        raise ValueError(f"{where}.mode: expected enforce or shadow, got {mode!r}")
    rules = dict(base.rules)
    for rule, action in _mapping(m.get("rules"), f"{where}.rules", None).items():
        path = f"{where}.rules.{rule}"
        if rule not in names:
            raise ValueError(f"{path}: unknown rule (known: {', '.join(sorted(names))})")
        if action is False:
            action = "off"
        if action not in ACTIONS:
            raise ValueError(f"{path}: expected one of {', '.join(ACTIONS)}, got {action!r}")
        if rule == "injection" and action == "redact":
            raise ValueError(f"{path}: an injection can be blocked or flagged, not redacted")
        rules[str(rule)] = action
    return replace(base, mode=mode, rules=rules)


def _custom(v: Any, where: str) -> CustomRule:
    m = _mapping(v, where, {"name", "pattern", "words", "action"})
    name = m.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}.name: use lower-case letters, digits and _ (it is a metric label)")
    action = m.get("action", "flag")
    if action not in ACTIONS:
        raise ValueError(f"{where}.action: expected one of {', '.join(ACTIONS)}, got {action!r}")
    if ("pattern" in m) == ("words" in m):
        raise ValueError(f"{where}: give either pattern or words")
    if "pattern" in m:
        try:
            rx = re.compile(str(m["pattern"]))
        except re.error as e:
            raise ValueError(f"{where}.pattern: not a valid regular expression: {e}") from None
        if rx.match(""):
            raise ValueError(f"{where}.pattern: matches the empty string")
        return CustomRule(name, action, pattern=rx)
    words = _strings(m["words"], f"{where}.words")
    if not words:
        raise ValueError(f"{where}.words: list at least one word")
    return CustomRule(name, action, words=tuple(w.lower() for w in words))


def _mapping(v: Any, where: str, allowed: set[str] | None) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(v).__name__}")
    for k in v:
        if allowed is not None and k not in allowed:
            raise ValueError(f"{where}.{k}: unknown key (allowed: {', '.join(sorted(allowed))})")
    return v


def _list(v: Any, where: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise ValueError(f"{where}: expected a list")
    return v


def _strings(v: Any, where: str) -> tuple[str, ...]:
    items = _list(v, where)
    for i, s in enumerate(items):
        if not isinstance(s, str) or not s:
            raise ValueError(f"{where}[{i}]: expected a non-empty string")
    return tuple(items)


def _int(v: Any, where: str, default: int, lo: int, hi: int) -> int:
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"{where}: expected a whole number from {lo} to {hi}")
    return v
