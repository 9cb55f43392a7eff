"""The credential vault: provider keys from env vars or files, injected per attempt.

Files (e.g. Kubernetes Secret volumes) are re-read when their modification
time or inode changes, checked at most once a second, so a rotated key is used
for the next request without a restart. Keys never leave this module except as
the header value sent upstream.
"""

from __future__ import annotations

import itertools
import os
import time

from extproc.config import Provider, SecretRef
from extproc.errors import UpstreamError

RECHECK_SECONDS = 1.0


class _FileSecret:
    __slots__ = ("path", "value", "stamp", "checked")

    def __init__(self, path: str) -> None:
        self.path = path
        self.value: str | None = None
        self.stamp: tuple[int, int, int] | None = None
        self.checked = 0.0

    def get(self, now: float) -> str | None:
        if now - self.checked < RECHECK_SECONDS and self.value is not None:
            return self.value
        self.checked = now
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self.stamp:
                with open(self.path, encoding="utf-8") as f:
                    self.value = f.read().strip() or None
                self.stamp = stamp
        except OSError:
            self.value, self.stamp = None, None
        return self.value


class CredentialVault:
    def __init__(self, providers: dict[str, Provider], env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        self._providers = providers
        self._sources: dict[str, list[str | _FileSecret]] = {}
        for name, p in providers.items():
            self._sources[name] = [self._source(ref, env) for ref in p.api_keys]
        self._turn = {name: itertools.count() for name in providers}

    @staticmethod
    def _source(ref: SecretRef, env: dict[str, str]) -> str | _FileSecret:
        if ref.env:
            return env.get(ref.env, "").strip()
        return _FileSecret(ref.file or "")

    def key(self, provider: str) -> str | None:
        """The next usable key of ``provider`` (round robin), or None if it has none."""
        sources = self._sources.get(provider) or []
        if not sources:
            return None
        now = time.monotonic()
        start = next(self._turn[provider])
        for i in range(len(sources)):
            s = sources[(start + i) % len(sources)]
            value = s if isinstance(s, str) else s.get(now)
            if value:
                return value
        return ""

    def headers(self, provider: Provider) -> dict[str, str]:
        """The auth headers ``provider`` expects, with its current key."""
        if provider.type == "demo":
            return {}
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
