"""Costs are exact integer micro-dollars from a price table that config can override."""

from __future__ import annotations

from decimal import Decimal

import pytest

from extproc.providers.base import Usage
from extproc.quota.prices import DEFAULT_PRICES, Price, PriceTable, UnpricedModel, parse_prices

TABLE = PriceTable(DEFAULT_PRICES)


def test_a_gpt4o_call_costs_its_list_price_to_the_micro_dollar() -> None:
    # 1,200 prompt tokens (200 of them cached) and 300 completion tokens at $2.50 / $1.25 / $10 per 1M
    cost = TABLE.cost("gpt-4o-2024-08-06", Usage(prompt_tokens=1_200, completion_tokens=300, cached_tokens=200))
    assert cost == 1_000 * 2.5 + 200 * 1.25 + 300 * 10 == 5_750  # $0.00575


def test_fractions_of_a_micro_dollar_round_up_once_per_request() -> None:
    # gpt-4o-mini: 7 tokens x $0.15 = 1.05 micro-dollars -> 2
    assert TABLE.cost("gpt-4o-mini", Usage(7, 0, 0)) == 2
    assert TABLE.cost("gpt-4o-mini", Usage(0, 0, 0)) == 0


def test_ten_thousand_small_calls_sum_to_the_cent() -> None:
    usage = Usage(prompt_tokens=1_000, completion_tokens=500, cached_tokens=0)
    per_call = TABLE.cost("claude-sonnet-4-5-20250929", usage)
    assert per_call == 3_000 + 7_500
    assert sum(per_call for _ in range(10_000)) == 105_000_000  # exactly $105.00


def test_anthropic_cache_writes_and_reads_have_their_own_prices() -> None:
    usage = Usage(prompt_tokens=10_000, completion_tokens=0, cached_tokens=6_000)
    # 6,000 read at $0.30, 3,000 written at $3.75, 1,000 fresh at $3
    assert TABLE.cost("claude-sonnet-4-5", usage, cache_write_tokens=3_000) == 1_800 + 11_250 + 3_000


def test_the_longest_prefix_prices_dated_and_provider_spelled_models() -> None:
    assert TABLE.price_of("gpt-4o-mini-2024-07-18") == DEFAULT_PRICES["gpt-4o-mini"]
    assert TABLE.price_of("gpt-4o-2024-05-13") == DEFAULT_PRICES["gpt-4o-2024-05-13"]
    assert TABLE.price_of("claude-sonnet-4-20250514") == DEFAULT_PRICES["claude-sonnet-4"]
    assert TABLE.price_of("claude-opus-4-1-20250805") == DEFAULT_PRICES["claude-opus-4-1"]
    assert TABLE.find("gpt-4ozzz") is None


def test_an_unpriced_model_is_refused_not_charged_zero() -> None:
    with pytest.raises(UnpricedModel) as caught:
        TABLE.cost("my-finetune", Usage(10, 10, 0))
    assert caught.value.status == 400 and "my-finetune" in caught.value.message
    assert TABLE.missing(["gpt-4o", "my-finetune"]) == ["my-finetune"]


def test_a_configured_default_prices_unknown_models() -> None:
    table = TABLE.with_overrides({}, default=Price(Decimal(20), Decimal(80)))
    assert table.cost("my-finetune", Usage(1_000, 1_000, 0)) == 100_000
    assert table.missing(["my-finetune"]) == []


def test_config_overrides_replace_and_extend_the_shipped_prices() -> None:
    table = TABLE.with_overrides(parse_prices({"gpt-4o": {"input": 2, "output": 8}, "my-azure-deployment":
                                               {"input": "0.15", "output": 0.6, "cached_input": 0.075}}))
    assert table.cost("gpt-4o", Usage(1_000, 1_000, 500)) == 10_000  # no cached price given: input price
    assert table.cost("my-azure-deployment", Usage(1_000, 100, 1_000)) == 75 + 60


@pytest.mark.parametrize("spec, message", [
    ({"gpt-4o": {"input": 1}}, "quota.prices.gpt-4o.output: is required"),
    ({"gpt-4o": {"input": -1, "output": 1}}, "quota.prices.gpt-4o.input: expected a price from 0"),
    ({"gpt-4o": {"input": "cheap", "output": 1}}, "quota.prices.gpt-4o.input: 'cheap' is not a number"),
    ({"gpt-4o": {"input": 1, "output": 1, "cache_read": 1}}, "quota.prices.gpt-4o.cache_read: unknown key"),
    ({"gpt-4o": {"input": True, "output": 1}}, "quota.prices.gpt-4o.input: expected a number"),
    ({"gpt-4o": 3}, "quota.prices.gpt-4o: expected a mapping"),
    ([], "quota.prices: expected a mapping"),
])
def test_bad_price_config_names_the_key(spec: object, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_prices(spec)
    assert message in str(caught.value)


def test_a_reservation_estimate_assumes_no_cache_discount() -> None:
    assert TABLE.estimate("gpt-4o", 1_000, 4_096) == 2_500 + 40_960
