"""JSON Web Key Sets: where an issuer's signing keys come from, and how they stay fresh.

A ``KeySet`` is one JWKS document, checked once: only asymmetric signing keys
(RSA of at least 2048 bits, EC, OKP) are kept; symmetric (``oct``) and
encryption keys are dropped, so no token can ever be checked with a shared
secret. A key is handed out only for an algorithm of its own family.

Three sources share one small interface (``current`` / ``may_refresh`` /
``refresh``):

* ``UrlJwks`` fetches with aiohttp. Keys older than the cache TTL are
  re-fetched in the background while the old ones keep serving; a token with
  an unknown ``kid`` may trigger a fetch, but at most one per minimum
  interval, so a flood of made-up ``kid``s cannot hammer the IdP; a failed
  fetch keeps the last good keys. Concurrent callers share one fetch.
* ``FileJwks`` reads a file (air-gapped clusters: ``kubectl get --raw
  /openid/v1/jwks``), re-read when it changes.
* ``StaticJwks`` is a fixed set (the local dev key).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import aiohttp
from jwt import PyJWK
from jwt.exceptions import PyJWKError

log = logging.getLogger("tollgate.auth")

MAX_JWKS_BYTES = 512 * 1024
FILE_RECHECK_SECONDS = 1.0
_FAMILY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
_CURVE = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


class JwksError(ValueError):
    """A JWKS document that cannot be used."""


class KeyMismatch(Exception):
    """The token's algorithm does not belong to the key its ``kid`` names."""


class KeySet:
    """The usable signing keys of one JWKS document, by ``kid``."""

    __slots__ = ("_jwks", "_prepared")

    def __init__(self, jwks: Mapping[str, Mapping[str, Any]]) -> None:
        self._jwks = dict(jwks)
        self._prepared: dict[tuple[str, str], PyJWK] = {}

    @classmethod
    def parse(cls, document: bytes | str | Mapping[str, Any]) -> KeySet:
        data: Any = document
        if isinstance(document, (bytes, str)):
            try:
                data = json.loads(document)
            except (ValueError, UnicodeDecodeError):
                raise JwksError("not JSON") from None
        if not isinstance(data, Mapping) or not isinstance(data.get("keys"), list):
            raise JwksError('expected an object with a "keys" list')
        usable: dict[str, Mapping[str, Any]] = {}
        for i, jwk in enumerate(data["keys"]):
            if not isinstance(jwk, Mapping) or not _usable(jwk):
                continue
            kid = jwk.get("kid")
            name = kid if isinstance(kid, str) and kid else f"#{i}"
            usable.setdefault(name, jwk)
        if not usable:
            raise JwksError("no usable signing keys (RSA >= 2048 bits, EC or OKP, use=sig)")
        return cls(usable)

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._jwks)

    def __len__(self) -> int:
        return len(self._jwks)

    def key(self, kid: str | None, alg: str) -> PyJWK | None:
        """The key for ``kid`` prepared for ``alg``; None when the kid is unknown.

        A token without a ``kid`` is accepted only when the set holds exactly one key.
        """
        if kid is None:
            if len(self._jwks) != 1:
                return None
            kid = next(iter(self._jwks))
        prepared = self._prepared.get((kid, alg))
        if prepared is not None:
            return prepared
        jwk = self._jwks.get(kid)
        if jwk is None:
            return None
        if not _fits(jwk, alg):
            raise KeyMismatch(kid)
        try:
            prepared = PyJWK(dict(jwk), algorithm=alg)
        except PyJWKError:
            raise KeyMismatch(kid) from None
        self._prepared[(kid, alg)] = prepared
        return prepared


def _usable(jwk: Mapping[str, Any]) -> bool:
    if jwk.get("use", "sig") != "sig" or jwk.get("kty") not in ("RSA", "EC", "OKP"):
        return False
    alg = jwk.get("alg")
    if alg is not None and (not isinstance(alg, str) or alg[:2] not in _FAMILY):
        return False  # e.g. an RSA key published for RSA-OAEP
    try:
        key = PyJWK(dict(jwk))
    except (PyJWKError, ValueError, TypeError):
        return False
    return jwk["kty"] != "RSA" or getattr(key.key, "key_size", 0) >= 2048


def _fits(jwk: Mapping[str, Any], alg: str) -> bool:
    if jwk.get("alg") not in (None, alg):
        return False
    if _FAMILY.get(alg[:2]) != jwk.get("kty"):
        return False
    return alg not in _CURVE or jwk.get("crv") == _CURVE[alg]


