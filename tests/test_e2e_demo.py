"""What `make run` serves: the embedded default config, offline, with the built-in demo model."""

from __future__ import annotations

from importlib import resources

import openai
import pytest
import yaml

pytestmark = pytest.mark.e2e


@pytest.fixture
def client(gateway):
    default = yaml.safe_load(resources.files("extproc").joinpath("default_config.yaml").read_text())
    gw = gateway(default, env={"OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": ""})
    return openai.OpenAI(base_url=gw.base_url, api_key="anything", max_retries=0, timeout=30)


def test_the_demo_model_answers_with_usage(client):
    resp = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "What is Tollgate?"}])
    assert "What is Tollgate?" in resp.choices[0].message.content
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0


def test_the_demo_model_streams(client):
    chunks = list(client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hello"}], stream=True,
        stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 10
    assert chunks[-1].usage.completion_tokens == sum(1 for _ in content) or chunks[-1].usage.completion_tokens > 0


def test_the_demo_embeddings_and_the_model_list(client):
    assert {m.id for m in client.models.list()} == {"demo", "demo-embedding"}
    a, b, c = client.embeddings.create(model="demo-embedding", input=["red apple", "red apple pie", "tax law"]).data
    dot = lambda x, y: sum(p * q for p, q in zip(x.embedding, y.embedding))  # noqa: E731
    assert dot(a, b) > dot(a, c)


def test_every_demo_answer_shows_the_demo_budget(client):
    """Every answer the demo model gives; a cache hit (which holds no budget) is the cache spec's business."""
    raw = client.chat.completions.with_raw_response.create(model="demo", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-ratelimit-limit-tokens"] == "200000"
    assert 0 < int(raw.headers["x-ratelimit-remaining-tokens"]) < 200000
    assert raw.headers["x-ratelimit-reset-tokens"].endswith(("ms", "s"))
    with client.chat.completions.with_streaming_response.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], stream=True,
            extra_headers={"Cache-Control": "no-cache"}) as stream:  # not the first answer, replayed
        assert stream.headers["x-ratelimit-limit-tokens"] == "200000"
