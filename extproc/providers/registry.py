"""Which translator serves which backend schema."""

from __future__ import annotations

from extproc.providers.settings import Provider, Target
from extproc.providers.base import Translator
from extproc.providers.openai import AzureOpenAITranslator, OpenAITranslator

ENDPOINTS = ("chat", "embeddings")
_EMBEDDINGS = {"openai", "azure_openai", "demo"}


def supports(provider: Provider, endpoint: str) -> bool:
    return endpoint == "chat" or provider.type in _EMBEDDINGS


def make_translator(provider: Provider, target: Target, endpoint: str, *, meter_text: bool = False) -> Translator:
    """A fresh translator for one upstream attempt; ``meter_text``: streamed results carry the generated text."""
    if provider.type == "anthropic":
        from extproc.providers.anthropic import AnthropicTranslator

        return AnthropicTranslator(provider, target, endpoint, meter_text=meter_text)
    if provider.type == "azure_openai":
        return AzureOpenAITranslator(provider, target, endpoint, meter_text=meter_text)
    return OpenAITranslator(provider, target, endpoint, meter_text=meter_text)
