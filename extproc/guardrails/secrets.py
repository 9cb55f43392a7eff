"""Private keys and credentials: cloud keys, API tokens, JWTs, secrets assigned in text or code.

Provider tokens are recognised by their documented shapes. Where
detect-secrets ships the shape (AWS key ids, Stripe, SendGrid, GitLab, PyPI,
npm, Slack webhooks, Twilio, Discord, Telegram, Azure storage, Square,
Mailchimp) its plugin's own pattern is used; the gaps it leaves (OpenAI
project keys without the ``T3BlbkFJ`` marker, Anthropic keys, fine-grained
GitHub PATs, Google API keys, AWS secrets written as ``KEY=value``, JWTs that
must decode, PEM bodies, generic ``password = …`` assignments) are filled here.

A placeholder is not a secret: ``sk-...``, ``YOUR_KEY_HERE``, ``<token>``,
``${API_KEY}``, AWS's ``…EXAMPLE`` keys, a lookup in the environment of the code.
Every pattern is gated by a literal that must occur in the text first (a C
substring search), so a prompt without any costs a few microseconds.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Iterable

import ahocorasick
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector

from extproc.guardrails.findings import Finding

_B = r"(?<![A-Za-z0-9_-])"  # a token starts at a word edge
_E = r"(?![A-Za-z0-9_-])"


def _plugin(det: object, index: int = 0) -> str:
    return det.denylist[index].pattern  # type: ignore[attr-defined]


# (detector, literals one of which must occur, pattern) — the match, or its group 1, is the secret
_TOKENS: list[tuple[str, tuple[str, ...], re.Pattern[str]]] = [
    ("aws_access_key_id", ("AKIA", "ASIA", "ABIA", "ACCA", "A3T"),
     re.compile(_B + _plugin(AWSKeyDetector()) + _E)),
    ("github_token", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
     re.compile(_B + r"(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{22,251})" + _E)),
    ("anthropic_key", ("sk-ant-",), re.compile(_B + r"sk-ant-[a-z]{2,8}\d{2}-[A-Za-z0-9_-]{32,}" + _E)),
    ("openai_key", ("sk-",), re.compile(_B + r"sk-(?!ant-)(?:[a-z]{2,8}-)?[A-Za-z0-9_-]{32,}" + _E)),
    ("google_api_key", ("AIza",), re.compile(_B + r"AIza[0-9A-Za-z_-]{35}" + _E)),
    ("slack_token", ("xox",), re.compile(_B + r"xox[abposre]-[0-9A-Za-z-]{10,}" + _E)),
    ("slack_webhook", ("hooks.slack.com",), re.compile(_plugin(SlackDetector(), 1))),
    ("stripe_key", ("k_live_", "k_test_"), re.compile(  # detect-secrets' live secret keys, plus test and publishable
        _B + "(?:" + _plugin(StripeDetector()) + r"|(?:sk|rk|pk)_(?:live|test)_[0-9a-zA-Z]{24,})" + _E)),
    ("sendgrid_key", ("SG.",), re.compile(_B + _plugin(SendGridDetector()) + _E)),
    ("gitlab_token", ("glpat-", "gldt-", "glft-", "glsoat-", "glrt-", "glcbt-", "GR1348941"), re.compile(_B + "(?:" + "|".join(
        p.pattern for p in GitLabTokenDetector().denylist) + ")")),
    ("pypi_token", ("pypi-",), re.compile(_plugin(PypiTokenDetector()))),
    ("npm_token", ("npm_", "_authToken"), re.compile(_B + r"npm_[A-Za-z0-9]{36}" + _E + "|" + _plugin(NpmDetector()))),
    ("twilio_key", ("AC", "SK"), re.compile(_B + "(?:" + "|".join(p.pattern for p in TwilioKeyDetector().denylist) + ")" + _E)),
    ("azure_storage_key", ("AccountKey=",), re.compile(_plugin(AzureStorageKeyDetector()))),
    ("square_token", ("sq0",), re.compile(_B + _plugin(SquareOAuthDetector()))),
    ("mailchimp_key", ("-us",), re.compile(_B + _plugin(MailchimpDetector()) + _E)),
    ("discord_token", ("discord", "Discord", "DISCORD"), re.compile(_B + _plugin(DiscordBotTokenDetector()) + _E)),
    ("telegram_token", (":AA",), re.compile(_B + _plugin(TelegramBotTokenDetector()) + _E)),
    ("jwt", ("eyJ",), re.compile(_B + r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}" + _E)),
]

_AWS_SECRET = re.compile(
    r"(?i)aws.{0,24}?(?:secret|private)?.{0,8}?(?:key|pwd|password|pass|token)\w*[\"']?\s*(?:[:=]|=>|\bis\b)\s*[\"']?"
    r"([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])")
_ASSIGN = re.compile(
    r"(?i)(?:password|passwd|pwd|passphrase|secret|token|api[_ -]?key|apikey|access[_ -]?key|auth[_ -]?key"
    r"|client[_ -]?secret|private[_ -]?key|credentials?)[a-z0-9_-]*\b[\"']?\s*(?:[:=]|=>|:=|\bis\b|\bwas\b)\s*"
    r"[\"'`]?([^\s\"'`,;)}\]]{8,200})")
# where an assignment can start (lower-cased); the pattern is tried only there, not at every character
_ASSIGN_WORDS = ("password", "passwd", "pwd", "passphrase", "secret", "token", "api_key", "api-key", "api key", "apikey",
                 "access_key", "access-key", "access key", "auth_key", "auth-key", "auth key", "client_secret",
                 "client-secret", "client secret", "private_key", "private-key", "private key", "credential")
_PLACEHOLDER = re.compile(
    r"(?i)x{4}|\.\.\.|\*{3}|<[^>]*>|\$\{|\{\{|your|here|example|placeholder|redacted|insert|dummy|changeme|sample"
    r"|replace|todo|fixme|none|null|undefined|environ|getenv|process\.env|secret_?key|api_?key|password|0{8}|1234567")
# hashes, git SHAs, UUIDs and order numbers are ids, not secrets, even after "token:"
_LOOKALIKE = re.compile(r"(?i)^(?:[0-9a-f]{32}|[0-9a-f]{40}|[0-9a-f]{64}|[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}"
                        r"|[a-z]{2,6}-\d+|v?\d+(?:\.\d+)+)$")
_CODEISH = re.compile(r"[()\[\]{}]|^[A-Za-z_][A-Za-z_.]*$|^\W|\.(?:get|read|load)|^[a-z]+(?:[._-][a-z]+)+$")


def _entropy(s: str) -> float:
    counts: dict[str, int] = {}
    for c in s:
        counts[c] = counts.get(c, 0) + 1
    n = len(s)
    return -sum(k / n * math.log2(k / n) for k in counts.values())


def _random_enough(v: str, least: float) -> bool:
    return len(set(v)) >= 8 and _entropy(v) >= least and not _PLACEHOLDER.search(v)


def _jwt_ok(v: str) -> bool:
    head = v.split(".", 1)[0]
    try:
        obj = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and "alg" in obj


def _triggers() -> ahocorasick.Automaton:
    """Every literal that gates a pattern, lower-cased, in one automaton: one pass over a text finds them all."""
    keys: dict[str, list[tuple[str, int]]] = {}
    for n, (_d, literals, _rx) in enumerate(_TOKENS):
        for lit in literals:
            keys.setdefault(lit.lower(), []).append(("token", n))
    for w in _ASSIGN_WORDS:
        keys.setdefault(w, []).append(("assign", len(w)))
    keys.setdefault("aws", []).append(("aws", 0))
    auto = ahocorasick.Automaton()
    for k, v in keys.items():
        auto.add_word(k, tuple(v))
    auto.make_automaton()
    return auto


def credentials(text: str) -> Iterable[Finding]:
    low = text.lower()
    tokens, starts, aws = _triggered(low)
    yield from _tokens(text, tokens)
    if aws:
        yield from _aws_secrets(text)
    if starts:
        yield from _assignments(text, low, starts)


def _triggered(low: str) -> tuple[list[int], list[int], bool]:
    """Which token patterns may match, where assignments may start, whether "aws" occurs: one automaton pass."""
    tokens: set[int] = set()
    starts: set[int] = set()
    aws = False
    for end, owners in _TRIGGERS.iter(low):
        for what, n in owners:
            if what == "token":
                tokens.add(n)
            elif what == "assign":
                starts.add(end - n + 1)
            else:
                aws = True
    return sorted(tokens), sorted(starts), aws


def _tokens(text: str, which: list[int]) -> Iterable[Finding]:
    for n in which:
        detector, literals, rx = _TOKENS[n]
        if not any(lit in text for lit in literals):  # the trigger is case-sensitive; the automaton is not
            continue
        for m in rx.finditer(text):
            g = 1 if m.lastindex and m.group(1) else 0
            v = m.group(g)
            if _jwt_ok(v) if detector == "jwt" else _random_enough(v, 3.0):
                yield Finding("credential", detector, m.start(g), m.end(g), v)


def _aws_secrets(text: str) -> Iterable[Finding]:
    for m in _AWS_SECRET.finditer(text):
        v = m.group(1)
        if _random_enough(v, 3.5):
            yield Finding("credential", "aws_secret_access_key", m.start(1), m.end(1), v)


def _assignments(text: str, low: str, starts: list[int]) -> Iterable[Finding]:
    last = -1
    for i in starts:
        if i < last or (i and low[i - 1].isalnum()):
            continue
        m = _ASSIGN.match(text, i)
        if m is None:
            continue
        last = m.end()
        v = m.group(1).rstrip(".!?")
        if _CODEISH.search(v) or _LOOKALIKE.match(v) or not any(c.isalpha() for c in v):
            continue
        if any(c.isdigit() or not c.isalnum() for c in v) and _random_enough(v, 2.8 if len(v) < 16 else 3.3):
            yield Finding("credential", "secret_assignment", m.start(1), m.start(1) + len(v), v)


_TRIGGERS = _triggers()


# ---------------------------------------------------------------- private keys

_PEM_BEGIN = re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY(?: BLOCK)?-----")
_PEM_BODY = re.compile(r"(?:[A-Za-z0-9+/=]|\s|\\[nr]|[A-Za-z-]+: [^\n\\]*)+")
_PEM_END = re.compile(r"-----END ((?:[A-Z0-9]+ )*)PRIVATE KEY(?: BLOCK)?-----")
MAX_KEY_CHARS = 16384


def private_keys(text: str) -> Iterable[Finding]:
    if "-----BEGIN" not in text:
        return
    for m in _PEM_BEGIN.finditer(text):
        body = _PEM_BODY.match(text, m.end(), min(len(text), m.end() + MAX_KEY_CHARS))
        b64 = sum(1 for c in body.group() if c.isalnum() or c in "+/=") if body else 0
        if b64 < 40:  # "-----BEGIN PRIVATE KEY-----\n...\n" in documentation
            continue
        assert body is not None
        end = _PEM_END.match(text, body.end())
        stop = end.end() if end else body.end()  # no END yet: the key runs to what is there (a stream holds it)
        yield Finding("private_key", "openssh_private_key" if "OPENSSH" in m.group() else "pem_private_key",
                      m.start(), stop, "")
