"""What the Anthropic inbound costs in Python, side by side with the OpenAI way in, in one run.

    python -m tests.bench.inbound --out tests/bench/inbound.md

The translation runs in the ext_proc server for every request and every streamed chunk, so it is
measured where it runs: the translators themselves, fed the same answer the fake providers send (a
50-chunk stream, one event per chunk, and a whole answer), on one core, best of several rounds.

  openai → openai         an OpenAI client on an OpenAI target (the base: usage read, nothing rewritten)
  anthropic → openai      an Anthropic client on the same target (OpenAI chunks → Anthropic events)
  openai → anthropic      an OpenAI client on an Anthropic target (Anthropic events → OpenAI chunks)
  anthropic → anthropic   an Anthropic client on an Anthropic target (the round trip through OpenAI's shape)

Only the translation is timed: the gRPC round trip per chunk costs about ten times more (README,
Performance), and is the same for every row.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from extproc.providers.settings import Provider, Target
from extproc.providers import sse
from extproc.providers.anthropic import AnthropicTranslator
from extproc.providers.base import Translator
from extproc.providers.inbound_anthropic import EventWriter, answer_body, to_openai
from extproc.providers.openai import OpenAITranslator

CHUNKS = 50
ROUNDS = 15  # rows take turns in every round (the machine is shared): the best round of each counts
REPEAT = 20
OPENAI = Provider(name="openai", type="openai", base_url="http://127.0.0.1:1/v1")
ANTHROPIC = Provider(name="anthropic", type="anthropic", base_url="http://127.0.0.1:2")
ANTHROPIC_REQUEST = {"model": "m", "max_tokens": 256, "stream": True, "system": "Be brief.",
                     "messages": [{"role": "user", "content": "word " * 400}]}


def openai_stream() -> list[bytes]:
    def chunk(delta: dict, finish: str | None = None) -> bytes:
        return sse.encode_json({"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o",
                                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": None})
    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": f" tok{i}"}) for i in range(CHUNKS)]
    out.append(chunk({}, "stop"))
    out.append(sse.encode_json({"id": "c", "choices": [], "usage": {"prompt_tokens": 500, "completion_tokens": 50}}))
    out.append(sse.DONE)
    return out


def anthropic_stream() -> list[bytes]:
    out = [sse.encode_json({"type": "message_start", "message": {
        "id": "msg", "type": "message", "role": "assistant", "model": "claude", "content": [],
        "usage": {"input_tokens": 500, "output_tokens": 1}}}, "message_start"),
        sse.encode_json({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                        "content_block_start")]
    out += [sse.encode_json({"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": f" tok{i}"}}, "content_block_delta")
            for i in range(CHUNKS)]
    out += [sse.encode_json({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            sse.encode_json({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                             "usage": {"output_tokens": 50}}, "message_delta"),
            sse.encode_json({"type": "message_stop"}, "message_stop")]
    return out


class Answering:
    """What answer.py does with one attempt's answer: the backend translator, then (for a client of
    /v1/messages) the Anthropic events or message."""

    def __init__(self, backend: str, inbound: bool) -> None:
        self.tr: Translator
        if backend == "openai":
            self.tr = OpenAITranslator(OPENAI, Target("openai", "gpt-4o"), "chat")
        else:
            self.tr = AnthropicTranslator(ANTHROPIC, Target("anthropic", "claude"), "chat")
        body = to_openai(ANTHROPIC_REQUEST) if inbound else {**to_openai(ANTHROPIC_REQUEST), "stream_options": None}
        self.tr.request({k: v for k, v in body.items() if v is not None}, b"")
        self.writer = EventWriter("alias") if inbound else None

    def chunk(self, data: bytes, end: bool) -> bytes | None:
        out = self.tr.stream_chunk(data, end)
        if self.writer is None:
            return out.body
        return self.writer.feed(data if out.body is None else out.body, out.usage)

    def whole(self, data: bytes) -> bytes | None:
        out = self.tr.response(200, data)
        if self.writer is None:
            return out.body
        return answer_body(200, data if out.body is None else out.body, out.usage, "alias")


def make(backend: str, inbound: bool) -> Callable[[], Answering]:
    return lambda: Answering(backend, inbound)


def per_chunk_us(build: Callable[[], Answering], chunks: list[bytes]) -> float:
    """One round: a fresh translator per stream, as per request (its making is counted in)."""
    started = time.perf_counter()
    for _ in range(REPEAT):
        a = build()
        for i, c in enumerate(chunks):
            a.chunk(c, i == len(chunks) - 1)
    return (time.perf_counter() - started) / (REPEAT * len(chunks)) * 1e6


def per_call_us(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    for _ in range(REPEAT * 10):
        fn()
    return (time.perf_counter() - started) / (REPEAT * 10) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    streams = {"openai": openai_stream(), "anthropic": anthropic_stream()}
    whole = {"openai": json.dumps({"id": "c", "model": "gpt-4o", "choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": "tok " * 50}}],
                                   "usage": {"prompt_tokens": 500, "completion_tokens": 50}}).encode(),
             "anthropic": json.dumps({"id": "m", "type": "message", "role": "assistant", "model": "claude",
                                      "content": [{"type": "text", "text": "tok " * 50}], "stop_reason": "end_turn",
                                      "usage": {"input_tokens": 500, "output_tokens": 50}}).encode()}
    pairs = (("openai", "openai"), ("anthropic", "openai"), ("openai", "anthropic"), ("anthropic", "anthropic"))
    best = {pair: [float("inf"), float("inf")] for pair in pairs}
    for _ in range(ROUNDS):
        for client, backend in pairs:
            build = make(backend, client == "anthropic")
            b = best[(client, backend)]
            b[0] = min(b[0], per_chunk_us(build, streams[backend]))
            b[1] = min(b[1], per_call_us(lambda b=build, k=backend: b().whole(whole[k])))
    rows = [(f"{c} → {t}", *best[(c, t)]) for c, t in pairs]
    base_chunk, base_answer = rows[0][1], rows[0][2]
    lines = ["| client → target | µs per streamed chunk | ratio | µs per whole answer (incl. request) | ratio |",
             "|---|---:|---:|---:|---:|"]
    for name, chunk, answer in rows:
        lines.append(f"| {name} | {chunk:.1f} | {chunk / base_chunk:.2f} | {answer:.1f} | {answer / base_answer:.2f} |")
    mapping = min(per_call_us(lambda: to_openai(ANTHROPIC_REQUEST)) for _ in range(ROUNDS))
    lines.append("")
    lines.append(f"Mapping a ~2 KB Anthropic request to the OpenAI shape: {mapping:.1f} µs.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("# Anthropic inbound: translation cost per chunk and per answer (python -m tests.bench.inbound)\n\n")
            f.write(text)


if __name__ == "__main__":
    main()
