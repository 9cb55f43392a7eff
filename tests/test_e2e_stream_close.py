"""How Envoy ends each ext_proc stream: with a half-close the server answers, never with a reset.

By default Envoy 1.40 resets (cancels) every ext_proc stream still open when its HTTP exchange ends,
and grpcio's aio server keeps ~70-120 bytes of native memory for every stream ended that way (README,
"Memory"). The rendered bootstrap turns on Envoy's graceful close (``envoy.ext_proc_close: graceful``,
the default): Envoy half-closes the stream and the server ends it. These specs drive the real openai SDK
through a real Envoy and ``tollgate run`` with quotas in a real redis-server, and read what Envoy itself
counted on the ext_proc cluster: streams it reset (``upstream_rq_tx_reset``) against streams opened
(``upstream_rq_total``). Memory is measured by ``tests/bench/memory.py``, not here.
"""

from __future__ import annotations

import threading
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest

from extproc.config import ConfigError, load_config, parse_config
from extproc.control.envoy_config import GRACEFUL_CLOSE_GUARD, render
from tests.fake_provider import Behaviour, FakeProvider, count_chat_words
from tests.harness import Gateway
from tests.helpers import OPENAI_KEY, providers_for
from tests.quota.redis_process import RedisProcess
from tests.test_e2e_quota import MICRO, billed, records

ONE_MODEL = """\
providers:
  openai: {type: openai, api_key: {env: OPENAI_API_KEY}}
models:
  gpt-4o: {targets: [{provider: openai, model: gpt-4o}]}
"""
ASK = [{"role": "user", "content": "Say hello, word by word."}]
REPLY = " ".join(["hello"] * 12)


@pytest.fixture
def fake():
    with FakeProvider("openai", api_key=OPENAI_KEY, prompt_counter=count_chat_words) as f:
        f.default = Behaviour(reply=REPLY, token_delay=0.002)
        yield f


@pytest.fixture
def redis(tmp_path: Path):
    with RedisProcess(tmp_path / "redis") as r:
        yield r


def config(fake: FakeProvider, redis: RedisProcess | None = None, **envoy: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "providers": providers_for(fake),
        "models": {"gpt-4o": {"targets": [{"provider": "openai", "model": "gpt-4o"}]}},
        "envoy": envoy,
    }
    if redis is not None:
        cfg["redis"] = {"url": redis.url, "key_prefix": "e2e"}
        cfg["quota"] = {"limits": {"org": {"usd_per_day": 1000}}}
    return cfg


def ext_proc_streams(gw: Gateway) -> dict[str, int]:
    """What Envoy counted on the ext_proc cluster: streams opened, reset by Envoy, reset by the server."""
    url = f"http://127.0.0.1:{gw.admin_port}/stats?filter=^cluster\\.tollgate_extproc\\.upstream_rq_"
    with urllib.request.urlopen(url, timeout=5) as r:
        stats = dict(line.split(": ", 1) for line in r.read().decode().splitlines() if ": " in line)
    name = "cluster.tollgate_extproc.upstream_rq_"
    return {"opened": int(stats[name + "total"]), "reset_by_envoy": int(stats[name + "tx_reset"]),
            "reset_by_server": int(stats[name + "rx_reset"])}


def load(gw: Gateway, threads: int, each: int) -> tuple[set[str], list[str]]:
    """``threads`` SDK clients at once, each alternating plain calls and streams; request ids and failures."""
    ids: set[str] = set()
    failures: list[str] = []
    lock = threading.Lock()

    def run(t: int) -> None:
        client = openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=30)
        for i in range(each):
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model="gpt-4o", messages=ASK, stream=i % 2 == 1)
                answer = raw.parse()
                if i % 2:
                    text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
                else:
                    text = answer.choices[0].message.content or ""
                with lock:
                    ids.add(raw.headers["x-request-id"])
                    if text != REPLY:
                        failures.append(f"thread {t} request {i}: {text!r}")
            except Exception as e:  # noqa: BLE001 - every failure is reported by the test, none is lost in a thread
                with lock:
                    failures.append(f"thread {t} request {i}: {e!r}")

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return ids, failures


@pytest.mark.e2e
def test_under_concurrent_plain_calls_and_streams_no_stream_is_reset_and_every_charge_is_the_bill(
        gateway, fake, redis):
    gw = gateway(config(fake, redis))
    ids, failures = load(gw, threads=6, each=30)
    assert failures == []
    assert len(ids) == 180
    streams = ext_proc_streams(gw)
    assert streams["opened"] >= 180  # one per request (the attempt and outcome filters are skipped here)
    assert streams["reset_by_envoy"] == 0 and streams["reset_by_server"] == 0
    found = records(gw, redis, n=180)
    assert {r.request_id for r in found} == ids
    assert len(fake.usage_log) == 180
    assert sum(r.micro_usd for r in found) == billed(fake) > 0
    assert all(r.micro_usd < MICRO for r in found)


@pytest.mark.e2e
def test_with_envoys_own_default_every_stream_is_reset_which_is_what_the_graceful_close_avoids(gateway, fake):
    gw = gateway(config(fake, ext_proc_close="reset"))
    ids, failures = load(gw, threads=2, each=10)
    assert failures == [] and len(ids) == 20
    streams = ext_proc_streams(gw)
    # the server ended each stream itself, yet Envoy reset every one before that end arrived
    assert streams["opened"] >= 20 and streams["reset_by_envoy"] == streams["opened"]


def test_the_rendered_bootstrap_turns_envoys_graceful_close_on_unless_told_reset():
    graceful = render(load_config(env={}), demo_socket="/tmp/tollgate-demo.sock")
    (layer, admin) = graceful["layered_runtime"]["layers"]
    assert layer["static_layer"] == {GRACEFUL_CLOSE_GUARD: True}
    assert admin == {"name": "admin", "admin_layer": {}}  # /runtime_modify keeps working
    reset = render(parse_config(ONE_MODEL + "envoy: {ext_proc_close: reset}\n", source="t.yaml", env={}))
    assert "layered_runtime" not in reset


def test_an_unknown_close_mode_is_refused_naming_the_key_and_line():
    with pytest.raises(ConfigError) as e:
        parse_config(ONE_MODEL + "envoy:\n  ext_proc_close: sometimes\n", source="t.yaml", env={})
    assert "envoy.ext_proc_close" in str(e.value) and "(line 6)" in str(e.value)
    assert "graceful, reset" in str(e.value)
