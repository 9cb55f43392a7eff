"""The credential vault: provider keys from env vars or files, injected per attempt.

Files (e.g. Kubernetes Secret volumes, where a rotation swaps a symlink) are
stat'ed on every use and re-read when their inode, size or modification time
changes, so a rotated key is used for the very next request without a
restart. A provider with several keys is a pool (``key_pool.py``): keys in
turn, refused ones quarantined, rate-limited ones cooling down. Azure OpenAI
providers with ``azure_ad`` get a bearer token from Azure AD instead
(``azure_ad.py``); the sources themselves are in ``secrets.py``. Keys never
leave this module except as the header value sent upstream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from extproc.config import environment
from extproc.credentials.azure_ad import AzureAdToken
from extproc.credentials.key_pool import KeyPool
from extproc.credentials.secrets import secret_reader
from extproc.errors import UpstreamError
from extproc.providers.settings import ModelAlias, Provider

log = logging.getLogger("tollgate.credentials")


class CredentialVault:
    def __init__(self, providers: dict[str, Provider], env: dict[str, str] | None = None, *,
                 wait_budget: float = 0.8, clock: Callable[[], float] = time.monotonic,
                 on_quarantine: Callable[[str, int], None] | None = None) -> None:
        env = environment() if env is None else env
        self._providers = providers
        self._pools = {
            name: KeyPool([(secret_reader(ref, env), ref.describe()) for ref in p.api_keys], p.key_quarantine, clock)
            for name, p in providers.items()
        }
        self._on_quarantine = on_quarantine
        self._azure_ad = {
            name: AzureAdToken(name, p.azure_ad, secret_reader(p.azure_ad.client_secret, env))
            for name, p in providers.items() if p.azure_ad is not None
        }
        self._wait_budget = wait_budget

    def warm_up(self, alias: ModelAlias) -> Coroutine[Any, Any, None] | None:
        """None when every Azure AD token ``alias`` may need is fresh; else a wait for them (bounded).

        Failures are not raised here: the attempt on that target answers 502, and
        Envoy moves on to the next target.
        """
        if not self._azure_ad:
            return None
        now = time.monotonic()
        stale = [t for t in (self._azure_ad.get(x.provider) for x in alias.targets) if t and not t.fresh(now)]
        if not stale:
            return None
        return self._ensure(stale)

    async def _ensure(self, tokens: list[AzureAdToken]) -> None:
        await asyncio.gather(*(t.ensure(self._wait_budget) for t in tokens))

    async def start(self) -> None:
        for t in self._azure_ad.values():
            await t.start()

    async def close(self) -> None:
        for t in self._azure_ad.values():
            await t.close()

    def pool_size(self, provider: str) -> int:
        """How many keys ``provider`` holds (0 for the demo and Azure AD)."""
        pool = self._pools.get(provider)
        return len(pool) if pool is not None and provider not in self._azure_ad else 0

    def quarantine(self, provider: str, slot: int, status: int, request_id: str) -> None:
        """``provider`` refused key ``slot`` (401/403): leave it out for a while. Logged by origin, never by value."""
        pool = self._pools[provider]
        if pool.quarantine(slot):
            log.warning("provider %s refused key #%d (%s) with HTTP %d (request %s): quarantined for %.0fs",
                        provider, slot, pool.origin(slot), status, request_id or "-",
                        self._providers[provider].key_quarantine)
            if self._on_quarantine is not None:
                self._on_quarantine(provider, slot)

    def cool_down(self, provider: str, slot: int, seconds: float) -> None:
        """``provider`` rate-limited key ``slot`` and asked for ``seconds`` of patience (Retry-After)."""
        self._pools[provider].cool_down(slot, seconds)

    def headers(self, provider: Provider) -> dict[str, str]:
        """The auth headers ``provider`` expects, with the next key of its pool."""
        return self.credential(provider)[0]

    def credential(self, provider: Provider, exclude: tuple[int, ...] | frozenset[int] = ()
                   ) -> tuple[dict[str, str], int | None]:
        """The auth headers for ``provider`` and which key of its pool they carry (None: no pool).

        ``exclude``: keys this request already tried; they, and quarantined keys, are used only when no
        other is left (``KeyPool.insist``). Raises ``UpstreamError`` when the provider has no key at all.
        """
        if provider.type == "demo":
            return {}, None
        aad = self._azure_ad.get(provider.name)
        if aad is not None:
            token = aad.current(time.monotonic())
            if token is None:
                why = aad.last_error or "no token fetched yet"
                raise UpstreamError(f"no Azure AD token for provider {provider.name}: {why}",
                                    code="azure_ad_token_unavailable")
            return {"authorization": f"Bearer {token}"}, None
        pick = self._pools[provider.name].insist(exclude)
        if pick is None:
            raise UpstreamError(
                f"no credential is available for provider {provider.name}", code="credential_unavailable"
            )
        key = pick.value
        if provider.type == "anthropic":
            return {"x-api-key": key}, pick.slot
        if provider.type == "azure_openai":
            return {"api-key": key}, pick.slot
        h = {"authorization": f"Bearer {key}"}
        if provider.organization:
            h["openai-organization"] = provider.organization
        if provider.project:
            h["openai-project"] = provider.project
        return h, pick.slot


# Headers that carry credentials in any provider's scheme: never forwarded from clients.
INBOUND_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "openai-organization", "openai-project")
