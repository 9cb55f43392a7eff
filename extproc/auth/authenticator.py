"""Authentication and authorization for one gateway: bearer JWT in, ``Identity`` out.

The hot path, a client reusing a token verified before, is: parse the
Authorization header, hash the token, one dict lookup, two deny-list lookups.
Nothing awaits. Only a token whose issuer keys must first be fetched returns
a coroutine, which the server awaits.

Every request ends in exactly one audit line: a refusal here (no token, bad
token, denied), or the decision of ``authorize`` once the alias is known.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

from extproc.auth.audit import AuditLog
from extproc.auth.denylist import DenyListSync
from extproc.auth.identity import Identity, IdentityMapper
from extproc.auth.policy import AccessPolicy
from extproc.auth.token_cache import VerifiedTokens, token_digest
from extproc.auth.verifier import Claims, TokenVerifier
from extproc.auth.jwks import JwksSource
from extproc.errors import GatewayError, Unauthenticated

_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9._~+/-]+=*)")


def bearer_token(value: str | None, max_bytes: int) -> str:
    """The token of ``Authorization: Bearer <token>`` (RFC 6750 characters only)."""
    if not value:
        raise Unauthenticated("no bearer token in the Authorization header", code="missing_token")
    if len(value) > max_bytes + 16:
        raise Unauthenticated("token is too large", code="token_too_large")
    m = _BEARER.fullmatch(value)
    if m is None:
        raise Unauthenticated("the Authorization header is not a well-formed Bearer token")
    return m.group(1)


class Authenticator:
    def __init__(
        self,
        *,
        verifier: TokenVerifier,
        mapper: IdentityMapper,
        policy: AccessPolicy,
        deny: DenyListSync,
        cache: VerifiedTokens,
        audit: AuditLog,
        key_sources: Iterable[JwksSource] = (),
        max_token_bytes: int = 8192,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.verifier = verifier
        self.mapper = mapper
        self.policy = policy
        self.deny = deny
        self.cache = cache
        self.audit = audit
        self._sources = list(key_sources)
        self._max = max_token_bytes
        self._clock = clock
        self._started = False
        self._start_task: asyncio.Task[None] | None = None

    def authenticate(self, headers: Mapping[str, str], request_id: str) -> Identity | Coroutine[Any, Any, Identity]:
        """The caller's identity, or a coroutine resolving to it; raises a GatewayError to refuse."""
        if not self._started:
            self._start_soon()
        ident: Identity | None = None
        try:
            token = bearer_token(headers.get("authorization"), self._max)
            digest = token_digest(token)
            now = self._clock()
            ident = self.cache.get(digest, now)
            if ident is None:
                claims = self.verifier.verify(token)
                if not isinstance(claims, dict):
                    return self._authenticate_later(claims, digest, request_id)
                ident = self._admit(claims, digest, now)
            self._check_deny(ident, now)
            return ident
        except GatewayError as err:
            self.audit.refused(request_id, err, ident)
            raise

    async def _authenticate_later(self, pending: Coroutine[Any, Any, Claims], digest: bytes, request_id: str) -> Identity:
        ident: Identity | None = None
        try:
            claims = await pending
            now = self._clock()
            ident = self._admit(claims, digest, now)
            self._check_deny(ident, now)
            return ident
        except GatewayError as err:
            self.audit.refused(request_id, err, ident)
            raise

    def _admit(self, claims: Claims, digest: bytes, now: float) -> Identity:
        trusted = self.verifier.issuer(claims["iss"])
        assert trusted is not None  # the verifier only returns claims of issuers it trusts
        ident = self.mapper.identity(claims, trusted.settings)
        self.cache.put(digest, ident, now)
        return ident

    def _check_deny(self, ident: Identity, now: float) -> None:
        refusal = self.deny.refusal(ident, now)
        if refusal is not None:
            raise refusal

    def authorize(self, ident: Identity, alias: str | None, request_id: str) -> None:
        """May ``ident`` call ``alias`` (None: list models)? Writes the request's audit line."""
        try:
            self.policy.check(ident, alias)
        except GatewayError as err:
            self.audit.refused(request_id, err, ident, alias)
            raise
        self.audit.allowed(request_id, ident, alias)

    def visible(self, ident: Identity, aliases: Iterable[str]) -> list[str]:
        return self.policy.visible(ident, aliases)

    def _start_soon(self) -> None:
        """The supervisor starts us before serving; a gateway built without it starts on first use."""
        self._started = True
        self._start_task = asyncio.get_running_loop().create_task(self._start_all())

    async def start(self) -> None:
        """Fetch the issuers' keys and read the deny list before the first request, where possible."""
        if not self._started:
            self._started = True
            await self._start_all()

    async def _start_all(self) -> None:
        await asyncio.gather(*(s.start() for s in self._sources), self.deny.start())

    async def close(self) -> None:
        for s in self._sources:
            await s.close()
        await self.deny.close()
