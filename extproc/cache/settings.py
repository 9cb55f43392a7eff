"""The ``cache:`` section of the gateway config, typed and validated.

``config.py`` hands the parsed YAML mapping to ``parse_cache`` with the alias
names; a ``ValueError`` names the bad key (``cache.aliases.gpt-4o.threshold:
…``) and config.py adds its line. Example::

    cache:
      mode: semantic            # off | exact | semantic: the default for every alias
      namespace: team           # team: a team only ever gets its own answers; shared: org-wide
      threshold: 0.95           # cosine of the last user messages, and the guards must agree
      ttl: 1h
      max_entries: 10000        # per namespace; the oldest are evicted
      lookup_budget: 25ms       # a lookup that would take longer is skipped (bypass)
      embed_workers: 1          # threads computing embeddings
      embed_queue: 4            # embeddings waiting or running at most; more: bypass (saturated)
      embed_cpu: 0.25           # share of one core embeddings may use; past it: bypass (cpu_budget)
      embedder: onnxruntime     # or numpy: same vectors, ~2.5x slower, ~120 MB less memory per process
      control_dir: ~/.local/state/tollgate/cache-control  # without Redis: where `tollgate cache clear` finds
                                # the running gateways (one Unix socket per ext_proc process)
      aliases:
        gpt-4o: {mode: exact, ttl: 10m}
        demo: {threshold: 0.95}

With Redis configured (top-level ``redis:``) the entries live there and every
sidecar shares them; otherwise they stay in this process.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["off", "exact", "semantic"]
MODES = ("off", "exact", "semantic")
# Chosen by two-fold cross-validation on the dev pairs (tests/bench/cache_fit.py, tests/bench/cache_fit.md):
# the lowest cosine whose precision reaches 0.97 on one half was 0.949, which held out on the other half
# gave 94.4 % precision at 17 % recall; on the other half 0.97 was only reached at 0.989 (2 % recall).
# Adding lexical features (a logistic fit) did not do better held out, so the rule stays one number.
DEFAULT_THRESHOLD = 0.95
# At most a quarter of a core for embeddings: on the 2-core bench machine the all-miss gateway at c=16 fell to
# 0.52x of the gateway without the cache when the embedding thread could take a whole core (tests/bench/cache.md).
DEFAULT_EMBED_CPU = 0.25
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


@dataclass(frozen=True, slots=True)
class AliasCache:
    mode: Mode
    threshold: float
    ttl: float  # seconds


@dataclass(frozen=True)
class CacheSettings:
    mode: Mode = "semantic"
    namespace: Literal["team", "shared"] = "team"
    threshold: float = DEFAULT_THRESHOLD
    ttl: float = 3600.0
    max_entries: int = 10_000
    lookup_budget: float = 0.025
    embed_workers: int = 1
    embed_queue: int = 4
    embed_cpu: float = DEFAULT_EMBED_CPU
    embedder: Literal["onnxruntime", "numpy"] = "onnxruntime"
    store: Literal["memory", "redis"] = "memory"
    redis_url: str | None = None
    key_prefix: str = "tollgate"
    control_dir: str = "/tmp/tollgate-cache-control"  # the config sets it under the state directory
    aliases: Mapping[str, AliasCache] = field(default_factory=dict)

    def for_alias(self, alias: str) -> AliasCache:
        found = self.aliases.get(alias)
        return found if found is not None else AliasCache(self.mode, self.threshold, self.ttl)

    @property
    def semantic(self) -> bool:
        """Whether any alias needs the embedder."""
        return self.mode == "semantic" or any(a.mode == "semantic" for a in self.aliases.values())


def _mapping(v: Any, path: str, allowed: set[str]) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"{path}: expected a mapping")
    unknown = sorted(set(v) - allowed)
    if unknown:
        raise ValueError(f"{path}.{unknown[0]}: unknown key (expected one of {', '.join(sorted(allowed))})")
    return v


def _seconds(v: Any, path: str, default: float, lo: float, hi: float) -> float:
    if v is None:
        return default
    m = _DURATION.match(str(v)) if not isinstance(v, bool) else None
    if m is None:
        raise ValueError(f"{path}: expected a duration such as 25ms, 30s, 10m, 1h or 7d")
    out = float(m.group(1)) * _UNIT[m.group(2)]
    if not lo <= out <= hi:
        raise ValueError(f"{path}: must be between {lo:g}s and {hi:g}s")
    return out


def _integer(v: Any, path: str, default: int, lo: int, hi: int) -> int:
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{path}: expected an integer from {lo} to {hi}")
    return v


def _threshold(v: Any, path: str, default: float) -> float:
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.5 <= float(v) <= 1.0:
        raise ValueError(f"{path}: expected a cosine similarity from 0.5 to 1.0")
    return float(v)


def _share(v: Any, path: str) -> float:
    if v is None:
        return DEFAULT_EMBED_CPU
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.01 <= float(v) <= 8.0:
        raise ValueError(f"{path}: expected the share of one core embeddings may use, from 0.01 to 8 (e.g. 0.25)")
    return float(v)


def _embedder(v: Any, path: str) -> Literal["onnxruntime", "numpy"]:
    if v is None:
        return "onnxruntime"
    if v not in ("onnxruntime", "numpy"):
        raise ValueError(f"{path}: expected onnxruntime or numpy")
    return v  # type: ignore[no-any-return]


def _mode(v: Any, path: str, default: Mode) -> Mode:
    if v is None:
        return default
    if v is False:  # YAML reads a bare `off` as false
        return "off"
    if v not in MODES:
        raise ValueError(f"{path}: expected off, exact or semantic")
    return v  # type: ignore[no-any-return]


def _directory(v: Any, key: str, default: str | None, expand: Callable[[str], str]) -> str:
    if v is None:
        return default or CacheSettings.control_dir
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{key}: expected a directory path")
    return expand(v.strip())


def parse_cache(v: Any, path: str = "cache", *, aliases: Sequence[str], redis_url: str | None = None,
                key_prefix: str = "tollgate", control_dir: str | None = None,
                expand: Callable[[str], str] = lambda v: v) -> CacheSettings | None:
    """The section, or None when it is absent or ``mode: off`` with no alias turning it on."""
    if v is None:
        return None
    m = _mapping(v, path, {"mode", "namespace", "threshold", "ttl", "max_entries", "lookup_budget",
                           "embed_workers", "embed_queue", "embed_cpu", "embedder", "store", "aliases",
                           "control_dir"})
    mode = _mode(m.get("mode"), f"{path}.mode", "semantic")
    namespace = m.get("namespace", "team")
    if namespace not in ("team", "shared"):
        raise ValueError(f"{path}.namespace: expected team or shared")
    threshold = _threshold(m.get("threshold"), f"{path}.threshold", DEFAULT_THRESHOLD)
    ttl = _seconds(m.get("ttl"), f"{path}.ttl", 3600.0, 1.0, 30 * 86400.0)
    store = m.get("store", "auto")
    if store not in ("auto", "memory", "redis"):
        raise ValueError(f"{path}.store: expected auto, memory or redis")
    if store == "redis" and redis_url is None:
        raise ValueError(f"{path}.store: redis needs the top-level redis: section")
    per_alias: dict[str, AliasCache] = {}
    for name, spec in _mapping(m.get("aliases"), f"{path}.aliases", set(aliases)).items():
        p = f"{path}.aliases.{name}"
        s = _mapping(spec if spec is not None else {}, p, {"mode", "threshold", "ttl"}) if not isinstance(
            spec, (str, bool)) else {"mode": spec}
        per_alias[name] = AliasCache(_mode(s.get("mode"), f"{p}.mode", mode),
                                     _threshold(s.get("threshold"), f"{p}.threshold", threshold),
                                     _seconds(s.get("ttl"), f"{p}.ttl", ttl, 1.0, 30 * 86400.0))
    out = CacheSettings(
        mode=mode, namespace=namespace, threshold=threshold, ttl=ttl,
        max_entries=_integer(m.get("max_entries"), f"{path}.max_entries", 10_000, 1, 10_000_000),
        lookup_budget=_seconds(m.get("lookup_budget"), f"{path}.lookup_budget", 0.025, 0.001, 0.15),
        embed_workers=_integer(m.get("embed_workers"), f"{path}.embed_workers", 1, 1, 8),
        embed_queue=_integer(m.get("embed_queue"), f"{path}.embed_queue", 4, 1, 256),
        embed_cpu=_share(m.get("embed_cpu"), f"{path}.embed_cpu"),
        embedder=_embedder(m.get("embedder"), f"{path}.embedder"),
        store="redis" if (store == "redis" or (store == "auto" and redis_url)) else "memory",
        redis_url=redis_url, key_prefix=key_prefix, aliases=per_alias,
        control_dir=_directory(m.get("control_dir"), f"{path}.control_dir", control_dir, expand),
    )
    if out.mode == "off" and all(a.mode == "off" for a in per_alias.values()):
        return None
    return out
