"""Personal data: payment cards, IBANs, national IDs, phone numbers, email addresses.

Each detector is a cheap candidate regex followed by the real check from a
well-kept library, so a look-alike never fires: a card must pass Luhn
(``stdnum.luhn``) and carry a known issuer prefix, an IBAN the country's length,
BBAN format and mod-97 (``schwifty``), a national ID its locale's checksum or
range rules (``stdnum``), a phone number libphonenumber's validity for its
region (``phonenumbers``). Only candidates reach the libraries, and only texts
holding a digit (or an ``@``) are searched at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import lru_cache

import phonenumbers
from schwifty import IBAN
from schwifty import registry as iban_registry
from stdnum import luhn
from stdnum.br import cpf
from stdnum.ca import sin
from stdnum.de import idnr
from stdnum.es import dni, nie
from stdnum.fr import nir
from stdnum.in_ import aadhaar
from stdnum.it import codicefiscale
from stdnum.us import ssn

from extproc.guardrails.findings import Finding

_DIGIT = re.compile(r"\d")
# a run of at least 7 digits (separators of up to two characters between them): every numeric format here has one,
# so the detectors' own patterns only search small windows around these runs, not the whole text
_RUN = re.compile(r"\d(?:[ .()/-]{0,2}\d){6,}")
Windows = list[tuple[int, int]]


def windows(text: str, left: int = 12, right: int = 4) -> Windows:
    """Merged [start, end) windows around each long digit run (empty: no numeric value can be in the text)."""
    out: Windows = []
    if sum(map(text.count, "0123456789")) < 7:  # ten C-speed counts instead of a regex pass over prose
        return out
    n = len(text)
    for m in _RUN.finditer(text):
        a, b = max(0, m.start() - left), min(n, m.end() + right)
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _within(rx: re.Pattern[str], text: str, wins: Windows) -> Iterable[re.Match[str]]:
    for a, b in wins:
        yield from rx.finditer(text, a, b)

# ---------------------------------------------------------------- payment cards

_CARD = re.compile(r"(?<![\w.,/+-])\d(?:[ -]?\d){12,18}(?![\w/]|[.,-]\d)")
# issuer prefixes (IIN ranges) of the networks in use; a Luhn-valid number outside them is an order number
_IIN = re.compile(r"^(?:4|5[1-5]|2(?:2[2-9][1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)|3[47]|3(?:0[0-5]|[689])|6(?:011|5|4[4-9]|2)"
                  r"|35(?:2[89]|[3-8]\d)|5[06-9]|6[0-9])")


def cards(text: str, wins: Windows) -> Iterable[Finding]:
    for m in _within(_CARD, text, wins):
        raw = m.group()
        sep = " " if " " in raw else "-" if "-" in raw else ""
        if sep and ((" " in raw and "-" in raw) or any(not 3 <= len(g) <= 6 for g in raw.split(sep))):
            continue  # groups of 4 (or 4-6-5 for Amex); anything else is a list of numbers
        digits = raw.replace(" ", "").replace("-", "")
        if not 13 <= len(digits) <= 19 or not _IIN.match(digits) or len(set(digits)) < 2:
            continue
        if luhn.is_valid(digits):
            yield Finding("card", "luhn_card", m.start(), m.end(), digits)


# ---------------------------------------------------------------- IBAN

_IBAN_START = re.compile(r"(?<![A-Za-z0-9])([A-Z]{2})(\d{2})(?=[ ]?[A-Z0-9])")


@lru_cache(maxsize=None)
def _iban_length(country: str) -> int:
    try:
        return int(iban_registry.get_iban_spec(country).iban_length)
    except Exception:
        return 0


def ibans(text: str, wins: Windows) -> Iterable[Finding]:
    n = len(text)
    for m in _within(_IBAN_START, text, wins):
        want = _iban_length(m.group(1))
        if not want:
            continue
        chars, i = [m.group(1), m.group(2)], m.end()
        got = 4
        while got < want and i < n:  # the country's length, in groups or without spaces
            c = text[i]
            if c == " " and i + 1 < n and text[i + 1].isalnum() and text[i - 1] != " ":
                i += 1
                continue
            if not (c.isascii() and c.isalnum()):
                break
            chars.append(c.upper())
            got += 1
            i += 1
        if got != want or (i < n and text[i].isascii() and text[i].isalnum()):
            continue
        compact = "".join(chars)
        try:
            IBAN(compact)  # mod-97 and the country's BBAN format
        except ValueError:
            continue
        yield Finding("iban", "iban_mod97", m.start(), i, compact)


# ---------------------------------------------------------------- national IDs per locale


def _valid(check: Callable[[str], bool]) -> Callable[[str], bool]:
    def run(v: str) -> bool:
        try:
            return bool(check(v))
        except Exception:
            return False
    return run


_NINO_BAD = {"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"}


def _nino(v: str) -> bool:
    c = v.replace(" ", "").upper()
    return c[:2] not in _NINO_BAD and c[0] not in "DFIQUV" and c[1] not in "DFIOQUV"


# locale -> [(detector, candidate regex, validator)]; formats with separators, so a bare number stays a number
NATIONAL_IDS: dict[str, list[tuple[str, re.Pattern[str], Callable[[str], bool]]]] = {
    "us": [("us_ssn", re.compile(r"(?<![\w-])\d{3}([- ])\d{2}\1\d{4}(?![\w-])"), _valid(ssn.is_valid))],
    "gb": [("gb_nino", re.compile(r"(?<![\w])[A-CEGHJ-PR-TW-Z]{2} ?\d{2} ?\d{2} ?\d{2} ?[A-D](?!\w)"), _nino)],
    "ca": [("ca_sin", re.compile(r"(?<![\w-])\d{3}([- ])\d{3}\1\d{3}(?![\w-])"), _valid(sin.is_valid))],
    "in": [("in_aadhaar", re.compile(r"(?<![\w-])[2-9]\d{3}([- ])\d{4}\1\d{4}(?![\w-])"), _valid(aadhaar.is_valid))],
    "br": [("br_cpf", re.compile(r"(?<![\w.-])\d{3}\.\d{3}\.\d{3}-\d{2}(?![\w-])"), _valid(cpf.is_valid))],
    "es": [("es_dni", re.compile(r"(?<![\w])\d{8}-?[A-Z](?!\w)"), _valid(dni.is_valid)),
           ("es_nie", re.compile(r"(?<![\w])[XYZ]-?\d{7}-?[A-Z](?!\w)"), _valid(nie.is_valid))],
    "it": [("it_codice_fiscale", re.compile(r"(?<![\w])[A-Z]{6}\d{2}[A-EHLMPR-T]\d{2}[A-Z]\d{3}[A-Z](?!\w)"),
            _valid(codicefiscale.is_valid))],
    "fr": [("fr_nir", re.compile(r"(?<![\w])[12] ?\d{2} ?(?:0[1-9]|1[0-2]|[2-9]\d) ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}(?!\w)"),
            _valid(nir.is_valid))],
    "de": [("de_idnr", re.compile(r"(?<![\w])\d{2} \d{3} \d{3} \d{3}(?!\w)"), _valid(idnr.is_valid))],
}
LOCALES = tuple(NATIONAL_IDS)


_LETTERED = {"gb_nino", "it_codice_fiscale"}  # fewer than 7 digits in a row: searched in the whole text


def national_ids(text: str, locales: Iterable[str], wins: Windows) -> Iterable[Finding]:
    for loc in locales:
        for detector, rx, valid in NATIONAL_IDS[loc]:
            found = rx.finditer(text) if detector in _LETTERED else _within(rx, text, wins)
            for m in found:
                if valid(m.group()):
                    yield Finding("national_id", detector, m.start(), m.end(), re.sub(r"\W", "", m.group()))


# ---------------------------------------------------------------- phone numbers

_PHONE = re.compile(
    r"(?<![\w+/.#-])(?<!\d[ .-])"
    r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,5}(?:[ .-]\d{2,8}){1,5}"
    r"|(?<![\w+])\+\d{8,15}"
    r"(?![\w/]|[ .-]\d)"
)
_DATE_LIKE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$|^\d{1,3}(?:\.\d{1,3}){3}$")


@lru_cache(maxsize=4096)
def _phone_valid(candidate: str, regions: tuple[str, ...]) -> bool:
    try:
        if candidate.startswith("+"):
            return phonenumbers.is_valid_number(phonenumbers.parse(candidate, None))
        for region in regions:
            if phonenumbers.is_valid_number(phonenumbers.parse(candidate, region)):
                return True
    except phonenumbers.NumberParseException:
        return False
    return False


def phones(text: str, regions: tuple[str, ...], wins: Windows) -> Iterable[Finding]:
    for m in _within(_PHONE, text, wins):
        raw = m.group()
        digits = re.sub(r"\D", "", raw)
        if not 7 <= len(digits) <= 15 or _DATE_LIKE.match(raw):
            continue
        if not raw.startswith("+") and (len(digits) < 9 or not any(c in raw for c in " .-(")):
            continue  # a bare run of digits, or a short one, is an id, an amount or a year: not a phone number
        if _phone_valid(raw, regions):
            yield Finding("phone", "phone_number", m.start(), m.end(), digits)


# ---------------------------------------------------------------- email addresses

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.)+[A-Za-z]{2,24}(?![\w@-])")
_NOT_EMAIL = re.compile(r"@\d+(?:\.\d+)?x\.|\.(?:png|jpe?g|gif|svg|webp|ico|css|js|ts|py|json|ya?ml|lock|txt)$", re.I)


_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")


def emails(text: str) -> Iterable[Finding]:
    at, seen = text.find("@"), -1
    while at > 0:
        i = at
        while i > 0 and at - i < 64 and text[i - 1] in _LOCAL:  # back to where the local part starts
            i -= 1
        m = _EMAIL.match(text, i) if i > seen else None
        at = text.find("@", at + 1)
        if m is None:
            continue
        seen = m.end()
        v = m.group()
        if _NOT_EMAIL.search(v):  # icon@2x.png, pkg@1.2.3/index.js: file names, not addresses
            continue
        yield Finding("email", "email_address", m.start(), m.end(), v.lower())


def has_digit(text: str) -> bool:
    return _DIGIT.search(text) is not None
