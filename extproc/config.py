"""The one gateway config: YAML in, typed and validated at load.

This module holds the root type (``GatewayConfig``), loading, the settings
that belong to the gateway as a whole (addresses, Envoy, limits, and the
``redis:`` connection that several packages share), and the one ``Reader``
every section parser uses: mappings with their allowed keys, strings,
numbers, durations (one grammar: ``250ms``, ``30s``, ``5m``, ``1h``, ``7d``),
secret references, paths and URLs. Every error names the key path and the
line it came from, so that
``models.gpt-4o.targets[1].provider: unknown provider 'opnai' (line 23)`` is
what an operator sees instead of a traceback.

Each section's types and parser live beside their users: ``providers:`` and
``models:`` in ``providers/settings.py`` (Azure AD client credentials in
``credentials/settings.py``), ``auth:`` and ``teams:`` in
``auth/settings.py``, ``quota:`` in ``quota/settings.py``, ``cache:`` in
``cache/settings.py``. They import this
module, never the other way round: ``_assemble`` is the one place that knows
every section, and imports their parsers when it runs.

The process environment is read here only (``environment``): the config
takes it once at load (``when_env``, ``~``, the default state directory), and
the runtime reads provider keys from the same copy.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml

if TYPE_CHECKING:  # section types, for annotations only (see the module docstring)
    from extproc.auth.settings import AuthSettings, Team
    from extproc.providers.settings import ModelAlias, Provider, Target
    from extproc.cache.settings import CacheSettings
    from extproc.guardrails.settings import GuardrailSettings
    from extproc.quota.settings import QuotaSettings

ENV_CONFIG = "TOLLGATE_CONFIG"


def environment() -> dict[str, str]:
    """A copy of the process environment: the only place Tollgate reads it."""
    return dict(os.environ)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and line."""


# --------------------------------------------------------------------------- gateway-wide settings


@dataclass(frozen=True)
class Address:
    host: str = "127.0.0.1"
    port: int = 0
    unix_socket: str | None = None

    @property
    def grpc_target(self) -> str:
        return f"unix:{self.unix_socket}" if self.unix_socket else f"{self.host}:{self.port}"

    def worker(self, index: int) -> Address:
        """Where ext_proc worker ``index`` listens: worker 0 on this address, worker N on port + N (or on
        the unix socket's path + ``.N``)."""
        if index == 0:
            return self
        if self.unix_socket:
            return Address(self.host, self.port, f"{self.unix_socket}.{index}")
        return Address(self.host, self.port + index, None)


@dataclass(frozen=True)
class SecretRef:
    """Where a credential lives: an environment variable or a file (e.g. a Secret volume)."""

    env: str | None = None
    file: str | None = None

    def describe(self) -> str:
        return f"env:{self.env}" if self.env else f"file:{self.file}"


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class EnvoySettings:
    binary: str | None = None
    admin: Address = Address("127.0.0.1", 9901)
    message_timeout: float = 1.0
    log_level: str = "warning"
    concurrency: int = 2
    max_exchanges: int = 128  # concurrent requests each ext_proc worker takes; beyond: a fast 503 (Retry-After)
    # How Envoy ends an ext_proc stream when its request is done: "graceful" half-closes it and waits for the
    # server's own end; "reset" cancels it (Envoy's default), which costs grpcio native memory per stream
    # (README, "Memory"). Kept as a choice to measure the difference and as a way back.
    ext_proc_close: str = "graceful"


@dataclass(frozen=True)
class RedisSettings:
    """The one Redis connection, shared by quotas, the deny list and the cache."""

    url: str
    password: SecretRef | None = None
    key_prefix: str = "tollgate"


LISTEN = Address("127.0.0.1", 10000)
EXTPROC = Address("127.0.0.1", 50051)
METRICS = Address("127.0.0.1", 9464)


@dataclass(frozen=True)
class GatewayConfig:
    providers: dict[str, Provider]
    models: dict[str, ModelAlias]
    auth: AuthSettings
    teams: dict[str, Team] = field(default_factory=dict)
    listen: Address = LISTEN
    extproc: Address = EXTPROC
    workers: int = 1  # ext_proc server processes behind Envoy (`extproc.workers`), each on its own address
    metrics: Address = METRICS
    envoy: EnvoySettings = EnvoySettings()
    limits: Limits = Limits()
    redis: RedisSettings | None = None
    quota: QuotaSettings | None = None  # None: no token or money governance at all
    cache: CacheSettings | None = None  # None: no response cache (every answer says bypass)
    guardrails: GuardrailSettings | None = None  # None: no request or answer is scanned
    source: str = "<embedded default>"

    def target(self, alias: str, index: int) -> tuple[ModelAlias, Target, Provider]:
        a = self.models[alias]
        t = a.targets[index]
        return a, t, self.providers[t.provider]


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> GatewayConfig:
    """Load ``path``, else ``$TOLLGATE_CONFIG``, else the embedded default."""
    env = environment() if env is None else env
    path = path or env.get(ENV_CONFIG) or None
    if path is None:
        text = resources.files("extproc").joinpath("default_config.yaml").read_text()
        return parse_config(text, source="<embedded default>", env=env)
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from None
    return parse_config(text, source=str(p), env=env)


