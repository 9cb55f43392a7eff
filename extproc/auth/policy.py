"""Which model aliases a team may call.

With no ``teams`` configured every authenticated caller may use every alias.
With teams configured, a caller must belong to one (or get ``auth.default_team``),
and a team with a ``models`` list may call only those aliases.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from extproc.auth.identity import Identity
from extproc.auth.settings import Team
from extproc.errors import Forbidden


class AccessPolicy:
    def __init__(self, teams: Mapping[str, Team]) -> None:
        self._enforced = bool(teams)
        self._allowed = {name: (frozenset(t.models) if t.models is not None else None) for name, t in teams.items()}

    def check(self, identity: Identity, alias: str | None) -> None:
        """Raise Forbidden unless ``identity`` may call ``alias`` (None: may use the gateway at all)."""
        if not self._enforced:
            return
        team = identity.team
        if team is None or team not in self._allowed:
            raise Forbidden(f"principal {identity.principal!r} belongs to no team of this gateway", code="no_team")
        allowed = self._allowed[team]
        if alias is not None and allowed is not None and alias not in allowed:
            raise Forbidden(f"team {team!r} may not use model {alias!r}", code="model_not_allowed", param="model")

    def visible(self, identity: Identity | None, aliases: Iterable[str]) -> list[str]:
        """The aliases ``identity`` may call, for /v1/models."""
        if identity is None or not self._enforced:
            return list(aliases)
        if identity.team not in self._allowed:
            return []
        allowed = self._allowed[identity.team]
        return [a for a in aliases if allowed is None or a in allowed]
