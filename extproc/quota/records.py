"""The usage record: what one request cost, as the ledger keeps it.

Its own module because both the stores (which write a record atomically with
the budget change it explains) and the ledger readers need it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

# How a record's amount was decided (``governor.Outcome`` plus ``cache``): ``unknown`` is also what a
# hold becomes when its lease expires without a settlement (its sidecar died): the amount then is
# exactly what the hold charged to the budgets, so budgets and ledger agree to the micro-dollar.
OUTCOMES = ("complete", "partial", "failed", "unsent", "unknown")


@dataclass(frozen=True, slots=True)
class UsageRecord:
    request_id: str
    principal: str
    team: str
    alias: str
    provider: str
    model: str
    input_tokens: int  # including cached ones
    output_tokens: int
    cached_tokens: int
    micro_usd: int
    cache_status: str = "bypass"  # hit_exact | hit_semantic | miss | bypass
    saved_tokens: int = 0  # a cache hit: the tokens (input + output) the provider was not asked for
    saved_micro_usd: int = 0  # a cache hit: what the cached answer cost when it was made
    time: float = 0.0  # seconds since the epoch; set by the ledger
    outcome: str = "complete"

    def to_fields(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self) if f.name != "time"}

    def expired(self, tokens: int, micro_usd: int) -> UsageRecord:
        """This (provisional) record as written when its hold expired holding ``tokens`` and ``micro_usd``."""
        return replace(self, output_tokens=max(0, tokens - self.input_tokens), micro_usd=micro_usd,
                       outcome="unknown")

    @classmethod
    def from_fields(cls, raw: Mapping[Any, Any], time: float) -> UsageRecord:
        d = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
             for k, v in raw.items()}

        def text(name: str, default: str = "") -> str:
            return str(d.get(name) or default)

        def number(name: str) -> int:
            return int(d.get(name) or 0)

        return cls(text("request_id"), text("principal"), text("team"), text("alias"), text("provider"),
                   text("model"), number("input_tokens"), number("output_tokens"), number("cached_tokens"),
                   number("micro_usd"), text("cache_status", "bypass"), number("saved_tokens"),
                   number("saved_micro_usd"), time=time,
                   outcome=text("outcome", "complete"))