class JwksSource(Protocol):
    label: str

    def current(self, now: float) -> KeySet | None:
        """The keys to use now (may start a background refresh); ``now`` is monotonic."""
        ...

    def may_refresh(self, now: float) -> bool:
        """Whether an unknown kid may wait for a fetch right now."""
        ...

    def refresh(self) -> Awaitable[KeySet | None]:
        """Fetch now (one fetch shared by all callers); resolves to the keys in use afterwards."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class StaticJwks:
    def __init__(self, keys: KeySet, label: str) -> None:
        self.keys = keys
        self.label = label

    def current(self, now: float) -> KeySet | None:
        return self.keys

    def may_refresh(self, now: float) -> bool:
        return False

    async def refresh(self) -> KeySet | None:
        return self.keys

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class FileJwks(StaticJwks):
    """A JWKS file, re-read (at most once a second) when its inode, size or mtime changes.

    Nothing to fetch or start: only ``current`` differs from a fixed key set."""

    def __init__(self, path: str, label: str, *, on_change: Callable[[], None] | None = None) -> None:
        self.path = path
        self.label = label
        self._on_change = on_change
        self._stamp: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        self.keys = self._read()  # a missing or broken file fails at start-up

    def _read(self) -> KeySet:
        try:
            st = os.stat(self.path)
            with open(self.path, "rb") as f:
                data = f.read(MAX_JWKS_BYTES + 1)
        except OSError as e:
            raise JwksError(f"cannot read {self.path}: {e.strerror}") from None
        if len(data) > MAX_JWKS_BYTES:
            raise JwksError(f"{self.path} is larger than {MAX_JWKS_BYTES} bytes")
        keys = KeySet.parse(data)
        self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        return keys

    def current(self, now: float) -> KeySet | None:
        if now - self._checked >= FILE_RECHECK_SECONDS:
            self._checked = now
            self._reload()
        return self.keys

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
            if (st.st_ino, st.st_mtime_ns, st.st_size) == self._stamp:
                return
            keys = self._read()
        except (OSError, JwksError) as e:
            log.warning("JWKS %s: %s; keeping the keys read before", self.label, e)
            return
        removed = self.keys.kids - keys.kids
        self.keys = keys
        log.info("JWKS %s: re-read %s (%d keys)", self.label, self.path, len(keys))
        if removed and self._on_change:
            self._on_change()


class UrlJwks:
    """A JWKS URL with a TTL cache, throttled refresh on unknown kids, and last-good-keys on failure."""

    def __init__(
        self,
        url: str,
        label: str,
        *,
        ttl: float,
        min_interval: float,
        timeout: float,
        ca_file: str | None = None,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.label = label
        self.ttl = ttl
        self.min_interval = min_interval
        self.timeout = timeout
        self._ssl: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self._on_change = on_change
        self._clock = clock
        self._keys: KeySet | None = None
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._task: asyncio.Task[KeySet | None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.fetches = 0  # attempts, for operators and tests

    def current(self, now: float) -> KeySet | None:
        if self._keys is not None and now - self._fetched_at > self.ttl and self.may_refresh(now):
            self.refresh()  # in the background; the cached keys serve meanwhile
        return self._keys

    def may_refresh(self, now: float) -> bool:
        return self._task is not None or now - self._attempted_at >= self.min_interval

    def refresh(self) -> asyncio.Task[KeySet | None]:
        if self._task is None:
            self._attempted_at = self._clock()
            task = asyncio.get_running_loop().create_task(self._fetch())
            task.add_done_callback(self._fetched)
            self._task = task
        return self._task

    def _fetched(self, task: asyncio.Task[KeySet | None]) -> None:
        self._task = None

    async def _fetch(self) -> KeySet | None:
        self.fetches += 1
        try:
            keys = KeySet.parse(await self._get())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, JwksError) as e:
            reason = str(e) or type(e).__name__
            kept = f"keeping {len(self._keys)} keys fetched before" if self._keys else "no keys yet"
            log.warning("JWKS %s: fetch from %s failed (%s); %s", self.label, self.url, reason[:200], kept)
            return self._keys
        removed = self._keys.kids - keys.kids if self._keys is not None else frozenset()
        self._keys, self._fetched_at = keys, self._clock()
        if removed and self._on_change:
            self._on_change()
        return keys

    async def _get(self) -> bytes:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        async with self._session.get(self.url, ssl=self._ssl, headers={"accept": "application/json"}) as r:
            if r.status != 200:
                raise JwksError(f"HTTP {r.status}")
            data = await r.content.read(MAX_JWKS_BYTES + 1)
        if len(data) > MAX_JWKS_BYTES:
            raise JwksError(f"larger than {MAX_JWKS_BYTES} bytes")
        return data

    async def start(self) -> None:
        """Fetch once, so the first request finds keys; an IdP that is down now is not fatal."""
        await self.refresh()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._session is not None:
            await self._session.close()
