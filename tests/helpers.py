"""What many specs share: the canary provider keys and the providers section that points at fake providers.

The keys are canaries: a test that finds one where it must not be (a log, a
client-visible body, the wrong provider) has caught a leak.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.fake_provider import FakeProvider

OPENAI_KEY = "sk-canary-openai-7f3a9c"
AZURE_KEY = "azure-canary-key-51b2e8"
ANTHROPIC_KEY = "sk-ant-canary-d04c61"
KEYS = {"OPENAI_KEY": OPENAI_KEY, "AZURE_KEY": AZURE_KEY, "ANTHROPIC_KEY": ANTHROPIC_KEY}


def providers_for(openai: FakeProvider | None = None, azure: FakeProvider | None = None,
                  anthropic: FakeProvider | None = None) -> dict[str, Any]:
    p: dict[str, Any] = {}
    if openai:
        p["openai"] = {"type": "openai", "base_url": openai.base_url + "/v1", "api_key": {"env": "OPENAI_KEY"}}
    if azure:
        p["azure"] = {"type": "azure_openai", "base_url": azure.base_url, "api_version": "2024-10-21",
                      "api_key": {"env": "AZURE_KEY"}}
    if anthropic:
        p["anthropic"] = {"type": "anthropic", "base_url": anthropic.base_url, "api_key": {"env": "ANTHROPIC_KEY"}}
    return p
