"""The ``quota:`` section of the gateway config, typed and validated.

``config.py`` passes the parsed YAML mapping to ``parse_quota`` with its
``Reader`` (so errors name the key and line:
``quota.limits.teams.ml.usd_per_day: … (line 12)``), the gateway's top-level
``redis:`` url and key prefix (the quota keys use the prefix as their hash
tag), and the model aliases, whose every target model must have a price.
Parsed on its own (no reader), errors are ``ConfigError``s without lines.
Example::

    quota:
      store: auto                      # auto: redis when redis: is configured, else memory
      time_zone: Europe/Berlin         # budgets reset at local midnight / on the 1st
      on_store_error: fail_closed      # or fail_open (local limits / replicas)
      replicas: 4
      lease: 10m
      stream_slice_tokens: 256         # bound on overshoot per in-flight stream
      default_max_tokens: 4096         # reserved (and injected) when a client sets none
      ledger: {path: /var/lib/tollgate/quota.sqlite3} # embedded mode: budgets, holds and the ledger (SQLite)
      # Redis mode: ledger: {pending: /var/lib/tollgate/quota-pending.sqlite3} keeps finished requests on
      # disk while Redis is down, for the next start if this process stops first (default under
      # $XDG_STATE_HOME/tollgate)
      # ledger: {keep: 400d}           # drop ledger records older than this (default: keep them all)
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

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Literal

from extproc.config import Reader
from extproc.quota.calendar import zone
from extproc.quota.limits import MAX_TOKENS, MICROS_PER_USD, Budget, TokenBucket
from extproc.quota.prices import DEFAULT_PRICES, PriceTable, parse_price, parse_prices

if TYPE_CHECKING:
    from extproc.providers.settings import ModelAlias

ANY = "*"  # a limit for every principal/team/alias without its own entry (each keeps its own counters)


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
    pending_path: str | None = None  # Redis mode: finished requests waiting on disk while the store is down
    ledger_keep_seconds: float | None = None  # records older than this are dropped; None: every record is kept
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
    data: Any, where: str = "quota", *, redis_url: str | None = None, key_prefix: str = "tollgate",
    reader: Reader | None = None, models: Mapping[str, ModelAlias] | None = None,
) -> QuotaSettings:
    r = reader or Reader.detached()
    m = r.mapping(data, where, _KEYS)
    d = QuotaSettings()
    store = m.get("store", "auto")
    if store == "auto":
        store = "redis" if redis_url else "memory"
    if store not in ("memory", "redis"):
        raise r.fail(f"{where}.store", "expected auto, memory or redis")
    if store == "redis" and not redis_url:
        raise r.fail(f"{where}.store", "redis needs the top-level redis: section (url)")
    policy = m.get("on_store_error", d.on_store_error)
    if policy not in ("fail_closed", "fail_open"):
        raise r.fail(f"{where}.on_store_error", "expected fail_closed or fail_open")
    tz = str(m.get("time_zone", d.time_zone))
    try:
        zone(tz)
    except ValueError as e:
        raise r.fail(f"{where}.time_zone", str(e)) from None
    try:
        prices = PriceTable(DEFAULT_PRICES).with_overrides(
            parse_prices(m.get("prices") or {}, f"{where}.prices"),
            parse_price(m["default_price"], f"{where}.default_price") if m.get("default_price") is not None else None,
        )
    except ValueError as e:  # the price parser names the key; the reader adds the line
        raise r.wrap(e) from None
    limits = r.mapping(m.get("limits"), f"{where}.limits", {"org", "teams", "principals", "aliases"})
    ledger = r.mapping(m.get("ledger"), f"{where}.ledger", {"path", "pending", "keep"})
    pool = r.mapping(m.get("redis_pool"), f"{where}.redis_pool", {"max_connections", "wait"})
    q = QuotaSettings(
        store=store, redis_url=redis_url if store == "redis" else None,
        hash_tag=_hash_tag(r, key_prefix, "redis.key_prefix"),
        time_zone=tz, on_store_error=policy,
        replicas=r.integer(m.get("replicas"), f"{where}.replicas", d.replicas, 1, 10_000),
        lease_seconds=r.duration(m.get("lease"), f"{where}.lease", d.lease_seconds, lo=1, hi=86_400),
        stream_slice_tokens=r.integer(m.get("stream_slice_tokens"), f"{where}.stream_slice_tokens",
                                      d.stream_slice_tokens, 1, 1_000_000),
        default_max_tokens=r.integer(m.get("default_max_tokens"), f"{where}.default_max_tokens",
                                     d.default_max_tokens, 1, 1_000_000),
        ledger_path=r.string(ledger.get("path"), f"{where}.ledger.path"),
        pending_path=r.string(ledger.get("pending"), f"{where}.ledger.pending"),
        # at least a day: a request replayed after an outage is deduplicated against the last day's records
        ledger_keep_seconds=(None if ledger.get("keep") is None else
                             r.duration(ledger["keep"], f"{where}.ledger.keep", 0, lo=86_400, hi=36_500 * 86_400)),
        redis_max_connections=r.integer(pool.get("max_connections"), f"{where}.redis_pool.max_connections",
                                        d.redis_max_connections, 1, 10_000),
        redis_pool_wait=r.duration(pool.get("wait"), f"{where}.redis_pool.wait", d.redis_pool_wait, lo=0.001, hi=60),
        prices=prices,
        context_windows={str(k): r.integer(v, f"{where}.context_windows.{k}", 0, 1, 100_000_000)
                         for k, v in r.mapping(m.get("context_windows"), f"{where}.context_windows", None).items()},
        org=_limit(r, limits["org"], f"{where}.limits.org") if limits.get("org") is not None else None,
        teams=_limits(r, limits.get("teams"), f"{where}.limits.teams"),
        principals=_limits(r, limits.get("principals"), f"{where}.limits.principals"),
        aliases=_limits(r, limits.get("aliases"), f"{where}.limits.aliases"),
    )
    if models is not None:
        _check_priced(r, q.prices, models)
    if q.pending_path:
        q = replace(q, pending_path=r.path(q.pending_path))
    elif reader is not None and q.store == "redis":  # part of a gateway config
        q = replace(q, pending_path=r.state_path("quota-pending.sqlite3"))
    if reader is not None and q.store == "memory" and q.ledger_path is None:
        return replace(q, ledger_path=r.state_path("quota.sqlite3"))
    if q.ledger_path:
        return replace(q, ledger_path=r.path(q.ledger_path))
    return q


def _check_priced(r: Reader, prices: PriceTable, models: Mapping[str, ModelAlias]) -> None:
    """Refuse an unpriced model now, not by charging 0 later."""
    for name, alias in models.items():
        for i, t in enumerate(alias.targets):
            if prices.missing([t.model]):
                raise r.fail(f"models.{name}.targets[{i}].model",
                             f"no price for model {t.model!r}; add it under quota.prices or set quota.default_price")


def _limits(r: Reader, v: Any, where: str) -> dict[str, LimitSpec]:
    m = r.mapping(v, where, None)
    return {str(name): _limit(r, spec, f"{where}.{name}") for name, spec in m.items()}


def _limit(r: Reader, v: Any, where: str) -> LimitSpec:
    m = r.mapping(v, where, {"tokens_per_minute", "burst", "requests_per_minute", "usd_per_day", "usd_per_month"})
    if not m:
        raise r.fail(where, "give tokens_per_minute, requests_per_minute and/or usd_per_day / usd_per_month")
    bucket = None
    if m.get("tokens_per_minute") is not None:
        rate = r.integer(m["tokens_per_minute"], f"{where}.tokens_per_minute", 0, 1, MAX_TOKENS)
        bucket = TokenBucket(rate, r.integer(m.get("burst"), f"{where}.burst", rate, 1, MAX_TOKENS))
    elif m.get("burst") is not None:
        raise r.fail(f"{where}.burst", "needs tokens_per_minute")
    requests = None
    if m.get("requests_per_minute") is not None:
        rpm = r.integer(m["requests_per_minute"], f"{where}.requests_per_minute", 0, 1, MAX_TOKENS)
        requests = TokenBucket(rpm, rpm)
    budgets: list[Budget] = []
    if m.get("usd_per_day") is not None:
        budgets.append(Budget("day", _usd(r, m["usd_per_day"], f"{where}.usd_per_day")))
    if m.get("usd_per_month") is not None:
        budgets.append(Budget("month", _usd(r, m["usd_per_month"], f"{where}.usd_per_month")))
    return LimitSpec(bucket, tuple(budgets), requests)


def _usd(r: Reader, v: Any, where: str) -> int:
    """A USD amount as integer micro-dollars (at most 6 decimals)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise r.fail(where, "expected an amount of USD such as 50 or 12.5")
    try:
        micro = Decimal(str(v).replace(",", "").lstrip("$")) * MICROS_PER_USD
    except InvalidOperation:
        raise r.fail(where, f"{v!r} is not an amount of USD") from None
    if not micro.is_finite() or micro < 0 or micro != micro.to_integral_value() or micro > 10**15:
        raise r.fail(where, "expected an amount of USD from 0 to 1000000000 with at most 6 decimals")
    return int(micro)


def _hash_tag(r: Reader, v: Any, where: str) -> str:
    if not isinstance(v, str) or not v or any(c in v for c in "{}"):
        raise r.fail(where, "expected a non-empty string without braces")
    return v
