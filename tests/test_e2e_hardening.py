"""The data path under bad providers, bad clients and a dying Python server: every answer is OpenAI's
shape, nothing unreadable passes as a success, nothing runs forever, and the gateway comes back by itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time

import openai
import pytest

try:  # the SDKs' HTTP client, named as the installed SDK names it
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

from tests.conftest import providers_for
from tests.harness import TOLLGATE
from tests.fake_provider import Behaviour, split_reply

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "hi"}]
COMPLETION = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}).encode()


def single(fake, **alias) -> dict:
    return {"providers": providers_for(fake),
            "models": {"gpt-4o": {"targets": [{"provider": "openai", "model": "gpt-4o"}], **alias}}}


def client_of(gw, timeout: float = 20) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="client-key", max_retries=0, timeout=timeout)


def openai_error(body: bytes | str) -> dict:
    obj = json.loads(body)
    assert set(obj) == {"error"} and {"message", "type", "code"} <= set(obj["error"]), obj
    return obj["error"]


# --------------------------------------------------------------------------- invalid provider answers

GARBAGE = [
    ("not json", b"<html>502 Bad Gateway</html>", "application/json"),
    ("truncated json", COMPLETION[: len(COMPLETION) // 2], "application/json"),
    ("json without choices", b'{"object": "chat.completion"}', "application/json"),
    ("wrong content type", COMPLETION, "text/html"),
    ("empty body", b"", "application/json"),
]


@pytest.mark.parametrize("name, body, ctype", GARBAGE, ids=[g[0] for g in GARBAGE])
def test_an_unreadable_200_is_a_502_in_openai_shape_and_billed_nothing(gateway, fake_openai, name, body, ctype):
    gw = gateway(single(fake_openai))
    fake_openai.behaviours.append(Behaviour(raw_body=body, content_type=ctype))
    with pytest.raises(openai.APIStatusError) as caught:
        client_of(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert openai_error(caught.value.response.text)["code"] == "invalid_upstream_response"
    record = wait_for_record(gw)
    assert record["status"] == 502 and record["error"] == "invalid_upstream_response"
    assert record["cost_usd"] == 0  # the documented rule: an answer nobody could read costs the caller nothing


def test_an_answer_larger_than_the_gateways_buffer_is_a_502_naming_the_limit(gateway, fake_openai):
    gw = gateway({**single(fake_openai), "limits": {"max_request_bytes": 1024 * 1024}})
    big = json.loads(COMPLETION)
    big["choices"][0]["message"]["content"] = "x" * (3 * 1024 * 1024)
    fake_openai.behaviours.append(Behaviour(raw_body=json.dumps(big).encode()))
    with pytest.raises(openai.APIStatusError) as caught:
        client_of(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 502
    err = openai_error(caught.value.response.text)
    assert err["code"] == "upstream_response_too_large" and "1048576 bytes" in err["message"]


@pytest.mark.parametrize("body, ctype, status", [
    (COMPLETION, "application/json", 502),  # a stream request answered with a whole JSON body
    (b"<html>oops</html>\n\n", "text/event-stream", 200),  # declared SSE, is not
    (b"data: {not json\n\n", "text/event-stream", 200),
], ids=["json instead of sse", "html as sse", "broken data line"])
def test_a_stream_that_is_not_an_openai_stream_never_passes_as_success(gateway, fake_openai, body, ctype, status):
    gw = gateway(single(fake_openai))
    fake_openai.behaviours.append(Behaviour(raw_body=body, content_type=ctype))
    client = client_of(gw)
    if status == 502:
        with pytest.raises(openai.APIStatusError) as caught:
            list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
        assert caught.value.status_code == 502
        return
    with pytest.raises(openai.APIError) as caught:  # the in-band error event the SDK raises on
        list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert "upstream openai" in str(caught.value)
    assert wait_for_record(gw)["error"] in ("stream_interrupted", "invalid_upstream_response")


# --------------------------------------------------------------------------- bad clients, Envoy's own replies


def send_raw(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


BODY = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
RAW = [
    ("http/1.0", b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n" % len(BODY) + BODY, 426, "http_version_not_supported"),
    ("underscore header", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX_Team: a\r\nconnection: close\r\n"
                          b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(BODY) + BODY,
     400, "malformed_request"),
    ("garbage request line", b"\x16\x03\x01 hello there\r\n\r\n", 400, "malformed_request"),
    ("huge headers", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-big: " + b"a" * 100_000 + b"\r\nconnection: close\r\n\r\n",
     431, "request_headers_too_large"),
    ("form post", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nconnection: close\r\n"
                  b"content-type: application/x-www-form-urlencoded\r\ncontent-length: %d\r\n\r\n" % len(BODY) + BODY,
     415, "unsupported_media_type"),
    ("text/plain", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nconnection: close\r\n"
                   b"content-type: text/plain\r\ncontent-length: %d\r\n\r\n" % len(BODY) + BODY,
     415, "unsupported_media_type"),
]


def test_every_refusal_of_a_bad_request_is_an_openai_error_and_reaches_no_provider(gateway, fake_openai):
    gw = gateway(single(fake_openai))
    for name, data, status, code in RAW:
        got, headers, body = send_raw(gw.port, data)
        assert (name, got) == (name, status)
        assert headers["content-type"].startswith("application/json"), name
        assert openai_error(body)["code"] == code, name
    lone = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "bad \\ud800 text"}]}'
    status, _, body = gw.raw("POST", "/v1/chat/completions", lone)
    assert status == 400 and openai_error(body)["code"] == "invalid_unicode"
    pair = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "fine \\ud83d\\ude00"}]}'
    assert gw.raw("POST", "/v1/chat/completions", pair)[0] == 200
    assert len(fake_openai.requests) == 1  # only the valid one


# --------------------------------------------------------------------------- time bounds


def test_a_plain_answer_trickling_a_byte_a_second_ends_at_the_answer_deadline(gateway, fake_openai):
    gw = gateway(single(fake_openai, answer_timeout="3s"))
    fake_openai.behaviours.append(Behaviour(raw_body=COMPLETION, byte_delay=1.0))
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client_of(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    took = time.monotonic() - started
    assert caught.value.status_code == 504
    assert openai_error(caught.value.response.text)["code"] == "upstream_timeout"
    assert 3 <= took < 10


def test_a_trickling_stream_is_cut_by_the_minimum_rate_with_every_byte_so_far_and_an_error_event(gateway, fake_openai):
    gw = gateway(single(fake_openai, first_byte_timeout="2s", min_bytes_per_second=400))
    # every word is one event of ~260 bytes: fifty a second keep up, one every 1.5 s does not
    fake_openai.behaviours.append(Behaviour(reply=" ".join(f"w{i}" for i in range(40)), token_delay=1.5))
    got: list[str] = []
    started = time.monotonic()
    with pytest.raises(openai.APIError) as caught:
        for chunk in client_of(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True):
            got.extend(c.delta.content or "" for c in chunk.choices)
    assert "min_bytes_per_second" in str(caught.value)
    assert time.monotonic() - started < 10
    words = "".join(got).split()
    assert 2 <= len(words) < 40 and words == [f"w{i}" for i in range(len(words))]  # a prefix, nothing skipped
    record = wait_for_record(gw)
    assert record["error"] == "upstream_too_slow"
    fake_openai.behaviours.append(Behaviour(reply=" ".join(f"w{i}" for i in range(40)), token_delay=0.02))
    fast = client_of(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in fast if c.choices).split() == [f"w{i}" for i in range(40)]


# --------------------------------------------------------------------------- cuts


def test_a_stream_the_provider_ends_without_its_terminator_delivers_every_chunk_then_an_error(gateway, fake_openai):
    gw = gateway(single(fake_openai))
    reply = "one two three four five six seven"
    fake_openai.behaviours.append(Behaviour(reply=reply, end_without_done=True))
    got: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client_of(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True):
            got.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(got) == reply
    assert "ended the stream before it was complete" in str(caught.value)
    assert wait_for_record(gw)["error"] == "stream_interrupted"


def test_a_stream_whose_provider_connection_breaks_never_looks_like_success_and_is_logged_as_failed(
        gateway, fake_openai):
    # Envoy resets the client's stream when the provider's connection breaks mid-answer (README: cuts)
    gw = gateway(single(fake_openai))
    reply = "one two three four five six seven"
    fake_openai.behaviours.append(Behaviour(reply=reply, fail_after_chunks=5, token_delay=0.02))
    got: list[str] = []
    with pytest.raises((openai.APIError, openai.APIConnectionError)):
        for chunk in client_of(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True):
            got.extend(c.delta.content or "" for c in chunk.choices)
    words = split_reply(reply)
    assert "".join(got) in ("".join(words[:4]), "".join(words[:5]))  # at most the chunk in flight is lost
    record = wait_for_record(gw)
    assert record["error"] == "stream_reset"


# --------------------------------------------------------------------------- supervision


def extproc_pid(gw) -> int:
    """The serving ext_proc child, once its standby is ready (it starts 2 s after the gateway)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        out = subprocess.run(["pgrep", "-P", str(gw.proc.pid), "-f", "extproc extproc"], capture_output=True,
                             text=True)
        pids = [int(p) for p in out.stdout.split()]
        serving = [p for p in pids if listens(p)]
        spare = [p for p in pids if p not in serving]
        if len(serving) == 1 and len(spare) == 1 and f"ext_proc standby ready (pid {spare[0]})" in gw.log():
            return serving[0]
        time.sleep(0.2)
    raise AssertionError(f"no serving ext_proc child with a ready standby: {pids}")


