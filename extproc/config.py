"""The one gateway config: YAML in, typed and validated at load.

Every error names the key path and the line it came from, so that
``models.gpt-4o.targets[1].provider: unknown provider 'opnai' (line 23)`` is
what an operator sees instead of a traceback. This is the only module that
reads environment variables or files for configuration.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

PROVIDER_TYPES = ("openai", "azure_openai", "anthropic", "demo")
ENV_CONFIG = "TOLLGATE_CONFIG"
DEMO_BASE_URL = "http://tollgate-demo/v1"  # served in-process; Envoy reaches it over a unix socket


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and line."""


@dataclass(frozen=True)
class Address:
    host: str = "127.0.0.1"
    port: int = 0
    unix_socket: str | None = None

    @property
    def grpc_target(self) -> str:
        return f"unix:{self.unix_socket}" if self.unix_socket else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SecretRef:
    """Where a credential lives: an environment variable or a file (e.g. a Secret volume)."""

    env: str | None = None
    file: str | None = None

    def describe(self) -> str:
        return f"env:{self.env}" if self.env else f"file:{self.file}"


@dataclass(frozen=True)
class Provider:
    name: str
    type: str
    base_url: str = ""
    api_keys: tuple[SecretRef, ...] = ()
    api_version: str | None = None  # azure_openai
    anthropic_version: str = "2023-06-01"
    default_max_tokens: int = 4096  # anthropic requires max_tokens
    organization: str | None = None  # openai
    project: str | None = None  # openai
    connect_timeout: float = 5.0

    @property
    def tls(self) -> bool:
        return urlsplit(self.base_url).scheme == "https"

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.base_url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def authority(self) -> str:
        default = 443 if self.tls else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"

    @property
    def path_prefix(self) -> str:
        return urlsplit(self.base_url).path.rstrip("/")


@dataclass(frozen=True)
class Target:
    provider: str
    model: str


@dataclass(frozen=True)
class ModelAlias:
    name: str
    targets: tuple[Target, ...]
    per_try_timeout: float = 60.0  # no response headers in time: next target
    first_byte_timeout: float = 30.0  # no byte for this long (before or during the answer)
    retry_on_429: bool = True
    owned_by: str = "tollgate"


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


@dataclass(frozen=True)
class GatewayConfig:
    listen: Address = Address("127.0.0.1", 10000)
    extproc: Address = Address("127.0.0.1", 50051)
    metrics: Address = Address("127.0.0.1", 9464)
    envoy: EnvoySettings = EnvoySettings()
    limits: Limits = Limits()
    providers: dict[str, Provider] = field(default_factory=dict)
    models: dict[str, ModelAlias] = field(default_factory=dict)
    source: str = "<embedded default>"

    def target(self, alias: str, index: int) -> tuple[ModelAlias, Target, Provider]:
        a = self.models[alias]
        t = a.targets[index]
        return a, t, self.providers[t.provider]


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> GatewayConfig:
    """Load ``path``, else ``$TOLLGATE_CONFIG``, else the embedded default."""
    env = dict(os.environ) if env is None else env
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
    env = dict(os.environ) if env is None else env
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    lines: dict[str, int] = {}
    _index_lines(node, "", lines)
    data = yaml.safe_load(text) if node is not None else {}
    return _Builder(source, lines, env).gateway(data if data is not None else {})


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


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


