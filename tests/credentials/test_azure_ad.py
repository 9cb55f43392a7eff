"""Azure AD client credentials: fetched off the request path, cached, refreshed before expiry, a clear 502 when impossible."""

from __future__ import annotations

import asyncio
import time

import pytest

from extproc.credentials.azure_ad import AzureAdToken
from extproc.config import SecretRef
from extproc.credentials.settings import AzureAd
from extproc.providers.settings import ModelAlias, Provider, Target
from extproc.credentials.secrets import secret_reader
from extproc.credentials.vault import CredentialVault
from extproc.errors import UpstreamError
from tests.fake_idp import FakeIdP
from tests.harness import free_port


@pytest.fixture
def idp():
    with FakeIdP() as f:
        yield f


def provider(token_url: str, secret: SecretRef = SecretRef(env="AAD_SECRET")) -> Provider:
    aad = AzureAd(client_id="app-1", client_secret=secret, token_url=token_url, timeout=2.0)
    return Provider(name="azure", type="azure_openai", base_url="https://contoso.openai.azure.com",
                    api_version="2024-10-21", azure_ad=aad)


ALIAS = ModelAlias("gpt-4o", (Target("azure", "gpt-4o-prod"),))


async def test_the_vault_injects_an_azure_ad_bearer_token_got_by_client_credentials(idp):
    p = provider(idp.token_url)
    vault = CredentialVault({"azure": p}, {"AAD_SECRET": "s3cret"})

    with pytest.raises(UpstreamError):
        vault.headers(p)  # nothing fetched yet
    warming = vault.warm_up(ALIAS)
    assert warming is not None
    await warming
    first = vault.headers(p)
    assert vault.warm_up(ALIAS) is None  # fresh now: requests do not wait
    second = vault.headers(p)
    await vault.close()
    assert first == second and first["authorization"].startswith("Bearer aad-token-1-")
    assert "api-key" not in first
    assert idp.token_requests == [{"grant_type": "client_credentials", "client_id": "app-1", "client_secret": "s3cret",
                                   "scope": "https://cognitiveservices.azure.com/.default"}]


async def test_the_token_is_refreshed_in_the_background_before_it_expires(idp):
    idp.token_lifetime = 1  # refreshed after half its life, used until a tenth before the end

    token = AzureAdToken("azure", provider(idp.token_url).azure_ad, lambda: "s3cret")
    await token.start()
    seen, gaps = set(), 0
    await asyncio.sleep(0.2)
    for _ in range(25):  # 1.25 s: longer than the first token lives
        current = token.current(time.monotonic())
        seen.add(current)
        gaps += current is None
        await asyncio.sleep(0.05)
    await token.close()
    assert gaps == 0  # never a moment without a usable token
    assert len(seen) >= 2 and len(idp.token_requests) >= 2


async def test_a_failing_token_endpoint_gives_a_clear_502_naming_the_provider(idp):
    idp.token_status = 401
    p = provider(idp.token_url)
    vault = CredentialVault({"azure": p}, {"AAD_SECRET": "wrong"})
    await vault.warm_up(ALIAS)
    try:
        with pytest.raises(UpstreamError) as e:
            vault.headers(p)
    finally:
        await vault.close()
    assert e.value.status == 502 and e.value.code == "azure_ad_token_unavailable"
    assert "provider azure" in e.value.message and "HTTP 401 (invalid_client)" in e.value.message
    assert "wrong" not in e.value.message


async def test_an_unreachable_token_endpoint_and_a_missing_secret_are_reported_too(tmp_path):
    async def attempt(p: Provider, env: dict) -> str:
        vault = CredentialVault({"azure": p}, env)
        await vault.warm_up(ALIAS)
        try:
            vault.headers(p)
        except UpstreamError as e:
            return e.message
        finally:
            await vault.close()
        return ""
    dead = f"http://127.0.0.1:{free_port()}/token"
    assert "unreachable" in await attempt(provider(dead), {"AAD_SECRET": "x"})
    missing = provider(dead, SecretRef(file=str(tmp_path / "absent")))
    assert "client secret (file:" in await attempt(missing, {})


async def test_a_rotated_client_secret_file_is_used_for_the_next_fetch(idp, tmp_path):
    secret = tmp_path / "aad-secret"
    secret.write_text("first\n")
    ref = SecretRef(file=str(secret))
    token = AzureAdToken("azure", provider(idp.token_url, ref).azure_ad, secret_reader(ref, {}))

    await token.fetch()
    secret.write_text("second\n")
    await token.fetch()
    await token.close()
    assert [r["client_secret"] for r in idp.token_requests] == ["first", "second"]
