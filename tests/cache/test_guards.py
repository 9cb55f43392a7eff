"""Look-alikes: the guards object where cosine cannot tell, and stay quiet on paraphrases.

The adversarial pairs (``adversarial_pairs.jsonl``, written for these specs)
are one catalogue for these unit specs, the scorer's spec and the bench.
"""

from __future__ import annotations

import json

import pytest

from extproc.cache.guards import disagreement, features, normalise
from tests.cache.conftest import ADVERSARIAL

PAIRS = [json.loads(line) for line in ADVERSARIAL.read_text().splitlines() if line.strip()]


def objection(a: str, b: str) -> str | None:
    return disagreement(features(a), features(b))


@pytest.mark.parametrize("pair", [p for p in PAIRS if p["label"] == 0 and p["guarded"]],
                         ids=lambda p: p["b"][:40])
def test_a_guard_objects_to_every_constructed_look_alike(pair):
    assert objection(pair["a"], pair["b"]) is not None
    assert objection(pair["b"], pair["a"]) is not None  # whichever of the two was stored


@pytest.mark.parametrize("pair", [p for p in PAIRS if p["label"] == 1], ids=lambda p: p["b"][:40])
def test_no_guard_objects_to_a_paraphrase(pair):
    assert objection(pair["a"], pair["b"]) is None


@pytest.mark.parametrize("a, b, guard", [
    ("Cancel order 1123", "Cancel order 1132", "number"),
    ("Give me three examples", "Give me 3 examples", None),  # a number word is its digits
    ("Costs 1,000 dollars", "Costs 1000 dollars", None),
    ("Run 5 km", "Run 5 miles", "unit"),
    ('Translate "bonjour"', 'Translate "bonsoir"', "quoted"),
    ("Is it safe?", "Isn't it safe?", "negation"),
    ("Is it safe?", "Is it never safe?", "negation"),
    ("Why is the sky blue?", "When is the sky blue?", "question"),
    ("How to enable caching", "How to disable caching", "opposite"),
    ("Tell me about Paris", "Tell me about Rome", "name"),
    ("Tell me about paris", "Tell me about Paris", None),  # names compare case-blind
    ("Is Python faster than Java?", "Is Java faster than Python?", "name"),  # same names, other order
    ("Convert celsius to fahrenheit", "Convert fahrenheit to celsius", "order"),
    ("Move the file to backup", "Move the file into backup", None),  # to / into: one marker
    ("Ship it to Berlin", "Ship it from Berlin", "order"),
    ("Is tea good for sleep?", "Is tea bad for sleep?", "opposite"),
    ("The cat chased the mouse, why?", "The mouse chased the cat, why?", "order"),  # roles traded
    ("What is the tallest mountain?", "Which mountain is the tallest?", None),  # neighbours reworded
    ("How does one deal with stress?", "How do I deal with stress?", None),  # "one" the pronoun
    ("Buy one ticket to Oslo", "Buy two tickets to Oslo", "number"),  # "one" the count
    ("Is Pokémon Go out in India?", "Is Pokemon Go out in India?", None),  # accents fold
    ("How to prepare for IIT-JEE 2017", "How to prepare for IIT JEE 2017", None),  # a hyphen splits words
    ("What is an ENTJ-A like?", "What is an ENTJ like?", "name"),  # a one-letter variant is a name
    # A known miss, precision first: "and"/"or" are argument markers, so a reordered pair objects too.
    ("Is it cheaper to buy or lease a car?", "Is it cheaper to lease or buy a car?", "order"),
])
def test_each_guard(a, b, guard):
    assert objection(a, b) == guard


def test_normalising_keeps_case_and_words_but_not_spacing_or_curly_quotes():
    assert normalise("  What’s   up\u00a0 NASA? ") == "What's up NASA?"
