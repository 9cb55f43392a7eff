"""The guardrails stage: the request's texts before the cache and quota see them, the answer on its way back.

``Guardrails.check_request`` runs in the router stage right after the body
checks: it scans every text of the request under the caller's policy (team,
else alias, else org), counts what fired, and then blocks (a 400
``guardrail_violation`` naming the rule, never the text), redacts (the body the
provider gets holds only placeholders), or lets it pass. A request whose texts
add up to ``offload_chars`` or more is scanned in a worker thread (at most two
at a time) so the event loop keeps serving others. ``check_answer`` does the
same for a whole answer; ``stream_guard`` gives a streamed answer its sliding
window (stream.py). In shadow mode everything is scanned and counted and
nothing is changed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from extproc.errors import GuardrailViolation
from extproc.guardrails.chat import Slot, answer_slots, request_slots
from extproc.guardrails.engine import Engine, Redactor, Verdict
from extproc.guardrails.findings import Finding
from extproc.guardrails.metrics import GuardrailMetrics
from extproc.guardrails.settings import GuardrailSettings, Policy
from extproc.guardrails.stream import StreamGuard


@dataclass(slots=True)
class GuardState:
    """What the guardrails decided for one exchange (kept on it for the answer, the header and the access log)."""

    policy: Policy
    redactor: Redactor = field(default_factory=Redactor)
    input: Verdict | None = None
    output: Verdict | None = None
    redacted: bool = False  # the request body now differs from the client's

    def header(self) -> str:
        return ", ".join(v.header() for v in (self.input, self.output) if v is not None and v.actions)

    def summary(self) -> dict[str, Any]:
        """For the access log: rules and counts, never text."""
        out: dict[str, Any] = {"mode": self.policy.mode}
        for name, v in (("input", self.input), ("output", self.output)):
            if v is not None and v.fired:
                out[name] = {r: {"count": n, "action": v.actions[r]} for r, n in v.fired.items()}
        return out


class Guardrails:
    def __init__(self, settings: GuardrailSettings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.engine = Engine(settings)
        self.metrics = GuardrailMetrics(registry or CollectorRegistry())
        self._workers: asyncio.Semaphore | None = None

    # ------------------------------------------------------------------ requests
    def check_request(self, ex: Any) -> Coroutine[Any, Any, None] | None:
        """Scan ``ex``'s request; raises GuardrailViolation to block. A coroutine when the scan goes off-loop."""
        policy = self.settings.policy_for(ex.team, ex.alias)
        ex.guardrails = state = GuardState(policy)
        slots = request_slots(ex.body, ex.endpoint)
        if sum(len(s.text) for s in slots) >= self.settings.offload_chars:
            return self._offloaded(ex, state, slots)
        self._decide(ex, state, slots, self._scan_slots(slots, policy))
        return None

    async def _offloaded(self, ex: Any, state: GuardState, slots: list[Slot]) -> None:
        if self._workers is None:
            self._workers = asyncio.Semaphore(2)
        async with self._workers:
            found = await asyncio.to_thread(self._scan_slots, slots, state.policy)
        self._decide(ex, state, slots, found)

    def _scan_slots(self, slots: list[Slot], policy: Policy) -> list[list[Finding]]:
        return [self.engine.scan(s.text, policy, role=s.role) for s in slots]

    def _decide(self, ex: Any, state: GuardState, slots: list[Slot], found: list[list[Finding]]) -> None:
        policy = state.policy
        v = state.input = Verdict(policy.mode)
        for fs in found:
            v.add(fs, policy)
        if not v.fired:
            return
        self.metrics.count(v, "input")
        if v.blocked_by is not None:
            raise GuardrailViolation(v.blocked_by, "request", headers={"x-tollgate-guardrails": v.header()})
        if policy.mode == "enforce" and "redact" in v.actions.values():
            for slot, fs in zip(slots, found):
                if fs:
                    new = state.redactor.apply(slot.text, fs, policy)
                    if new != slot.text:
                        slot.set(new)
                        state.redacted = True
            if state.redacted:
                ex.raw_body = json.dumps(ex.body, ensure_ascii=False, separators=(",", ":")).encode()

    # ------------------------------------------------------------------ answers
    def check_answer(self, ex: Any, body: bytes) -> bytes | None:
        """A whole answer: the new body when something was redacted, else None; raises to block."""
        state: GuardState | None = ex.guardrails
        if state is None or not self.settings.output or b'"choices"' not in body:
            return None
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        slots = answer_slots(obj)
        policy = state.policy
        found = [self.engine.scan(s.text, policy, role="assistant", output=True) for s in slots]
        v = state.output = Verdict(policy.mode)
        for fs in found:
            v.add(fs, policy)
        if not v.fired:
            return None
        self.metrics.count(v, "output")
        if v.blocked_by is not None:
            raise GuardrailViolation(v.blocked_by, "answer", headers={"x-tollgate-guardrails": state.header()})
        if policy.mode != "enforce" or "redact" not in v.actions.values():
            return None
        for slot, fs in zip(slots, found):
            if fs:
                slot.set(state.redactor.apply(slot.text, fs, policy))
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()

    def stream_guard(self, ex: Any) -> StreamGuard | None:
        state: GuardState | None = ex.guardrails
        if state is None or not self.settings.output:
            return None
        g = StreamGuard(self.engine, state.policy, state.redactor, self.settings.stream_window)
        state.output = g.verdict
        return g

    def stream_done(self, ex: Any) -> None:
        """Count a streamed answer's decisions once, when it ends."""
        state: GuardState | None = ex.guardrails
        if state is not None and state.output is not None and state.output.fired:
            self.metrics.count(state.output, "output")


def guard_stage(rt: Any) -> Callable[[Any], Coroutine[Any, Any, None] | None] | None:
    """The input stage (see ``pipeline.router.build_stages``); None without a guardrails section."""
    guard: Guardrails | None = rt.guardrails
    if guard is None:
        return None
    return guard.check_request
