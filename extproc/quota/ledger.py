"""The usage ledger: one record per completed request, summed for chargeback.

``RedisLedger`` appends to a Redis Stream (``{tollgate}:usage``), durable as
far as Redis persists it (run Redis with ``appendonly yes``); the entry id is
Redis's own time, which is what ``since``/``until`` filter on.
``FileLedger`` (embedded mode) appends JSON lines to a local file, flushed and
fsynced per record. Both record a request id at most once within
``dedupe_seconds``, so a retried append cannot count a request twice.
``totals`` sums records for ``tollgate spend --team ml --since 24h --by model``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from extproc.config import parse_duration
from extproc.quota.clock import SYSTEM_CLOCK, Clock
from extproc.quota.limits import MICROS_PER_USD
from extproc.quota.redis_store import connect, lua_source
from extproc.quota.settings import QuotaSettings
from extproc.quota.store import QuotaUnavailable

DEFAULT_DEDUPE_SECONDS = 24 * 3600
GROUPS = ("model", "team", "principal", "alias", "provider", "cache_status")


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

    def to_fields(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self) if f.name != "time"}

    @classmethod
    def from_fields(cls, raw: Mapping[str, Any], time: float) -> UsageRecord:
        d = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
             for k, v in raw.items()}
        def text(name: str) -> str:
            return str(d.get(name, ""))

        def number(name: str) -> int:
            return int(d.get(name) or 0)

        return cls(text("request_id"), text("principal"), text("team"), text("alias"), text("provider"),
                   text("model"), number("input_tokens"), number("output_tokens"), number("cached_tokens"),
                   number("micro_usd"), text("cache_status") or "bypass", number("saved_tokens"),
                   number("saved_micro_usd"), time)


@dataclass(slots=True)
class Totals:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    micro_usd: int = 0
    saved_tokens: int = 0
    saved_micro_usd: int = 0

    def add(self, r: UsageRecord) -> None:
        self.requests += 1
        self.saved_tokens += r.saved_tokens
        self.saved_micro_usd += r.saved_micro_usd
        self.input_tokens += r.input_tokens
        self.output_tokens += r.output_tokens
        self.cached_tokens += r.cached_tokens
        self.micro_usd += r.micro_usd


class Ledger(Protocol):
    async def append(self, record: UsageRecord) -> bool:
        """Record one request; False if its request id was recorded already."""

    def records(self, *, since: float, until: float | None = None) -> AsyncIterator[UsageRecord]:
        """Records with ``since <= time < until``, oldest first."""

    async def close(self) -> None: ...


async def totals(
    ledger: Ledger,
    *,
    since: float,
    until: float | None = None,
    team: str | None = None,
    principal: str | None = None,
    by: str | None = None,
) -> dict[str, Totals]:
    """Sums per ``by`` group (one ``"total"`` group when ``by`` is None)."""
    if by is not None and by not in GROUPS:
        raise ValueError(f"cannot group by {by!r} (expected one of {', '.join(GROUPS)})")
    out: dict[str, Totals] = {}
    async for r in ledger.records(since=since, until=until):
        if (team is not None and r.team != team) or (principal is not None and r.principal != principal):
            continue
        out.setdefault(getattr(r, by) if by else "total", Totals()).add(r)
    return dict(sorted(out.items()))


def parse_since(text: str) -> float:
    """``90s``, ``30m``, ``24h``, ``7d`` → seconds (the config's duration grammar)."""
    seconds = parse_duration(text)
    if seconds is None or seconds <= 0:
        raise ValueError(f"expected a duration such as 30m, 24h or 7d, not {text!r}")
    return seconds


def format_totals(groups: Mapping[str, Totals], by: str | None) -> str:
    """The table ``tollgate spend`` prints."""
    head = f"{(by or 'scope'):<32} {'requests':>9} {'input':>12} {'cached':>12} {'output':>12} {'cost (USD)':>14}"
    lines = [head]
    for name, t in groups.items():
        lines.append(f"{name:<32} {t.requests:>9} {t.input_tokens:>12} {t.cached_tokens:>12} "
                     f"{t.output_tokens:>12} {t.micro_usd / MICROS_PER_USD:>14.6f}")
    if len(groups) > 1:
        s = Totals()
        for t in groups.values():
            s.requests += t.requests
            s.input_tokens, s.cached_tokens = s.input_tokens + t.input_tokens, s.cached_tokens + t.cached_tokens
            s.output_tokens, s.micro_usd = s.output_tokens + t.output_tokens, s.micro_usd + t.micro_usd
        lines.append(f"{'total':<32} {s.requests:>9} {s.input_tokens:>12} {s.cached_tokens:>12} "
                     f"{s.output_tokens:>12} {s.micro_usd / MICROS_PER_USD:>14.6f}")
    saved_tokens = sum(t.saved_tokens for t in groups.values())
    if saved_tokens:  # cache hits: recorded at cost 0, with what the provider would have charged
        saved_usd = sum(t.saved_micro_usd for t in groups.values()) / MICROS_PER_USD
        lines.append(f"saved by the cache: {saved_tokens} tokens, {saved_usd:.6f} USD")
    return "\n".join(lines)


def open_ledger(
    settings: QuotaSettings, *, password: str | None = None, client: aioredis.Redis | None = None,
    timeout: float = 5.0,
) -> Ledger:
    """The configured ledger: the Redis stream when quotas use Redis, else the local file.

    ``client`` shares a connection pool with the quota store; without one a
    client with ``timeout`` is opened (reading a long stream needs more than
    the request path's quarter second).
    """
    if settings.store == "redis" and settings.redis_url:
        client = client or connect(settings.redis_url, password=password, timeout=timeout)
        return RedisLedger(client, hash_tag=settings.hash_tag)
    return FileLedger(settings.ledger_path or "usage.jsonl")


class RedisLedger:
    def __init__(
        self, client: aioredis.Redis, *, hash_tag: str = "tollgate", dedupe_seconds: float = DEFAULT_DEDUPE_SECONDS
    ) -> None:
        self._client = client
        self._stream = f"{{{hash_tag}}}:usage"
        self._seen = f"{{{hash_tag}}}:usage:seen"
        self._dedupe_ms = int(dedupe_seconds * 1000)
        self._append = client.register_script(lua_source("ledger_append", with_common=False))

    async def append(self, record: UsageRecord) -> bool:
        pairs = [x for kv in record.to_fields().items() for x in kv]
        try:
            added = await self._append(keys=[self._stream, self._seen],
                                       args=[record.request_id, self._dedupe_ms, *pairs])
        except (RedisError, OSError) as e:
            raise QuotaUnavailable(f"the usage ledger (Redis) is unavailable: {e}") from e
        return bool(added)

    async def records(self, *, since: float, until: float | None = None) -> AsyncIterator[UsageRecord]:
        low = str(int(since * 1000))
        high = "+" if until is None else f"({int(until * 1000)}"
        while True:
            batch: list[Any] = list(await self._client.xrange(self._stream, min=low, max=high, count=1000) or ())
            for entry_id, raw in batch:
                eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                yield UsageRecord.from_fields(raw, int(eid.split("-")[0]) / 1000)
            if len(batch) < 1000:
                return
            low = "(" + eid

    async def close(self) -> None:
        await self._client.aclose()


class FileLedger:
    """Append-only JSON lines; a torn last line (a crash mid-write) is skipped when read."""

    def __init__(
        self, path: str | os.PathLike[str], *, clock: Clock = SYSTEM_CLOCK,
        dedupe_seconds: float = DEFAULT_DEDUPE_SECONDS,
    ) -> None:
        self._path = Path(path)
        self._clock = clock
        self._dedupe = dedupe_seconds
        self._lock = asyncio.Lock()
        self._seen: dict[str, float] | None = None  # request id -> time, loaded on first append

    async def append(self, record: UsageRecord) -> bool:
        async with self._lock:
            now = self._clock.now()
            if self._seen is None:
                self._seen = {r.request_id: r.time async for r in self.records(since=now - self._dedupe)}
            self._seen = {k: t for k, t in self._seen.items() if t >= now - self._dedupe}
            if record.request_id in self._seen:
                return False
            line = json.dumps({**asdict(record), "time": now}, separators=(",", ":")) + "\n"
            await asyncio.to_thread(self._write, line)
            self._seen[record.request_id] = now
            return True

    def _write(self, line: str) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    async def records(self, *, since: float, until: float | None = None) -> AsyncIterator[UsageRecord]:
        for r in await asyncio.to_thread(self._read):
            if r.time >= since and (until is None or r.time < until):
                yield r

    def _read(self) -> list[UsageRecord]:
        try:
            text = self._path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                d = json.loads(line)
                out.append(UsageRecord.from_fields(d, float(d["time"])))
            except (ValueError, KeyError, TypeError):
                continue
        return out

    async def close(self) -> None:
        return None
