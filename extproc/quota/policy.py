"""Which limits apply to a request: its principal, its team, the org, its model alias."""

from __future__ import annotations

from collections.abc import Mapping

from extproc.quota.limits import Budget, ScopeLimits, TokenBucket
from extproc.quota.settings import ANY, LimitSpec, QuotaSettings


class QuotaPolicy:
    def __init__(self, settings: QuotaSettings) -> None:
        self._s = settings

    def scopes(self, *, principal: str | None, team: str | None, alias: str) -> tuple[ScopeLimits, ...]:
        """The scopes to check and charge together, most specific first."""
        out: list[ScopeLimits] = []
        for kind, name, table in (("principal", principal, self._s.principals), ("team", team, self._s.teams)):
            spec = _lookup(table, name)
            if spec is not None and name:
                out.append(_scope(f"{kind}:{name}", spec))
        if self._s.org is not None:
            out.append(_scope("org", self._s.org))
        spec = _lookup(self._s.aliases, alias)
        if spec is not None:
            out.append(_scope(f"alias:{alias}", spec))
        return tuple(out)


def scaled(scopes: tuple[ScopeLimits, ...], replicas: int) -> tuple[ScopeLimits, ...]:
    """Each limit divided by ``replicas``: what one sidecar may use alone when the shared store is down."""
    if replicas <= 1:
        return scopes
    def share(n: int) -> int:
        return max(1, n // replicas)

    return tuple(
        ScopeLimits(
            s.scope,
            TokenBucket(share(s.bucket.per_minute), share(s.bucket.burst)) if s.bucket else None,
            tuple(Budget(b.period, b.limit_micro_usd // replicas) for b in s.budgets),
            TokenBucket(share(s.requests.per_minute), share(s.requests.burst)) if s.requests else None,
        )
        for s in scopes
    )


def _lookup(table: Mapping[str, LimitSpec], name: str | None) -> LimitSpec | None:
    if name is None:
        return None
    return table.get(name) or table.get(ANY)


def _scope(name: str, spec: LimitSpec) -> ScopeLimits:
    return ScopeLimits(name, spec.bucket, spec.budgets, spec.requests)
