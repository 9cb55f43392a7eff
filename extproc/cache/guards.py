"""Checks that cosine similarity cannot make: would the cached answer still be right?

Sentence embeddings put "flights from Paris to Rome" and "flights from Rome
to Paris" at cosine 0.99, and "cancel order 1123" next to "cancel order 1132".
A semantic candidate above the threshold is therefore served only when both
prompts also agree on what an embedding blurs:

- numbers and quantities (digits, number words, units and currencies), in order;
- quoted strings (the exact text the user cares about);
- names: capitalised or mixed-case words and acronyms, compared case-blind,
  must all appear in the other prompt, and in the same order;
- negation (not, never, n't, without, ...) and opposites (increase/decrease,
  buy/sell, before/after, ...);
- argument order: the word after a directional marker (from, to, into, than,
  vs, ...) must be the same in both prompts when both use the marker, and two
  content words may not trade places across another ("the dog bit the man" /
  "the man bit the dog": the same words, cosine 0.98);
- the kind of question: why / where / when / who ask different things about
  the same words ("why does vinegar expire" / "how does vinegar expire").

Words are read in any script with accents folded ("Pokémon" = "Pokemon"), a
hyphen separates words ("IIT-JEE" = "IIT JEE"), and "one" the pronoun ("how
does one ...") is not a number: on the dev pairs these three wrongly objected to
eleven paraphrases and let no different-meaning pair through.

Each check is a few set and list comparisons over features extracted once per
prompt (``features``), so a guard costs microseconds, not an embedding.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# a word: letters of any script, then letters or digits ("Pokémon", "GPT4", "don't"); a hyphen or an
# underscore separates words, so "IIT-JEE" / "IIT JEE" and "BITSAT-2017" / "BITSAT 2017" read alike
_WORD = re.compile(r"[^\W\d_][^\W_]*(?:['’][^\W\d_]+)*|\d[\d,]*(?:\.\d+)?%?|[$€£¥]")
# "one" as a pronoun ("how does one learn", "one should") is no quantity
_ONE_AFTER = {"does", "do", "can", "could", "should", "would", "will", "must", "might", "may", "makes", "make",
              "let", "how", "no", "any", "every", "which", "that", "this", "the"}
_ONE_BEFORE = {"can", "could", "should", "would", "will", "must", "might", "may", "does", "do", "is", "has",
               "needs", "need", "gets", "get"}
_QUOTED = re.compile(r"\"([^\"]{1,200})\"|“([^”]{1,200})”|`([^`]{1,200})`|(?<![A-Za-z])'([^']{1,200})'(?![A-Za-z])")
_SENTENCE_END = re.compile(r"[.!?:;]\s+")

NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14",
    "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19", "twenty": "20",
    "thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90",
    "hundred": "100", "thousand": "1000", "million": "1e6", "billion": "1e9", "dozen": "12", "half": "0.5",
    "first": "#1", "second": "#2", "third": "#3", "fourth": "#4", "fifth": "#5", "last": "#-1",
    "once": "x1", "twice": "x2", "double": "x2", "triple": "x3",
}
UNITS = {
    "$": "usd", "usd": "usd", "dollar": "usd", "dollars": "usd", "€": "eur", "eur": "eur", "euro": "eur",
    "euros": "eur", "£": "gbp", "gbp": "gbp", "pound": "gbp", "pounds": "gbp", "¥": "jpy", "yen": "jpy",
    "km": "km", "kilometer": "km", "kilometers": "km", "kilometre": "km", "kilometres": "km", "mile": "mi",
    "miles": "mi", "m": "m", "meter": "m", "meters": "m", "metre": "m", "metres": "m", "cm": "cm", "mm": "mm",
    "kg": "kg", "kilogram": "kg", "kilograms": "kg", "lb": "lb", "lbs": "lb", "g": "g", "gram": "g",
    "grams": "g", "celsius": "c", "fahrenheit": "f", "kelvin": "k", "gb": "gb", "mb": "mb", "tb": "tb",
    "kb": "kb", "%": "pct", "percent": "pct", "hour": "h", "hours": "h", "minute": "min", "minutes": "min",
    "second": "s", "seconds": "s", "day": "d", "days": "d", "week": "w", "weeks": "w", "month": "mo",
    "months": "mo", "year": "y", "years": "y", "liter": "l", "liters": "l", "litre": "l", "litres": "l",
    "gallon": "gal", "gallons": "gal", "inch": "in", "inches": "in", "feet": "ft", "foot": "ft",
}
NEGATIONS = {"not", "no", "never", "without", "none", "nobody", "nothing", "neither", "nor", "cannot",
             "nowhere", "hardly", "barely", "unsafe", "illegal", "impossible", "unable", "dont", "doesnt",
             "didnt", "isnt", "arent", "wasnt", "werent", "cant", "couldnt", "wont", "wouldnt", "shouldnt",
             "havent", "hasnt", "hadnt", "mustnt", "except", "stop", "avoid"}
_OPPOSITES = [
    ("increase", "decrease"), ("increase", "reduce"), ("raise", "lower"), ("buy", "sell"), ("before", "after"),
    ("min", "max"), ("minimum", "maximum"), ("largest", "smallest"), ("biggest", "smallest"),
    ("highest", "lowest"), ("best", "worst"), ("first", "last"), ("add", "remove"), ("enable", "disable"),
    ("open", "close"), ("start", "stop"), ("import", "export"), ("upload", "download"), ("encrypt", "decrypt"),
    ("encode", "decode"), ("compress", "decompress"), ("login", "logout"), ("push", "pull"), ("true", "false"),
    ("positive", "negative"), ("male", "female"), ("men", "women"), ("boy", "girl"), ("up", "down"),
    ("in", "out"), ("cheap", "expensive"), ("fast", "slow"), ("hot", "cold"), ("old", "new"), ("above", "below"),
    ("more", "less"), ("more", "fewer"), ("win", "lose"), ("pros", "cons"), ("advantages", "disadvantages"),
    ("north", "south"), ("east", "west"), ("left", "right"), ("inside", "outside"), ("early", "late"),
    ("easy", "hard"), ("easy", "difficult"), ("safe", "dangerous"), ("legal", "illegal"), ("love", "hate"),
    ("accept", "reject"), ("include", "exclude"), ("ascending", "descending"), ("yesterday", "tomorrow"),
    ("import", "export"), ("sunrise", "sunset"), ("morning", "evening"), ("rich", "poor"), ("light", "dark"),
    ("young", "old"), ("long", "short"), ("tall", "short"), ("big", "small"), ("large", "small"),
    ("good", "bad"), ("better", "worse"), ("healthy", "unhealthy"), ("agree", "disagree"), ("like", "dislike"),
    ("allow", "block"), ("allow", "deny"), ("success", "failure"), ("rise", "fall"), ("gain", "lose"),
    ("connect", "disconnect"), ("lock", "unlock"), ("install", "uninstall"), ("mount", "unmount"),
    ("subscribe", "unsubscribe"), ("follow", "unfollow"), ("send", "receive"), ("input", "output"),
    ("most", "least"), ("same", "different"), ("similar", "different"), ("winter", "summer"), ("day", "night"),
    ("husband", "wife"), ("mother", "father"), ("son", "daughter"), ("brother", "sister"), ("king", "queen"),
]
OPPOSITE: dict[str, set[str]] = {}
for _a, _b in _OPPOSITES:
    OPPOSITE.setdefault(_a, set()).add(_b)
    OPPOSITE.setdefault(_b, set()).add(_a)
_SAME_MARKER = {"into": "to", "onto": "to", "towards": "to", "toward": "to", "versus": "vs", "against": "vs"}
QUESTION_WORDS = {"why", "where", "when", "who", "whom", "whose"}
DIRECTIONAL = {"from", "to", "into", "than", "vs", "versus", "onto", "towards", "toward", "over", "against",
               "between", "and", "or", "by", "per", "instead", "rather"}
STOPWORDS = {
    "a", "an", "the", "of", "in", "on", "at", "for", "with", "is", "are", "was", "were", "be", "been", "do",
    "does", "did", "i", "you", "we", "my", "your", "our", "me", "it", "its", "this", "that", "these", "those",
    "what", "which", "who", "whom", "how", "why", "when", "where", "can", "could", "should", "would", "will",
    "shall", "may", "might", "must", "there", "their", "they", "them", "he", "she", "his", "her", "if", "so",
    "as", "about", "some", "any", "all", "best", "way", "ways", "good", "get", "make", "to", "and", "or",
    "please", "tell", "explain", "s", "'s", "am", "has", "have", "had", "just", "also", "very", "really",
}
# words that start a question or a sentence capitalised without being a name
_NOT_NAMES = STOPWORDS | {"is", "are", "please", "hi", "hello", "hey", "ok", "okay", "yes", "no", "why", "whats",
                          "what's", "how's", "who's", "where's", "give", "list", "write", "show", "find", "help"}


def normalise(text: str) -> str:
    """NFKC, straight quotes, collapsed whitespace: what the exact layer hashes."""
    t = unicodedata.normalize("NFKC", text).replace("’", "'").replace("‘", "'")
    return " ".join(t.split())


@dataclass(frozen=True, slots=True)
class Features:
    numbers: tuple[str, ...]
    units: frozenset[str]
    quoted: frozenset[str]
    names: tuple[str, ...]  # lowercased, in order of first appearance
    words: frozenset[str]  # every lowercased word
    negated: bool
    opposites: frozenset[str]  # words that have an opposite
    markers: tuple[tuple[str, str], ...]  # (marker, next content word)
    asks: frozenset[str]  # why / where / when / who
    content: tuple[str, ...] = ()  # the words that are not stopwords, in order ("and"/"or" pairs sorted)


def _canon_number(tok: str) -> str:
    t = tok.replace(",", "").rstrip("%")
    try:
        v = float(t)
    except ValueError:
        return tok
    return str(int(v)) if v.is_integer() else repr(v)


def features(text: str) -> Features:
    text = normalise(text)
    quoted = frozenset(" ".join(next(g for g in m.groups() if g is not None).lower().split())
                       for m in _QUOTED.finditer(text))
    starts = {0} | {m.end() for m in _SENTENCE_END.finditer(text)}
    numbers: list[str] = []
    units: set[str] = set()
    names: list[str] = []
    words: list[str] = []
    negated = False
    for m in _WORD.finditer(text):
        tok = m.group(0)
        low = _fold(tok.lower().replace("’", "'"))
        flat = low.replace("'", "")
        words.append(low)
        if tok[0].isdigit():
            numbers.append(_canon_number(tok))
            if tok.endswith("%"):
                units.add("pct")
            continue
        if low in NUMBER_WORDS and not (low == "one" and _pronoun_one(words, text, m.end())):
            numbers.append(NUMBER_WORDS[low])
        if low in UNITS or flat in UNITS:
            units.add(UNITS.get(low) or UNITS[flat])
        if flat in NEGATIONS or low.endswith("n't"):
            negated = True
        at_start = m.start() in starts or text[:m.start()].rstrip().endswith(("\"", "(", "-"))
        suffix = len(tok) == 1 and tok.isupper() and text[m.start() - 1:m.start()] == "-"  # ENTJ-A, Plan-B
        if (suffix or _is_name(tok, at_start)) and low not in names:
            names.append(low)
    opposites = frozenset(w for w in words if w in OPPOSITE)
    markers = []
    for i, w in enumerate(words[:-1]):
        if w in DIRECTIONAL:
            nxt = next((x for x in words[i + 1:] if x not in STOPWORDS or x in DIRECTIONAL), None)
            if nxt is not None and nxt not in DIRECTIONAL:
                markers.append((_SAME_MARKER.get(w, w), nxt))
    asks = frozenset(w for w in words if w in QUESTION_WORDS)
    return Features(tuple(numbers), frozenset(units), quoted, tuple(names), frozenset(words), negated,
                    opposites, tuple(markers), asks, _content_sequence(words))


def _content_sequence(words: list[str]) -> tuple[str, ...]:
    """Content words in order; "X and Y" / "X or Y" written in sorted order, since that order means nothing."""
    w = list(words)
    for i in range(1, len(w) - 1):
        if w[i] in ("and", "or") and w[i + 1] < w[i - 1]:
            w[i - 1], w[i + 1] = w[i + 1], w[i - 1]
    return tuple(x for x in w if x not in STOPWORDS)


def _fold(word: str) -> str:
    """Accents dropped ("pokémon" -> "pokemon"), so a name written with or without them compares equal."""
    if word.isascii():
        return word
    return "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c))


def _pronoun_one(words: list[str], text: str, end: int) -> bool:
    """Whether the "one" just read (the last of ``words``) is the pronoun: "how does one ...", "one can ..."."""
    before = words[-2] if len(words) > 1 else ""
    after = _WORD.search(text, end)
    return before in _ONE_AFTER or (after is not None and after.group(0).lower() in _ONE_BEFORE)


def _is_name(tok: str, at_start: bool) -> bool:
    if tok[0] in "$€£¥" or len(tok) < 2:
        return False
    low = tok.lower()
    if low in _NOT_NAMES:
        return False
    inner_caps = any(c.isupper() for c in tok[1:])  # iPhone, McDonald, GPT4, NASA
    has_digit = any(c.isdigit() for c in tok)
    if inner_caps or (has_digit and tok[0].isalpha()):
        return True
    return tok[0].isupper() and not at_start


def disagreement(a: Features, b: Features) -> str | None:
    """Why ``b`` must not get ``a``'s answer, or None when no guard objects."""
    if a.numbers != b.numbers:
        return "number"
    if a.units != b.units:
        return "unit"
    if a.quoted != b.quoted:
        return "quoted"
    if a.negated != b.negated:
        return "negation"
    if any(OPPOSITE[w] & b.words and w not in b.words for w in a.opposites) or any(
            OPPOSITE[w] & a.words and w not in a.words for w in b.opposites):
        return "opposite"
    if a.asks != b.asks:
        return "question"
    if not _names_agree(a, b):
        return "name"
    if not _markers_agree(a, b) or _roles_swapped(a.content, b.content):
        return "order"
    return None


