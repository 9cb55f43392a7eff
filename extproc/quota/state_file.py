"""The embedded store's state on disk: one SQLite file in WAL mode, written in batches by one thread.

Why SQLite and not an append-only log: measured here (``tests/bench/quota_state.py``,
README "Quotas"), a batched SQLite transaction of upserts costs a few
microseconds per changed row, keeps the file bounded by the number of
counters (a log must be compacted), and gives ``tollgate spend`` indexed
reads by time while the gateway writes. Python's standard library has it.

How it stays constant-time and off the event loop: the store changes its
in-memory dicts as before and tells this file which keys changed (a dict
assignment). A writer thread swaps the pending batch out *under the store's
own lock* (so a batch always holds whole operations, never half of one) and
commits it in one transaction: the latest value of each bucket and budget
counter, the holds opened or closed, the ledger records. Coalescing makes a
batch proportional to what changed, not to the traffic.

What survives what: a commit in WAL mode with ``synchronous=NORMAL`` is in
the operating system's hands once ``COMMIT`` returns, so it survives the
process being killed (not a power cut). Every committed state is a
consistent cut of the store: budget counters, open holds and ledger records
agree. A reserve waits for its batch to be committed before the request goes
on (``durable``; a commit takes well under a millisecond), so a request that
reached a provider always has its hold on disk; settlements and records are
not waited for (they are flushed on stop). After a crash the holds still
open in the file belonged to the dead process: ``recover`` turns each into
a ledger record (outcome ``unknown``, amount = what it charged), in one
transaction, before the store serves.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

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
  micro_usd integer not null, cache_status text not null, outcome text not null);
create index if not exists ledger_time on ledger (time);
"""
LEDGER_COLUMNS = ("request_id", "time", "principal", "team", "alias", "provider", "model", "input_tokens",
                  "output_tokens", "cached_tokens", "micro_usd", "cache_status", "outcome")
_INSERT = (f"insert into ledger ({', '.join(LEDGER_COLUMNS)}) values ({', '.join('?' * len(LEDGER_COLUMNS))})")
_INSERT_NEW = _INSERT.replace("insert", "insert or ignore", 1)
_UPSERT = _INSERT + " on conflict(request_id) do update set " + ", ".join(
    f"{c} = excluded.{c}" for c in LEDGER_COLUMNS[1:])


class StateFileBusy(RuntimeError):
    """Another process has the embedded state file open (one sidecar per file)."""


@dataclass(slots=True)
class _Waiter:
    loop: asyncio.AbstractEventLoop
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
    d = asdict(r)
    return tuple(d[c] for c in LEDGER_COLUMNS)


def connect_file(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("pragma journal_mode=wal")
    db.execute("pragma synchronous=normal")
    db.execute("pragma busy_timeout=5000")
    return db


class StateFile:
    """The writer side: one per embedded store, holding an exclusive lock on ``path``."""

    def __init__(self, path: str | os.PathLike[str], lock: threading.Lock) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lockfile = open(self.path.with_name(self.path.name + ".lock"), "a+")  # noqa: SIM115
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.close()
            raise StateFileBusy(f"another tollgate process is using the quota state file {self.path}") from None
        self._db = connect_file(self.path)
        self._db.executescript(SCHEMA)
        self._store_lock = lock  # the store's lock: a batch is swapped out only between whole operations
        self._wake = threading.Condition(threading.Lock())
        self._pending = _Batch()
        self._closing = False
        self._failed: BaseException | None = None
        self.commits = 0
        self._thread = threading.Thread(target=self._run, name="tollgate-quota-state", daemon=True)

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
        self._thread.start()
        return Loaded(buckets, spent, len(holds))

    def close(self) -> None:
        """Commit everything pending, then stop the writer and release the file (blocking: run off-loop)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join()
        self._commit(self._take())  # anything added while the writer was stopping
        self._db.close()
        fcntl.flock(self._lockfile, fcntl.LOCK_UN)
        self._lockfile.close()

    # -- changes (called with the store's lock held: cheap dict writes)

    def bucket(self, key: str, units: int, last_ms: int) -> None:
        self._pending.buckets[key] = (units, last_ms)
        self._poke()

    def spend(self, key: str, micro_usd: int) -> None:
        self._pending.spent[key] = micro_usd
        self._poke()

    def hold(self, rid: str, tokens: int, micro_usd: int, record: UsageRecord | None) -> None:
        self._pending.holds[rid] = (tokens, micro_usd, _record_to_json(record))
        self._poke()

    def release(self, rid: str) -> None:
        self._pending.holds[rid] = None
        self._poke()

    def record(self, record: UsageRecord, *, replace: bool = False) -> None:
        self._pending.records.append((record, replace))
        self._poke()

    def waiter(self, *, answers_last_record: bool = False) -> asyncio.Future[bool]:
        """A future resolved once what is pending now is committed (with whether the last record was new)."""
        loop = asyncio.get_running_loop()
        w = _Waiter(loop, loop.create_future(), len(self._pending.records) - 1 if answers_last_record else -1)
        self._pending.waiters.append(w)
        self._poke()
        return w.future

    # -- the writer thread

    def _poke(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"the quota state file {self.path} cannot be written: {self._failed}")
        with self._wake:
            self._wake.notify()

    def _take(self) -> _Batch:
        with self._store_lock:
            batch, self._pending = self._pending, _Batch()
        return batch

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait(0.5)
                closing = self._closing
            batch = self._take()
            try:
                self._commit(batch)
            except BaseException as e:  # a full disk: every later change fails loudly (see _poke)
                self._failed = e
                _answer(batch.waiters, lambda w: e)
                return
            if closing:
                return

    def _commit(self, batch: _Batch) -> None:
        if not batch:
            return
        db = self._db
        new: list[bool] = []
        db.execute("begin immediate")
        try:
            if batch.buckets:
                db.executemany("insert or replace into buckets values (?, ?, ?)",
                               [(k, u, t) for k, (u, t) in batch.buckets.items()])
            if batch.spent:
                db.executemany("insert or replace into spent values (?, ?)", list(batch.spent.items()))
            for rid, hold in batch.holds.items():
                if hold is None:
                    db.execute("delete from holds where id = ?", (rid,))
                else:
                    db.execute("insert or replace into holds values (?, ?, ?, ?)", (rid, *hold))
            for record, again in batch.records:
                new.append(db.execute(_UPSERT if again else _INSERT_NEW, ledger_row(record)).rowcount == 1)
            db.execute("commit")
        except BaseException:
            db.execute("rollback")
            raise
        self.commits += 1
        _answer(batch.waiters, lambda w: new[w.index] if w.index >= 0 else True)


def _answer(waiters: list[_Waiter], value: Callable[[_Waiter], Any]) -> None:
    for w in waiters:
        v = value(w)
        try:
            w.loop.call_soon_threadsafe(_settle_future, w.future, v)
        except RuntimeError:  # that loop is closed: nobody waits any more
            pass


def _settle_future(f: asyncio.Future[bool], v: Any) -> None:
    if f.done():
        return
    if isinstance(v, BaseException):
        f.set_exception(RuntimeError(f"the quota state file cannot be written: {v}"))
    else:
        f.set_result(bool(v))


def _record_to_json(r: UsageRecord | None) -> str | None:
    return None if r is None else json.dumps(asdict(r), separators=(",", ":"))


def _record_from_json(raw: str | None, rid: str) -> UsageRecord:
    if not raw:
        return UsageRecord(rid, "", "", "", "", "", 0, 0, 0, 0, outcome="unknown")
    return UsageRecord(**json.loads(raw))
