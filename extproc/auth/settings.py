"""The ``auth:`` and ``teams:`` sections: who may call, and what each team may use.

``auth.mode: jwt`` trusts the listed issuers (each with exactly one key
source: a JWKS URL, a JWKS file, or a dev key); a caller's team comes from a
claim and ``teams.NAME.claim_values``. Teams name the aliases they may call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from extproc.config import Reader, RedisSettings

JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
AUTH_MODES = ("none", "jwt")
_ISSUER_KEYS = {"issuer", "audiences", "audience", "jwks_url", "jwks_file", "jwks_ca_file", "dev_key_file",
                "algorithms", "required_claims", "claims", "leeway", "jwks_cache_ttl", "jwks_refresh_min_interval",
                "jwks_timeout"}


@dataclass(frozen=True)
class ClaimPaths:
    """Where the identity is in a token's claims; each a list of dotted paths, first present wins."""

    principal: tuple[str, ...] = ("sub",)
    teams: tuple[str, ...] = ()
    tier: tuple[str, ...] = ()


@dataclass(frozen=True)
class Issuer:
    """One trusted token issuer and where its signing keys come from (exactly one source)."""

    issuer: str
    audiences: tuple[str, ...]
    jwks_url: str | None = None
    jwks_file: str | None = None
    jwks_ca_file: str | None = None  # a private CA for jwks_url (e.g. a cluster's API server)
    dev_key_file: str | None = None  # `tollgate dev-token` signs with this key; local use only
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    required_claims: tuple[str, ...] = ()
    claims: ClaimPaths = ClaimPaths()
    leeway: float = 30.0
    jwks_cache_ttl: float = 600.0  # keys older than this are re-fetched in the background
    jwks_refresh_min_interval: float = 30.0  # an unknown kid fetches the JWKS at most this often
    jwks_timeout: float = 3.0


@dataclass(frozen=True)
class DenyListSettings:
    file: str | None = None  # the embedded store, when no redis is configured
    poll_interval: float = 0.25
    on_redis_down: str = "last_known"  # last_known | refuse


@dataclass(frozen=True)
class AuthSettings:
    mode: str = "none"
    issuers: tuple[Issuer, ...] = ()
    default_team: str | None = None  # for identities that match no configured team
    max_token_bytes: int = 8192
    token_cache_size: int = 10_000
    audit: str = "all"  # all | refusals
    deny_list: DenyListSettings = DenyListSettings()


@dataclass(frozen=True)
class Team:
    name: str
    models: tuple[str, ...] | None = None  # aliases this team may call; None: all of them
    claim_values: tuple[str, ...] = ()  # values of the teams claim that mean this team (default: its name)


def parse_teams(r: Reader, v: Any, declared: set[str], usable: set[str]) -> dict[str, Team]:
    """``declared``: every alias in the file; ``usable``: those left with a target (others are dropped)."""
    m = r.named(v, "teams")
    out: dict[str, Team] = {}
    for name, spec in m.items():
        path = f"teams.{name}"
        r.name(str(name), path, "team names")
        t = r.mapping(spec, path, {"models", "claim_values"})
        models: tuple[str, ...] | None = None
        if "models" in t:
            listed = r.strings(t["models"], f"{path}.models")
            for i, alias in enumerate(listed):
                if alias != "*" and alias not in declared:
                    raise r.fail(f"{path}.models[{i}]", f"unknown model alias {alias!r}")
            models = None if "*" in listed else tuple(a for a in listed if a in usable)
        values = r.strings(t.get("claim_values"), f"{path}.claim_values") or (str(name),)
        out[str(name)] = Team(name=str(name), models=models, claim_values=values)
    return out


def parse_auth(r: Reader, v: Any, teams: dict[str, Team], redis: RedisSettings | None) -> AuthSettings:
    m = r.mapping(v, "auth", {"mode", "issuers", "default_team", "leeway", "max_token_bytes", "token_cache_size",
                              "audit", "deny_list"})
    d = AuthSettings()
    mode = r.choice(m.get("mode"), "auth.mode", AUTH_MODES, d.mode)
    leeway = r.duration(m.get("leeway"), "auth.leeway", 30.0, hi=300.0, zero=True)
    issuers = _issuers(r, m.get("issuers"), leeway)
    if mode == "jwt" and not issuers:
        raise r.fail("auth.issuers", "mode jwt needs at least one issuer")
    default_team = r.string(m.get("default_team"), "auth.default_team")
    if default_team is not None and default_team not in teams:
        raise r.fail("auth.default_team", f"unknown team {default_team!r} (teams: {', '.join(teams) or 'none'})")
    return AuthSettings(
        mode=mode,
        issuers=issuers,
        default_team=default_team,
        max_token_bytes=r.integer(m.get("max_token_bytes"), "auth.max_token_bytes", d.max_token_bytes, 512, 32 * 1024),
        token_cache_size=r.integer(m.get("token_cache_size"), "auth.token_cache_size", d.token_cache_size, 0,
                                   10_000_000),
        audit=r.choice(m.get("audit"), "auth.audit", ("all", "refusals"), "all", expected="all or refusals"),
        deny_list=parse_deny_list(r, m.get("deny_list"), redis),
    )


