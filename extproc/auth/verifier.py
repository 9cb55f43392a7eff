"""Verify a bearer JWT against the issuers this gateway trusts.

Order of checks, cheapest first, each refusal a 401 with a description that
never contains token material:

1. shape and size (compact JWS, three base64url parts, at most
   ``auth.max_token_bytes``);
2. the unverified ``iss`` picks the issuer; unknown issuers are refused;
3. the header ``alg`` must be on that issuer's allow-list (``none`` and HS*
   can never be configured), and must belong to the key's own type;
4. the ``kid`` picks the key; an unknown kid may wait for one JWKS fetch
   (throttled per issuer); with no keys at all the answer is 503, fail closed;
5. pyjwt checks the signature, then ``exp``, ``nbf``, ``iat``, ``iss``, ``aud``
   with the issuer's leeway, and the required claims.

Keys named by the token itself (``jku``, ``x5u``, ``jwk`` headers) are ignored.
``verify`` returns the claims, or, only when keys must be fetched first, a
coroutine resolving to them; the common case never awaits.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from jwt import PyJWK

from extproc.auth.jwks import JwksSource, KeyMismatch, KeySet
from extproc.auth.settings import Issuer
from extproc.errors import Unauthenticated, Unavailable

Claims = dict[str, Any]
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    settings: Issuer
    keys: JwksSource


def _b64json(segment: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise Unauthenticated("token is malformed") from None


class TokenVerifier:
    def __init__(
        self,
        issuers: Sequence[TrustedIssuer],
        *,
        max_token_bytes: int = 8192,
        wait_budget: float = 0.8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._issuers = {t.settings.issuer: t for t in issuers}
        self._max = max_token_bytes
        self._wait = wait_budget
        self._clock = clock
        self._jwt = jwt.PyJWT()
        self._require = {
            t.settings.issuer: sorted({"exp", "iss", "aud", *t.settings.required_claims}) for t in issuers
        }

    def issuer(self, name: str) -> TrustedIssuer | None:
        return self._issuers.get(name)

    def verify(self, token: str) -> Claims | Coroutine[Any, Any, Claims]:
        trusted, alg, kid = self._peek(token)
        now = self._clock()
        keys = trusted.keys.current(now)
        key = _key(keys, kid, alg)
        if key is not None:
            return self._decode(token, trusted, key, alg)
        if trusted.keys.may_refresh(now):
            return self._verify_after_fetch(token, trusted, alg, kid)
        raise _no_key(keys)

    async def _verify_after_fetch(self, token: str, trusted: TrustedIssuer, alg: str, kid: str | None) -> Claims:
        fetch = trusted.keys.refresh()
        try:
            keys = await asyncio.wait_for(asyncio.shield(fetch), self._wait)
        except asyncio.TimeoutError:
            keys = trusted.keys.current(self._clock())  # the fetch goes on for the next request
        key = _key(keys, kid, alg)
        if key is None:
            raise _no_key(keys)
        return self._decode(token, trusted, key, alg)

    def _peek(self, token: str) -> tuple[TrustedIssuer, str, str | None]:
        if len(token) > self._max:
            raise Unauthenticated("token is too large", code="token_too_large")
        parts = token.split(".")
        if len(parts) != 3 or not all(_SEGMENT.fullmatch(p) for p in parts[:2]):
            raise Unauthenticated("token is not a signed JWT")
        header, payload = _b64json(parts[0]), _b64json(parts[1])
        if not isinstance(header, dict) or not isinstance(payload, dict):
            raise Unauthenticated("token is malformed")
        iss = payload.get("iss")
        trusted = self._issuers.get(iss) if isinstance(iss, str) else None
        if trusted is None:
            raise Unauthenticated("token issuer is not trusted", code="untrusted_issuer")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in trusted.settings.algorithms:
            raise Unauthenticated("token algorithm is not allowed", code="algorithm_not_allowed")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > 256):
            raise Unauthenticated("token kid is malformed")
        return trusted, alg, kid

    def _decode(self, token: str, trusted: TrustedIssuer, key: PyJWK, alg: str) -> Claims:
        s = trusted.settings
        try:
            return self._jwt.decode(
                token, key, algorithms=[alg], audience=list(s.audiences), issuer=s.issuer, leeway=s.leeway,
                options={"require": self._require[s.issuer]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token has expired", code="token_expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("token is not valid yet (nbf or iat in the future)", code="token_not_yet_valid") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("token audience is not accepted here", code="invalid_audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("token issuer is not trusted", code="untrusted_issuer") from None
        except jwt.MissingRequiredClaimError as e:
            raise Unauthenticated(f"token lacks the required {e.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("token signature is invalid", code="invalid_signature") from None
        except jwt.InvalidAlgorithmError:
            raise Unauthenticated("token algorithm is not allowed", code="algorithm_not_allowed") from None
        except jwt.PyJWTError:
            raise Unauthenticated("token is malformed or its claims are invalid") from None


def _key(keys: KeySet | None, kid: str | None, alg: str) -> PyJWK | None:
    if keys is None:
        return None
    try:
        return keys.key(kid, alg)
    except KeyMismatch:
        raise Unauthenticated("token algorithm does not match its signing key", code="algorithm_not_allowed") from None


def _no_key(keys: KeySet | None) -> Exception:
    if keys is None:
        return Unavailable(
            "the signing keys of this token's issuer cannot be fetched right now; try again shortly",
            code="auth_unavailable",
            headers={"retry-after": "5"},
        )
    return Unauthenticated("token signing key (kid) is unknown", code="unknown_kid")
