"""What tokens cost: a price table in USD per 1M tokens, costs in integer micro-dollars.

A price in USD per 1M tokens is exactly the cost of one token in micro-dollars,
so ``cost = tokens x price`` needs no division: the table holds ``Decimal``s,
a request's cost is summed exactly and rounded *up* once to whole
micro-dollars (never under-charging; at most 1 micro-dollar per request).

A model is priced by its own entry, else by the longest listed prefix
followed by ``-``, ``.``, ``:`` or ``@`` (``gpt-4o-2024-08-06`` is ``gpt-4o``;
``claude-sonnet-4-5-20250929`` is ``claude-sonnet-4-5``), else by the
configured default; with no default an unpriced model is refused
(``UnpricedModel``), never charged 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

from extproc.errors import GatewayError


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens. Cached input and cache writes cost the input price unless given."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None


class UsageLike(Protocol):
    """OpenAI's usage shape: prompt tokens include the cached ones."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class UnpricedModel(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "model_not_priced"


def _p(inp: str, out: str, cached: str | None = None, write: str | None = None) -> Price:
    return Price(Decimal(inp), Decimal(out), Decimal(cached) if cached else None, Decimal(write) if write else None)


# List prices (standard tier, USD per 1M tokens: input, output, cached input,
# cache write) as published on openai.com/api/pricing and on Anthropic's
# pricing page in November 2025. The Anthropic rows were cross-checked against
# a stored copy of that page; the OpenAI rows are as we know them and were not
# re-checked live (this machine has no internet). Prices change and newer
# models are missing: override or extend them under ``quota.prices``.
# Not modelled: batch discounts, long-context (>200K) surcharges, 1-hour cache writes.
DEFAULT_PRICES: dict[str, Price] = {
    # OpenAI
    "gpt-5": _p("1.25", "10", "0.125"),
    "gpt-5-mini": _p("0.25", "2", "0.025"),
    "gpt-5-nano": _p("0.05", "0.40", "0.005"),
    "gpt-4.1": _p("2", "8", "0.50"),
    "gpt-4.1-mini": _p("0.40", "1.60", "0.10"),
    "gpt-4.1-nano": _p("0.10", "0.40", "0.025"),
    "gpt-4o": _p("2.50", "10", "1.25"),
    "gpt-4o-2024-05-13": _p("5", "15"),
    "chatgpt-4o-latest": _p("5", "15"),
    "gpt-4o-mini": _p("0.15", "0.60", "0.075"),
    "o1": _p("15", "60", "7.50"),
    "o1-mini": _p("1.10", "4.40", "0.55"),
    "o3": _p("2", "8", "0.50"),
    "o3-mini": _p("1.10", "4.40", "0.55"),
    "o4-mini": _p("1.10", "4.40", "0.275"),
    "gpt-4-turbo": _p("10", "30"),
    "gpt-4": _p("30", "60"),
    "gpt-3.5-turbo": _p("0.50", "1.50"),
    "text-embedding-3-small": _p("0.02", "0"),
    "text-embedding-3-large": _p("0.13", "0"),
    "text-embedding-ada-002": _p("0.10", "0"),
    # Anthropic (cache write = 5-minute cache write)
    "claude-opus-4-5": _p("5", "25", "0.50", "6.25"),
    "claude-opus-4-1": _p("15", "75", "1.50", "18.75"),
    "claude-opus-4": _p("15", "75", "1.50", "18.75"),
    "claude-sonnet-4-5": _p("3", "15", "0.30", "3.75"),
    "claude-sonnet-4": _p("3", "15", "0.30", "3.75"),
    "claude-3-7-sonnet": _p("3", "15", "0.30", "3.75"),
    "claude-3-5-sonnet": _p("3", "15", "0.30", "3.75"),
    "claude-haiku-4-5": _p("1", "5", "0.10", "1.25"),
    "claude-3-5-haiku": _p("0.80", "4", "0.08", "1"),
    "claude-3-opus": _p("15", "75", "1.50", "18.75"),
    "claude-3-haiku": _p("0.25", "1.25", "0.03", "0.30"),
}


class PriceTable:
    def __init__(self, prices: Mapping[str, Price], default: Price | None = None) -> None:
        self._prices = {k.lower(): v for k, v in prices.items()}
        self.default = default

    def with_overrides(self, prices: Mapping[str, Price], default: Price | None = None) -> PriceTable:
        return PriceTable({**self._prices, **{k.lower(): v for k, v in prices.items()}}, default or self.default)

    def find(self, model: str) -> Price | None:
        """The model's own price or its longest listed prefix's; None if neither."""
        name = model.lower()
        if name in self._prices:
            return self._prices[name]
        best = ""
        for prefix in self._prices:
            if len(prefix) > len(best) and name.startswith(prefix) and name[len(prefix)] in "-.:@":
                best = prefix
        return self._prices[best] if best else None

    def price_of(self, model: str) -> Price:
        price = self.find(model) or self.default
        if price is None:
            raise UnpricedModel(
                f"the gateway has no price for model {model!r} and refuses to run it unmetered; "
                "add it under quota.prices or set quota.default_price"
            )
        return price

    def missing(self, models: Iterable[str]) -> list[str]:
        """Models that would be refused (for checking a config at load)."""
        return [] if self.default else sorted({m for m in models if self.find(m) is None})

    def cost(self, model: str, usage: UsageLike, *, cache_write_tokens: int = 0) -> int:
        """Micro-dollars for a request's reported usage, rounded up once."""
        p = self.price_of(model)
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        writes = min(cache_write_tokens, usage.prompt_tokens - cached)
        fresh = usage.prompt_tokens - cached - writes
        total = (fresh * p.input + cached * _or(p.cached_input, p.input) + writes * _or(p.cache_write, p.input)
                 + usage.completion_tokens * p.output)
        return math.ceil(total)

    def estimate(self, model: str, input_tokens: int, output_tokens: int) -> int:
        """Micro-dollars to reserve before the call: no cache discount is assumed."""
        p = self.price_of(model)
        return math.ceil(input_tokens * p.input + output_tokens * p.output)


def _or(value: Decimal | None, fallback: Decimal) -> Decimal:
    return fallback if value is None else value


def parse_prices(mapping: Any, where: str = "quota.prices") -> dict[str, Price]:
    """``{model: {input, output, cached_input?, cache_write?}}`` in USD per 1M tokens; ValueError names the key."""
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{where}: expected a mapping of model name to prices")
    return {str(model): parse_price(spec, f"{where}.{model}") for model, spec in mapping.items()}


def parse_price(spec: Any, where: str) -> Price:
    fields = ("input", "output", "cached_input", "cache_write")
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: expected a mapping with input and output (USD per 1M tokens)")
    for key in spec:
        if key not in fields:
            raise ValueError(f"{where}.{key}: unknown key (allowed: {', '.join(fields)})")
    for key in ("input", "output"):
        if spec.get(key) is None:
            raise ValueError(f"{where}.{key}: is required (USD per 1M tokens)")
    values = {k: _usd(spec[k], f"{where}.{k}") for k in fields if spec.get(k) is not None}
    return Price(values["input"], values["output"], values.get("cached_input"), values.get("cache_write"))


def _usd(v: Any, where: str) -> Decimal:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"{where}: expected a number of USD per 1M tokens")
    try:
        d = Decimal(str(v))  # str() keeps 0.15 as written, not as its binary float
    except InvalidOperation:
        raise ValueError(f"{where}: {v!r} is not a number") from None
    if not d.is_finite() or d < 0 or d > 100_000:
        raise ValueError(f"{where}: expected a price from 0 to 100000 USD per 1M tokens")
    return d
