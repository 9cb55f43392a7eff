"""The composition root: everything one running gateway shares between exchanges."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from extproc.cache.build import build_cache
from extproc.cache.stage import CacheStage
from extproc.telemetry.access_log import access_record
from extproc.auth.authenticator import Authenticator
from extproc.auth.build import build_authenticator, wait_budget
from extproc.config import GatewayConfig, environment
from extproc.guardrails.stage import Guardrails
from extproc.credentials.secrets import redis_password
from extproc.credentials.vault import CredentialVault
from extproc.pipeline.exchange import Exchange, Exchanges
from extproc.pipeline.admission import settle
from extproc.telemetry.metrics import Metrics
from extproc.providers.base import Usage
from extproc.quota.build import build_governor as build_quota_governor
from extproc.quota.governor import Governor
from extproc.quota.limits import MICROS_PER_USD
from extproc.quota.prices import DEFAULT_PRICES, PriceTable
from extproc.quota.settings import ANY
from extproc.quota.tokenizer import Tokenizer

log = logging.getLogger("tollgate")


@dataclass
class Runtime:
    config: GatewayConfig
    vault: CredentialVault
    exchanges: Exchanges
    access_log: logging.Logger
    metrics: Metrics
    auth: Authenticator | None = None  # None in auth.mode none: every request is anonymous
    governor: Governor | None = None  # None without a quota section: nothing is counted or limited
    prices: PriceTable = field(default_factory=lambda: PriceTable(DEFAULT_PRICES))  # what answers cost
    cache: CacheStage | None = None  # None without a cache section: every answer says bypass
    guardrails: Guardrails | None = None  # None without a guardrails section: nothing is scanned
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def release(self, ex: Exchange) -> None:
        """One stream of ``ex`` is done; the last one settles its quota hold, records metrics and the access log.

        Settling talks to the store, so it runs as a task of its own: a closing
        stream (even one Envoy reset) never waits for it, and it runs once.
        """
        if not self.exchanges.release(ex):
            return
        if ex.admission is None or self.governor is None:
            self._record(ex)
        else:
            self.spawn(self._settle(self.governor, ex))

    async def _settle(self, gov: Governor, ex: Exchange) -> None:
        try:
            record = await settle(gov, ex)
            ex.cost_usd = record.micro_usd / MICROS_PER_USD
            if not ex.answer_complete and record.input_tokens:  # no (final) provider usage: what was billed
                ex.usage = Usage(record.input_tokens, record.output_tokens, record.cached_tokens)
        except Exception:
            log.exception("could not settle the quota hold of request %s", ex.request_id)
        finally:
            self._record(ex)

    def cost_micros(self, ex: Exchange) -> int | None:
        """What the provider's reported usage cost, at the configured prices; None when unknown or unpriced."""
        u, model = ex.usage, ex.target_model
        if u is None or model is None or self.prices.find(model) is None:
            return None
        return self.prices.cost(model, u, cache_write_tokens=u.cache_write_tokens)

    def _record(self, ex: Exchange) -> None:
        if ex.admission is None and not ex.cost_usd:  # no quota settlement priced it: price the usage
            micros = self.cost_micros(ex)
            if micros:
                ex.cost_usd = micros / MICROS_PER_USD
        now = time.monotonic()
        self.metrics.observe(ex, now)
        self.access_log.info(access_record(ex, now))

    def spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``work`` on the loop, kept until it is done (and awaited by ``close``)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Let every pending settlement finish, then flush and close the cache, the quota store and ledger.

        No fixed cut: a settlement is one store call bounded by the store's own
        timeouts (one that fails goes to the governor's backlog, which
        ``Governor.close`` replays while the store answers), so waiting for all
        of them ends, and stopping never drops a record.
        """
        while self._tasks:
            await asyncio.wait(set(self._tasks))
        if self.cache is not None:
            await self.cache.close()
        if self.governor is not None:
            await self.governor.close()


def build_runtime(config: GatewayConfig, env: dict[str, str] | None = None, *, defer_governor: bool = False) -> Runtime:
    """Everything the data path needs. ``defer_governor``: leave the quota governor for ``attach_governor``
    (a standby must not open the embedded state file while the server it will replace holds it)."""
    env = environment() if env is None else env
    password = redis_password(config.redis, env)
    quota_teams = {t for t in config.quota.teams if t != ANY} if config.quota else set()
    metrics = Metrics(config, teams={*config.teams, *quota_teams})
    rt = Runtime(
        config=config,
        vault=CredentialVault(config.providers, env, wait_budget=wait_budget(config),
                              on_quarantine=metrics.key_quarantined),
        exchanges=Exchanges(),
        access_log=logging.getLogger("tollgate.access"),
        metrics=metrics,
        auth=build_authenticator(config, password),
        governor=None if defer_governor else build_governor(config, password, metrics),
        prices=config.quota.prices if config.quota else PriceTable(DEFAULT_PRICES),
        guardrails=Guardrails(config.guardrails, metrics.registry) if config.guardrails else None,
    )
    rt.cache = build_cache(config.cache, registry=metrics.registry, metrics_on=metrics.enabled, spawn=rt.spawn,
                           ledger=rt.governor.ledger if rt.governor else None, cost_of=rt.cost_micros,
                           redis_password=password)
    return rt


def attach_governor(rt: Runtime, *, tokenizer: Tokenizer | None = None) -> None:
    """Open the quota store a deferred runtime left out, and hand its ledger to the cache."""
    password = redis_password(rt.config.redis, environment())
    rt.governor = build_governor(rt.config, password, rt.metrics, tokenizer=tokenizer)
    if rt.cache is not None and rt.governor is not None:
        rt.cache.ledger = rt.governor.ledger


def build_governor(config: GatewayConfig, redis_password: str | None, metrics: Metrics,
                   tokenizer: Tokenizer | None = None) -> Governor | None:
    q = config.quota
    if q is None:
        return None
    r = config.redis
    return build_quota_governor(q, redis_url=r.url if r is not None else None, redis_password=redis_password,
                                on_store_error=lambda op: metrics.quota_store_error(op, q.on_store_error),
                                tokenizer=tokenizer)