def parse_config(text: str, *, source: str = "<string>", env: dict[str, str] | None = None) -> GatewayConfig:
    env = environment() if env is None else env
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    lines: dict[str, int] = {}
    _index_lines(node, "", lines)
    data = yaml.safe_load(text) if node is not None else {}
    return _assemble(Reader(source, lines, env), data if data is not None else {})


def _index_lines(node: yaml.Node | None, path: str, out: dict[str, int]) -> None:
    if node is None:
        return
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{path}.{k.value}" if path else str(k.value)
            out[key] = k.start_mark.line + 1
            _index_lines(v, key, out)
            out[key] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _index_lines(v, f"{path}[{i}]", out)


ROOT_KEYS = {"listen", "extproc", "metrics", "envoy", "limits", "providers", "models", "auth", "teams", "redis", "quota",
             "cache", "guardrails"}


def _assemble(r: Reader, data: Any) -> GatewayConfig:
    """Every section, in dependency order (models name providers, teams name models, auth names teams)."""
    from extproc.auth.settings import parse_auth, parse_teams
    from extproc.providers.settings import parse_models, parse_providers
    from extproc.cache.settings import parse_cache
    from extproc.guardrails.settings import parse_guardrails
    from extproc.quota.settings import parse_quota

    top = r.mapping(data, "", ROOT_KEYS)
    providers = parse_providers(r, top.get("providers"))
    models = parse_models(r, top.get("models"), providers)
    declared = {str(k) for k in top["models"]} if isinstance(top.get("models"), dict) else set()
    teams = parse_teams(r, top.get("teams"), declared, set(models))
    redis = parse_redis(r, top.get("redis"))
    quota = None
    if top.get("quota") is not None:
        quota = parse_quota(top["quota"], "quota", redis_url=redis.url if redis else None,
                            key_prefix=redis.key_prefix if redis else "tollgate", reader=r, models=models)
    try:
        cache = parse_cache(top.get("cache"), "cache", aliases=list(models), redis_url=redis.url if redis else None,
                            key_prefix=redis.key_prefix if redis else "tollgate",
                            control_dir=r.state_path("cache-control"), expand=r.path)
    except ValueError as e:
        raise r.wrap(e) from None
    workers = parse_workers(r, top.get("extproc"))
    if workers > 1 and quota is not None and quota.store != "redis":
        raise r.fail("extproc.workers", "several workers need quota.store: redis (the embedded quota store is one "
                                        "file with one writer process)")
    observed = [name for name, alias in models.items() if alias.stream_chunks == "observe"]
    if workers > 1 and observed:  # a meter stream is never answered, so it cannot be relayed to its owner
        raise r.fail("extproc.workers", f"several workers cannot meter observed streams yet: models.{observed[0]} "
                                        "has stream_chunks: observe (use hold, or one worker)")
    return GatewayConfig(
        listen=r.address(top.get("listen"), "listen", LISTEN),
        extproc=r.address(_without(top.get("extproc"), "workers"), "extproc", EXTPROC),
        workers=workers,
        metrics=r.address(top.get("metrics"), "metrics", METRICS),
        envoy=parse_envoy(r, top.get("envoy")),
        limits=parse_limits(r, top.get("limits")),
        providers={k: p for k, p in providers.items() if p is not None},
        models=models,
        auth=parse_auth(r, top.get("auth"), teams, redis),
        teams=teams,
        redis=redis,
        quota=quota,
        cache=cache,
        guardrails=parse_guardrails(top.get("guardrails"), "guardrails", reader=r, teams=set(teams) or None,
                                    aliases=set(models)) if top.get("guardrails") is not None else None,
        source=r.source,
    )