def _issuers(r: Reader, raw: Any, leeway: float) -> tuple[Issuer, ...]:
    raw = raw or []
    if not isinstance(raw, list):
        raise r.fail("auth.issuers", "expected a list")
    issuers = tuple(parse_issuer(r, x, f"auth.issuers[{i}]", leeway) for i, x in enumerate(raw))
    seen: set[str] = set()
    for i, iss in enumerate(issuers):
        if iss.issuer in seen:
            raise r.fail(f"auth.issuers[{i}].issuer", f"issuer {iss.issuer!r} is listed twice")
        seen.add(iss.issuer)
    return issuers


def parse_issuer(r: Reader, v: Any, path: str, leeway: float) -> Issuer:
    m = r.mapping(v, path, _ISSUER_KEYS)
    sources = [k for k in ("jwks_url", "jwks_file", "dev_key_file") if k in m]
    if len(sources) != 1:
        raise r.fail(path, "needs exactly one key source: jwks_url, jwks_file or dev_key_file")
    if "audience" in m and "audiences" in m:
        raise r.fail(f"{path}.audiences", "give audience or audiences, not both")
    aud_key = "audience" if "audience" in m else "audiences"
    audiences = r.strings(m.get(aud_key), f"{path}.{aud_key}")
    if not audiences:
        raise r.fail(f"{path}.audiences", "is required: the audience(s) your IdP puts in tokens for this gateway")
    algorithms = parse_algorithms(r, m.get("algorithms"), f"{path}.algorithms")
    if "dev_key_file" in m and algorithms != ("ES256",) and "algorithms" in m:
        raise r.fail(f"{path}.algorithms", "a dev key signs with ES256 only")
    files = {k: r.path(r.string(m.get(k), f"{path}.{k}") or "") or None
             for k in ("jwks_file", "jwks_ca_file", "dev_key_file")}
    return Issuer(
        issuer=r.string(m.get("issuer"), f"{path}.issuer", required=True) or "",
        audiences=audiences,
        jwks_url=r.url(m.get("jwks_url"), f"{path}.jwks_url"),
        jwks_file=files["jwks_file"],
        jwks_ca_file=files["jwks_ca_file"],
        dev_key_file=files["dev_key_file"],
        algorithms=("ES256",) if "dev_key_file" in m else algorithms,
        required_claims=r.strings(m.get("required_claims"), f"{path}.required_claims"),
        claims=parse_claim_paths(r, m.get("claims"), f"{path}.claims"),
        leeway=r.duration(m.get("leeway"), f"{path}.leeway", leeway, hi=300.0, zero=True),
        jwks_cache_ttl=r.duration(m.get("jwks_cache_ttl"), f"{path}.jwks_cache_ttl", Issuer.jwks_cache_ttl),
        jwks_refresh_min_interval=r.duration(m.get("jwks_refresh_min_interval"), f"{path}.jwks_refresh_min_interval",
                                             Issuer.jwks_refresh_min_interval, zero=True),
        jwks_timeout=r.duration(m.get("jwks_timeout"), f"{path}.jwks_timeout", Issuer.jwks_timeout),
    )


def parse_algorithms(r: Reader, v: Any, path: str) -> tuple[str, ...]:
    if v is None:
        return Issuer.algorithms
    algs = r.strings(v, path)
    for i, a in enumerate(algs):
        where = f"{path}[{i}]" if isinstance(v, list) else path
        if a.lower() == "none" or a.upper().startswith("HS"):
            raise r.fail(where, f"{a} is never accepted: tokens must be signed with an asymmetric key")
        if a not in JWT_ALGORITHMS:
            raise r.fail(where, f"unknown algorithm {a!r} (expected some of {', '.join(JWT_ALGORITHMS)})")
    if not algs:
        raise r.fail(path, "expected at least one algorithm")
    return algs


def parse_claim_paths(r: Reader, v: Any, path: str) -> ClaimPaths:
    m = r.mapping(v, path, {"principal", "teams", "tier"})
    return ClaimPaths(
        principal=r.strings(m.get("principal"), f"{path}.principal") or ClaimPaths.principal,
        teams=r.strings(m.get("teams"), f"{path}.teams"),
        tier=r.strings(m.get("tier"), f"{path}.tier"),
    )


def parse_deny_list(r: Reader, v: Any, redis: RedisSettings | None) -> DenyListSettings:
    m = r.mapping(v, "auth.deny_list", {"file", "poll_interval", "on_redis_down"})
    file = r.string(m.get("file"), "auth.deny_list.file")
    if file is not None and redis is not None:
        raise r.fail("auth.deny_list.file", "the deny list lives in redis when redis is configured")
    if file is None and redis is None:
        file = r.state_path("deny-list.json")
    return DenyListSettings(
        file=r.path(file) if file else None,
        poll_interval=r.duration(m.get("poll_interval"), "auth.deny_list.poll_interval", 0.25),
        on_redis_down=r.choice(m.get("on_redis_down"), "auth.deny_list.on_redis_down", ("last_known", "refuse"),
                               "last_known", expected="last_known or refuse"),
    )

