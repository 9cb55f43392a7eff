"""The cache section: defaults, per-alias settings, and errors that name the key and its line."""

from __future__ import annotations

import pytest

from extproc.config import ConfigError, parse_config

BASE = """
providers: {demo: {type: demo}}
models:
  chat: {targets: [{provider: demo, model: tollgate-demo-1}]}
  other: {targets: [{provider: demo, model: tollgate-demo-1}]}
"""


def test_without_a_section_there_is_no_cache():
    assert parse_config(BASE).cache is None


def test_defaults_and_per_alias_settings():
    cfg = parse_config(BASE + """
cache:
  mode: exact
  ttl: 10m
  aliases:
    chat: {mode: semantic, threshold: 0.97}
    other: off
""")
    c = cfg.cache
    assert c is not None and c.store == "memory" and c.namespace == "team" and c.lookup_budget == 0.025
    assert c.embed_cpu == 0.25 and c.embedder == "onnxruntime"
    assert (c.for_alias("chat").mode, c.for_alias("chat").threshold, c.for_alias("chat").ttl) == ("semantic", 0.97, 600)
    assert c.for_alias("other").mode == "off" and c.semantic


def test_with_redis_the_entries_live_there():
    cfg = parse_config(BASE + "redis: {url: 'redis://127.0.0.1:6399'}\ncache: {namespace: shared}\n")
    assert cfg.cache is not None and cfg.cache.store == "redis" and cfg.cache.namespace == "shared"


@pytest.mark.parametrize("section, key", [
    ("cache: {threshold: 2}", "cache.threshold"),
    ("cache: {mode: fuzzy}", "cache.mode"),
    ("cache: {namespace: everyone}", "cache.namespace"),
    ("cache: {lookup_budget: 5s}", "cache.lookup_budget"),
    ("cache: {embed_cpu: 0}", "cache.embed_cpu"),
    ("cache: {embed_cpu: yes}", "cache.embed_cpu"),
    ("cache: {embedder: torch}", "cache.embedder"),
    ("cache: {aliases: {nope: {mode: exact}}}", "cache.aliases.nope"),
    ("cache: {aliases: {chat: {ttl: soon}}}", "cache.aliases.chat.ttl"),
    ("cache: {treshold: 0.9}", "cache.treshold"),
])
def test_a_bad_setting_names_its_key_and_line(section, key):
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + section + "\n")
    assert key in str(e.value) and "line" in str(e.value)