def parse_envoy(r: Reader, v: Any) -> EnvoySettings:
    m = r.mapping(v, "envoy", {"binary", "admin", "message_timeout", "log_level", "concurrency", "max_exchanges",
                               "ext_proc_close"})
    d = EnvoySettings()
    level = r.choice(m.get("log_level"), "envoy.log_level", ("trace", "debug", "info", "warning", "error", "critical",
                                                             "off"), d.log_level)
    return EnvoySettings(
        binary=r.string(m.get("binary"), "envoy.binary"),
        admin=r.address(m.get("admin"), "envoy.admin", d.admin),
        message_timeout=r.duration(m.get("message_timeout"), "envoy.message_timeout", d.message_timeout),
        log_level=level,
        concurrency=r.integer(m.get("concurrency"), "envoy.concurrency", d.concurrency, 1, 64),
        max_exchanges=r.integer(m.get("max_exchanges"), "envoy.max_exchanges", d.max_exchanges, 1, 1_000_000),
        ext_proc_close=r.choice(m.get("ext_proc_close"), "envoy.ext_proc_close", ("graceful", "reset"),
                                d.ext_proc_close),
    )


MAX_WORKERS = 64


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container's cpuset narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_workers(r: Reader, v: Any) -> int:
    """``extproc.workers``: a number, or ``auto`` for one per usable core (at most 8: beyond that Envoy, not
    Python, is the bottleneck of a sidecar)."""
    value = v.get("workers") if isinstance(v, dict) else None
    if value == "auto":
        return max(1, min(8, usable_cores()))
    if isinstance(value, str):
        raise r.fail("extproc.workers", f"expected a whole number from 1 to {MAX_WORKERS}, or auto")
    return r.integer(value, "extproc.workers", 1, 1, MAX_WORKERS)


def _without(v: Any, key: str) -> Any:
    return {k: x for k, x in v.items() if k != key} if isinstance(v, dict) else v


def parse_limits(r: Reader, v: Any) -> Limits:
    m = r.mapping(v, "limits", {"max_request_bytes"})
    return Limits(max_request_bytes=r.integer(m.get("max_request_bytes"), "limits.max_request_bytes",
                                              Limits.max_request_bytes, 1024, 64 * 1024 * 1024))


def parse_redis(r: Reader, v: Any) -> RedisSettings | None:
    if v is None:
        return None
    m = r.mapping(v, "redis", {"url", "password", "key_prefix"})
    url = r.string(m.get("url"), "redis.url", required=True) or ""
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise r.fail("redis.url", "expected redis://HOST:PORT[/DB], rediss://… or unix://PATH")
    prefix = r.string(m.get("key_prefix"), "redis.key_prefix", default="tollgate") or "tollgate"
    if not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", prefix):
        raise r.fail("redis.key_prefix", "use letters, digits and . _ : -")
    password = r.secret(m["password"], "redis.password") if "password" in m else None
    return RedisSettings(url=url, password=password, key_prefix=prefix)


# --------------------------------------------------------------------------- the shared reader

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
DURATION_EXAMPLES = "250ms, 30s, 5m, 1h or 7d"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


def parse_duration(v: Any) -> float | None:
    """Seconds from a number of seconds or ``NUMBER[ms|s|m|h|d]``; None when it is neither.

    The one duration grammar: the config, the CLI's ``--ttl`` and ``--since``.
    """
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str) and (m := _DURATION.match(v)):
        return float(m.group(1)) * _UNITS[m.group(2)]
    return None


