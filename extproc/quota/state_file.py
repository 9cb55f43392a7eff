"""The embedded store's state on disk: one SQLite file in WAL mode, committed in batches.

Why SQLite and not an append-only log with snapshots: Python's standard
library has it; a batched transaction of upserts keeps the file bounded by
the number of counters (a log must be compacted, and replayed on start);
``tollgate spend`` reads the ledger by an index on time while the gateway
writes (WAL). Measured (``python -m tests.bench.quota``, README "Quotas"):
a reserve that waits for its commit costs tenths of a millisecond.

How it stays constant-time: the store changes its in-memory dicts as before
and tells this file which keys changed (a dict assignment). A commit writes
one transaction holding the latest value of each changed bucket and budget
counter, the holds opened or closed and the new ledger records, so its size
follows what changed, not the traffic or the ledger's length. The changes of
one store operation are made on the event loop between two awaits, so a batch
always holds whole operations, never half of one.

When it commits: at the end of the loop iteration in which someone awaits a
commit (a reserve, a public ``append``), all of that iteration's changes in
one transaction; otherwise (settlements and their records: nobody waits) at
most ``LAZY_SECONDS`` later. A commit runs on the loop: it is a ``write()``
of a few pages to the WAL, no ``fsync`` (``synchronous=NORMAL``), measured
below a tenth of a millisecond for a batch; a thread was measured first and
lost: handing each batch to a writer thread cost a reserve ~5 ms at 32
concurrent callers (the GIL's 5 ms switch interval), against ~0.3 ms here.
The one ``fsync`` of WAL mode, the checkpoint, is what goes to a thread: SQLite
would run it inside the commit that crosses 1,000 WAL pages, stalling the loop
(measured 95 µs wall per commit on average with it, 43 µs without, the same
CPU); a worker thread runs a ``passive`` one every ``CHECKPOINT_COMMITS``.

What survives what: once ``COMMIT`` returns the data is in the operating
system's hands, so it survives the process being killed (not a power cut).
Every committed state is a consistent cut of the store: budget counters,
open holds and ledger records agree. A reserve waits for its commit before
the request goes on, so a request that reached a provider always has its
hold on disk. After a crash the holds still open in the file belonged to the
dead process: ``load`` turns each into a ledger record (outcome ``unknown``,
amount = what it charged), in one transaction, before the store serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from extproc.config import ConfigError
from extproc.quota.records import UsageRecord

SCHEMA = """
create table if not exists buckets (key text primary key, units integer not null, last_ms integer not null);
create table if not exists spent (key text primary key, micro_usd integer not null);
create table if not exists holds (id text primary key, tokens integer not null, micro_usd integer not null,
                                  record text);
create table if not exists ledger (
  seq integer primary key autoincrement, request_id text not null unique, time real not null,
  principal text not null, team text not null, alias text not null, provider text not null, model text not null,
  input_tokens integer not null, output_tokens integer not null, cached_tokens integer not null,
  micro_usd integer not null, cache_status text not null, saved_tokens integer not null,
  saved_micro_usd integer not null, outcome text not null);
