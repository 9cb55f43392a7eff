"""Measured rates the issue sets as goals, on sets made or written here (the bench reports the public ones).

PII and secrets: recall >= 0.98 per kind on valid values in sentences, false
positives <= 1 % on near-misses and ordinary prompts. Injection: the
hard negatives written here (prompts that say "ignore", "system", "password",
role-play, code naming credentials) fire at most 1 in 80.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extproc.guardrails.engine import Engine
from extproc.guardrails.settings import score_settings
from tests.guardrails import corpus

SETTINGS = score_settings()
ENGINE = Engine(SETTINGS)
DATA = Path(__file__).parent / "data"


def fired(text: str) -> set[str]:
    return {f.kind for f in ENGINE.scan(text, SETTINGS.policy, role="user")}


@pytest.mark.parametrize("kind", sorted(corpus.MAKERS))
def test_recall_on_valid_values_in_sentences_is_at_least_98_percent(kind):
    texts = corpus.positives(kind, 400, seed=11)
    caught = sum(kind in fired(t) for t in texts)
    assert caught / len(texts) >= 0.98


def test_near_misses_and_ordinary_prompts_fire_at_most_1_percent():
    texts = corpus.near_misses(1000, seed=11) + corpus.PROMPTS
    assert sum(bool(fired(t)) for t in texts) / len(texts) <= 0.01


def _lines(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def test_injection_hard_negatives_rarely_fire_and_written_attacks_are_caught():
    negatives = _lines("hard_negatives.jsonl")
    attacks = _lines("injections.jsonl")
    assert sum("injection" in fired(d["text"]) for d in negatives) <= 1
    assert sum("injection" in fired(d["text"]) for d in attacks) / len(attacks) >= 0.85