def _roles_swapped(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """The same words, two of them traded across another: "the dog bit the man" / "the man bit the dog".

    Only a trade of two words with at least one content word between them counts: neighbours that
    change places ("tallest mountain" / "mountain tallest") are rewordings.
    """
    if len(a) != len(b) or a == b or sorted(a) != sorted(b):
        return False
    moved = [i for i in range(len(a)) if a[i] != b[i]]
    return len(moved) == 2 and moved[1] - moved[0] > 1 and a[moved[0]] == b[moved[1]] and a[moved[1]] == b[moved[0]]


def _names_agree(a: Features, b: Features) -> bool:
    """Every name of each prompt appears in the other, and the shared names come in the same order."""
    if any(n not in b.words for n in a.names) or any(n not in a.words for n in b.names):
        return False
    shared = [n for n in a.names if n in b.names]
    return shared == [n for n in b.names if n in a.names]


def _markers_agree(a: Features, b: Features) -> bool:
    """A marker both prompts use must lead to the same word ("from Paris to Rome" vs "from Rome to Paris")."""
    first_a: dict[str, list[str]] = {}
    for m, w in a.markers:
        first_a.setdefault(m, []).append(w)
    first_b: dict[str, list[str]] = {}
    for m, w in b.markers:
        first_b.setdefault(m, []).append(w)
    for marker, targets in first_a.items():
        other = first_b.get(marker)
        if other is None:
            # the same word now follows a different marker: "to Rome" vs "from Rome"
            if any(t in a.words and any(t == w for _, w in b.markers) for t in targets):
                return False
            continue
        if targets != other and set(targets) & (b.words - set(other)):
            return False
    return True
