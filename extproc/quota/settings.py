"""The ``quota:`` section of the gateway config, typed and validated.

``config.py`` passes the parsed YAML mapping to ``parse_quota`` with the
gateway's top-level ``redis:`` url and key prefix (the quota keys use the
prefix as their hash tag); a ``ValueError`` names the bad key
(``quota.limits.teams.ml.usd_per_day: …``) for config.py to report with its
line. Example::

    quota:
      store: auto                      # auto: redis when redis: is configured, else memory
      time_zone: Europe/Berlin         # budgets reset at local midnight / on the 1st
      on_store_error: fail_closed      # or fail_open (local limits / replicas)
      replicas: 4
      lease: 10m
      stream_slice_tokens: 256         # bound on overshoot per in-flight stream
      default_max_tokens: 4096         # reserved (and injected) when a client sets none
      ledger: {path: /var/lib/tollgate/quota.sqlite3} # embedded mode: budgets, holds and the ledger (SQLite)
      redis_pool: {max_connections: 128, wait: 1s}     # Redis mode: a call waits this long for a connection
      prices: {my-deployment: {input: 2.5, output: 10, cached_input: 1.25}}
      default_price: {input: 15, output: 60}          # omit to refuse unpriced models
      context_windows: {my-deployment: 128000}        # tokens; adds to / overrides the shipped table
      limits:
        org: {usd_per_day: 2000}
        teams:
          ml: {tokens_per_minute: 2000000, requests_per_minute: 600, usd_per_day: 50}
        principals:
          "*": {tokens_per_minute: 200000, burst: 400000}
        aliases:
          gpt-4o: {tokens_per_minute: 5000000}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from extproc.quota.calendar import zone
from extproc.quota.limits import MAX_TOKENS, MICROS_PER_USD, Budget, TokenBucket
from extproc.quota.prices import DEFAULT_PRICES, PriceTable, parse_price, parse_prices

ANY = "*"  # a limit for every principal/team/alias without its own entry (each keeps its own counters)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


@dataclass(frozen=True, slots=True)
class LimitSpec:
    bucket: TokenBucket | None = None
    budgets: tuple[Budget, ...] = ()
    requests: TokenBucket | None = None  # requests_per_minute (burst = the rate: a minute's worth)


@dataclass(frozen=True)
class QuotaSettings:
    store: Literal["memory", "redis"] = "memory"  # "auto" in YAML resolves to one of these
    redis_url: str | None = None
    hash_tag: str = "tollgate"
    time_zone: str = "UTC"
    on_store_error: Literal["fail_closed", "fail_open"] = "fail_closed"
    replicas: int = 1
    lease_seconds: float = 600.0
    stream_slice_tokens: int = 256
    default_max_tokens: int = 4096
    ledger_path: str | None = None  # embedded mode: the SQLite state file (budgets, holds, ledger)
    redis_max_connections: int = 128
    redis_pool_wait: float = 1.0
    prices: PriceTable = field(default_factory=lambda: PriceTable(DEFAULT_PRICES))
    context_windows: Mapping[str, int] = field(default_factory=dict)
    org: LimitSpec | None = None
    teams: Mapping[str, LimitSpec] = field(default_factory=dict)
    principals: Mapping[str, LimitSpec] = field(default_factory=dict)
    aliases: Mapping[str, LimitSpec] = field(default_factory=dict)


_KEYS = {"store", "time_zone", "on_store_error", "replicas", "lease", "stream_slice_tokens",
         "default_max_tokens", "ledger", "redis_pool", "prices", "default_price", "context_windows", "limits"}


def parse_quota(
    data: Any, where: str = "quota", *, redis_url: str | None = None, key_prefix: str = "tollgate"
) -> QuotaSettings:
    m = _mapping(data, where, _KEYS)
    d = QuotaSettings()
    store = m.get("store", "auto")
    if store == "auto":
        store = "redis" if redis_url else "memory"
    if store not in ("memory", "redis"):
        raise ValueError(f"{where}.store: expected auto, memory or redis")
    if store == "redis" and not redis_url:
        raise ValueError(f"{where}.store: redis needs the top-level redis: section (url)")
    policy = m.get("on_store_error", d.on_store_error)
    if policy not in ("fail_closed", "fail_open"):
        raise ValueError(f"{where}.on_store_error: expected fail_closed or fail_open")
    tz = str(m.get("time_zone", d.time_zone))
    try:
        zone(tz)
    except ValueError as e:
        raise ValueError(f"{where}.time_zone: {e}") from None
    prices = PriceTable(DEFAULT_PRICES).with_overrides(
        parse_prices(m.get("prices") or {}, f"{where}.prices"),
        parse_price(m["default_price"], f"{where}.default_price") if m.get("default_price") is not None else None,
    )
    limits = _mapping(m.get("limits"), f"{where}.limits", {"org", "teams", "principals", "aliases"})
    pool = _mapping(m.get("redis_pool"), f"{where}.redis_pool", {"max_connections", "wait"})
    return QuotaSettings(
        store=store, redis_url=redis_url if store == "redis" else None,
        hash_tag=_hash_tag(key_prefix, "redis.key_prefix"),
        time_zone=tz, on_store_error=policy,
        replicas=_int(m.get("replicas"), f"{where}.replicas", d.replicas, 1, 10_000),
        lease_seconds=_duration(m.get("lease"), f"{where}.lease", d.lease_seconds),
        stream_slice_tokens=_int(m.get("stream_slice_tokens"), f"{where}.stream_slice_tokens",
                                 d.stream_slice_tokens, 1, 1_000_000),
        default_max_tokens=_int(m.get("default_max_tokens"), f"{where}.default_max_tokens",
                                d.default_max_tokens, 1, 1_000_000),
        ledger_path=_str(_mapping(m.get("ledger"), f"{where}.ledger", {"path"}).get("path"), f"{where}.ledger.path"),
        redis_max_connections=_int(pool.get("max_connections"), f"{where}.redis_pool.max_connections",
                                   d.redis_max_connections, 1, 10_000),
        redis_pool_wait=_duration(pool.get("wait"), f"{where}.redis_pool.wait", d.redis_pool_wait, low=0.001,
                                  high=60),
        prices=prices,
        context_windows={str(k): _int(v, f"{where}.context_windows.{k}", 0, 1, 100_000_000)
                         for k, v in _mapping(m.get("context_windows"), f"{where}.context_windows", None).items()},
        org=_limit(limits["org"], f"{where}.limits.org") if limits.get("org") is not None else None,
        teams=_limits(limits.get("teams"), f"{where}.limits.teams"),
        principals=_limits(limits.get("principals"), f"{where}.limits.principals"),
        aliases=_limits(limits.get("aliases"), f"{where}.limits.aliases"),
    )


def _limits(v: Any, where: str) -> dict[str, LimitSpec]:
    m = _mapping(v, where, None)
    return {str(name): _limit(spec, f"{where}.{name}") for name, spec in m.items()}


def _limit(v: Any, where: str) -> LimitSpec:
    m = _mapping(v, where, {"tokens_per_minute", "burst", "requests_per_minute", "usd_per_day", "usd_per_month"})
    if not m:
        raise ValueError(f"{where}: give tokens_per_minute, requests_per_minute and/or usd_per_day / usd_per_month")
    bucket = None
    if m.get("tokens_per_minute") is not None:
        rate = _int(m["tokens_per_minute"], f"{where}.tokens_per_minute", 0, 1, MAX_TOKENS)
        bucket = TokenBucket(rate, _int(m.get("burst"), f"{where}.burst", rate, 1, MAX_TOKENS))
    elif m.get("burst") is not None:
        raise ValueError(f"{where}.burst: needs tokens_per_minute")
    requests = None
    if m.get("requests_per_minute") is not None:
        rpm = _int(m["requests_per_minute"], f"{where}.requests_per_minute", 0, 1, MAX_TOKENS)
        requests = TokenBucket(rpm, rpm)
    budgets: list[Budget] = []
    if m.get("usd_per_day") is not None:
        budgets.append(Budget("day", _usd(m["usd_per_day"], f"{where}.usd_per_day")))
    if m.get("usd_per_month") is not None:
        budgets.append(Budget("month", _usd(m["usd_per_month"], f"{where}.usd_per_month")))
    return LimitSpec(bucket, tuple(budgets), requests)


def _mapping(v: Any, where: str, allowed: set[str] | None) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise ValueError(f"{where}: expected a mapping")
    for k in v:
        if allowed is not None and k not in allowed:
            raise ValueError(f"{where}.{k}: unknown key (allowed: {', '.join(sorted(allowed))})")
    return dict(v)


def _int(v: Any, where: str, default: int, lo: int, hi: int) -> int:
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{where}: expected a whole number from {lo} to {hi}")
    return v


def _usd(v: Any, where: str) -> int:
    """A USD amount as integer micro-dollars (at most 6 decimals)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"{where}: expected an amount of USD such as 50 or 12.5")
    try:
        micro = Decimal(str(v).replace(",", "").lstrip("$")) * MICROS_PER_USD
    except InvalidOperation:
        raise ValueError(f"{where}: {v!r} is not an amount of USD") from None
    if not micro.is_finite() or micro < 0 or micro != micro.to_integral_value() or micro > 10**15:
        raise ValueError(f"{where}: expected an amount of USD from 0 to 1000000000 with at most 6 decimals")
    return int(micro)


def _duration(v: Any, where: str, default: float, *, low: float = 1, high: float = 86_400) -> float:
    if v is None:
        return default
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        seconds = float(v)
    elif isinstance(v, str) and (m := _DURATION.match(v)):
        seconds = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    else:
        raise ValueError(f"{where}: expected a duration such as 30s, 10m or 1h")
    if not low <= seconds <= high:
        span = "1s to 24h" if (low, high) == (1, 86_400) else f"{low:g}s to {high:g}s"
        raise ValueError(f"{where}: expected from {span}")
    return seconds


def _str(v: Any, where: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise ValueError(f"{where}: expected a non-empty string")
    return v


def _hash_tag(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v or any(c in v for c in "{}"):
        raise ValueError(f"{where}: expected a non-empty string without braces")
    return v
