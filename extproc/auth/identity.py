"""Who is calling: the principal, team and tier read from verified claims.

Claim paths are dotted (``realm_access.roles``). Keys that themselves contain
dots are found too: ``kubernetes.io.namespace`` reads
``{"kubernetes.io": {"namespace": ...}}``, the longest matching key winning at
each level. A path list means "the first one present".

The team is the first configured team (in config order) whose claim values
appear among the token's team claim values, so operators, not the IdP's group
order, decide which team a member of several is charged to. With no teams
configured, the first team claim value is taken as is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from extproc.auth.settings import Issuer, Team
from extproc.errors import Unauthenticated


@dataclass(frozen=True, slots=True)
class Identity:
    principal: str
    team: str | None
    tier: str | None
    issuer: str
    jti: str | None
    expires_at: float  # the token's exp, seconds since the epoch


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The value at dotted ``path``, or None."""
    node: Any = claims
    parts = path.split(".")
    while parts:
        if not isinstance(node, Mapping):
            return None
        for n in range(len(parts), 0, -1):
            key = ".".join(parts[:n])
            if key in node:
                node, parts = node[key], parts[n:]
                break
        else:
            return None
    return node


def _first_string(claims: Mapping[str, Any], paths: Iterable[str]) -> str | None:
    for p in paths:
        v = claim_at(claims, p)
        if isinstance(v, str) and v:
            return v
    return None


def _values(claims: Mapping[str, Any], paths: Iterable[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        v = claim_at(claims, p)
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, list):
            out.extend(x for x in v if isinstance(x, str))
    return out


class IdentityMapper:
    def __init__(self, teams: Mapping[str, Team], default_team: str | None = None) -> None:
        self._teams = [(t.name, frozenset(t.claim_values or (t.name,))) for t in teams.values()]
        self._default = default_team

    def identity(self, claims: Mapping[str, Any], issuer: Issuer) -> Identity:
        paths = issuer.claims
        principal = _first_string(claims, paths.principal)
        if principal is None or len(principal) > 256:
            raise Unauthenticated(f"token has no usable principal claim ({', '.join(paths.principal)})")
        jti = claims.get("jti")
        return Identity(
            principal=principal,
            team=self.team_of(_values(claims, paths.teams)),
            tier=_first_string(claims, paths.tier),
            issuer=issuer.issuer,
            jti=jti if isinstance(jti, str) and jti else None,
            expires_at=float(claims["exp"]),
        )

    def team_of(self, values: list[str]) -> str | None:
        if not self._teams:
            return values[0][:128] if values else None
        have = set(values)
        for name, accepted in self._teams:
            if accepted & have:
                return name
        return self._default
