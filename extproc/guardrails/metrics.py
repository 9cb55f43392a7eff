"""``tollgate_guardrail_decisions_total{rule,action,direction,mode}``: one count per rule that fired, per request.

Rule names come from the config (built-in and custom rules), so the label set
is bounded; nothing matched is ever a label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from extproc.guardrails.engine import Verdict


class GuardrailMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "tollgate_guardrail_decisions",
            "Guardrail rules that fired, per request or answer: the rule, the action its policy names, the direction "
            "(input, output) and the mode (enforce, shadow: counted, not acted on).",
            ("rule", "action", "direction", "mode"), registry=registry)

    def count(self, verdict: Verdict, direction: str) -> None:
        for rule, action in verdict.actions.items():
            self.decisions.labels(rule, action, direction, verdict.mode).inc()
