"""`tollgate cache stats` and `clear` against a real redis-server (without Redis: test_e2e_cache_control.py)."""

from __future__ import annotations

import subprocess

import redis.asyncio as aioredis

from extproc.cache.entry import Answer
from extproc.cache.keys import Plan, plan
from extproc.cache.redis_store import RedisCacheStore
from extproc.cache.semantic import SemanticCache
from tests.harness import TOLLGATE


def tollgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TOLLGATE, "cache", *args], capture_output=True, text=True, timeout=60)


async def test_stats_counts_per_namespace_and_clear_reaches_only_what_it_names(redis_server, tmp_path):
    cache = SemanticCache(RedisCacheStore(aioredis.Redis.from_url(redis_server.url), prefix="tollgate"))
    await cache.store.clear("ml")
    await cache.store.clear("research")
    for i, (team, alias) in enumerate((("ml", "demo"), ("ml", "demo"), ("ml", "other"), ("research", "demo"))):
        p = plan({"messages": [{"role": "user", "content": f"question {i}"}]}, alias=alias, namespace=team)
        assert isinstance(p, Plan)
        await cache.insert(p, None, Answer("a", "m", 1, 1, 1), ttl=60, max_entries=10)
    await cache.store.close()
    cfg = tmp_path / "tollgate.yaml"
    cfg.write_text("providers: {demo: {type: demo}}\n"
                   "models: {demo: {targets: [{provider: demo, model: tollgate-demo-1}]},"
                   " other: {targets: [{provider: demo, model: tollgate-demo-1}]}}\n"
                   f"redis: {{url: '{redis_server.url}'}}\ncache: {{mode: exact}}\n")
    stats = tollgate("stats", "--config", str(cfg))
    assert stats.returncode == 0, stats.stderr
    assert [line.split() for line in stats.stdout.splitlines()[1:]] == [["ml", "3"], ["research", "1"]]
    cleared = tollgate("clear", "--namespace", "ml", "--alias", "demo", "--config", str(cfg))
    assert cleared.returncode == 0 and "removed 2 entries" in cleared.stdout
    after = tollgate("stats", "--namespace", "ml", "--config", str(cfg))
    assert after.stdout.splitlines()[1].split() == ["ml", "1"]


def test_a_config_without_a_cache_section_says_so(tmp_path):
    cfg = tmp_path / "tollgate.yaml"
    cfg.write_text("providers: {demo: {type: demo}}\nmodels: {demo: {targets: [{provider: demo, model: x}]}}\n")
    r = tollgate("stats", "--config", str(cfg))
    assert r.returncode == 2 and "has no cache: section" in r.stderr and "Traceback" not in r.stderr