create index if not exists ledger_time on ledger (time);
"""
_log = logging.getLogger("tollgate.quota")
LEDGER_COLUMNS = ("request_id", "time", "principal", "team", "alias", "provider", "model", "input_tokens",
                  "output_tokens", "cached_tokens", "micro_usd", "cache_status", "saved_tokens", "saved_micro_usd",
                  "outcome")
_INSERT = (f"insert into ledger ({', '.join(LEDGER_COLUMNS)}) values ({', '.join('?' * len(LEDGER_COLUMNS))})")
_INSERT_NEW = _INSERT.replace("insert", "insert or ignore", 1)
_UPSERT = _INSERT + " on conflict(request_id) do update set " + ", ".join(
    f"{c} = excluded.{c}" for c in LEDGER_COLUMNS[1:])


LAZY_SECONDS = 0.05  # the longest a settlement waits to be committed (a SIGKILL meanwhile: see load)
CHECKPOINT_COMMITS = 200  # commits between two checkpoints of the WAL into the file, run off the loop


class StateFileBusy(ConfigError):
    """Another process has the embedded state file open (one gateway per file): ``tollgate run`` says so
    and exits 2, as for a config it cannot use (set ``quota.ledger.path``, or use Redis)."""


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[bool]
    index: int = -1  # the ledger row whose insertion answers it (-1: answered True once committed)


@dataclass(slots=True)
class _Batch:
    buckets: dict[str, tuple[int, int]] = field(default_factory=dict)
    spent: dict[str, int] = field(default_factory=dict)
    holds: dict[str, tuple[int, int, str | None] | None] = field(default_factory=dict)  # None: closed
    records: list[tuple[UsageRecord, bool]] = field(default_factory=list)  # (record, replace an earlier one)
    waiters: list[_Waiter] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.buckets or self.spent or self.holds or self.records or self.waiters)


@dataclass(slots=True)
class Loaded:
    buckets: dict[str, tuple[int, int]]
    spent: dict[str, int]
    recovered: int  # holds of a dead process written to the ledger as ``unknown``


def ledger_row(r: UsageRecord) -> tuple[Any, ...]:
    return tuple(getattr(r, c) for c in LEDGER_COLUMNS)


def connect_file(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("pragma journal_mode=wal")
    db.execute("pragma synchronous=normal")
    db.execute("pragma busy_timeout=5000")
    return db


class StateFile:
    """The writer side: one per embedded store, holding an exclusive lock on ``path``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lockfile = open(self.path.with_name(self.path.name + ".lock"), "a+")  # noqa: SIM115
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.close()
            raise StateFileBusy(f"another tollgate process is using the quota state file {self.path} "
                                "(give each gateway its own quota.ledger.path, or share budgets through Redis)") from None
        self._db = connect_file(self.path)
        self._db.executescript(SCHEMA)
        # SQLite's own checkpoint runs inside the COMMIT that crosses 1000 WAL pages and fsyncs there: on
        # the loop, a stall of milliseconds for every request in flight. It is done on a thread instead.
        self._db.execute("pragma wal_autocheckpoint=0")
        self._checkpointing: asyncio.Future[None] | None = None
        self._since_checkpoint = 0
        self._pending = _Batch()
        self._soon: asyncio.Handle | None = None  # a commit at the end of this loop iteration (someone waits)
        self._later: asyncio.TimerHandle | None = None  # a lazy commit (settlements: nobody waits)
        self._failed: BaseException | None = None
        self.commits = 0

    # -- start and stop

    def load(self, now: float) -> Loaded:
        """Read the counters back and turn the holds a dead process left open into ``unknown`` records."""
        db = self._db
        buckets = {k: (u, t) for k, u, t in db.execute("select key, units, last_ms from buckets")}
        spent = dict(db.execute("select key, micro_usd from spent").fetchall())
        holds = db.execute("select id, tokens, micro_usd, record from holds").fetchall()
        db.execute("begin immediate")
        for rid, tokens, micro, raw in holds:
            base = _record_from_json(raw, rid)
            db.execute(_UPSERT, ledger_row(replace(base.expired(tokens, micro), time=now)))
        db.execute("delete from holds")
        db.execute("commit")
        return Loaded(buckets, spent, len(holds))

    def close(self) -> None:
        """Commit everything pending, then release the file."""
        for handle in (self._soon, self._later):
            if handle is not None:
                handle.cancel()
        self.flush()
        self._db.execute("pragma wal_checkpoint(truncate)")  # waits for a checkpoint thread still running
        self._db.close()
        fcntl.flock(self._lockfile, fcntl.LOCK_UN)
        self._lockfile.close()

    # -- changes (cheap dict writes; the commit is scheduled on the running loop)

    def bucket(self, key: str, units: int, last_ms: int) -> None:
        self._changed()
        self._pending.buckets[key] = (units, last_ms)

    def spend(self, key: str, micro_usd: int) -> None:
        self._changed()
        self._pending.spent[key] = micro_usd

    def hold(self, rid: str, tokens: int, micro_usd: int, record: UsageRecord | None) -> None:
        self._changed()
        self._pending.holds[rid] = (tokens, micro_usd, _record_to_json(record))

    def release(self, rid: str) -> None:
        self._changed()
        self._pending.holds[rid] = None

    def record(self, record: UsageRecord, *, replace: bool = False) -> None:
        self._changed()
        self._pending.records.append((record, replace))

    def waiter(self, *, answers_last_record: bool = False) -> asyncio.Future[bool]:
        """A future resolved once what is pending now is committed (with whether the last record was new)."""
        loop = asyncio.get_running_loop()
        w = _Waiter(loop.create_future(), len(self._pending.records) - 1 if answers_last_record else -1)
        self._pending.waiters.append(w)
        if self._soon is None:
            self._soon = loop.call_soon(self.flush)
        return w.future

    def _writable(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"the quota state file {self.path} cannot be written: {self._failed}")

    def _changed(self) -> None:
        self._writable()
        if self._later is None and self._soon is None:
            with contextlib.suppress(RuntimeError):  # no running loop (start-up, close): close() commits
                self._later = asyncio.get_running_loop().call_later(LAZY_SECONDS, self._lazy)

    def _lazy(self) -> None:
        # The timer outlives the commits made before it fires (flush leaves it armed): arming and cancelling
        # one per commit cost more than the commit's SQL. A change made after it was armed is then committed
        # sooner than LAZY_SECONDS, never later.
        self._later = None
        if self._pending:
            self.flush()

    def trim(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` of the oldest ledger rows older than ``before`` (by the time index), in a
        transaction of their own on the loop, like a commit; how many went."""
        self._writable()
        return self._db.execute("delete from ledger where seq in "
                                "(select seq from ledger where time < ? order by time limit ?)",
                                (before, limit)).rowcount

    # -- committing

    def flush(self) -> None:
        """Commit what is pending in one transaction and answer whoever waits for it."""
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        batch, self._pending = self._pending, _Batch()
        try:
            new = self._commit(batch)
        except BaseException as e:  # a full disk: every later change fails loudly (see _changed)
            self._failed = e
            for w in batch.waiters:
                if not w.future.done():
                    w.future.set_exception(RuntimeError(f"the quota state file cannot be written: {e}"))
            raise
        for w in batch.waiters:
            if not w.future.done():
                w.future.set_result(new[w.index] if w.index >= 0 else True)

    def _commit(self, batch: _Batch) -> list[bool]:
        new: list[bool] = []
        if not (batch.buckets or batch.spent or batch.holds or batch.records):
            return new
        db = self._db
        db.execute("begin immediate")
        try:
            if batch.buckets:
                db.executemany("insert or replace into buckets values (?, ?, ?)",
                               [(k, u, t) for k, (u, t) in batch.buckets.items()])
            if batch.spent:
                db.executemany("insert or replace into spent values (?, ?)", list(batch.spent.items()))
            gone = [(rid,) for rid, hold in batch.holds.items() if hold is None]
            if gone:
                db.executemany("delete from holds where id = ?", gone)
            kept = [(rid, *hold) for rid, hold in batch.holds.items() if hold is not None]
            if kept:
                db.executemany("insert or replace into holds values (?, ?, ?, ?)", kept)
            for record, again in batch.records:
                new.append(db.execute(_UPSERT if again else _INSERT_NEW, ledger_row(record)).rowcount == 1)
            db.execute("commit")
        except BaseException:
            db.execute("rollback")
            raise
        self.commits += 1
        self._since_checkpoint += 1
        if self._since_checkpoint >= CHECKPOINT_COMMITS and self._checkpointing is None:
            self._checkpoint_soon()
        return new

    @property
    def checkpointing(self) -> bool:
        """Whether a checkpoint is running on its thread."""
        return self._checkpointing is not None

    def _checkpoint_soon(self) -> None:
        """Copy the WAL into the database file on a worker thread (one at a time, every
        ``CHECKPOINT_COMMITS`` commits, never per request). A ``passive`` checkpoint neither waits for nor
        blocks the writer; its fsync is what would otherwise stall the loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (start-up, close): close() checkpoints
        self._since_checkpoint = 0
        self._checkpointing = loop.run_in_executor(None, _checkpoint, self.path)
        self._checkpointing.add_done_callback(self._checkpointed)

    def _checkpointed(self, done: asyncio.Future[None]) -> None:
        self._checkpointing = None
        if not done.cancelled() and done.exception() is not None:
            # the next commits go on in the WAL, which grows until a checkpoint succeeds: worth a line
            _log.warning("checkpoint of the quota state file %s failed: %s", self.path, done.exception())


def _checkpoint(path: Path) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("pragma busy_timeout=5000")
        db.execute("pragma wal_checkpoint(passive)")
    finally:
        db.close()


_RECORD_FIELDS = tuple(f.name for f in fields(UsageRecord))


def _record_to_json(r: UsageRecord | None) -> str | None:
    # not dataclasses.asdict: it deep-copies every field, a third of a hold's cost (its fields are scalars)
    return None if r is None else json.dumps({f: getattr(r, f) for f in _RECORD_FIELDS}, separators=(",", ":"))


def _record_from_json(raw: str | None, rid: str) -> UsageRecord:
    if not raw:
        return UsageRecord(rid, "", "", "", "", "", 0, 0, 0, 0, outcome="unknown")
    return UsageRecord(**json.loads(raw))
