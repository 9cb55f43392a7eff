"""The one object the request path talks to about tokens and money.

Per request::

    admission = await governor.admit(body, caller=Caller(...), model=target_model, stream=stream)
        # before routing: counts the prompt (400 if it cannot fit the model's context window), reserves
        # prompt + max output (streams: + one slice) in every scope at once; raises QuotaExceeded 429
        # (or UnpricedModel 400, QuotaUnavailable 503)
    admission.output_cap                           # a non-streamed request without a cap gets this one upstream
    response headers += admission.headers()        # x-ratelimit-*-tokens
    admission.count_output(delta_text)             # per streamed chunk: go, wait (await top_up()) or stop
    await admission.on_output(delta_text)          # the same, awaiting: raises 429 when a top-up is refused
    record = await admission.finish(usage, provider=..., model=answering_model, outcome=...)
        # when the exchange ends: settles the difference exactly once, appends the ledger record

``finish`` bills by what is known of the answer (``Outcome``): the provider's
usage when it sent it; for a stream that ended early, the prompt plus the
output that passed (the provider's counts where it gave them, else ours);
nothing for an error answer or when no provider was reached; and the whole
reservation when a provider was asked but no answer was seen (the client
left first): the provider bills such work, so the gateway never charges less.

Settling and recording are one store call (``QuotaStore.settle`` with the
record): the ledger entry is written atomically with the budget change, and
every hold carries the record its expiry writes (outcome ``unknown``, the
amount it charged), so a sidecar killed mid-request leaves budgets and
ledger in agreement. With no limit for a caller (a quota section with prices
and no ``limits``: "a ledger without holds") nothing is held; ``finish``
only appends the record.

With ``on_store_error: fail_open`` a store outage admits against a local
memory store holding each limit divided by ``replicas`` (counted in
``store_errors`` and logged); the request is settled there, then *charged*
to the shared store (``QuotaStore.charge``: added without a limit check,
and recorded, once per request id) as soon as it answers again, so the
shared budgets and the ledger see all of the outage's spend exactly once.

A settle, charge or ledger append that fails (the store is down as the
request ends) is kept in a bounded backlog and replayed oldest first after
the next request that settles normally, and every 5 seconds by the
governor's own task (``start``) (which also reaps expired leases, so a dead
sidecar's holds reach the ledger without traffic). Each is idempotent by
request id, so a replay never counts twice. ``close`` replays what is left
and flushes the store before the process exits. With Redis, the backlog is
also kept on disk (``spool.Spool``, written only while the store fails):
what a process could not settle before it stopped or was killed during an
outage is replayed by the next one on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from extproc.errors import GatewayError
from extproc.providers.base import Usage
from extproc.quota.calendar import zone
from extproc.quota.clock import SYSTEM_CLOCK, Clock
from extproc.quota.context import ContextWindows
from extproc.quota.ledger import Ledger
from extproc.quota.records import UsageRecord
from extproc.quota.limits import Rejection, Reservation, ScopeLimits
from extproc.quota.memory_store import MemoryQuotaStore
from extproc.quota.policy import QuotaPolicy, scaled
from extproc.quota.prices import UsageLike
from extproc.quota.settings import QuotaSettings
from extproc.quota.spool import Kind, Pending, Spool
from extproc.quota.store import QuotaStore, QuotaUnavailable
from extproc.quota.tokenizer import OutputMeter, TokenCount, Tokenizer

log = logging.getLogger("tollgate.quota")
BACKLOG_LIMIT = 10_000  # unsettled / unrecorded requests kept for a replay while the store is down

Step = Literal["go", "wait", "stop"]  # what a stream may do after a chunk (Admission.count_output)
Outcome = Literal["complete", "partial", "failed", "unsent", "unknown"]
# complete: the answer ended normally (the provider's usage, else our count)
# partial:  a stream that ended early (cut by a quota, broken, client gone): the prompt and what passed
# failed:   the provider answered with an error: nothing is billed
# unsent:   no provider was reached: nothing is billed
# unknown:  a provider was asked but no answer was seen: the reservation is billed as held


@dataclass(frozen=True, slots=True)
class Caller:
    request_id: str
    principal: str | None
    team: str | None
    alias: str


@dataclass(frozen=True, slots=True)
class Plan:
    """What ``admit`` decided for one request."""

    caller: Caller
    model: str  # the model counted and priced for the reservation (the alias's first target)
    prompt: TokenCount
    max_output: int
    hold: int  # output tokens reserved up front (streams: one slice)
    inject_max_tokens: int | None  # a non-streamed request without a cap: send this one upstream
    stream: bool
    priced_as: tuple[str, ...] = ()  # holds are priced at the dearest of these (the alias's targets)
    scopes: tuple[ScopeLimits, ...] = ()  # the shared limits (a fail-open hold is charged to these later)


class Governor:
    def __init__(
        self,
        settings: QuotaSettings,
        *,
        store: QuotaStore,
        ledger: Ledger,
        tokenizer: Tokenizer,
        clock: Clock = SYSTEM_CLOCK,
        on_store_error: Callable[[str], None] | None = None,
        spool: Spool | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool  # the backlog's copy on disk, replayed by the next process if this one dies
        self.store = store
        self.ledger = ledger
        self.tokenizer = tokenizer
        self.policy = QuotaPolicy(settings)
        self.windows = ContextWindows(settings.context_windows)
        self.store_errors = 0  # shared-store failures (also reported to ``on_store_error`` with the operation)
        self._on_store_error = on_store_error
        self._backlog: deque[_Unfinished] = deque()
        self._replaying = False
        self._clock = clock
        self._local = (MemoryQuotaStore(tz=zone(settings.time_zone), clock=clock)
                       if settings.on_store_error == "fail_open" else None)
        self._maintenance: asyncio.Task[None] | None = None

    @property
    def backlog(self) -> int:
        """Finished requests whose settlement or record waits for the store."""
        return len(self._backlog)

    def start(self, every: float = 5.0) -> None:
        """Run the maintenance task every ``every`` seconds: replay the backlog, reap expired leases and drop
        ledger records older than ``quota.ledger.keep``."""
        if self._maintenance is None:
            self._load_spool()
            self._maintenance = asyncio.get_running_loop().create_task(self._maintain(every))

    def _load_spool(self) -> None:
        """Take up what an earlier process on this machine served and could not settle or record."""
        if self.spool is None:
            return
        found = [_Unfinished.from_pending(p) for p in self.spool.load() if not p.owned_by_another_live_process()]
        if found:
            log.warning("%d finished requests from an earlier run wait for the quota store (from %s): replaying",
                        len(found), self.spool.path)
            self._backlog.extendleft(reversed(found))

    async def _maintain(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                if self._backlog and not self._replaying:
                    await self.replay()
                expired = await self.store.reap()
                if expired:
                    log.warning("%d quota holds expired unsettled (their sidecar stopped): recorded as unknown",
                                expired)
                keep = self.settings.ledger_keep_seconds
                if keep is not None and await self.ledger.trim(self._clock.now() - keep):
                    log.debug("ledger records older than %s s dropped (quota.ledger.keep)", keep)
            except QuotaUnavailable:
                pass  # counted where the request path meets it; the next round tries again
            except Exception:
                log.exception("quota maintenance failed")

    async def close(self, *, patience: float = 10.0) -> None:
        """Stop maintenance, replay what waits for the store (for up to ``patience`` seconds while it
        stays down), then close the store (the embedded one commits everything) and the ledger."""
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
        deadline = asyncio.get_running_loop().time() + patience
        while self._backlog:
            await self.replay()
            if not self._backlog or asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.5)
        for item in self._backlog:
            if self.spool is not None:
                log.error("stopping with request %s neither settled nor recorded (the quota store stayed down); "
                          "kept in %s for the next start", item.record.request_id, self.spool.path)
            else:
                log.error("stopping with request %s neither settled nor recorded (the quota store stayed down); "
                          "its hold expires into an unknown record: %s", item.record.request_id, item.record)
        await self.store.close()
        await self.ledger.close()
        if self.spool is not None:
            self.spool.close()

    async def admit(
        self, body: Mapping[str, Any], *, caller: Caller, model: str, stream: bool, endpoint: str = "chat",
        fallbacks: Sequence[str] = (),
    ) -> Admission:
        """Count the prompt with ``model``'s tokenizer and hold its worst case, priced at the dearest of
        ``model`` and the ``fallbacks`` that may answer instead (so no fallback can cost more than was held)."""
        if endpoint == "embeddings":
            prompt = await asyncio.to_thread(self.tokenizer.count_embedding_input, model, body.get("input"))
            asked: Any = 0  # embeddings produce no output tokens
        else:
            prompt = await self.tokenizer.count_chat_async(model, body)
            self.windows.check(model, prompt.tokens, exact=prompt.exact)
            asked = body.get("max_completion_tokens") or body.get("max_tokens")
        max_output = asked if isinstance(asked, int) else self.settings.default_max_tokens
        hold = min(self.settings.stream_slice_tokens, max_output) if stream else max_output
        priced_as = (model, *(m for m in fallbacks if m != model))
        micro = self.estimate(priced_as, prompt.tokens, hold)
        scopes = self.policy.scopes(principal=caller.principal, team=caller.team, alias=caller.alias)
        provisional = UsageRecord(caller.request_id, caller.principal or "", caller.team or "", caller.alias, "",
                                  model, prompt.tokens, 0, 0, 0, outcome="unknown")
        result, store = await self._reserve(scopes, prompt.tokens + hold, micro, provisional)
        if isinstance(result, Rejection):
            raise result.error()
        cap = None if stream or isinstance(asked, int) else max_output
        plan = Plan(caller, model, prompt, max_output, hold, cap, stream, priced_as, scopes)
        return Admission(self, store, result, plan)

    def estimate(self, models: Sequence[str], input_tokens: int, output_tokens: int) -> int:
        """Micro-dollars to hold: the dearest of ``models`` for these tokens."""
        return max(self.settings.prices.estimate(m, input_tokens, output_tokens) for m in models)

    def priced(self, *models: str | None) -> str | None:
        """The first of ``models`` the price table knows (or any, with a default price)."""
        prices = self.settings.prices
        return next((m for m in models if m and (prices.find(m) or prices.default)), None)

    async def complete(self, item: _Unfinished) -> None:
        """Settle and record one finished request (kept for later if the store fails); then replay the backlog."""
        if await item.run(self) and self._backlog and not self._replaying:
            await self.replay()

    async def replay(self) -> None:
        """Retry, oldest first, what could not be settled or recorded before; stop at the first failure."""
        self._replaying = True
        try:
            while self._backlog:
                item = self._backlog[0]
                if not await item.run(self, quiet=True):
                    return
                self._backlog.popleft()
                log.info("settled and recorded request %s after the store came back", item.record.request_id)
        finally:
            self._replaying = False

    def keep(self, item: _Unfinished) -> None:
        if self.spool is not None and not item.spooled:
            try:
                self.spool.put(item.pending())
                item.spooled = True
            except Exception as e:  # a full or read-only disk: the memory backlog still has it
                log.error("could not keep request %s on disk in %s: %s", item.record.request_id, self.spool.path, e)
        if len(self._backlog) >= BACKLOG_LIMIT:
            lost = self._backlog.popleft()
            if lost.spooled:
                log.error("quota backlog full: request %s waits on disk for the next start", lost.record.request_id)
            else:
                log.error("quota backlog full: request %s stays as reserved (its lease expires into a charge) and "
                          "unrecorded: %s", lost.record.request_id, lost.record)
        self._backlog.append(item)

    def unspool(self, item: _Unfinished) -> None:
        if self.spool is not None:
            try:
                self.spool.drop(item.record.request_id)
            except Exception as e:  # replayed again at the next start: idempotent by request id
                log.warning("could not forget request %s in %s: %s", item.record.request_id, self.spool.path, e)
            item.spooled = item.provisional = False

    def store_failed(self, op: str) -> None:
        self.store_errors += 1
        if self._on_store_error is not None:
            self._on_store_error(op)

    async def _reserve(
        self, scopes: tuple[ScopeLimits, ...], tokens: int, micro: int, record: UsageRecord
    ) -> tuple[Reservation | Rejection, QuotaStore | None]:
        lease = self.settings.lease_seconds
        rid = record.request_id
        if not scopes:  # no limit applies: nothing to hold, the record is appended when the request ends
            return Reservation(rid, (), (), tokens, micro, self._clock.now() + lease), None
        try:
            result = await self.store.reserve(scopes, tokens, micro, lease_seconds=lease, reservation_id=rid,
                                              record=record)
            return result, self.store
        except QuotaUnavailable as e:
            self.store_failed("reserve")
            if self._local is None:
                log.error("quota store unavailable, refusing request %s (fail_closed): %s", rid, e.message)
                raise
            log.warning("quota store unavailable, admitting request %s against local limits / %d (fail_open): %s",
                        rid, self.settings.replicas, e.message)
            local = scaled(scopes, self.settings.replicas)
            result = await self._local.reserve(local, tokens, micro, lease_seconds=lease, reservation_id=rid)
            if isinstance(result, Reservation):
                self._spool_admitted(result, scopes, record.expired(tokens, micro))
            return result, self._local

    def _spool_admitted(self, held: Reservation, scopes: tuple[ScopeLimits, ...], record: UsageRecord) -> None:
        """Put a fail-open admission on disk at once, as what its hold would charge (``unknown``): if the
        process dies before the request finishes, the next one charges it, as an expired Redis hold would be
        (its ``finish`` replaces the entry, or drops it once the shared charge went through)."""
        if self.spool is None:
            return
        try:
            self.spool.put(Pending("charge", record, held, scopes, owner=os.getpid()))
        except Exception as e:  # a full or read-only disk: the request still finishes and is charged in memory
            log.error("could not keep request %s on disk in %s: %s", record.request_id, self.spool.path, e)


class Admission:
    """One admitted request's hold on the quotas, until ``finish``."""

    def __init__(self, governor: Governor, store: QuotaStore | None, reservation: Reservation, plan: Plan) -> None:
        self._g = governor
        self._store = store
        self.reservation = reservation
        self.plan = plan
        self.caller = plan.caller
        self.model = plan.model
        self.prompt = plan.prompt
        self.output_cap = plan.inject_max_tokens  # the output cap to send upstream, if the client set none
        self._covered = plan.hold  # output tokens reserved so far
        self._meter: OutputMeter = governor.tokenizer.output_meter(plan.model)
        self._finished: UsageRecord | None = None
        self._ahead = max(1, governor.settings.stream_slice_tokens // 2)  # ask for the next slice this early
        self._growing: asyncio.Task[None] | None = None  # a top-up under way
        self._refused: GatewayError | None = None  # the next slice was refused: the stream ends at the boundary

    def headers(self) -> dict[str, str]:
        return self.reservation.headers()

    @property
    def produced(self) -> int:
        """Output tokens counted so far (streams)."""
        return self._meter.tokens

    def count_output(self, text: str) -> Step:
        """Count streamed output and say what the stream may do next.

        ``go``: it is covered. Half a slice before the end of what is covered,
        the next slice is asked for in the background, so a granted slice
        costs the stream no store round trip and a refused one is known before
        the boundary. ``wait``: past the boundary with the answer not in yet
        (``await top_up()``). ``stop``: past the boundary and refused: end the
        stream now, without another store call, so as little as possible is
        produced beyond what was held.
        """
        produced = self._meter.add(text)
        if produced <= self._covered:
            if self._growing is None and self._refused is None and produced > self._covered - self._ahead:
                self._growing = asyncio.get_running_loop().create_task(self._grow())
            return "go"
        return "stop" if self._refused is not None else "wait"

    def refusal(self) -> GatewayError:
        """Why the stream must stop (after ``count_output`` said ``stop``)."""
        assert self._refused is not None
        return self._refused

    async def on_output(self, text: str) -> None:
        """Count streamed output; past the reserved slices, reserve the next one or end the stream (429)."""
        if self.count_output(text) != "go":
            await self.top_up()

    async def top_up(self) -> None:
        """Hold slices until the output counted so far is covered; raise the refusal (429, or 503) if one is refused."""
        while self._meter.tokens > self._covered:
            if self._refused is not None:
                raise self._refused
            if self._growing is None:
                self._growing = asyncio.get_running_loop().create_task(self._grow())
            grown = self._covered
            await asyncio.shield(self._growing)
            if self._covered == grown and self._refused is None:
                return  # fail open: the store is down; keep streaming, settle later

    async def _grow(self) -> None:
        """Reserve one more slice: on success it is covered; a refusal is kept for the boundary."""
        s = self._g.settings
        grow = s.stream_slice_tokens
        if self._store is None:  # nothing is held: every slice is granted
            self._covered += grow
            self._growing = None
            return
        try:
            result = await self._store.top_up(self.reservation, grow,
                                              self._g.estimate(self.plan.priced_as or (self.model,), 0, grow),
                                              lease_seconds=s.lease_seconds)
        except QuotaUnavailable as e:
            self._g.store_failed("top_up")
            if s.on_store_error == "fail_closed":
                self._refused = e
            return
        finally:
            self._growing = None
        if isinstance(result, Rejection):
            self._refused = result.error()
        else:
            self.reservation, self._covered = result, self._covered + grow

    async def finish(
        self, usage: UsageLike | None, *, provider: str, model: str | None = None, cache_status: str = "bypass",
        cache_write_tokens: int = 0, outcome: Outcome = "complete",
    ) -> UsageRecord:
        """Settle with what the answer used (see the module docstring) and record it; once."""
        if self._finished is not None:
            return self._finished
        if self._growing is not None:  # settle what was finally held, not a moving target
            await asyncio.wait([self._growing])
            if self._finished is not None:
                return self._finished
        model = model or self.model
        usage, micro = await self._billed(usage, outcome, model, cache_write_tokens)
        c = self.caller
        record = UsageRecord(c.request_id, c.principal or "", c.team or "", c.alias, provider, model,
                             usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, micro, cache_status,
                             outcome=outcome)
        self._finished = record
        await self._g.complete(_Unfinished.of(self._g, self._store, self.reservation, record, self.plan.scopes))
        return record

    async def _billed(
        self, usage: UsageLike | None, outcome: Outcome, model: str, cache_write_tokens: int
    ) -> tuple[UsageLike, int]:
        """The usage to bill and its cost in micro-dollars."""
        if outcome in ("failed", "unsent"):
            return Usage(0, 0, 0), 0
        if outcome == "unknown":  # the work may have been done: bill what was held for it
            r = self.reservation
            return Usage(self.prompt.tokens, max(0, r.tokens - self.prompt.tokens), 0), r.micro_usd
        if outcome == "partial" or (usage is None and self.plan.stream):
            output = max(await self._meter.exact(), usage.completion_tokens if usage else 0)
            usage = Usage(usage.prompt_tokens if usage else self.prompt.tokens, output,
                          usage.cached_tokens if usage else 0)
        elif usage is None:  # an answer without usage: its worst case, never 0
            usage = Usage(self.prompt.tokens, self.plan.max_output, 0)
        return usage, self._g.settings.prices.cost(model, usage, cache_write_tokens=cache_write_tokens)


class _Unfinished:
    """A finished request's settlement and ledger record, until both went through.

    ``kind`` says what is left (see ``spool.Kind``): ``settle`` a hold in the
    shared store (one call writes the budget change and the record),
    ``charge`` a fail-open admission (settled on the ``local`` store first,
    then charged to the shared store with its record) or ``append`` the record
    alone (nothing was held). ``spooled``: also kept on disk (``Spool``);
    ``provisional``: a fail-open admission's entry is on disk at its hold, to be
    replaced by this record if it must wait, or dropped once it went through.
    """

    __slots__ = ("kind", "local", "provisional", "reservation", "record", "scopes", "spooled")

    def __init__(
        self, kind: Kind, reservation: Reservation, record: UsageRecord,
        scopes: tuple[ScopeLimits, ...] = (), local: QuotaStore | None = None,
    ) -> None:
        self.kind = kind
        self.local = local  # settled (then None) before the shared charge
        self.reservation = reservation
        self.record = record
        self.scopes = scopes
        self.spooled = False
        self.provisional = False

    @classmethod
    def of(cls, g: Governor, store: QuotaStore | None, reservation: Reservation, record: UsageRecord,
           scopes: tuple[ScopeLimits, ...]) -> _Unfinished:
        """What is left for a request held in ``store`` (None: nothing was held)."""
        if store is None:
            return cls("append", reservation, record)
        if store is g.store:
            return cls("settle", reservation, record, scopes)
        item = cls("charge", reservation, record, scopes, local=store)
        item.provisional = g.spool is not None  # its admission is on disk (Governor._spool_admitted)
        return item

    @classmethod
    def from_pending(cls, p: Pending) -> _Unfinished:
        item = cls(p.kind, p.reservation, p.record, p.scopes)  # the local store died with its process
        item.spooled = True
        return item

    def pending(self) -> Pending:
        return Pending(self.kind, self.record, self.reservation, self.scopes)

    async def run(self, g: Governor, *, quiet: bool = False) -> bool:
        """Do what is left; False (and kept for later, unless ``quiet``) when the store failed."""
        r = self.record
        used = r.input_tokens + r.output_tokens
        try:
            if self.kind == "append":
                await g.ledger.append(r)
            elif self.kind == "settle":
                await g.store.settle(self.reservation, used, r.micro_usd, r)
            else:
                if self.local is not None:
                    await self.local.settle(self.reservation, used, r.micro_usd)
                    self.local = None
                await g.store.charge(self.scopes, used, r.micro_usd, reservation_id=r.request_id, record=r)
        except GatewayError as e:
            if not quiet:
                g.store_failed("charge" if self.kind == "charge" else "settle")
                log.error("could not settle and record request %s (kept to retry): %s", r.request_id, e.message)
                g.keep(self)
            return False
        if self.spooled or self.provisional:
            g.unspool(self)
        return True
