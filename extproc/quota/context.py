"""How many tokens a model can read at once, to refuse an oversized prompt before it costs anything.

A prompt that does not fit its model's context window is answered with a 400
(``context_length_exceeded``, with the count) by the gateway instead of by the
provider. The window is the one of the alias's first target, whose tokenizer
counted the prompt: a larger prompt would fail there with the same 400, and
Envoy does not fall back on a 4xx.

Counts that are approximations (Claude, unknown models) are only refused
when they exceed the window by more than ``APPROXIMATE_MARGIN``, so that a
count erring high never refuses a prompt the provider would take; the
provider refuses the rest itself.

Models are matched like prices: the exact name, else the longest listed
prefix followed by ``-``, ``.``, ``:`` or ``@``. Unlisted models (Azure
deployment names, fine-tunes) are not checked unless ``quota.context_windows``
names them.
"""

from __future__ import annotations

from collections.abc import Mapping

from extproc.errors import BadRequest

APPROXIMATE_MARGIN = 1.25

# Input context windows in tokens, as OpenAI and Anthropic document them (November 2025).
# Claude Sonnet 4 / 4.5 offer 1M tokens only behind a beta header the gateway does not send.
CONTEXT_WINDOWS: dict[str, int] = {
    "gpt-5": 400_000,
    "gpt-4.1": 1_047_576,
    "gpt-4.5": 128_000,
    "gpt-4o": 128_000,
    "chatgpt-4o": 128_000,
    "o1": 200_000,
    "o1-mini": 128_000,
    "o3": 200_000,
    "o4-mini": 200_000,
    "gpt-4-turbo": 128_000,
    "gpt-4": 8_192,
    "gpt-4-32k": 32_768,
    "gpt-3.5-turbo": 16_385,
    "claude": 200_000,
}


class ContextWindows:
    def __init__(self, overrides: Mapping[str, int] | None = None) -> None:
        self._windows = {k.lower(): v for k, v in {**CONTEXT_WINDOWS, **(overrides or {})}.items()}

    def of(self, model: str) -> int | None:
        name = model.lower().rsplit("/", 1)[-1]
        if name in self._windows:
            return self._windows[name]
        best = ""
        for prefix in self._windows:
            if len(prefix) > len(best) and name.startswith(prefix) and name[len(prefix)] in "-.:@":
                best = prefix
        return self._windows[best] if best else None

    def check(self, model: str, prompt_tokens: int, *, exact: bool) -> None:
        """Raise a 400 when ``prompt_tokens`` cannot fit ``model``'s window."""
        window = self.of(model)
        if window is None:
            return
        if prompt_tokens > (window if exact else window * APPROXIMATE_MARGIN):
            about = "" if exact else "about "
            raise BadRequest(
                f"this model's maximum context length is {window} tokens, but the messages have {about}"
                f"{prompt_tokens} tokens; reduce the length of the messages",
                code="context_length_exceeded", param="messages",
            )