class _Builder:
    def __init__(self, source: str, lines: dict[str, int], env: dict[str, str]) -> None:
        self.source = source
        self.lines = lines
        self.env = env

    # -- helpers
    def fail(self, path: str, msg: str) -> ConfigError:
        line = self._line(path)
        where = f" (line {line})" if line else ""
        return ConfigError(f"{self.source}: {path or '<root>'}: {msg}{where}")

    def _line(self, path: str) -> int | None:
        """The line of ``path``, or of its nearest parent that exists (a missing key has none)."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path)
        return None

    def mapping(self, v: Any, path: str, allowed: set[str]) -> dict[str, Any]:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise self.fail(path, f"expected a mapping, got {type(v).__name__}")
        for k in v:
            if k not in allowed:
                raise self.fail(f"{path}.{k}" if path else str(k), f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return v

    def string(self, v: Any, path: str, *, required: bool = False, default: str | None = None) -> str | None:
        if v is None:
            if required:
                raise self.fail(path, "is required")
            return default
        if not isinstance(v, str) or not v:
            raise self.fail(path, "expected a non-empty string")
        return v

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

    def duration(self, v: Any, path: str, default: float) -> float:
        if v is None:
            return default
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            seconds = float(v)
        elif isinstance(v, str) and (m := _DURATION.match(v)):
            n = float(m.group(1))
            seconds = {"ms": n / 1000, "s": n, "m": n * 60, None: n}[m.group(2)]
        else:
            raise self.fail(path, "expected a duration such as 250ms, 30s or 5m")
        if not 0 < seconds <= 3600:
            raise self.fail(path, "duration must be above 0 and at most 1h")
        return seconds

    def address(self, v: Any, path: str, default: Address) -> Address:
        m = self.mapping(v, path, {"host", "port", "unix_socket"})
        sock = self.string(m.get("unix_socket"), f"{path}.unix_socket")
        return Address(
            host=self.string(m.get("host"), f"{path}.host", default=default.host) or default.host,
            port=self.integer(m.get("port"), f"{path}.port", default.port, 0, 65535),
            unix_socket=sock,
        )

    # -- sections
    def gateway(self, data: Any) -> GatewayConfig:
        top = self.mapping(data, "", {"listen", "extproc", "metrics", "envoy", "limits", "providers", "models"})
        d = GatewayConfig()
        providers = self.providers(top.get("providers"))
        models = self.models(top.get("models"), providers)
        return GatewayConfig(
            listen=self.address(top.get("listen"), "listen", d.listen),
            extproc=self.address(top.get("extproc"), "extproc", d.extproc),
            metrics=self.address(top.get("metrics"), "metrics", d.metrics),
            envoy=self.envoy(top.get("envoy")),
            limits=self.limits(top.get("limits")),
            providers={k: p for k, p in providers.items() if p is not None},
            models=models,
            source=self.source,
        )

    def envoy(self, v: Any) -> EnvoySettings:
        m = self.mapping(v, "envoy", {"binary", "admin", "message_timeout", "log_level", "concurrency"})
        d = EnvoySettings()
        level = self.string(m.get("log_level"), "envoy.log_level", default=d.log_level)
        if level not in ("trace", "debug", "info", "warning", "error", "critical", "off"):
            raise self.fail("envoy.log_level", "expected one of trace, debug, info, warning, error, critical, off")
        return EnvoySettings(
            binary=self.string(m.get("binary"), "envoy.binary"),
            admin=self.address(m.get("admin"), "envoy.admin", d.admin),
            message_timeout=self.duration(m.get("message_timeout"), "envoy.message_timeout", d.message_timeout),
            log_level=level or d.log_level,
            concurrency=self.integer(m.get("concurrency"), "envoy.concurrency", d.concurrency, 1, 64),
        )

    def limits(self, v: Any) -> Limits:
        m = self.mapping(v, "limits", {"max_request_bytes"})
        return Limits(
            max_request_bytes=self.integer(
                m.get("max_request_bytes"), "limits.max_request_bytes", Limits.max_request_bytes, 1024, 64 * 1024 * 1024
            )
        )

    def providers(self, v: Any) -> dict[str, Provider | None]:
        m = self.mapping(v, "providers", set(v or {}))
        if not m:
            raise self.fail("providers", "at least one provider is required")
        out: dict[str, Provider | None] = {}
        for name, spec in m.items():
            out[str(name)] = self.provider(str(name), spec, f"providers.{name}")
        return out

    def provider(self, name: str, v: Any, path: str) -> Provider | None:
        if not _NAME.match(name):
            raise self.fail(path, "provider names use letters, digits and . _ : / -")
        m = self.mapping(
            v,
            path,
            {"type", "base_url", "api_key", "api_keys", "api_version", "anthropic_version", "default_max_tokens",
             "organization", "project", "connect_timeout", "when_env"},
        )
        when = self.string(m.get("when_env"), f"{path}.when_env")
        if when and not self.env.get(when):
            return None  # an optional provider whose variable is not set
        ptype = self.string(m.get("type"), f"{path}.type", required=True)
        if ptype not in PROVIDER_TYPES:
            raise self.fail(f"{path}.type", f"unknown provider type {ptype!r} (expected one of {', '.join(PROVIDER_TYPES)})")
        defaults = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com", "demo": DEMO_BASE_URL}
        base_url = self.string(m.get("base_url"), f"{path}.base_url", default=defaults.get(ptype or ""))
        if ptype == "azure_openai" and not base_url:
            raise self.fail(f"{path}.base_url", "is required for azure_openai (https://RESOURCE.openai.azure.com)")
        parts = urlsplit(base_url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise self.fail(f"{path}.base_url", "expected an http(s) URL such as https://api.openai.com/v1")
        keys = self.secrets(m, path)
        if ptype in ("openai", "azure_openai", "anthropic") and not keys:
            raise self.fail(path, "needs api_key (env: NAME or file: PATH)")
        api_version = self.string(m.get("api_version"), f"{path}.api_version")
        if ptype == "azure_openai" and not api_version:
            raise self.fail(f"{path}.api_version", "is required for azure_openai (e.g. 2024-10-21)")
        return Provider(
            name=name,
            type=ptype or "",
            base_url=(base_url or "").rstrip("/"),
            api_keys=keys,
            api_version=api_version,
            anthropic_version=self.string(m.get("anthropic_version"), f"{path}.anthropic_version", default="2023-06-01")
            or "2023-06-01",
            default_max_tokens=self.integer(m.get("default_max_tokens"), f"{path}.default_max_tokens", 4096, 1, 1_000_000),
            organization=self.string(m.get("organization"), f"{path}.organization"),
            project=self.string(m.get("project"), f"{path}.project"),
            connect_timeout=self.duration(m.get("connect_timeout"), f"{path}.connect_timeout", 5.0),
        )

    def secrets(self, m: dict[str, Any], path: str) -> tuple[SecretRef, ...]:
        if "api_key" in m and "api_keys" in m:
            raise self.fail(f"{path}.api_keys", "give api_key or api_keys, not both")
        if "api_key" in m:
            items, base = [m["api_key"]], f"{path}.api_key"
        else:
            raw = m.get("api_keys") or []
            if not isinstance(raw, list):
                raise self.fail(f"{path}.api_keys", "expected a list")
            items, base = raw, f"{path}.api_keys"
        refs = []
        for i, item in enumerate(items):
            p = base if "api_key" in m else f"{base}[{i}]"
            s = self.mapping(item, p, {"env", "file"})
            if len(s) != 1:
                raise self.fail(p, "expected exactly one of env: NAME or file: PATH")
            refs.append(SecretRef(env=self.string(s.get("env"), f"{p}.env"), file=self.string(s.get("file"), f"{p}.file")))
        return tuple(refs)

    def models(self, v: Any, providers: dict[str, Provider | None]) -> dict[str, ModelAlias]:
        m = self.mapping(v, "models", set(v or {}))
        out: dict[str, ModelAlias] = {}
        for name, spec in m.items():
            alias = self.alias(str(name), spec, f"models.{name}", providers)
            if alias is not None:
                out[alias.name] = alias
        if not out:
            raise self.fail("models", "at least one model alias with a usable target is required")
        return out

    def alias(self, name: str, v: Any, path: str, providers: dict[str, Provider | None]) -> ModelAlias | None:
        if not _NAME.match(name):
            raise self.fail(path, "model aliases use letters, digits and . _ : / - (at most 128)")
        m = self.mapping(v, path, {"targets", "per_try_timeout", "first_byte_timeout", "retry_on_429", "owned_by"})
        raw = m.get("targets")
        if not isinstance(raw, list) or not raw:
            raise self.fail(f"{path}.targets", "expected a non-empty list of {provider, model}")
        targets = []
        for i, t in enumerate(raw):
            tp = f"{path}.targets[{i}]"
            tm = self.mapping(t, tp, {"provider", "model"})
            prov = self.string(tm.get("provider"), f"{tp}.provider", required=True) or ""
            model = self.string(tm.get("model"), f"{tp}.model", required=True) or ""
            if prov not in providers:
                raise self.fail(f"{tp}.provider", f"unknown provider {prov!r} (known: {', '.join(sorted(providers))})")
            if providers[prov] is None:
                continue  # optional provider switched off
            targets.append(Target(prov, model))
        if not targets:
            return None
        return ModelAlias(
            name=name,
            targets=tuple(targets),
            per_try_timeout=self.duration(m.get("per_try_timeout"), f"{path}.per_try_timeout", 60.0),
            first_byte_timeout=self.duration(m.get("first_byte_timeout"), f"{path}.first_byte_timeout", 30.0),
            retry_on_429=self.boolean(m.get("retry_on_429"), f"{path}.retry_on_429", True),
            owned_by=self.string(m.get("owned_by"), f"{path}.owned_by", default="tollgate") or "tollgate",
        )
