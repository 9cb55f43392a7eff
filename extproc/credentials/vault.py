"""The credential vault: provider keys from env vars or files, injected per attempt.

Files (e.g. Kubernetes Secret volumes, where a rotation swaps a symlink) are
stat'ed on every use and re-read when their inode, size or modification time
changes, so a rotated key is used for the very next request without a
restart. A provider with several keys uses them in turn. Azure OpenAI
providers with ``azure_ad`` get a bearer token from Azure AD instead
(``azure_ad.py``); the sources themselves are in ``secrets.py``. Keys never leave this module except as the header
value sent upstream.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Coroutine
from typing import Any

from extproc.config import SecretRef, environment
from extproc.credentials.azure_ad import AzureAdToken
from extproc.credentials.secrets import FileSecret, secret_reader
from extproc.errors import UpstreamError
from extproc.providers.settings import ModelAlias, Provider


class CredentialVault:
    def __init__(self, providers: dict[str, Provider], env: dict[str, str] | None = None, *,
                 wait_budget: float = 0.8) -> None:
        env = environment() if env is None else env
        self._providers = providers
        self._sources: dict[str, list[str | FileSecret]] = {}
        for name, p in providers.items():
            self._sources[name] = [self._source(ref, env) for ref in p.api_keys]
        self._turn = {name: itertools.count() for name in providers}
        self._azure_ad = {
            name: AzureAdToken(name, p.azure_ad, secret_reader(p.azure_ad.client_secret, env))
            for name, p in providers.items() if p.azure_ad is not None
        }
        self._wait_budget = wait_budget

    @staticmethod
    def _source(ref: SecretRef, env: dict[str, str]) -> str | FileSecret:
        if ref.env:
            return env.get(ref.env, "").strip()
        return FileSecret(ref.file or "")

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

    def key(self, provider: str) -> str | None:
        """The next usable key of ``provider`` (round robin), or None if it has none."""
        sources = self._sources.get(provider) or []
        if not sources:
            return None
        start = next(self._turn[provider])
        for i in range(len(sources)):
            s = sources[(start + i) % len(sources)]
            value = s if isinstance(s, str) else s.get()
            if value:
                return value
        return ""

    def headers(self, provider: Provider) -> dict[str, str]:
        """The auth headers ``provider`` expects, with its current key."""
        if provider.type == "demo":
            return {}
        aad = self._azure_ad.get(provider.name)
        if aad is not None:
            token = aad.current(time.monotonic())
            if token is None:
                why = aad.last_error or "no token fetched yet"
                raise UpstreamError(f"no Azure AD token for provider {provider.name}: {why}",
                                    code="azure_ad_token_unavailable")
            return {"authorization": f"Bearer {token}"}
        key = self.key(provider.name)
        if not key:
            raise UpstreamError(
                f"no credential is available for provider {provider.name}", code="credential_unavailable"
            )
        if provider.type == "anthropic":
            return {"x-api-key": key}
        if provider.type == "azure_openai":
            return {"api-key": key}
        h = {"authorization": f"Bearer {key}"}
        if provider.organization:
            h["openai-organization"] = provider.organization
        if provider.project:
            h["openai-project"] = provider.project
        return h


# Headers that carry credentials in any provider's scheme: never forwarded from clients.
INBOUND_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "openai-organization", "openai-project")
