"""Fake LLM providers that speak the OpenAI, Azure OpenAI and Anthropic wire formats.

End-to-end tests put a real Envoy and the Tollgate gateway in front of these
fakes, so the fakes mimic the real HTTP APIs closely: the same status codes,
JSON shapes, error bodies and server-sent-event framing.  Each test programs a
fake with a FIFO queue of :class:`Behaviour` objects and afterwards inspects
what the fake received (``.requests``) and what it billed (``.usage_log``).

Typical use::

    with FakeProvider("openai", api_key="sk-test") as fake:
        fake.behaviours.append(Behaviour(status=429))
        ...  # drive requests at fake.base_url (directly or through Envoy)
        assert fake.requests[0].headers["authorization"] == "Bearer sk-test"

The module is also a small CLI for benchmarks (one process, uvloop, no access
log, no recording)::

    python tests/fake_provider.py --kind openai --port 18001 --token-delay 0.01
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import re
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

try:  # uvloop is optional: fall back to the stock event loop.
    import uvloop
except ImportError:  # pragma: no cover - depends on the platform
    uvloop = None

__all__ = [
    "Behaviour",
    "FakeProvider",
    "Recorded",
    "KINDS",
    "DEFAULT_REPLY",
    "EMBEDDING_DIMS",
    "count_prompt_tokens",
    "count_chat_words",
    "count_words",
    "default_error_body",
    "fake_embedding",
    "split_reply",
]

KINDS = ("openai", "azure", "anthropic")
DEFAULT_REPLY = "Hello from the fake provider."
EMBEDDING_DIMS = 8

_JSON_CT = "application/json"
_SSE_CT = "text/event-stream; charset=utf-8"


# --------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------


@dataclass
class Behaviour:
    """How the fake answers one request.

    ``status`` >= 400 sends ``error_body`` (or a realistic default error for
    the provider kind) instead of a completion.  Delays are in seconds.
    ``headers`` adds (or overrides) response headers.
    """

    status: int = 200
    error_body: dict | None = None
    reply: str = DEFAULT_REPLY
    chunks: int | None = None
    first_token_delay: float = 0.0
    token_delay: float = 0.0
    header_delay: float = 0.0
    fail_after_chunks: int | None = None
    error_event_after_chunks: int | None = None
    end_without_done: bool = False
    tool_call: dict | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    headers: dict[str, str] | None = None
    # A broken provider: ``raw_body`` is sent as it is (with ``content_type``, JSON by default) instead of an
    # answer; with ``byte_delay`` every byte of it (or of the normal answer) goes out alone, that many seconds
    # apart. ``error_message`` replaces the message of an error, whether answered or sent as a stream event.
    raw_body: bytes | None = None
    content_type: str | None = None
    byte_delay: float = 0.0
    error_message: str | None = None


@dataclass
class Recorded:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    json: Any  # parsed body, or None when it is not JSON
    received_at: float = field(default_factory=time.monotonic)


# --------------------------------------------------------------------------
# Deterministic helpers (exported so tests can compute expected values)
# --------------------------------------------------------------------------


def count_prompt_tokens(value: Any) -> int:
    """The fake's prompt-token count: a quarter of the JSON length, at least 1.

    ``value`` is the request's ``messages`` (chat/messages) or ``input``
    (embeddings), exactly as parsed from the request body.
    """
    return max(1, len(json.dumps(value)) // 4)


WORD = re.compile(r"\w+|[^\w\s]")


def count_words(text: str) -> int:
    """The billing fake's own token rule: each run of letters/digits is one token, each other
    non-space character one more (``"Say hello, word."`` is 5)."""
    return len(WORD.findall(text))


def count_chat_words(body: dict) -> int:
    """A chat prompt as the billing fake counts it: per message 3 tokens of framing plus the words
    of its role and text content, plus 3 for the reply's priming.

    This is deliberately *not* the gateway's tokenizer: it imitates OpenAI's
    published chat framing with a word rule, so on plain English it lands
    within a token or so of o200k, and where the gateway must count by
    itself (a stream cut before the provider's usage arrived) the tests see
    two independent figures and hold them to the tolerance the README states.
    """
    total = 3
    for m in body.get("messages") or []:
        content = m.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        total += 3 + count_words(str(m.get("role", ""))) + count_words(str(content or ""))
    return total


def split_reply(text: str, chunks: int | None = None) -> list[str]:
    """Cut ``text`` into the content pieces that will be streamed.

    Without ``chunks`` the text is cut into word-ish pieces (each word carries
    its leading whitespace, like real tokenisers).  With ``chunks`` it is cut
    into exactly that many non-empty pieces of near-equal length; a text that
    is too short is repeated (space separated) until it is long enough.
    """
    if chunks is None:
        return re.findall(r"\s*\S+|\s+$", text)
    if chunks <= 0:
        return []
    base = text or "x"
    while len(text) < chunks:
        text = f"{text} {base}" if text else base
    size, extra = divmod(len(text), chunks)
    pieces, pos = [], 0
    for i in range(chunks):
        step = size + (1 if i < extra else 0)
        pieces.append(text[pos:pos + step])
        pos += step
    return pieces


def fake_embedding(value: Any, dims: int = EMBEDDING_DIMS) -> list[float]:
    """A deterministic unit vector derived from a hash of ``value``."""
    seed = value if isinstance(value, str) else json.dumps(value)
    raw = b""
    counter = 0
    while len(raw) < dims * 4:
        raw += hashlib.sha256(f"{counter}:{seed}".encode()).digest()
        counter += 1
    ints = struct.unpack(f"<{dims}I", raw[: dims * 4])
    vec = [(n / 0xFFFFFFFF) * 2.0 - 1.0 for n in ints]
    norm = sum(x * x for x in vec) ** 0.5 or 1.0
    return [round(x / norm, 6) for x in vec]


_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key",
          "Incorrect API key provided. You can find your API key at "
          "https://platform.openai.com/account/api-keys."),
    403: ("request_forbidden", "unsupported_country_region_territory",
          "Country, region, or territory not supported"),
    404: ("invalid_request_error", "model_not_found",
          "The model does not exist or you do not have access to it."),
    429: ("tokens", "rate_limit_exceeded",
          "Rate limit reached for requests in organization org-fake on tokens "
          "per min (TPM): Limit 30000, Used 30000, Requested 100. Please try "
          "again in 1s. Visit https://platform.openai.com/account/rate-limits "
          "to learn more."),
    500: ("server_error", None,
          "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None,
          "The engine is currently overloaded, please try again later."),
}

_AZURE_ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "Invalid request."),
    401: ("401", "Access denied due to invalid subscription key or wrong API "
                 "endpoint. Make sure to provide a valid key for an active "
                 "subscription and use a correct regional API endpoint for "
                 "your resource."),
    403: ("403", "Access denied due to Virtual Network/Firewall rules."),
    404: ("DeploymentNotFound", "The API deployment for this resource does "
                                "not exist. If you created the deployment "
                                "within the last 5 minutes, please wait a "
                                "moment and try again."),
    429: ("429", "Requests to the ChatCompletions_Create Operation under Azure "
                 "OpenAI API version 2024-10-21 have exceeded token rate limit "
                 "of your current OpenAI S0 pricing tier. Please retry after "
                 "1 second."),
    500: ("InternalServerError", "The server had an error while processing "
                                 "your request. Sorry about that!"),
    503: ("ServiceUnavailable", "The service is temporarily unable to process "
                                "your request. Please try again later."),
}

_ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use "
                              "the specified resource."),
    404: ("not_found_error", "Not Found"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your "
                              "per-minute rate limit. Please reduce the prompt "
                              "length or the maximum tokens requested, or try "
                              "again later."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}


def default_error_body(kind: str, status: int, message: str | None = None) -> dict:
    """A realistic error JSON for ``kind`` and HTTP ``status``."""
    if kind == "anthropic":
        etype, msg = _ANTHROPIC_ERRORS.get(
            status, ("api_error" if status >= 500 else "invalid_request_error",
                     f"HTTP {status}"))
        return {"type": "error", "error": {"type": etype, "message": message or msg}}
    if kind == "azure":
        code, msg = _AZURE_ERRORS.get(status, (str(status), f"HTTP {status}"))
        return {"error": {"code": code, "message": message or msg}}
    etype, code, msg = _OPENAI_ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error",
                 None, f"HTTP {status}"))
    return {"error": {"message": message or msg, "type": etype, "param": None, "code": code}}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _data_event(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _named_event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _dumps(obj) + b"\n\n"


def _rand(n: int = 24) -> str:
    return uuid.uuid4().hex[:n]


def _mask_key(key: str) -> str:
    if len(key) <= 8:
        return "*" * len(key)
    return f"{key[:3]}{'*' * (len(key) - 7)}{key[-4:]}"


class _Reject(Exception):
    """Raised by validation to answer with an error response."""

    def __init__(self, status: int, body: dict):
        super().__init__(status)
        self.status = status
        self.body = body


# --------------------------------------------------------------------------
# The fake provider
# --------------------------------------------------------------------------


class FakeProvider:
    """An aiohttp server imitating one provider, run in a background thread."""

    def __init__(self, kind: str, api_key: str | None = "sk-test",
                 host: str = "127.0.0.1", port: int = 0, *, record: bool = True,
                 default: Behaviour | None = None,
                 prompt_counter: Callable[[dict], int] | None = None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.api_key = api_key  # None disables the auth check
        self.host = host
        self.port = port
        self.record = record
        # How chat prompts are counted (the request body in; tokens out); by default a quarter of the
        # JSON length of the messages. Tests of exact billing pass the provider's real recipe.
        self.prompt_counter = prompt_counter
        self.behaviours: list[Behaviour] = []
        self.default = default or Behaviour()
        self.requests: list[Recorded] = []
        self.usage_log: list[dict] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._sock: socket.socket | None = None

    # -- lifecycle ---------------------------------------------------------

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "FakeProvider":
        if self._thread is not None:
            raise RuntimeError("already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = uvloop.new_event_loop() if uvloop else asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._astart())
            except BaseException as exc:  # report start-up failures to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(
                        asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(
            target=run, name=f"fake-{self.kind}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake provider did not start within 10s")
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._astop(), loop)
            try:
                fut.result(timeout=10)
            except Exception:
                pass
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None
        self._loop = None

    def __enter__(self) -> "FakeProvider":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _astart(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # A short shutdown timeout so stop() does not wait for "hung" handlers.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.25,
                                     handle_signals=False)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        site = web.SockSite(self._runner, sock, backlog=1024)
        await site.start()

    async def _astop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- conveniences for tests -------------------------------------------

    def reset(self) -> None:
        """Forget recorded requests, usage and queued behaviours."""
        self.behaviours.clear()
        self.requests.clear()
        self.usage_log.clear()

    @property
    def last_request(self) -> Recorded | None:
        return self.requests[-1] if self.requests else None

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> bool:
        """Block until at least ``n`` requests were recorded (or time out)."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def wait_for_usage(self, n: int, timeout: float = 5.0) -> bool:
        """Block until at least ``n`` usage entries were logged (or time out)."""
        deadline = time.monotonic() + timeout
        while len(self.usage_log) < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # -- request plumbing --------------------------------------------------

    def _next_behaviour(self) -> Behaviour:
        try:
            return self.behaviours.pop(0)
        except IndexError:
            return self.default

    def _prompt(self, body: dict) -> int:
        if self.prompt_counter is not None:
            return self.prompt_counter(body)
        return count_prompt_tokens(body.get("messages"))

    def _log_usage(self, prompt: int, completion: int, stream: bool,
                   completed: bool) -> None:
        if self.record:
            self.usage_log.append({"prompt_tokens": prompt,
                                   "completion_tokens": completion,
                                   "stream": stream, "completed": completed})

    def _base_headers(self) -> dict[str, str]:
        rid = _rand(32)
        if self.kind == "anthropic":
            return {"request-id": f"req_{rid}"}
        headers = {"x-request-id": f"req_{rid}"}
        if self.kind == "azure":
            headers["apim-request-id"] = str(uuid.UUID(rid))
        else:
            headers["openai-processing-ms"] = "1"
            headers["openai-version"] = "2020-10-01"
        return headers

    def _json_response(self, status: int, body: dict,
                       extra: dict[str, str] | None = None) -> web.Response:
        headers = self._base_headers()
        headers["Content-Type"] = _JSON_CT
        if status == 429:
            headers["retry-after"] = "1"
        if extra:
            headers.update(extra)
        return web.Response(status=status, body=_dumps(body), headers=headers)

    def _route(self, method: str, path: str) -> tuple[str, str | None] | None:
        """Map a request to (endpoint, azure deployment) or None for 404."""
        if method != "POST":
            return None
        if self.kind == "openai":
            if path == "/v1/chat/completions":
                return "chat", None
            if path == "/v1/embeddings":
                return "embeddings", None
            return None
        if self.kind == "anthropic":
            return ("messages", None) if path == "/v1/messages" else None
        parts = path.split("/")
        # ['', 'openai', 'deployments', '{deployment}', ...]
        if len(parts) >= 5 and parts[1] == "openai" and parts[2] == "deployments" and parts[3]:
            tail = "/".join(parts[4:])
            if tail == "chat/completions":
                return "chat", parts[3]
            if tail == "embeddings":
                return "embeddings", parts[3]
        return None

    def _not_found(self, request: web.Request) -> web.Response:
        if self.kind == "openai":
            body = default_error_body(
                "openai", 404, f"Invalid URL ({request.method} {request.path})")
            body["error"]["code"] = None
        elif self.kind == "azure":
            body = {"error": {"code": "404", "message": "Resource not found"}}
        else:
            body = default_error_body("anthropic", 404)
        return self._json_response(404, body)

    def _check_auth(self, request: web.Request) -> web.Response | None:
        headers = request.headers
        if self.kind == "openai":
            auth = headers.get("Authorization", "")
            if self.api_key is None:
                return None
            if not auth.startswith("Bearer ") or not auth[7:].strip():
                return self._json_response(401, default_error_body(
                    "openai", 401,
                    "You didn't provide an API key. You need to provide your API "
                    "key in an Authorization header using Bearer auth (i.e. "
                    "Authorization: Bearer YOUR_KEY). You can obtain an API key "
                    "from https://platform.openai.com/account/api-keys."))
            given = auth[7:].strip()
            if given != self.api_key:
                return self._json_response(401, default_error_body(
                    "openai", 401,
                    f"Incorrect API key provided: {_mask_key(given)}. You can find "
                    "your API key at https://platform.openai.com/account/api-keys."))
            return None
        if self.kind == "azure":
            if self.api_key is not None and headers.get("api-key") != self.api_key:
                return self._json_response(401, default_error_body("azure", 401))
            if not request.query.get("api-version"):
                return self._json_response(
                    404, {"error": {"code": "404", "message": "Resource not found"}})
            return None
        # anthropic: x-api-key is the documented header; recent SDKs (2.x) send
        # the same key as "Authorization: Bearer", which the API also accepts.
        if self.api_key is not None:
            key = headers.get("x-api-key")
            if not key:
                auth = headers.get("Authorization", "")
                if auth.startswith("Bearer ") and auth[7:].strip():
                    key = auth[7:].strip()
            if not key:
                return self._json_response(401, default_error_body(
                    "anthropic", 401, "x-api-key header is required"))
            if key != self.api_key:
                return self._json_response(401, default_error_body("anthropic", 401))
        if not headers.get("anthropic-version"):
            return self._json_response(400, default_error_body(
                "anthropic", 400, "anthropic-version: header is required"))
        return None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        if self.record:
            self.requests.append(Recorded(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers={k.lower(): v for k, v in request.headers.items()},
                body=raw,
                json=parsed,
            ))
        route = self._route(request.method, request.path)
        if route is None:
            return self._not_found(request)
        rejected = self._check_auth(request)
        if rejected is not None:
            return rejected
        endpoint, deployment = route
        try:
            self._validate(endpoint, parsed)
        except _Reject as rej:
            return self._json_response(rej.status, rej.body)

        behaviour = self._next_behaviour()
        if behaviour.header_delay > 0:
            await asyncio.sleep(behaviour.header_delay)
        if behaviour.raw_body is not None:
            return await self._raw(request, behaviour, behaviour.raw_body)
        if behaviour.status >= 400:
            body = behaviour.error_body
            if body is None:
                body = default_error_body(self.kind, behaviour.status, behaviour.error_message)
            return self._json_response(behaviour.status, body, behaviour.headers)

        if endpoint == "embeddings":
            return await self._embeddings(request, behaviour, parsed, deployment)
        if endpoint == "messages":
            return await self._anthropic_messages(request, behaviour, parsed)
        return await self._openai_chat(request, behaviour, parsed, deployment)

    async def _raw(self, request: web.Request, b: Behaviour, body: bytes) -> web.StreamResponse:
        """Send ``body`` as it is; with ``byte_delay``, one byte at a time."""
        headers = {**self._base_headers(), "Content-Type": b.content_type or _JSON_CT, **(b.headers or {})}
        if b.byte_delay <= 0:
            return web.Response(status=b.status, body=body, headers=headers)
        headers["Content-Length"] = str(len(body))
        resp = web.StreamResponse(status=b.status, headers=headers)
        try:
            await resp.prepare(request)
            for i in range(len(body)):
                await resp.write(body[i:i + 1])
                await asyncio.sleep(b.byte_delay)
            await resp.write_eof()
        except ConnectionError:  # the gateway gave up on us
            pass
        return resp

    # -- validation --------------------------------------------------------

    def _bad_request(self, message: str, param: str | None = None,
                     code: str | None = None) -> _Reject:
        body = default_error_body(self.kind, 400, message)
        if self.kind == "openai":
            body["error"]["param"] = param
            body["error"]["code"] = code
        return _Reject(400, body)

    def _validate(self, endpoint: str, body: Any) -> None:
        if not isinstance(body, dict):
            if self.kind == "anthropic":
                raise self._bad_request("There was an error parsing the body of "
                                        "your request. Please send valid JSON.")
            raise self._bad_request(
                "We could not parse the JSON body of your request. (HINT: This "
                "likely means you aren't using your HTTP library correctly. The "
                "OpenAI API expects a JSON payload, but what was sent was not "
                "valid JSON.)")
        if endpoint == "embeddings":
            if self.kind == "openai" and not body.get("model"):
                raise self._bad_request("you must provide a model parameter")
            if "input" not in body:
                raise self._bad_request("Missing required parameter: 'input'.",
                                        "input", "missing_required_parameter")
            return
        if endpoint == "chat":
            if self.kind == "openai" and not body.get("model"):
                raise self._bad_request("you must provide a model parameter")
            messages = body.get("messages")
            if not isinstance(messages, list):
                raise self._bad_request("Missing required parameter: 'messages'.",
                                        "messages", "missing_required_parameter")
            if not messages:
                raise self._bad_request("[] is too short - 'messages'",
                                        "messages", "empty_array")
            return
        # Anthropic /v1/messages
        if not body.get("model"):
            raise self._bad_request("model: Field required")
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            raise self._bad_request("max_tokens: Field required")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise self._bad_request("max_tokens: Input should be a valid integer")
        if max_tokens < 1:
            raise self._bad_request("max_tokens: Input should be greater than or equal to 1")
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise self._bad_request("messages: Field required")
        if not messages:
            raise self._bad_request("messages: at least one message is required")
        previous = None
        for i, msg in enumerate(messages):
            role = msg.get("role") if isinstance(msg, dict) else None
            if role not in ("user", "assistant"):
                raise self._bad_request(
                    f"messages.{i}.role: Input should be 'user' or 'assistant'")
            if i == 0 and role != "user":
                raise self._bad_request('messages: first message must use the "user" role')
            if role == previous:
                raise self._bad_request(
                    'messages: roles must alternate between "user" and "assistant", '
                    f'but found multiple "{role}" roles in a row')
            previous = role

    # -- streaming driver --------------------------------------------------

    async def _interrupt(self, request: web.Request, resp: web.StreamResponse,
                         b: Behaviour, sent: int, error_event: bytes,
                         at_end: bool) -> str | None:
        """Inject a failure after ``sent`` content chunks, if one is due."""
        if b.fail_after_chunks is not None and (at_end or sent >= b.fail_after_chunks):
            self._kill_connection(request)
            return "aborted"
        if b.error_event_after_chunks is not None and (
                at_end or sent >= b.error_event_after_chunks):
            await resp.write(error_event)
            return "error_event"
        return None

    @staticmethod
    def _kill_connection(request: web.Request) -> None:
        transport = request.transport
        if transport is None:
            return
        # abort() drops anything still buffered in the transport; fall back to
        # close() (which flushes first) so the chunks already "sent" do arrive.
        if transport.get_write_buffer_size():
            transport.close()
        else:
            transport.abort()

    async def _stream(self, request: web.Request, b: Behaviour, *,
                      preamble: list[bytes], content: list[bytes],
                      epilogue: list[bytes], terminator: list[bytes],
                      error_event: bytes, prompt_tokens: int,
                      completion_tokens: int) -> web.StreamResponse:
        headers = self._base_headers()
        headers["Content-Type"] = _SSE_CT
        headers["Cache-Control"] = "no-cache"
        if b.headers:
            headers.update(b.headers)
        resp = web.StreamResponse(status=b.status, headers=headers)
        resp.enable_chunked_encoding()
        sent = 0
        completed = False
        try:
            await resp.prepare(request)  # headers go out now
            if b.first_token_delay > 0:
                await asyncio.sleep(b.first_token_delay)
            for event in preamble:
                await resp.write(event)
            for i, event in enumerate(content):
                if await self._interrupt(request, resp, b, sent, error_event, False):
                    return resp
                if i and b.token_delay > 0:
                    await asyncio.sleep(b.token_delay)
                await resp.write(event)
                sent += 1
            if await self._interrupt(request, resp, b, sent, error_event, True):
                return resp
            if b.token_delay > 0 and content:
                await asyncio.sleep(b.token_delay)
            for event in epilogue:
                await resp.write(event)
            if not b.end_without_done:
                for event in terminator:
                    await resp.write(event)
                completed = True
            return resp
        except ConnectionError:  # the client went away mid-stream
            return resp
        finally:
            self._log_usage(prompt_tokens, completion_tokens if completed else sent,
                            stream=True, completed=completed)

    async def _plain(self, request: web.Request, b: Behaviour, body: dict,
                     prompt_tokens: int, completion_tokens: int,
                     work: int) -> web.StreamResponse:
        """Send a non-streaming JSON answer after simulated generation time."""
        delay = b.first_token_delay + b.token_delay * max(0, work - 1)
        if delay > 0:
            await asyncio.sleep(delay)
        payload = _dumps(body)
        if b.fail_after_chunks is not None:
            # Promise the whole body, deliver half of it, then drop the line.
            headers = self._base_headers()
            headers["Content-Type"] = _JSON_CT
            if b.headers:
                headers.update(b.headers)
            resp = web.StreamResponse(status=b.status, headers=headers)
            resp.content_length = len(payload)
            try:
                await resp.prepare(request)
                await resp.write(payload[: len(payload) // 2])
            except ConnectionError:
                pass
            self._kill_connection(request)
            self._log_usage(prompt_tokens, 0, stream=False, completed=False)
            return resp
        transport = request.transport
        alive = transport is not None and not transport.is_closing()
        self._log_usage(prompt_tokens, completion_tokens, stream=False, completed=alive)
        headers = self._base_headers()
        headers["Content-Type"] = _JSON_CT
        if b.headers:
            headers.update(b.headers)
        return web.Response(status=b.status, body=payload, headers=headers)

    # -- OpenAI / Azure chat -------------------------------------------------

    async def _openai_chat(self, request: web.Request, b: Behaviour, body: dict,
                           deployment: str | None) -> web.StreamResponse:
        model = body.get("model") or deployment or "gpt-4o"
        prompt = b.prompt_tokens if b.prompt_tokens is not None else self._prompt(body)
        cid = f"chatcmpl-{_rand(29)}"
        created = int(time.time())
        is_azure = self.kind == "azure"

        finish = "stop"
        tool = None
        if b.tool_call is not None:
            arguments = json.dumps(b.tool_call.get("arguments", {}))
            tool = {"id": f"call_{_rand(24)}", "name": b.tool_call["name"],
                    "arguments": arguments}
            pieces = split_reply(arguments, b.chunks)
            finish = "tool_calls"
        else:
            pieces = split_reply(b.reply, b.chunks)
            limit = body.get("max_completion_tokens") or body.get("max_tokens")
            if isinstance(limit, int) and 0 < limit < len(pieces):
                pieces = pieces[:limit]
                finish = "length"
        completion = b.completion_tokens if b.completion_tokens is not None else len(pieces)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0},
        }

        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "refusal": None}
            if tool is not None:
                message["content"] = None
                message["tool_calls"] = [{
                    "id": tool["id"], "type": "function",
                    "function": {"name": tool["name"], "arguments": tool["arguments"]},
                }]
            else:
                message["content"] = "".join(pieces)
            choice: dict[str, Any] = {"index": 0, "message": message,
                                      "logprobs": None, "finish_reason": finish}
            result: dict[str, Any] = {
                "id": cid, "object": "chat.completion", "created": created,
                "model": model, "choices": [choice], "usage": usage,
                "system_fingerprint": "fp_fake",
            }
            if is_azure:
                choice["content_filter_results"] = {}
                result["prompt_filter_results"] = [
                    {"prompt_index": 0, "content_filter_results": {}}]
            return await self._plain(request, b, result, prompt, completion, len(pieces))

        stream_options = body.get("stream_options") or {}
        include_usage = bool(isinstance(stream_options, dict)
                             and stream_options.get("include_usage"))

        def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
            obj: dict[str, Any] = {
                "id": cid, "object": "chat.completion.chunk", "created": created,
                "model": model, "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish_reason}],
            }
            if include_usage:
                obj["usage"] = None
            return _data_event(obj)

        if tool is not None:
            first = chunk({"role": "assistant", "content": None, "refusal": None,
                           "tool_calls": [{"index": 0, "id": tool["id"], "type": "function",
                                           "function": {"name": tool["name"],
                                                        "arguments": ""}}]})
            content = [chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]})
                       for p in pieces]
        else:
            first = chunk({"role": "assistant", "content": "", "refusal": None})
            content = [chunk({"content": p}) for p in pieces]
        epilogue = [chunk({}, finish)]
        if include_usage:
            epilogue.append(_data_event({
                "id": cid, "object": "chat.completion.chunk", "created": created,
                "model": model, "system_fingerprint": "fp_fake", "choices": [],
                "usage": usage,
            }))
        error_event = _data_event(default_error_body("openai", 500, b.error_message))
        return await self._stream(
            request, b, preamble=[first], content=content, epilogue=epilogue,
            terminator=[b"data: [DONE]\n\n"], error_event=error_event,
            prompt_tokens=prompt, completion_tokens=completion)

    # -- OpenAI / Azure embeddings -----------------------------------------

    async def _embeddings(self, request: web.Request, b: Behaviour, body: dict,
                          deployment: str | None) -> web.StreamResponse:
        model = body.get("model") or deployment or "text-embedding-3-small"
        raw_input = body.get("input")
        inputs = raw_input if isinstance(raw_input, list) and raw_input and \
            not isinstance(raw_input[0], int) else [raw_input]
        dims = body.get("dimensions")
        dims = dims if isinstance(dims, int) and dims > 0 else EMBEDDING_DIMS
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(inputs):
            vec = fake_embedding(item, dims)
            emb: Any = vec
            if as_base64:
                emb = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        prompt = b.prompt_tokens if b.prompt_tokens is not None else \
            count_prompt_tokens(raw_input)
        result = {"object": "list", "data": data, "model": model,
                  "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}
        return await self._plain(request, b, result, prompt, 0, 1)

    # -- Anthropic messages ------------------------------------------------

    async def _anthropic_messages(self, request: web.Request, b: Behaviour,
                                  body: dict) -> web.StreamResponse:
        model = body["model"]
        prompt = b.prompt_tokens if b.prompt_tokens is not None else self._prompt(body)
        mid = f"msg_01{_rand(22)}"
        stop_reason = "end_turn"
        tool = None
        if b.tool_call is not None:
            tool_input = b.tool_call.get("arguments", {})
            tool = {"type": "tool_use", "id": f"toolu_01{_rand(22)}",
                    "name": b.tool_call["name"], "input": tool_input}
            pieces = split_reply(json.dumps(tool_input), b.chunks)
            stop_reason = "tool_use"
        else:
            pieces = split_reply(b.reply, b.chunks)
            if len(pieces) > body["max_tokens"]:
                pieces = pieces[: body["max_tokens"]]
                stop_reason = "max_tokens"
        completion = b.completion_tokens if b.completion_tokens is not None else len(pieces)

        if not body.get("stream"):
            block = tool if tool is not None else {"type": "text", "text": "".join(pieces)}
            result = {
                "id": mid, "type": "message", "role": "assistant", "model": model,
                "content": [block], "stop_reason": stop_reason, "stop_sequence": None,
                "usage": {"input_tokens": prompt, "output_tokens": completion,
                          "cache_creation_input_tokens": 0,
                          "cache_read_input_tokens": 0},
            }
            return await self._plain(request, b, result, prompt, completion, len(pieces))

        start_block = dict(tool, input={}) if tool is not None else {"type": "text", "text": ""}
        preamble = [
            _named_event("message_start", {"type": "message_start", "message": {
                "id": mid, "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": prompt, "output_tokens": 1,
                          "cache_creation_input_tokens": 0,
                          "cache_read_input_tokens": 0}}}),
            _named_event("content_block_start", {"type": "content_block_start",
                                                 "index": 0, "content_block": start_block}),
            _named_event("ping", {"type": "ping"}),
        ]
        if tool is not None:
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in pieces]
        else:
            deltas = [{"type": "text_delta", "text": p} for p in pieces]
        content = [_named_event("content_block_delta", {"type": "content_block_delta",
                                                        "index": 0, "delta": d})
                   for d in deltas]
        epilogue = [
            _named_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _named_event("message_delta", {"type": "message_delta",
                                           "delta": {"stop_reason": stop_reason,
                                                     "stop_sequence": None},
                                           "usage": {"output_tokens": completion}}),
        ]
        error_event = _named_event("error", {"type": "error", "error": {
            "type": "overloaded_error", "message": b.error_message or "Overloaded"}})
        return await self._stream(
            request, b, preamble=preamble, content=content, epilogue=epilogue,
            terminator=[_named_event("message_stop", {"type": "message_stop"})],
            error_event=error_event, prompt_tokens=prompt, completion_tokens=completion)


# --------------------------------------------------------------------------
# CLI for benchmarks
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a fake LLM provider.")
    parser.add_argument("--kind", choices=KINDS, default="openai")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="sk-test",
                        help="expected key; pass an empty string to accept any")
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--first-token-delay", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=None)
    parser.add_argument("--reply", default=DEFAULT_REPLY)
    args = parser.parse_args(argv)

    provider = FakeProvider(
        args.kind, api_key=args.api_key or None, host=args.host, port=args.port,
        record=False,
        default=Behaviour(reply=args.reply, chunks=args.chunks,
                          token_delay=args.token_delay,
                          first_token_delay=args.first_token_delay))

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await provider._astart()
        print(f"fake {args.kind} provider listening on {provider.base_url}", flush=True)
        try:
            await stop.wait()
        finally:
            await provider._astop()

    if uvloop is not None:
        uvloop.run(serve())
    else:  # pragma: no cover
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
