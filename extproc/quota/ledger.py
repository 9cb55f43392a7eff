"""The usage ledger: one record per completed request, summed for chargeback.

The quota stores write the records of the requests they settle themselves,
atomically with the budget change (``QuotaStore.settle``), so the ledger and
the budgets cannot disagree; ``Ledger.append`` is for records that hold no
budget (a cache hit, a quota section without limits).

``RedisLedger`` is a Redis Stream (``{tollgate}:usage``), durable as far as
Redis persists it (run Redis with ``appendonly yes``); the entry id is
Redis's own time, which is what ``since``/``until`` filter on; a request id
is recorded at most once within ``dedupe_seconds``.
``SqliteLedger`` (embedded mode) is the ``ledger`` table of the embedded
store's SQLite file (``state_file.py``); a request id is recorded once.
``totals`` sums records for ``tollgate spend --team ml --since 24h --by model``.

Both keep every record unless ``quota.ledger.keep`` says how long: then the
governor's maintenance calls ``trim`` every few seconds, which drops records
older than that in bounded steps (``TRIM_STEP`` at a time), so the ledger's
size follows the traffic of the kept period instead of all history.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from extproc.config import parse_duration
from extproc.quota.clock import SYSTEM_CLOCK, Clock
from extproc.quota.limits import MICROS_PER_USD
from extproc.quota.records import UsageRecord
from extproc.quota.redis_store import connect, lua_source
from extproc.quota.settings import QuotaSettings
from extproc.quota.state_file import LEDGER_COLUMNS, StateFile
from extproc.quota.store import QuotaUnavailable

__all__ = ["GROUPS", "Ledger", "RedisLedger", "SqliteLedger", "Totals", "UsageRecord", "format_totals",
           "open_ledger", "parse_since", "totals"]

DEFAULT_DEDUPE_SECONDS = 24 * 3600
TRIM_STEP = 10_000  # at most this many records dropped per trim: a first trim of a long history takes turns
SQLITE_TRIM_CHUNK = 1_000  # rows per delete of the embedded ledger (10,000 at once held the loop ~16 ms)
GROUPS = ("model", "team", "principal", "alias", "provider", "cache_status")


@dataclass(slots=True)
class Totals:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    micro_usd: int = 0
    saved_tokens: int = 0
    saved_micro_usd: int = 0
    unknown: int = 0  # records of holds that expired unsettled (billed as held)

    def add(self, r: UsageRecord) -> None:
        self.requests += 1
        self.unknown += r.outcome == "unknown"
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

    async def trim(self, before: float) -> int:
        """Drop up to ``TRIM_STEP`` records older than ``before`` (epoch seconds); how many went."""

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


def totals_json(groups: Mapping[str, Totals], by: str | None) -> dict[str, Any]:
    """What ``tollgate spend --json`` prints: exact integers (micro-dollars), one entry per group."""
    return {"by": by or "scope", "groups": {name: asdict(t) for name, t in groups.items()},
            "total": asdict(sum_totals(groups.values()))}


def sum_totals(groups: Any) -> Totals:
    s = Totals()
    for t in groups:
        for f in ("requests", "input_tokens", "output_tokens", "cached_tokens", "micro_usd", "saved_tokens",
                  "saved_micro_usd", "unknown"):
            setattr(s, f, getattr(s, f) + getattr(t, f))
    return s


def format_totals(groups: Mapping[str, Totals], by: str | None) -> str:
    """The table ``tollgate spend`` prints (``unknown``: records of holds that expired unsettled)."""
    head = (f"{(by or 'scope'):<32} {'requests':>9} {'unknown':>8} {'input':>12} {'cached':>12} {'output':>12} "
            f"{'cost (USD)':>14}")

    def line(name: str, t: Totals) -> str:
        return (f"{name:<32} {t.requests:>9} {t.unknown:>8} {t.input_tokens:>12} {t.cached_tokens:>12} "
                f"{t.output_tokens:>12} {t.micro_usd / MICROS_PER_USD:>14.6f}")

    lines = [head, *(line(name, t) for name, t in groups.items())]
    if len(groups) > 1:
        lines.append(line("total", sum_totals(groups.values())))
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
    return SqliteLedger(settings.ledger_path or "quota.sqlite3")


class RedisLedger:
    def __init__(
        self, client: aioredis.Redis, *, hash_tag: str = "tollgate", dedupe_seconds: float = DEFAULT_DEDUPE_SECONDS,
        owns_client: bool = True,
    ) -> None:
        self._client = client
        self._owns_client = owns_client  # False when the quota store shares (and closes) the client
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

    async def trim(self, before: float) -> int:
        """Whole stream nodes (about 100 entries each) older than ``before``: Redis's cheap, approximate trim,
        so up to one node's worth of older records may stay until the next call. Needs Redis 6.2 (MINID)."""
        try:
            return int(await self._client.xtrim(self._stream, minid=str(int(before * 1000)), approximate=True,
                                                limit=TRIM_STEP))
        except (RedisError, OSError) as e:
            raise QuotaUnavailable(f"the usage ledger (Redis) is unavailable: {e}") from e

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()


class SqliteLedger:
    """The ledger table of an embedded state file.

    With ``writer`` (the running store's ``StateFile``) appends go through
    the store's one writer thread; without it (``tollgate spend`` beside a
    running gateway) the ledger is read-only: WAL mode lets it read while the
    gateway writes.
    """

    def __init__(self, path: str | os.PathLike[str], *, writer: StateFile | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self._path = Path(path)
        self._writer = writer
        self._clock = clock

    async def append(self, record: UsageRecord) -> bool:
        if self._writer is None:
            raise QuotaUnavailable(f"the ledger {self._path} is open read-only")
        self._writer.record(replace(record, time=self._clock.now()))
        return await self._writer.waiter(answers_last_record=True)

    async def records(self, *, since: float, until: float | None = None) -> AsyncIterator[UsageRecord]:
        if self._writer is not None:
            self._writer.flush()  # what this process settled a moment ago is part of the answer
        for r in await asyncio.to_thread(self._read, since, until):
            yield r

    async def trim(self, before: float) -> int:
        """In deletes of ``SQLITE_TRIM_CHUNK`` rows (~3 ms each on the loop, measured), with the loop given
        back between them: a first trim of a long history never holds requests for the whole step."""
        if self._writer is None:
            raise QuotaUnavailable(f"the ledger {self._path} is open read-only")
        dropped = 0
        while dropped < TRIM_STEP:
            n = self._writer.trim(before, SQLITE_TRIM_CHUNK)
            dropped += n
            if n < SQLITE_TRIM_CHUNK:
                break
            await asyncio.sleep(0)
        return dropped

    def _read(self, since: float, until: float | None) -> list[UsageRecord]:
        if not self._path.exists():
            return []
        db = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True)
        try:
            db.execute("pragma busy_timeout=5000")
            sql = f"select {', '.join(LEDGER_COLUMNS)} from ledger where time >= ?"
            args: list[float] = [since]
            if until is not None:
                sql += " and time < ?"
                args.append(until)
            try:
                rows = db.execute(sql + " order by time, seq", args).fetchall()
            except sqlite3.OperationalError as e:
                if "no such table" in str(e):
                    return []
                raise
        finally:
            db.close()
        return [UsageRecord(**dict(zip(LEDGER_COLUMNS, row, strict=True))) for row in rows]

    async def close(self) -> None:
        return None