def listens(pid: int) -> bool:
    out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    return f"pid={pid}," in out


LONG_REPLY = " ".join(f"w{i}" for i in range(30))


def test_sigkill_of_the_python_server_under_load_gives_json_errors_and_service_is_back_within_2s(
        gateway, fake_openai):
    """Plain requests and streams in flight when the serving process is SIGKILLed (README: supervision).

    A request whose answer has not begun (request phase, or a plain answer Envoy still buffers for the
    answer stage) gets a 503 in OpenAI's shape with Retry-After; only a stream whose 200 and first events had
    already left is cut, and then as an incomplete body the SDK raises on, never as a success. Envoy stays
    up; the standby serves within 2 s.
    """
    gw = gateway(single(fake_openai))
    envoy_before = subprocess.run(["pgrep", "-P", str(gw.proc.pid), "-x", "envoy"], capture_output=True,
                                  text=True).stdout.split()
    victim = extproc_pid(gw)
    fake_openai.default = Behaviour(reply=LONG_REPLY, first_token_delay=0.05, token_delay=0.01)
    client = client_of(gw, timeout=10)
    plain: list[tuple[float, int | str]] = []
    streams: list[tuple[float, int | str, str]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def plain_load() -> None:
        try:
            while not stop.is_set():
                at = time.monotonic()
                try:
                    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
                    plain.append((at, 200))
                except openai.APIStatusError as e:
                    assert openai_error(e.response.text)["code"] == "gateway_unavailable"
                    assert e.response.headers["retry-after"] == "1"
                    plain.append((at, e.status_code))
                except openai.APIConnectionError:
                    plain.append((at, "reset"))
        except BaseException as e:  # noqa: BLE001 - reported to the test below
            failures.append(e)

    def stream_load() -> None:
        try:
            while not stop.is_set():
                at, got = time.monotonic(), []
                try:
                    for chunk in client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True):
                        got.extend(c.delta.content or "" for c in chunk.choices)
                    assert "".join(got) == LONG_REPLY
                    streams.append((at, 200, "".join(got)))
                except openai.APIStatusError as e:
                    assert openai_error(e.response.text)["code"] == "gateway_unavailable"
                    streams.append((at, e.status_code, ""))
                except (openai.APIConnectionError, httpx.TransportError):
                    streams.append((at, "cut", "".join(got)))
        except BaseException as e:  # noqa: BLE001 - reported to the test below
            failures.append(e)

    threads = [threading.Thread(target=plain_load) for _ in range(3)]
    threads += [threading.Thread(target=stream_load) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(15)
    assert failures == []
    assert not [at for at, what in plain if what == "reset"], plain  # a plain request always gets JSON
    after = [(at - killed_at, what) for at, what in plain if at > killed_at]
    assert after, plain
    back = next(at for at, what in after if what == 200)
    assert back <= 2.0
    assert {what for _, what in after} <= {200, 503}
    for at, what, text in streams:
        assert what in (200, 503, "cut")
        if what == "cut":  # only a stream already under way when the server died: a prefix, then no end
            assert at < killed_at, (at - killed_at, text)
            assert LONG_REPLY.startswith(text)
    assert any(at > killed_at + back and what == 200 for at, what, _ in streams)  # streams are served again
    envoy_after = subprocess.run(["pgrep", "-P", str(gw.proc.pid), "-x", "envoy"], capture_output=True,
                                 text=True).stdout.split()
    assert envoy_after == envoy_before  # Envoy never exited
    assert extproc_pid(gw) != victim


def test_a_request_arriving_while_the_python_server_is_down_waits_for_the_standby_instead_of_failing(
        gateway, fake_openai, tmp_path):
    """Envoy retries opening the exchange's gRPC stream when the connection fails (README: supervision), so a
    request that comes in between a server's death and its standby binding is served, not refused."""
    gw = gateway(single(fake_openai), split=True)
    log = (tmp_path / "standby.log").open("ab")
    standby = subprocess.Popen([TOLLGATE, "extproc", "--standby", "--config", str(gw.config_path), "--runtime-dir",
                                str(gw.runtime)], stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                               env=gw.env)
    try:
        deadline = time.monotonic() + 60
        while b"ext_proc standby ready" not in (tmp_path / "standby.log").read_bytes():
            assert standby.poll() is None and time.monotonic() < deadline, "the standby did not get ready"
            time.sleep(0.1)
        gw.kill_extproc()
        retries_before = extproc_retries(gw)
        answer: list[object] = []

        def ask() -> None:
            try:
                answer.append(client_of(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES))
            except BaseException as e:  # noqa: BLE001 - compared below
                answer.append(e)

        asking = threading.Thread(target=ask)
        asking.start()
        while extproc_retries(gw) == retries_before:  # the first attempt failed: nothing listens now
            assert not answer, answer  # the request did not end without a retry
            time.sleep(0.002)
        assert standby.stdin is not None
        standby.stdin.write(b"go\n")
        standby.stdin.flush()
        asking.join(10)
        assert len(answer) == 1 and not isinstance(answer[0], BaseException), answer
        assert answer[0].choices[0].message.content  # type: ignore[attr-defined]
    finally:
        standby.terminate()
        standby.wait(20)


def extproc_retries(gw) -> int:
    stats = gw.admin("/stats?filter=cluster.tollgate_extproc.upstream_rq_retry$")
    return int(stats.split(":")[1]) if ":" in stats else 0


def wait_for_record(gw, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = gw.access_records()
        if records:
            return records[-1]
        time.sleep(0.05)
    raise AssertionError("no access-log record")
