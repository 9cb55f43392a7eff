"""Prompt-injection and jailbreak heuristics.

No classifier here: the small ones that ship weights in a registry package
need PyTorch or transformers at run time, and a scan must stay within
microseconds per prompt. Instead, phrases that only an attack needs, grouped
by intent, each matched on the lower-cased text:

- *override*: "ignore / disregard / forget … previous / prior / system …
  instructions / rules / guidelines", "new instructions:", "do not follow your
  rules";
- *exfiltrate*: "reveal / print / repeat … your system prompt / initial
  instructions / the text above";
- *persona*: the known jailbreak personas (DAN, developer mode, AIM, STAN,
  evil confidant …) and "act as an AI without restrictions / filters /
  ethics", "you are free from / no longer bound by …";
- *smuggling*: chat-template control tokens inside user text
  (``<|im_start|>system``, ``[INST]``, ``<<SYS>>``).

Hard negatives guide each pattern: a phrase only fires with the object that
makes it an attack ("ignore the previous error" and "what is a system prompt?"
do not; "ignore your previous instructions" does), role-play without a
restriction clause ("act as a Linux terminal") does not, and code or prose
that names passwords or the word "system" does not. One strong phrase fires;
the weak signals (e.g. "stay in character", "hypothetically") fire only
together. Only user and tool messages are scanned (an app's own system prompt
is trusted to talk about instructions).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import ahocorasick

from extproc.guardrails.deobfuscate import views
from extproc.guardrails.findings import Finding
from extproc.guardrails.intents import FAMILIES, SHELL

_OBJ = (r"(?:instructions?|prompts?|rules|guidelines?|directives?|commands?|programming|restrictions?|constraints?"
        r"|polic(?:y|ies)|guardrails?|safeguards?|filters?|training|orders|(?:security|safety) (?:checks|measures|protocols))")
_ADJ = (r"(?:previous|prior|preceding|above|earlier|initial|original|old|system|developer|safety|ethical|moral|content"
        r"|existing|given|former|default|built-in|openai'?s?|anthropic'?s?|all(?: the| of the| your)?|any(?: of the)?"
        r"|your|these|those|the above)")
_LIMITS = (r"(?:restrictions?|limitations?|limits|filters?|filtering|censorship|guidelines|rules|ethics|ethical|morals?"
           r"|moral|boundaries|safeguards|content polic(?:y|ies))")


def _words(*ws: str) -> str:
    return "(?:" + "|".join(ws) + ")"


# (detector, trigger words, pattern): the pattern runs only on a text where one of its triggers occurs at a word
# start, found with all other triggers in one Aho-Corasick pass; most prompts run none of them
_OVERRIDE = ("ignore", "disregard", "forget", "override", "bypass", "neglect", "abandon", "discard", "set aside",
             "throw out", "skip", "drop")
_EXFIL = ("reveal", "show", "print", "output", "repeat", "display", "disclose", "leak", "dump", "spell out", "write out",
          "recite", "list", "give", "tell", "share", "translate", "summarize", "summarise", "what is", "what are",
          "what were")
_ROLE = ("act", "acting", "pretend", "behave", "respond", "answer", "roleplay", "role-play", "simulate", "become",
         "you are", "you're", "you will be")
_STRONG: list[tuple[str, tuple[str, ...], re.Pattern[str]]] = [  # noqa: RUF012
    ("override", _OVERRIDE, re.compile(
        _words(*_OVERRIDE) + r"\b(?:\s+(?:all|any|every|each|of|the|your|my|these|those|that|this|everything"
        r"|what(?:ever)?|you(?:'ve| have)?|were|been|was|told|given|said|received|so far|up to now|before|above|about))*"
        rf"(?:\s+{_ADJ}(?:\s+(?:and|or|&))?)+(?:\s+\w+)?\s+{_OBJ}\b")),
    ("override", ("ignore", "disregard", "forget"), re.compile(
        r"(?:ignore|disregard|forget)\s+(?:all|everything)(?:\s+(?:you(?:'ve| have)? (?:been told|learned|were told|know)"
        r"|(?:that )?(?:was|i) (?:said|told you)|above|before|previous(?:ly)?|prior))(?!\s+about)"
        r"|forget (?:that )?you(?: are|'re) (?:an ai|a language model|an assistant|chatgpt|claude)")),
    ("override", ("follow", "obey", "comply", "adhere", "abide", "respect"), re.compile(
        r"(?:do not|don'?t|never|stop|no longer|cease to)\s+(?:follow|obey|comply with|adhere to|abide by|respect)"
        rf"\s+(?:any\s+(?:of\s+)?)?(?:your|the|its|their|openai'?s|anthropic'?s)\s+(?:\w+\s+)?{_OBJ}")),
    ("override", ("instruction", "rules", "task", "prompt", "directive"), re.compile(
        r"(?:new|updated|revised|real|actual|true)\s+(?:system\s+)?(?:instructions?|rules|task|prompt|directive)\s*[:\-]")),
    ("override", ("bypass", "ignore", "override", "disable", "circumvent", "evade"), re.compile(
        r"(?:bypass|ignore|override|disable|circumvent|evade)(?:\s+(?:all|the|any|your|its))?\s+(?:security|safety"
        r"|filters?|limits|restrictions|guardrails|moderation|content filters?|censorship)\b\s*(?::|and\b|to\b|,)")),
    ("exfiltrate", ("prompt", "instructions", "developer message", "text above", "words above", "you were given"),
     re.compile(
        _words(*_EXFIL) + r"\b(?:\s+me)?(?:\s+(?:all|everything|back|verbatim|exactly|word for word|in full|of))*"
        r"\s+(?:your|the|these)\s+(?:full\s+|entire\s+|complete\s+|exact\s+|original\s+|initial\s+|hidden\s+"
        r"|secret\s+|internal\s+|confidential\s+|real\s+|first\s+|above\s+|previous\s+)*"
        r"(?:system\s*(?:prompt|message|instructions?)|pre-?prompt|initial\s+(?:prompt|instructions)"
        r"|hidden\s+(?:prompt|instructions)|(?:instructions|prompt)\s+(?:above|you were given|you received"
        r"|before this|that (?:came )?before)|(?:text|words)\s+(?:you were given|you received|before this)"
        r"|developer\s+(?:message|instructions)|prompt template)")),
    ("exfiltrate", ("your system", "your initial", "your hidden", "your original", "your full", "your entire",
                    "your secret", "your current", "your internal", "your pre-prompt", "your preprompt"), re.compile(
        r"your\s+(?:full\s+|entire\s+|original\s+|initial\s+|hidden\s+|secret\s+|current\s+|internal\s+)*"
        r"(?:system\s+(?:prompt|message|instructions)|initial\s+instructions|hidden\s+instructions|pre-?prompt)\b")),
    ("exfiltrate", ("personal", "sensitive", "confidential", "private", "classified", "secret", "restricted",
                    "login", "credentials", "password"), re.compile(
        r"(?:give|provide|share|send|reveal|disclose|show|tell|leak|hand over)\s+(?:me|us)\s+(?:with\s+)?(?:access to\s+)?"
        r"(?:all\s+)?(?:of\s+)?(?:the\s+|your\s+|its\s+)?(?:(?:users?|patients?|customers?|clients?|employees?|admin)'?s?\s+)?"
        r"(?:(?:personal|sensitive|confidential|private|classified|secret|restricted|login)\s+(?:\w+\s+)?"
        r"(?:information|info|data|records|details|files|documents|credentials)|credentials|passwords?)\b"
        r"(?!\s+(?:handling|protection|security|policy|policies|classification|management|governance|best|tips|guidance"
        r"|examples|laws?|regulations?|types))")),
    ("exfiltrate", ("above", "before", "prior to"), re.compile(
        r"(?:repeat|print|output)\b[^.\n]{0,30}\b(?:everything|all|the words|the text)\s+(?:above|before|prior to)\b"
        r"(?!\s+(?:the|this|that|a|an|my|your)\b)")),
    ("exfiltrate", ("starts with", "start with", "starting with", "begins with", "begin with", "beginning with"),
     re.compile(r"(?:start|begin)(?:s|ning|ing)? with\s+[\"'“‘]?(?:the|this|my|your)\s+(?:system\s+)?"
                r"(?:prompt|instructions?)(?:\s+(?:template|guidelines|text))?\s+(?:is|are|was|says|reads)\b")),
    ("persona", ("dan", "stan", "dude", "aim", "anti-dan", "antidan", "betterdan", "evil", "jailbr", "nla"), re.compile(
        r"(?:dan|stan|dude|aim|anti-?dan|betterdan|evil[- ]?bot|jailbreak(?:en|ed)?|nla)\b[^.\n]{0,60}"
        r"\b(?:do anything now|stands? for|mode|no (?:restrictions|limits|filters|rules)|unfiltered|always intelligent)\b")),
    ("persona", (" mode",), re.compile(
        r"(?:developer|dev|god|jailbreak|unrestricted|uncensored|unfiltered|evil|opposite|chaos|dan) mode\b[^.\n]{0,40}"
        r"\b(?:enabled|activated|engaged|is now on|turned on)|enable (?:developer|dev|dan|god) mode\b[^.\n]{0,40}\b(?:respond|answer|output|generate|ignore|no )")),
    ("persona", ("do anything now", "machiavellian", "evil confidant", "uncensored", "unfiltered", "stands for"),
     re.compile(r"do anything now\b|machiavellian\b[^.\n]{0,80}\bamoral\b|evil confidant\b"
                r"|(?:uncensored|unfiltered)\s+(?:ai|assistant|chatbot|model|version|responses?)\b"
                r"|stands for\b[^.\n]{0,30}\b(?:anything|everything|no limits?|unrestricted|unfiltered|limitless)")),
    ("persona", ("restrict", "limitation", "limits", "filter", "censor", "guidelines", "rules", "ethic", "moral",
                 "boundaries", "safeguards", "content polic"), re.compile(
        _words(*_ROLE) + r"\b[^.\n]{0,60}\b(?:without|free (?:of|from)|no longer (?:bound|restricted|limited) by"
        rf"|not bound by|no)\s+(?:any\s+)?(?:\w+\s+)?{_LIMITS}\b")),
    ("persona", ("you are now", "you're now", "you will now be", "you are going to", "not bound", "no longer bound",
                 "free from", "unbound by", "unfiltered", "uncensored", "unrestricted"), re.compile(
        r"(?:you are now|you're now|you will now be|you are going to (?:be|play|act as))\b[^.\n]{0,60}\b(?:free\b|unrestricted"
        r"|unfiltered|uncensored|not bound|no (?:restrictions|limits|rules|filters))"
        r"|(?:ai|model|assistant|chatbot|bot|character|persona)\b[^.\n]{0,40}\b(?:not bound by|no longer bound by|free from"
        rf"|unbound by)\s+(?:any\s+)?(?:\w+\s+)?{_LIMITS}"
        r"|(?:responses?|answers?|replies|outputs?)\s+(?:will|must|should|shall)\s+(?:always\s+)?(?:be|remain)\s+"
        r"(?:completely\s+|totally\s+|fully\s+|entirely\s+)?(?:unfiltered|uncensored|unrestricted)")),
    ("persona", ("freed", "liberated", "jailbroken", "unshackled", "released from", "broken free", "escaped the"),
     re.compile(
        r"(?:you are|you're|you have been)\s+(?:now\s+)?(?:freed|liberated|jailbroken|unshackled|released from)\b"
        r"|broken free of\b|escaped the (?:typical|matrix|confines)")),
    ("persona", ("ignore", "bypass", "disable", "turn off", "circumvent", "evade"), re.compile(
        r"(?:ignore|bypass|disable|turn off|remove|break|circumvent|evade)\s+(?:all\s+|any\s+|your\s+|the\s+)*"
        r"(?:\w+\s+)?(?:safety|ethical|moral|content)\s+(?:guidelines|filters?|restrictions|polic(?:y|ies)"
        r"|protocols?|measures|training|constraints)")),
    ("smuggling", ("<|im_start|>", "<|system|>", "<<sys>>", "[inst]", "[/inst]", "<|endoftext|>",
                   "<|start_header_id|>", "system override", "[end session]", "[new session]", "{system:",
                   "[system]:"), re.compile(
        r"<\|im_start\|>\s*system|<\|system\|>|<<sys>>|\[/?inst\]|<\|endoftext\|>|<\|start_header_id\|>\s*system"
        r"|system\s*override|\[(?:end|new) session\]|\{\s*system\s*:|\[system\]:")),
    *FAMILIES,
]
# weak signals: substrings; an attack piles them up, an ordinary prompt has one at most
_WEAK: list[tuple[str, ...]] = [
    ("stay in character", "staying in character", "never break character", "break character", "breaking character"),
    ("no restrictions", "without restrictions", "without any restrictions", "no censorship", "without censorship",
     "no filters", "without filters", "no limits", "without limits", "no morals", "no ethics", "no moral",
     "no ethical"),
    ("hypothetical", "fictional world", "fictional story", "fictional scenario"),
    ("openai's content polic", "openai content polic", "openai polic", "anthropic's polic", "content policies",
     "content policy"),
    ("from now on",),
    ("two responses", "two different responses", "two distinct ways", "[gpt]", "2 responses", "two answers", "[🔓", "[jailbreak]", "[classic]"),
    ("illegal", "harmful", "unethical", "immoral", "amoral"),
    ("never refuse", "not refuse", "can't refuse", "cannot refuse", "won't refuse", "never say no",
     "always answer", "any request", "anything i ask"),
    ("break the rules", "must obey", "obey all", "must comply", "comply with all", "without question"),
]
MIN_WEAK = 3
MAX_SCAN_CHARS = 65536  # an attack states itself early or late; the middle of a huge document adds nothing


def injections(text: str) -> Iterable[Finding]:
    """The first phrase found in the text; when none, the first found in what its obfuscation hides."""
    found = False
    seen: set[tuple[str, int]] = set()
    for f in _plain(text, seen):
        found = True
        yield f
    if found:
        return
    for view, start, end, decoded in views(text):
        # an undone view whose triggers the text already had (its digits read as letters, say) says nothing new
        known = seen if not decoded and len(text) <= 2 * MAX_SCAN_CHARS else None
        if next(iter(_scan(view, 0, known=known)), None) is not None or (decoded and SHELL.search(view) is not None):
            yield Finding("injection", "injection_obfuscated", start, end)
            return


def _plain(text: str, seen: set[tuple[str, int]]) -> Iterable[Finding]:
    if len(text) > 2 * MAX_SCAN_CHARS:  # head and tail, spans kept in the original coordinates
        yield from _scan(text[:MAX_SCAN_CHARS].lower(), 0)
        yield from _scan(text[-MAX_SCAN_CHARS:].lower(), len(text) - MAX_SCAN_CHARS)
        return
    yield from _scan(text.lower(), 0, seen=seen)


def _leads(pattern: str, triggers: tuple[str, ...]) -> bool:
    """Whether ``pattern`` opens with a group matching exactly its triggers (then it can be tried only there).

    A leading group of lookbehinds (what must come before the trigger: a sentence start, say) is skipped.
    """
    if pattern.startswith("(?:(?<"):
        pattern = pattern[_group_end(pattern) + 1:]
    if not pattern.startswith("(?:"):
        return False
    head = re.compile(pattern[: _group_end(pattern) + 1])
    return all(head.fullmatch(t) is not None for t in triggers)


def _group_end(pattern: str) -> int:
    depth = 0
    for i, c in enumerate(pattern):
        depth += c == "("
        depth -= c == ")"
        if depth == 0:
            return i
    return len(pattern) - 1


ANCHOR_FROM = 0  # a pattern that opens with its trigger is tried only where one occurs
MAX_ANCHORS = 4096


def _build() -> ahocorasick.Automaton:
    """One automaton for every trigger and weak phrase: a single pass over the text finds them all."""
    auto = ahocorasick.Automaton()
    keys: dict[str, list[tuple[str, int]]] = {}
    for n, (_d, triggers, _rx) in enumerate(_STRONG):
        for t in triggers:
            keys.setdefault(t, []).append(("s", n))
    for n, group in enumerate(_WEAK):
        for w in group:
            keys.setdefault(w, []).append(("w", n))
    for k, v in keys.items():
        auto.add_word(k, (len(k), tuple(v)))
    auto.make_automaton()
    return auto


def _scan(low: str, base: int, *, seen: set[tuple[str, int]] | None = None,
          known: set[tuple[str, int]] | None = None) -> Iterable[Finding]:
    """Findings of ``low``; its triggers are added to ``seen``; nothing is tried when all of them are ``known``."""
    strong, weak = _triggers(low)
    keys = {("s", n) for n in strong} | {("w", n) for n in weak}
    if seen is not None:
        seen |= keys
    if known is not None and keys <= known:
        return
    for n in sorted(strong):
        detector, _t, rx = _STRONG[n]
        at = strong[n]
        if len(low) >= ANCHOR_FROM and n in _ANCHORED and len(at) <= MAX_ANCHORS:
            m = next((m for i in at if (m := rx.match(low, i)) is not None), None)
        else:
            m = rx.search(low)  # only texts holding one of its triggers get here
        if m is not None and not _quoted(low, m.start(), m.end()):
            yield Finding("injection", f"injection_{detector}", base + m.start(), base + m.end())
            return
    if len(weak) >= MIN_WEAK:
        first = min(weak.values())
        yield Finding("injection", "injection_signals", base + first, base + first + 1)


def _triggers(low: str) -> tuple[dict[int, list[int]], dict[int, int]]:
    """Where each strong pattern's triggers start, and the first place of each weak signal, in one pass."""
    strong: dict[int, list[int]] = {}
    weak: dict[int, int] = {}
    for end, (size, owners) in _AUTO.iter(low):
        start = end - size + 1
        if start and low[start - 1].isalnum() and not low[start].isspace() and low[start] < "\u2e80":
            continue  # inside a word ("contact", "abundant"); Chinese and Japanese have no word breaks
        for kind, n in owners:
            if kind == "s":
                strong.setdefault(n, []).append(start)
            else:
                weak.setdefault(n, start)
    return strong, weak


_QUOTES = "\"'“”‘’«»`"


def _quoted(low: str, start: int, end: int) -> bool:
    """A phrase standing alone between quotes is named, not said ("why do 'ignore previous instructions' attacks work")."""
    return start > 0 and end < len(low) and low[start - 1] in _QUOTES and low[end] in _QUOTES


_AUTO = _build()
_ANCHORED = frozenset(n for n, (_d, triggers, rx) in enumerate(_STRONG) if _leads(rx.pattern, triggers))