class Reader:
    """Reads one config document: typed values, and errors that name the key and its line.

    A section parser gets the reader and the section's raw value; it calls
    ``fail`` (or one of the typed readers, which call it) for anything it
    cannot use. A reader without a source or lines (``Reader.detached()``)
    serves a section parsed on its own, as the section's tests do.
    """

    def __init__(self, source: str, lines: Mapping[str, int], env: Mapping[str, str]) -> None:
        self.source = source
        self.lines = lines
        self.env = env

    @classmethod
    def detached(cls, env: Mapping[str, str] | None = None) -> Reader:
        return cls("", {}, env or {})

    def fail(self, path: str, msg: str) -> ConfigError:
        line = self._line(path)
        where = f" (line {line})" if line else ""
        head = f"{self.source}: " if self.source else ""
        return ConfigError(f"{head}{path or '<root>'}: {msg}{where}")

    def _line(self, path: str) -> int | None:
        """The line of ``path``, or of its nearest parent that exists (a missing key has none)."""
        while path:
            if path in self.lines:
                return self.lines[path]
            parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path)
            if parent == path:  # a top-level key has no parent to fall back to
                return None
            path = parent
        return None

    def mapping(self, v: Any, path: str, allowed: set[str] | None) -> dict[str, Any]:
        """A mapping (None reads as empty) whose keys are all in ``allowed`` (None: any key)."""
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise self.fail(path, f"expected a mapping, got {type(v).__name__}")
        if allowed is not None:
            for k in v:
                if k not in allowed:
                    raise self.fail(f"{path}.{k}" if path else str(k),
                                    f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return v

    def named(self, v: Any, path: str) -> dict[str, Any]:
        """A mapping of names the operator chooses (providers, aliases, teams)."""
        return self.mapping(v, path, set(v) if isinstance(v, dict) else set())

    def name(self, v: str, path: str, what: str) -> str:
        if not _NAME.match(v):
            raise self.fail(path, f"{what} use letters, digits and . _ : / - (at most 128)")
        return v

    def string(self, v: Any, path: str, *, required: bool = False, default: str | None = None) -> str | None:
        if v is None:
            if required:
                raise self.fail(path, "is required")
            return default
        if not isinstance(v, str) or not v:
            raise self.fail(path, "expected a non-empty string")
        return v

    def strings(self, v: Any, path: str) -> tuple[str, ...]:
        """One string or a list of strings."""
        if v is None:
            return ()
        items = v if isinstance(v, list) else [v]
        return tuple(self.string(x, f"{path}[{i}]" if isinstance(v, list) else path, required=True) or ""
                     for i, x in enumerate(items))

    def choice(self, v: Any, path: str, options: tuple[str, ...], default: str, *, expected: str = "") -> str:
        value = self.string(v, path, default=default) or default
        if value not in options:
            raise self.fail(path, f"expected {expected or 'one of ' + ', '.join(options)}")
        return value

    def integer(self, v: Any, path: str, default: int, lo: int, hi: int) -> int:
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.fail(path, f"expected a whole number from {lo} to {hi}")
        return v

    def boolean(self, v: Any, path: str, default: bool) -> bool:
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.fail(path, "expected true or false")
        return v

    def duration(self, v: Any, path: str, default: float, *, lo: float = 0.0, hi: float = 3600.0,
                 zero: bool = False) -> float:
        """Seconds: at least ``lo`` (and above 0, unless ``zero`` allows exactly 0), at most ``hi``."""
        if v is None:
            return default
        seconds = parse_duration(v)
        if seconds is None:
            raise self.fail(path, f"expected a duration such as {DURATION_EXAMPLES}")
        if not ((seconds > 0 or (zero and seconds == 0)) and lo <= seconds <= hi):
            low = _span(lo) if lo else "0" if zero else "above 0"
            raise self.fail(path, f"expected a duration from {low} to {_span(hi)}")
        return seconds

    def secret(self, v: Any, path: str) -> SecretRef:
        s = self.mapping(v, path, {"env", "file"})
        if len(s) != 1:
            raise self.fail(path, "expected exactly one of env: NAME or file: PATH")
        file = self.string(s.get("file"), f"{path}.file")
        return SecretRef(env=self.string(s.get("env"), f"{path}.env"), file=self.path(file) if file else None)

    def path(self, v: str) -> str:
        """A file path from the config; ``~`` means $HOME."""
        if v == "~" or v.startswith("~/"):
            return self.env.get("HOME", "") + v[1:]
        return v

    def state_path(self, name: str) -> str:
        """Where Tollgate keeps ``name`` by default: under $XDG_STATE_HOME (or ~/.local/state)/tollgate."""
        state = self.env.get("XDG_STATE_HOME") or (self.env.get("HOME", "/tmp") + "/.local/state")
        return f"{state}/tollgate/{name}"

    def url(self, v: Any, path: str, *, required: bool = False, default: str | None = None) -> str | None:
        """An https URL (plain http only for loopback hosts, which tests and local IdPs use)."""
        u = self.string(v, path, required=required, default=default)
        if u is None:
            return None
        parts = urlsplit(u)
        loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
        if not parts.hostname or parts.fragment or not (parts.scheme == "https" or (parts.scheme == "http" and loopback)):
            raise self.fail(path, "expected an https:// URL (http:// only for localhost)")
        return u

    def address(self, v: Any, path: str, default: Address) -> Address:
        m = self.mapping(v, path, {"host", "port", "unix_socket"})
        sock = self.string(m.get("unix_socket"), f"{path}.unix_socket")
        return Address(
            host=self.string(m.get("host"), f"{path}.host", default=default.host) or default.host,
            port=self.integer(m.get("port"), f"{path}.port", default.port, 0, 65535),
            unix_socket=sock,
        )

    def wrap(self, err: ValueError) -> ConfigError:
        """A ``ValueError("PATH: message")`` from a helper that knows no lines, with its line."""
        path, _, message = str(err).partition(": ")
        return self.fail(path, message)


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
