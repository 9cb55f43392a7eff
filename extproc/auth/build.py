"""Build the runtime auth objects from the config, at start-up, so a bad key file fails there."""

from __future__ import annotations

from collections.abc import Callable

from extproc.auth.audit import AuditLog
from extproc.auth.authenticator import Authenticator
from extproc.auth.deny_store import DenyStore, FileDenyStore, RedisDenyStore
from extproc.auth.denylist import DenyListSync
from extproc.auth.devtoken import dev_keyset
from extproc.auth.identity import IdentityMapper
from extproc.auth.jwks import FileJwks, JwksError, JwksSource, StaticJwks, UrlJwks
from extproc.auth.policy import AccessPolicy
from extproc.auth.token_cache import VerifiedTokens
from extproc.auth.verifier import TokenVerifier, TrustedIssuer
from extproc.auth.settings import Issuer
from extproc.config import ConfigError, GatewayConfig


def wait_budget(cfg: GatewayConfig) -> float:
    """How long a request may wait for an IdP or token endpoint: well inside Envoy's message timeout."""
    return max(0.05, 0.75 * cfg.envoy.message_timeout)


def build_authenticator(cfg: GatewayConfig, redis_password: str | None = None) -> Authenticator | None:
    """None in ``auth.mode: none``, where every request is anonymous.

    The caller (the runtime, or a command) reads the Redis password: provider
    and store credentials are not this package's business.
    """
    a = cfg.auth
    if a.mode == "none":
        return None
    cache = VerifiedTokens(a.token_cache_size)
    trusted = []
    for i, iss in enumerate(a.issuers):
        try:
            trusted.append(TrustedIssuer(iss, _key_source(iss, cache.clear)))
        except (JwksError, ValueError, OSError) as e:
            raise ConfigError(f"{cfg.source}: auth.issuers[{i}] ({iss.issuer}): {e}") from None
    return Authenticator(
        verifier=TokenVerifier(trusted, max_token_bytes=a.max_token_bytes, wait_budget=wait_budget(cfg)),
        mapper=IdentityMapper(cfg.teams, a.default_team),
        policy=AccessPolicy(cfg.teams),
        deny=DenyListSync(deny_store(cfg, redis_password), poll_interval=a.deny_list.poll_interval,
                          refuse_when_stale=a.deny_list.on_redis_down == "refuse"),
        cache=cache,
        audit=AuditLog(refusals_only=a.audit == "refusals"),
        key_sources=[t.keys for t in trusted],
        max_token_bytes=a.max_token_bytes,
    )


def _key_source(iss: Issuer, on_change: Callable[[], None]) -> JwksSource:
    if iss.jwks_url:
        return UrlJwks(iss.jwks_url, iss.issuer, ttl=iss.jwks_cache_ttl, min_interval=iss.jwks_refresh_min_interval,
                       timeout=iss.jwks_timeout, ca_file=iss.jwks_ca_file, on_change=on_change)
    if iss.jwks_file:
        return FileJwks(iss.jwks_file, iss.issuer, on_change=on_change)
    return StaticJwks(dev_keyset(iss.dev_key_file or ""), iss.issuer)


def deny_store(cfg: GatewayConfig, password: str | None = None) -> DenyStore:
    """Redis when configured (shared by every sidecar), else the local file."""
    if cfg.redis is not None:
        return RedisDenyStore(cfg.redis.url, password=password, prefix=cfg.redis.key_prefix)
    return FileDenyStore(cfg.auth.deny_list.file or "deny-list.json")
