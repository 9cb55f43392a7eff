"""Quotas on the data path: admit an exchange before routing, settle it when it ends.

The gateway stage calls ``admit`` once the request is parsed and its caller
known; the hold it gets (an ``Admission``) rides on the exchange, where each
preparation of a target reads its output cap (``upstream.prepare``), and the
answer (``answer.py``) its ``x-ratelimit-*`` headers and the meter of a
stream. When the last stream holding the exchange closes, ``Runtime.release``
(runtime.py) schedules ``settle``, which bills what is known of the answer
(``outcome_of``) exactly once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from extproc.errors import QuotaExceeded
from extproc.pipeline.exchange import Exchange
from extproc.telemetry.metrics import Metrics
from extproc.quota.governor import Admission, Caller, Governor, Outcome
from extproc.quota.ledger import UsageRecord

if TYPE_CHECKING:  # the runtime settles through this module; stages only need its type
    from extproc.pipeline.base import Stage
    from extproc.pipeline.runtime import Runtime

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


async def admit(gov: Governor, metrics: Metrics, ex: Exchange, models: Sequence[str], spawn: Spawn) -> None:
    """Reserve ``ex``'s worst case (streams: its prompt and one slice) in every scope, or raise 429/503.

    ``models`` are the alias's targets in fallback order: the first one's
    tokenizer counts the prompt, and the hold is priced at the dearest of
    them. If Envoy gives up on the exchange while the store is answering
    (the client left, or the server is stopping), a hold that was granted
    anyway is settled as unused instead of expiring into a charge. The
    store call runs as a ``spawn``ed task, so a stopping server waits for
    it (and that settlement) before it closes the store.
    """
    caller = Caller(ex.request_id, ex.principal, ex.team, ex.alias)
    task = spawn(gov.admit(ex.body, caller=caller, model=models[0], stream=ex.stream, endpoint=ex.endpoint,
                           fallbacks=models[1:]))
    try:
        admission = await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda t: _release_unused(t, spawn))
        raise
    except QuotaExceeded as e:
        metrics.quota_rejected(e.scope_kind, e.kind)
        raise
    ex.admission = admission
    metrics.budgets(admission.reservation.states)


def _release_unused(task: asyncio.Future[Admission], spawn: Spawn) -> None:
    if not task.cancelled() and task.exception() is None:
        spawn(task.result().finish(None, provider="", outcome="unsent"))


def outcome_of(ex: Exchange) -> Outcome:
    """What can be billed for the exchange's last attempt (see ``Outcome`` in governor.py)."""
    if ex.upstream_sent_at is None:
        return "unsent"
    status = ex.last_attempt_status
    if status is None:
        return "unknown"  # asked, never answered (the client left, or the provider went silent)
    if not 200 <= status < 300:
        return "failed"
    if ex.answer_complete:
        return "complete"
    return "partial" if ex.streamed else "unknown"


async def settle(gov: Governor, ex: Exchange) -> UsageRecord:
    """Replace ``ex``'s hold by what it used, and record it in the ledger; once per exchange."""
    admission = ex.admission
    assert admission is not None
    usage = ex.usage
    # The configured target model is what prices are keyed by (an Azure deployment name may only be
    # priced under its model's name, which the answer carries); the admitted model is always priced.
    model = gov.priced(ex.target_model, ex.response_model) or admission.model
    return await admission.finish(
        usage, provider=ex.provider or "", model=model, cache_status=ex.cache,
        cache_write_tokens=usage.cache_write_tokens if usage is not None else 0, outcome=outcome_of(ex),
    )


def admit_stage(rt: Runtime) -> Stage | None:
    """The quota stage (see ``router.build_stages``); None without a quota section."""
    gov = rt.governor
    if gov is None:
        return None
    models_of = {name: [t.model for t in a.targets] for name, a in rt.config.models.items()}

    async def admit_exchange(ex: Exchange) -> None:
        # counted as the first target, held at the dearest
        await admit(gov, rt.metrics, ex, models_of[ex.alias], rt.spawn)

    return admit_exchange
