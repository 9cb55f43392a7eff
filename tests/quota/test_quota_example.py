"""The quota example config loads, and the README's worked example adds up with it."""

from __future__ import annotations

from pathlib import Path

from extproc.config import load_config
from extproc.providers.base import Usage
from extproc.quota.limits import MICROS_PER_USD
from extproc.quota.policy import QuotaPolicy
from tests.test_envoy_config import ENVOY_DIR

EXAMPLE = ENVOY_DIR / "gateway.quotas.example.yaml"


def test_the_example_gives_alice_of_team_ml_three_scopes_checked_at_once(tmp_path: Path) -> None:
    cfg = load_config(EXAMPLE, env={"HOME": str(tmp_path)})
    q = cfg.quota
    assert q is not None and (q.store, q.time_zone, q.stream_slice_tokens) == ("redis", "Europe/Berlin", 256)
    scopes = QuotaPolicy(q).scopes(principal="alice", team="ml", alias="gpt-4o")
    assert [s.scope for s in scopes] == ["principal:alice", "team:ml", "org"]
    assert [(b.period, b.limit_micro_usd) for b in scopes[1].budgets] == [("day", 50 * MICROS_PER_USD)]


def test_the_worked_example_in_the_readme() -> None:
    prices = load_config(EXAMPLE, env={}).quota.prices  # type: ignore[union-attr]
    # alice asks gpt-4o (which may fall back to Claude) with a 1,200-token prompt and max_tokens 800
    held = max(prices.estimate(m, 1200, 800) for m in ("gpt-4o", "claude-sonnet-4-5"))
    assert held == 15_600  # $0.0156 at Claude's $3 / $15 per 1M; gpt-4o alone would hold $0.011
    assert prices.estimate("gpt-4o", 1200, 800) == 11_000
    assert prices.cost("gpt-4o", Usage(1200, 310, 0)) == 6_100  # OpenAI answered: $0.0061, $0.0095 refunded
    assert prices.cost("gpt-4o", Usage(1200, 310, 1024)) == 4_820  # 1,024 of them from OpenAI's prompt cache
    assert max(prices.estimate(m, 1200, 256) for m in ("gpt-4o", "claude-sonnet-4-5")) == 7_440  # a stream
    assert prices.estimate("claude-sonnet-4-5", 0, 256) == 3_840  # and each slice after
