"""The built-in demo model: an OpenAI-compatible backend that needs no key and no network.

It is an ordinary upstream to Envoy (reached over a unix socket), so a demo
call takes the same path as a real one: routing, translation, streaming,
usage. Answers are made up from the question, streamed word by word at a
steady pace, with usage counted the way a tokenizer roughly would.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import re
import struct
import time
import uuid

from aiohttp import web

from extproc.errors import error_object

_WORDS = re.compile(r"\w+|[^\w\s]")
TOKEN_DELAY = 0.015


def count_tokens(text: str) -> int:
    return max(1, len(_WORDS.findall(text)))


def _prompt_text(messages: list) -> str:
    parts = []
    for m in messages:
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, str):
            parts.append(c)
        elif isinstance(c, list):
            parts.extend(p.get("text", "") for p in c if isinstance(p, dict))
    return "\n".join(parts)


def _last_user(messages: list) -> str:
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return _prompt_text([m])
    return ""


def compose_reply(messages: list, max_tokens: int | None) -> list[str]:
    """The answer as a list of pieces (one streamed chunk each)."""
    question = " ".join(_last_user(messages).split())
    if len(question) > 80:
        question = question[:77] + "..."
    text = (
        f'You asked: "{question}". I am Tollgate\'s built-in demo model, so this answer is made up, '
        "but it travelled the real path: Envoy, the ext_proc sidecar, routing, metering and streaming. "
        "Configure OpenAI, Azure OpenAI or Anthropic to get real answers."
    )
    pieces = re.findall(r"\S+\s*", text)
    if max_tokens is not None:
        pieces = pieces[: max(1, max_tokens)]
    return pieces


def embed(text: str, dims: int = 256) -> list[float]:
    """A deterministic bag-of-words vector: similar texts get similar vectors."""
    v = [0.0] * dims
    for w in _WORDS.findall(text.lower()):
        h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
        v[h % dims] += 1.0 if (h >> 32) & 1 else -1.0
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [round(x / norm, 6) for x in v]


def _usage(prompt: int, completion: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def _error(status: int, message: str) -> web.Response:
    body = error_object(message, "invalid_request_error", None)
    return web.json_response(body, status=status)


async def chat(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "body is not JSON")
    messages = body.get("messages") or []
    model = body.get("model") or "tollgate-demo-1"
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    pieces = compose_reply(messages, max_tokens)
    prompt_tokens = count_tokens(_prompt_text(messages)) + 3 * len(messages)
    completion_tokens = sum(count_tokens(p) for p in pieces)
    finish = "length" if max_tokens is not None and len(pieces) >= max_tokens else "stop"
    cid, created = f"chatcmpl-demo{uuid.uuid4().hex[:20]}", int(time.time())
    if not body.get("stream"):
        return web.json_response(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "".join(pieces)}, "finish_reason": finish}
                ],
                "usage": _usage(prompt_tokens, completion_tokens),
            }
        )
    resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
    await resp.prepare(request)
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

    async def send(obj: object) -> None:
        await resp.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")

    try:
        await send({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}]})
        for p in pieces:
            await asyncio.sleep(TOKEN_DELAY)
            await send({**base, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]})
        await send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        opts = body.get("stream_options") or {}
        if opts.get("include_usage"):
            await send({**base, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except ConnectionResetError:  # the client left (Envoy closed this stream): nothing to finish
        pass
    return resp


async def embeddings(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "body is not JSON")
    inp = body.get("input")
    items = [inp] if isinstance(inp, str) else list(inp or [])
    texts = [x if isinstance(x, str) else " ".join(map(str, x)) if isinstance(x, list) else str(x) for x in items]
    dims = int(body.get("dimensions") or 256)
    as_base64 = body.get("encoding_format") == "base64"
    data = [
        {"object": "embedding", "index": i, "embedding": _base64(embed(t, dims)) if as_base64 else embed(t, dims)}
        for i, t in enumerate(texts)
    ]
    tokens = sum(count_tokens(t) for t in texts)
    return web.json_response(
        {"object": "list", "data": data, "model": body.get("model"), "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    )


def _base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: little-endian float32s."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def make_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    return app


async def start_demo(socket_path: str) -> web.AppRunner:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    await web.UnixSite(runner, socket_path).start()
    return runner
