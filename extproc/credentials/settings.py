"""Azure AD (Entra ID) client credentials of an ``azure_openai`` provider: its settings and their parser.

Read as part of a provider (``providers.NAME.azure_ad``, parsed in
``providers/settings.py``); the vault (``vault.py``) turns them into a bearer
token source (``azure_ad.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from extproc.config import Reader, SecretRef


@dataclass(frozen=True)
class AzureAd:
    """Azure AD (Entra ID) client-credentials for an azure_openai provider."""

    client_id: str
    client_secret: SecretRef
    token_url: str  # https://login.microsoftonline.com/TENANT/oauth2/v2.0/token unless given
    scope: str = "https://cognitiveservices.azure.com/.default"
    timeout: float = 5.0


def parse_azure_ad(r: Reader, v: Any, path: str) -> AzureAd:
    m = r.mapping(v, path, {"tenant_id", "client_id", "client_secret", "token_url", "scope", "timeout"})
    tenant = r.string(m.get("tenant_id"), f"{path}.tenant_id")
    if tenant is not None and not re.fullmatch(r"[A-Za-z0-9.-]{1,128}", tenant):
        raise r.fail(f"{path}.tenant_id", "expected a tenant id or domain")
    if tenant is None and "token_url" not in m:
        raise r.fail(path, "needs tenant_id (or token_url)")
    default_url = f"https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token" if tenant else None
    if "client_secret" not in m:
        raise r.fail(f"{path}.client_secret", "is required (env: NAME or file: PATH)")
    return AzureAd(
        client_id=r.string(m.get("client_id"), f"{path}.client_id", required=True) or "",
        client_secret=r.secret(m.get("client_secret"), f"{path}.client_secret"),
        token_url=r.url(m.get("token_url"), f"{path}.token_url", default=default_url) or "",
        scope=r.string(m.get("scope"), f"{path}.scope", default=AzureAd.scope) or AzureAd.scope,
        timeout=r.duration(m.get("timeout"), f"{path}.timeout", AzureAd.timeout),
    )
