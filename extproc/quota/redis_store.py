"""The shared quota store: every sidecar asks one Redis, one EVALSHA per call.

Each operation is one Lua script (``lua/common.lua`` + ``lua/<op>.lua``)
that reads the time from Redis ``TIME``, checks every limit of every scope
and deducts from all of them or none. The sidecar's clock only proposes the
neighbouring calendar periods of each budget; Redis picks the one that holds
its own now, so sidecars whose clocks disagree still charge the same day.

Keys: every key carries the same hash tag, ``{tollgate}`` by default
(``{tollgate}:tb:team:ml``, ``{tollgate}:bg:org:day:1718236800000``,
``{tollgate}:reservations``). A script may only touch keys of one cluster
slot, and one request checks the principal, team, org and alias together, so
per-scope tags could not stay atomic; one tag puts all quota state on one
shard, which handles far more than any gateway's request rate (each call is
a few hash and string operations). Several independent gateways (tenants)
can share a cluster with a tag each (``hash_tag`` in the config).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from importlib import resources
from typing import Any
from zoneinfo import ZoneInfo

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from extproc.quota import calendar
from extproc.quota.clock import SYSTEM_CLOCK, Clock
from extproc.quota.limits import Kind, LimitState, Period, Rejection, Reservation, ScopeLimits, Settlement
from extproc.quota.records import UsageRecord
from extproc.quota.store import (
    DEFAULT_RETENTION_SECONDS,
    QuotaUnavailable,
    bucket_key,
    budget_key,
    check_amounts,
    lease_gone,
    requests_key,
)

Meta = tuple[str, Kind, Period]  # scope, kind, period of one check, in script order
_IDEMPOTENT = ("reserve", "settle", "charge", "reap")  # safe to repeat with the same reservation id after a lost reply


def lua_source(name: str, *, with_common: bool = True) -> str:
    """The script ``name`` as loaded: the shared prelude (quota operations), then the script."""
    folder = resources.files("extproc.quota") / "lua"
    prelude = (folder / "common.lua").read_text() + "\n" if with_common else ""
    return prelude + (folder / f"{name}.lua").read_text()


def connect(
    url: str, *, password: str | None = None, timeout: float = 0.25, max_connections: int = 128,
    pool_wait: float = 1.0,
) -> aioredis.Redis:
    """A client sized for the request path: short timeouts, no retry loop, a pool that waits.

    redis-py's default retries with backoff for seconds, far past Envoy's
    per-message timeout; a quota call that cannot finish quickly must fail
    (closed or open, as configured) instead. Two exceptions: a connection
    error is retried once at once (after a Redis restart each pooled
    connection is stale, and a command that died on one never ran), and a
    reserve or settle whose reply timed out is sent once more (same id: it
    cannot count twice), so a reply lost after the script ran does not refuse
    a request that was in fact admitted. Two tries stay under 0.6 s.

    The pool is a ``BlockingConnectionPool``: past ``max_connections`` busy
    connections a call waits up to ``pool_wait`` for one to come back instead
    of failing at once ("Too many connections", a false store outage with
    Redis healthy). A script runs in well under a millisecond, so a modest
    pool serves hundreds of concurrent requests with short waits.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url, password=password, socket_timeout=timeout, socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        max_connections=max_connections, timeout=pool_wait, health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes both


