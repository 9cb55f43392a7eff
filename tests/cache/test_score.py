"""``tollgate cache score``: the live decision on labelled pairs, and any input line handled."""

from __future__ import annotations

import json
import subprocess

from extproc.cache.score import read_pairs, run, tallies
from extproc.cache.settings import DEFAULT_THRESHOLD
from tests.cache.conftest import ADVERSARIAL
from tests.harness import TOLLGATE


def test_at_the_shipped_setting_no_constructed_look_alike_is_served_and_most_paraphrases_are(embedder):
    results = run(read_pairs(ADVERSARIAL.read_text().splitlines()), embedder, threshold=DEFAULT_THRESHOLD)
    t = tallies(results)["all"]
    assert t.negatives == 59 and t.false_hits == 0
    # paraphrases worded far apart ("benefits of working remotely") fall below the threshold: precision first
    assert t.true_hits / t.positives >= 0.7


def test_each_pair_is_scored_in_a_cache_of_its_own(embedder):
    lines = [json.dumps({"a": "How do I reset my password?", "b": "x", "label": 0}),
             json.dumps({"a": "y", "b": "How do I reset my password?", "label": 0})]
    assert [d.result for _, d in run(read_pairs(lines), embedder, threshold=0.9)] == ["miss", "miss"]


MIXED = "\n".join([
    json.dumps({"a": "Cancel order 1123", "b": "Cancel order 1123", "label": 1, "id": "same"}),
    "this is not json",
    "",
    json.dumps([1, 2]),
    json.dumps({"a": "only a"}),
    json.dumps({"a": "Cancel order 1123", "b": "Cancel order 1132", "label": "0", "source": "mine"}),
    json.dumps({"a": "What is 2+2?", "b": "What's 2+2?"}),  # no label: a decision, no metric
    json.dumps({"a": "Grüße aus Zürich", "b": "", "label": 1}),
    json.dumps({"a": 5, "b": None, "label": 0}),
]) + "\n"


def test_the_command_answers_every_line_in_order_and_never_crashes():
    r = subprocess.run([TOLLGATE, "cache", "score", "--pairs", "-", "--json"], input=MIXED, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["line"] for o in out] == [1, 2, 4, 5, 6, 7, 8, 9]  # the blank line is no pair
    assert [o["decision"] for o in out] == ["hit_exact", "bypass", "bypass", "bypass", "miss",
                                            out[5]["decision"], "bypass", "bypass"]
    assert out[0]["id"] == "same" and out[0]["similarity"] == 1.0
    assert all("error" in out[i] for i in (1, 2, 3, 7))
    assert ":2: not JSON" in r.stderr and "precision" in r.stderr
    assert [o["label"] for o in out] == [1, None, None, None, 0, None, 1, 0]  # "0" reads as 0; line 7 has none
    assert "pairs      8" in r.stderr and "(1 right hits, 0 wrong)" in r.stderr  # line 9 is no pair: no metric


def test_a_missing_file_is_a_clear_error():
    r = subprocess.run([TOLLGATE, "cache", "score", "--pairs", "/nonexistent.jsonl"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--pairs" in r.stderr and "Traceback" not in r.stderr
