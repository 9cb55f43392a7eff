"""End to end: the real openai SDK → real Envoy → Tollgate → fake providers in their real wire formats."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import ANTHROPIC_KEY, AZURE_KEY, OPENAI_KEY, providers_for
from tests.fake_provider import Behaviour

pytestmark = pytest.mark.e2e

CLIENT_KEY = "client-credential-must-not-travel"


def config(openai_fake, azure_fake, anthropic_fake) -> dict:
    return {
        "providers": providers_for(openai_fake, azure_fake, anthropic_fake),
        "models": {
            "gpt-4o": {"targets": [{"provider": "openai", "model": "gpt-4o"}]},
            "smart": {"targets": [{"provider": "openai", "model": "gpt-4o-2024-08-06"}]},
            "azure-gpt": {"targets": [{"provider": "azure", "model": "prod-deployment"}]},
            "claude": {"targets": [{"provider": "anthropic", "model": "claude-sonnet-4-5"}]},
            "text-embedding-3-small": {"targets": [{"provider": "openai", "model": "text-embedding-3-small"}]},
            "azure-embed": {"targets": [{"provider": "azure", "model": "embed-deployment"}]},
        },
    }


@pytest.fixture
def gw(gateway, fake_openai, fake_azure, fake_anthropic):
    return gateway(config(fake_openai, fake_azure, fake_anthropic))


@pytest.fixture
def client(gw):
    return openai.OpenAI(base_url=gw.base_url, api_key=CLIENT_KEY, max_retries=0, timeout=30)


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
]


def test_models_lists_the_aliases(client):
    ids = {m.id for m in client.models.list()}
    assert ids == {"gpt-4o", "smart", "azure-gpt", "claude", "text-embedding-3-small", "azure-embed"}


@pytest.mark.parametrize(
    "alias, fake_name, provider, model",
    [
        ("gpt-4o", "fake_openai", "openai", "gpt-4o"),
        ("azure-gpt", "fake_azure", "azure", "prod-deployment"),
        ("claude", "fake_anthropic", "anthropic", "claude-sonnet-4-5"),
    ],
)
def test_a_non_streaming_call_is_answered_by_the_aliased_backend(client, request, alias, fake_name, provider, model):
    fake = request.getfixturevalue(fake_name)
    fake.default = Behaviour(reply="Hello there!", prompt_tokens=12, completion_tokens=3)
    raw = client.chat.completions.with_raw_response.create(model=alias, messages=MESSAGES)
    resp = raw.parse()
    assert resp.choices[0].message.content == "Hello there!"
    assert resp.choices[0].finish_reason == "stop"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (12, 3)
    assert raw.headers["x-tollgate-provider"] == provider
    assert raw.headers["x-tollgate-model"] == model
    assert raw.headers["x-tollgate-attempts"] == "1"
    assert raw.headers["x-request-id"]
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    "alias, fake_name",
    [("gpt-4o", "fake_openai"), ("azure-gpt", "fake_azure"), ("claude", "fake_anthropic")],
)
@pytest.mark.parametrize("include_usage", [True, False])
def test_a_streaming_call_arrives_chunk_by_chunk(client, request, alias, fake_name, include_usage):
    fake = request.getfixturevalue(fake_name)
    fake.default = Behaviour(reply="one two three four five", token_delay=0.01, prompt_tokens=9, completion_tokens=5)
    kwargs = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(client.chat.completions.create(model=alias, messages=MESSAGES, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four five"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    usage = [c.usage for c in chunks if c.usage]
    if include_usage:
        assert [(u.prompt_tokens, u.completion_tokens) for u in usage] == [(9, 5)]
    else:
        assert usage == []  # the gateway asked for usage itself, and took that chunk out again


def test_the_gateway_always_asks_openai_for_stream_usage(client, fake_openai, gw):
    list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    sent = fake_openai.requests[0].json
    assert sent["stream_options"] == {"include_usage": True}


def test_the_alias_is_replaced_by_the_backend_model(client, fake_openai):
    client.chat.completions.create(model="smart", messages=MESSAGES)
    assert fake_openai.requests[0].json["model"] == "gpt-4o-2024-08-06"


def test_an_openai_request_that_needs_no_change_passes_byte_for_byte(gw, fake_openai):
    body = b'{"model":"gpt-4o",  "messages":[{"role":"user","content":"hi"}], "temperature": 0.5}'
    status, _, _ = gw.raw("POST", "/v1/chat/completions", body)
    assert status == 200
    assert fake_openai.requests[0].body == body


def test_azure_gets_its_deployment_path_version_and_key(client, fake_azure):
    client.chat.completions.create(model="azure-gpt", messages=MESSAGES)
    r = fake_azure.requests[0]
    assert r.path == "/openai/deployments/prod-deployment/chat/completions"
    assert r.query["api-version"] == "2024-10-21"
    assert r.headers["api-key"] == AZURE_KEY
    assert "authorization" not in r.headers


def test_each_provider_sees_only_its_own_injected_credential(client, fake_openai, fake_anthropic):
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    client.chat.completions.create(model="claude", messages=MESSAGES)
    o, a = fake_openai.requests[0].headers, fake_anthropic.requests[0].headers
    assert o["authorization"] == f"Bearer {OPENAI_KEY}"
    assert a["x-api-key"] == ANTHROPIC_KEY and "authorization" not in a
    assert a["anthropic-version"]
    for h in (o, a):
        assert CLIENT_KEY not in json.dumps(h)
        assert not any(k.startswith("x-tollgate-") for k in h)


def test_the_anthropic_translation_carries_system_and_tools(client, fake_anthropic):
    fake_anthropic.default = Behaviour(tool_call={"name": "get_weather", "arguments": {"city": "Paris"}})
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    resp = client.chat.completions.create(model="claude", messages=MESSAGES, tools=tools, max_tokens=50)
    sent = fake_anthropic.requests[0].json
    assert sent["system"] == "You are terse."
    assert sent["max_tokens"] == 50
    assert sent["tools"][0]["name"] == "get_weather"
    call = resp.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert resp.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("alias, fake_name", [("text-embedding-3-small", "fake_openai"), ("azure-embed", "fake_azure")])
def test_embeddings(client, request, alias, fake_name):
    fake = request.getfixturevalue(fake_name)
    resp = client.embeddings.create(model=alias, input=["alpha", "beta"])
    assert [d.index for d in resp.data] == [0, 1]
    assert len(resp.data[0].embedding) > 0
    assert len(fake.requests) == 1


def test_a_provider_error_reaches_the_client_in_openai_shape(client, fake_anthropic):
    fake_anthropic.default = Behaviour(status=400)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="claude", messages=MESSAGES)
    assert e.value.body["type"] == "invalid_request_error"
    assert e.value.body["message"]


def test_each_request_leaves_one_access_log_line(client, gw, fake_openai):
    fake_openai.default = Behaviour(prompt_tokens=7, completion_tokens=2)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    rid = raw.headers["x-request-id"]
    import time

    for _ in range(50):
        recs = [r for r in gw.access_records() if r["request_id"] == rid]
        if recs:
            break
        time.sleep(0.05)
    assert len(recs) == 1
    rec = recs[0]
    assert (rec["alias"], rec["provider"], rec["status"], rec["input_tokens"], rec["output_tokens"]) == (
        "gpt-4o", "openai", 200, 7, 2)
    assert OPENAI_KEY not in gw.log() and CLIENT_KEY not in gw.log()


def test_the_request_id_is_envoys_own_echoed_and_sent_upstream(gw, fake_openai):
    body = json.dumps({"model": "gpt-4o", "messages": MESSAGES}).encode()
    ids = []
    for _ in range(2):  # a client-chosen id cannot make two exchanges collide
        status, headers, _ = gw.raw("POST", "/v1/chat/completions", body, headers={"x-request-id": "fixed"})
        assert status == 200
        ids.append(headers["x-request-id"])
    assert len(set(ids)) == 2 and "fixed" not in ids
    assert [r.headers["x-request-id"] for r in fake_openai.requests] == ids


def test_http2_clients_are_served(gw):
    import shutil
    import subprocess

    curl = shutil.which("curl")
    assert curl, "curl is part of the base image"
    out = subprocess.run(
        [curl, "-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
         "-H", "content-type: application/json", "-d", json.dumps({"model": "gpt-4o", "messages": MESSAGES}),
         gw.base_url + "/chat/completions"],
        capture_output=True, text=True, timeout=30,
    ).stdout
    assert out == "2 200"


def test_the_extproc_server_can_listen_on_a_unix_socket(gateway, fake_openai, tmp_path):
    sock = tmp_path / "extproc.sock"
    g = gateway({**config(fake_openai, None, None) | {"providers": providers_for(fake_openai)},
                 "models": {"gpt-4o": {"targets": [{"provider": "openai", "model": "gpt-4o"}]}},
                 "extproc_unix_socket": str(sock)})
    c = openai.OpenAI(base_url=g.base_url, api_key="x", max_retries=0)
    assert c.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices
    assert sock.exists()


def test_the_grpc_health_service_reports_serving(gw):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{gw.extproc_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