class RedisQuotaStore:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        tz: ZoneInfo,
        hash_tag: str = "tollgate",
        clock: Clock = SYSTEM_CLOCK,
        retention_seconds: float = DEFAULT_RETENTION_SECONDS,
    ) -> None:
        if not hash_tag or any(c in hash_tag for c in "{}"):
            raise ValueError("hash_tag must be a non-empty string without braces")
        self._client = client
        self._tz = tz
        self._tag = hash_tag
        self._clock = clock
        self._retention_ms = int(retention_seconds * 1000)
        self._scripts = {op: client.register_script(lua_source(op))
                         for op in ("reserve", "top_up", "settle", "charge", "reap")}

    def key(self, suffix: str) -> str:
        return f"{{{self._tag}}}:{suffix}"

    # -- the QuotaStore interface

    async def reserve(
        self,
        scopes: Sequence[ScopeLimits],
        tokens: int,
        micro_usd: int,
        *,
        lease_seconds: float,
        reservation_id: str | None = None,
        record: UsageRecord | None = None,
    ) -> Reservation | Rejection:
        check_amounts(tokens, micro_usd)
        rid = reservation_id or uuid.uuid4().hex
        scopes = tuple(scopes)
        keys, args, meta = self._new_checks(scopes)
        head = [rid, tokens, micro_usd, _ms(lease_seconds), self._retention_ms, len(meta), _fields(record)]
        reply = await self._run("reserve", keys, head + args)
        return self._answer(reply, rid, scopes, meta)

    async def top_up(
        self, reservation: Reservation, tokens: int, micro_usd: int, *, lease_seconds: float
    ) -> Reservation | Rejection:
        check_amounts(tokens, micro_usd)
        keys, args, meta = self._charged(reservation, with_limits=True)
        head = [reservation.id, tokens, micro_usd, _ms(lease_seconds), self._retention_ms, len(meta)]
        reply = await self._run("top_up", keys, head + args)
        if _text(reply[0]) == "gone":
            return lease_gone(reservation, tokens, _text(reply[1]))
        return self._answer(reply, reservation.id, reservation.scopes, meta)

    async def settle(
        self, reservation: Reservation, actual_tokens: int, actual_micro_usd: int,
        record: UsageRecord | None = None,
    ) -> Settlement:
        check_amounts(actual_tokens, actual_micro_usd)
        keys, args, meta = self._charged(reservation, with_limits=False)
        head = [reservation.id, actual_tokens, actual_micro_usd, self._retention_ms, len(meta), _fields(record)]
        outcome, dt, dm = await self._run("settle", keys, head + args)
        return Settlement(reservation.id, _text(outcome), int(dt), int(dm))  # type: ignore[arg-type]

    async def charge(
        self, scopes: Sequence[ScopeLimits], tokens: int, micro_usd: int, *, reservation_id: str,
        record: UsageRecord | None = None,
    ) -> Settlement:
        check_amounts(tokens, micro_usd)
        keys, args, meta = self._new_checks(tuple(scopes))
        head = [reservation_id, tokens, micro_usd, self._retention_ms, len(meta), _fields(record)]
        outcome, dt, dm = await self._run("charge", keys, head + args)
        return Settlement(reservation_id, _text(outcome), int(dt), int(dm))  # type: ignore[arg-type]

    async def reap(self, limit: int = 1000) -> int:
        return int(await self._run("reap", self._base_keys(), [self._retention_ms, limit]))

    async def close(self) -> None:
        await self._client.aclose()

    # -- helpers

    def _base_keys(self) -> list[str]:
        return [self.key("reservations"), self.key("leases"), self.key("closed"), self.key("usage"),
                self.key("usage:seen")]

    def _new_checks(self, scopes: tuple[ScopeLimits, ...]) -> tuple[list[str], list[Any], list[Meta]]:
        """Keys and arguments for a new request: request buckets, token buckets, and each budget's
        neighbouring periods by this sidecar's clock (the script charges the one holding Redis TIME)."""
        keys, args, meta = self._base_keys(), list[Any](), list[Meta]()
        now = self._clock.now()
        for s in scopes:
            if s.requests is not None:
                keys.append(self.key(requests_key(s.scope)))
                args += ["r", s.requests.burst, s.requests.per_minute]
                meta.append((s.scope, "requests", "minute"))
            if s.bucket is not None:
                keys.append(self.key(bucket_key(s.scope)))
                args += ["b", s.bucket.burst, s.bucket.per_minute]
                meta.append((s.scope, "tokens", "minute"))
            for b in s.budgets:
                bounds = calendar.boundaries(b.period, self._tz, now)
                keys += [self.key(budget_key(s.scope, b.period, start)) for start in bounds[:3]]
                args += ["m", b.limit_micro_usd, *bounds]
                meta.append((s.scope, "money", b.period))
        return keys, args, meta

    def _charged(self, r: Reservation, *, with_limits: bool) -> tuple[list[str], list[Any], list[Meta]]:
        """Keys and arguments naming the buckets and the budget periods ``r`` was charged to."""
        keys, args, meta = self._base_keys(), list[Any](), list[Meta]()
        starts = iter(r.windows)
        for s in r.scopes:
            if s.bucket is not None:
                keys.append(self.key(bucket_key(s.scope)))
                args += ["b", s.bucket.burst, s.bucket.per_minute]
                meta.append((s.scope, "tokens", "minute"))
            for b in s.budgets:
                start = next(starts)
                keys.append(self.key(budget_key(s.scope, b.period, start)))
                end = calendar.period_end(b.period, self._tz, start)
                args += ["m", b.limit_micro_usd if with_limits else 0, end]
                meta.append((s.scope, "money", b.period))
        return keys, args, meta

    async def _run(self, op: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._scripts[op](keys=keys, args=args)
        except RedisTimeoutError as e:
            if op not in _IDEMPOTENT:
                raise QuotaUnavailable(f"the quota store (Redis) is unavailable: {e}") from e
            # The script may have run and only its reply been lost: the same id again does not hold (or
            # settle) twice, it answers with what the first call did.
            try:
                return await self._scripts[op](keys=keys, args=args)
            except (RedisError, OSError) as again:
                raise _unavailable(again) from again
        except (RedisError, OSError) as e:
            raise _unavailable(e) from e

    def _answer(
        self, reply: list[Any], rid: str, scopes: tuple[ScopeLimits, ...], meta: list[Meta]
    ) -> Reservation | Rejection:
        states = tuple(_state(m, s) for m, s in zip(meta, reply[-1], strict=False))
        if _text(reply[0]) == "ok":
            _, deadline, tokens, micro, windows, _ = reply
            return Reservation(rid, scopes, tuple(int(w) for w in windows), int(tokens), int(micro),
                               int(deadline) / 1000, states)
        _, index, retry_ms, never, requested, _ = reply
        s = states[int(index) - 1]
        return Rejection(s.scope, s.kind, s.period, int(requested), s.limit, s.remaining,
                         max(1, math.ceil(int(retry_ms) / 1000)), bool(int(never)), states)


def _unavailable(e: Exception) -> QuotaUnavailable:
    if isinstance(e, ResponseError):
        if "TOLLGATE_CLOCK_SKEW" in str(e):
            return QuotaUnavailable("this sidecar's clock is more than a day away from the quota store's")
        return QuotaUnavailable(f"the quota store (Redis) failed: {e}")
    if isinstance(e, (RedisConnectionError, RedisTimeoutError, OSError)):
        return QuotaUnavailable(f"the quota store (Redis) is unavailable: {e}")
    return QuotaUnavailable(f"the quota store (Redis) failed: {e}")


def _state(meta: Meta, raw: list[Any]) -> LimitState:
    scope, kind, period = meta
    _, limit, remaining, reset_ms = raw
    return LimitState(scope, kind, period, int(limit), int(remaining), int(reset_ms) / 1000)


def _fields(record: UsageRecord | None) -> str:
    """A record as the scripts take it: a JSON list of field, value, field, value..."""
    if record is None:
        return ""
    return json.dumps([x for kv in record.to_fields().items() for x in kv], separators=(",", ":"))


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
