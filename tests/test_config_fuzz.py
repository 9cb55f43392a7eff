"""Any file handed to the config loader ends, within a second, in a loaded config or a ConfigError.

Three families of input, all deterministic (seeded): the good configs cut at every line and at
random byte offsets; every key of a good config given a value of each wrong type; and random YAML
documents built from the config's own vocabulary. Anything else (another exception, a hang) fails.
"""

from __future__ import annotations

import random
import signal
import textwrap
from importlib import resources
from typing import Any

import pytest
import yaml

from extproc.config import ConfigError, GatewayConfig, parse_config

GOOD = textwrap.dedent("""
    listen: {host: 127.0.0.1, port: 10000}
    envoy: {message_timeout: 1s, concurrency: 2}
    limits: {max_request_bytes: 1048576}
    providers:
      openai: {type: openai, base_url: "http://127.0.0.1:9/v1", api_key: {env: OPENAI_KEY}}
      claude: {type: anthropic, api_key: {file: /run/secrets/anthropic}}
    models:
      gpt-4o:
        targets:
          - {provider: openai, model: gpt-4o}
          - {provider: claude, model: claude-sonnet-4-5}
        per_try_timeout: 250ms
        first_byte_timeout: 2m
    quota:
      limits:
        org: {usd_per_day: 10}
""")
DEFAULT = resources.files("extproc").joinpath("default_config.yaml").read_text()
ENV = {"OPENAI_KEY": "sk-test", "OPENAI_API_KEY": "sk-test", "ANTHROPIC_API_KEY": "sk-ant-test"}
WRONG_VALUES: list[Any] = [None, 0, -1, 10**30, 1.5, True, "", "x", "-5s", [], [1, "a"], {}, {"x": 1}]
WORDS = ["providers", "models", "targets", "provider", "model", "type", "openai", "anthropic", "azure_openai",
         "demo", "api_key", "env", "file", "base_url", "listen", "port", "host", "quota", "limits", "auth",
         "mode", "jwt", "teams", "redis", "url", "per_try_timeout", "first_byte_timeout", "envoy", "1s", "-1"]


class Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang


def load_within_a_second(text: str) -> GatewayConfig | ConfigError:
    """Parse ``text``; a ConfigError is a fine answer, anything else (or more than a second) is not."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        return parse_config(text, source="fuzz.yaml", env=ENV)
    except ConfigError as e:
        assert str(e).startswith("fuzz.yaml"), f"an error that does not name the file: {e}"
        return e
    except Hang:
        pytest.fail(f"the loader ran for over a second on:\n{text[:2000]}")
    except Exception as e:  # noqa: BLE001 - the very thing under test: nothing but ConfigError may escape
        pytest.fail(f"{type(e).__name__}: {e} escaped the loader on:\n{text[:2000]}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_the_good_configs_load():
    assert isinstance(load_within_a_second(GOOD), GatewayConfig)
    assert isinstance(load_within_a_second(DEFAULT), GatewayConfig)


@pytest.mark.parametrize("text", ["", "\n", "~", "[]", "3", "x", "providers:", "models:", "providers: {}",
                                  "models: {}", "listen: {port: 1}", "quota: {}", "auth: {}", "teams:"])
def test_configs_without_providers_or_models_end_in_a_clear_error(text):
    result = load_within_a_second(text)
    if isinstance(result, ConfigError):
        assert "line" in str(result) or ":" in str(result)


@pytest.mark.parametrize("source", [GOOD, DEFAULT], ids=["small", "default"])
def test_a_config_cut_at_any_line_or_byte_loads_or_fails_cleanly(source):
    lines = source.splitlines(keepends=True)
    for n in range(len(lines) + 1):
        load_within_a_second("".join(lines[:n]))
    rng = random.Random(12)
    for cut in sorted(rng.sample(range(len(source)), 120)):
        load_within_a_second(source[:cut])


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((*prefix, k))
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append((*prefix, i))
            out.extend(_paths(v, (*prefix, i)))
    return out


def _replaced(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(doc, dict):
        return {**doc, head: _replaced(doc[head], rest, value)}
    return [_replaced(v, rest, value) if i == head else v for i, v in enumerate(doc)]


@pytest.mark.parametrize("source", [GOOD, DEFAULT], ids=["small", "default"])
def test_every_key_given_a_wrong_type_loads_or_names_the_key(source):
    doc = yaml.safe_load(source)
    for path in _paths(doc):
        for value in WRONG_VALUES:
            result = load_within_a_second(yaml.safe_dump(_replaced(doc, path, value)))
            if isinstance(result, ConfigError):
                assert "fuzz.yaml: " in str(result)


def _random_node(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth > 4 or roll < 0.35:
        return rng.choice([*WORDS, *WRONG_VALUES[:9]])
    if roll < 0.8:
        return {rng.choice(WORDS): _random_node(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    return [_random_node(rng, depth + 1) for _ in range(rng.randint(0, 3))]


def test_random_yaml_documents_load_or_fail_cleanly():
    rng = random.Random(7)
    for _ in range(600):
        doc = {rng.choice(WORDS): _random_node(rng, 1) for _ in range(rng.randint(1, 5))}
        load_within_a_second(yaml.safe_dump(doc))


def test_random_bytes_load_or_fail_cleanly():
    rng = random.Random(3)
    alphabet = "ab:- \n\t{}[],'\"&*!|>%@`#?\\0123456789"
    for _ in range(400):
        load_within_a_second("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))))
