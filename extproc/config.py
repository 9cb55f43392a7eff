"""The one gateway config: YAML in, typed and validated at load.

Every error names the key path and the line it came from, so that
``models.gpt-4o.targets[1].provider: unknown provider 'opnai' (line 23)`` is
what an operator sees instead of a traceback. This is the only module that
reads environment variables or files for configuration.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from extproc.quota.settings import QuotaSettings, parse_quota

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
class AzureAd:
    """Azure AD (Entra ID) client-credentials for an azure_openai provider."""

    client_id: str
    client_secret: SecretRef
    token_url: str  # https://login.microsoftonline.com/TENANT/oauth2/v2.0/token unless given
    scope: str = "https://cognitiveservices.azure.com/.default"
    timeout: float = 5.0


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
    azure_ad: AzureAd | None = None  # azure_openai: a bearer token from Azure AD instead of api-key

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


JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
AUTH_MODES = ("none", "jwt")


@dataclass(frozen=True)
class ClaimPaths:
    """Where the identity is in a token's claims; each a list of dotted paths, first present wins."""

    principal: tuple[str, ...] = ("sub",)
    teams: tuple[str, ...] = ()
    tier: tuple[str, ...] = ()


@dataclass(frozen=True)
class Issuer:
    """One trusted token issuer and where its signing keys come from (exactly one source)."""

    issuer: str
    audiences: tuple[str, ...]
    jwks_url: str | None = None
    jwks_file: str | None = None
    jwks_ca_file: str | None = None  # a private CA for jwks_url (e.g. a cluster's API server)
    dev_key_file: str | None = None  # `tollgate dev-token` signs with this key; local use only
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    required_claims: tuple[str, ...] = ()
    claims: ClaimPaths = ClaimPaths()
    leeway: float = 30.0
    jwks_cache_ttl: float = 600.0  # keys older than this are re-fetched in the background
    jwks_refresh_min_interval: float = 30.0  # an unknown kid fetches the JWKS at most this often
    jwks_timeout: float = 3.0


@dataclass(frozen=True)
class DenyListSettings:
    file: str | None = None  # the embedded store, when no redis is configured
    poll_interval: float = 0.25
    on_redis_down: str = "last_known"  # last_known | refuse


@dataclass(frozen=True)
class AuthSettings:
    mode: str = "none"
    issuers: tuple[Issuer, ...] = ()
    default_team: str | None = None  # for identities that match no configured team
    max_token_bytes: int = 8192
    token_cache_size: int = 10_000
    audit: str = "all"  # all | refusals
    deny_list: DenyListSettings = DenyListSettings()


@dataclass(frozen=True)
class Team:
    name: str
    models: tuple[str, ...] | None = None  # aliases this team may call; None: all of them
    claim_values: tuple[str, ...] = ()  # values of the teams claim that mean this team (default: its name)


@dataclass(frozen=True)
class RedisSettings:
    url: str
    password: SecretRef | None = None
    key_prefix: str = "tollgate"


@dataclass(frozen=True)
class GatewayConfig:
    listen: Address = Address("127.0.0.1", 10000)
    extproc: Address = Address("127.0.0.1", 50051)
    metrics: Address = Address("127.0.0.1", 9464)
    envoy: EnvoySettings = EnvoySettings()
    limits: Limits = Limits()
    providers: dict[str, Provider] = field(default_factory=dict)
    models: dict[str, ModelAlias] = field(default_factory=dict)
    auth: AuthSettings = AuthSettings()
    teams: dict[str, Team] = field(default_factory=dict)
    redis: RedisSettings | None = None
    quota: QuotaSettings | None = None  # None: no token or money governance at all
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
        top = self.mapping(
            data, "",
            {"listen", "extproc", "metrics", "envoy", "limits", "providers", "models", "auth", "teams", "redis", "quota"},
        )
        d = GatewayConfig()
        providers = self.providers(top.get("providers"))
        models = self.models(top.get("models"), providers)
        declared = {str(k) for k in top.get("models") or {}} if isinstance(top.get("models"), dict) else set()
        teams = self.teams(top.get("teams"), declared, set(models))
        redis = self.redis(top.get("redis"))
        auth = self.auth(top.get("auth"), teams, redis)
        return GatewayConfig(
            listen=self.address(top.get("listen"), "listen", d.listen),
            extproc=self.address(top.get("extproc"), "extproc", d.extproc),
            metrics=self.address(top.get("metrics"), "metrics", d.metrics),
            envoy=self.envoy(top.get("envoy")),
            limits=self.limits(top.get("limits")),
            providers={k: p for k, p in providers.items() if p is not None},
            models=models,
            auth=auth,
            teams=teams,
            redis=redis,
            quota=self.quota(top.get("quota"), redis, models),
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
             "organization", "project", "connect_timeout", "when_env", "azure_ad"},
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
        azure_ad = self.azure_ad(m.get("azure_ad"), f"{path}.azure_ad") if "azure_ad" in m else None
        if azure_ad is not None and ptype != "azure_openai":
            raise self.fail(f"{path}.azure_ad", "only azure_openai providers authenticate with Azure AD")
        if azure_ad is not None and keys:
            raise self.fail(f"{path}.azure_ad", "give api_key(s) or azure_ad, not both")
        if ptype in ("openai", "azure_openai", "anthropic") and not keys and azure_ad is None:
            raise self.fail(path, "needs api_key (env: NAME or file: PATH)" + (" or azure_ad" if ptype == "azure_openai" else ""))
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
            azure_ad=azure_ad,
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
        return tuple(self.secret(item, base if "api_key" in m else f"{base}[{i}]") for i, item in enumerate(items))

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

    def strings(self, v: Any, path: str) -> tuple[str, ...]:
        """One string or a list of strings."""
        if v is None:
            return ()
        items = v if isinstance(v, list) else [v]
        return tuple(self.string(x, f"{path}[{i}]" if isinstance(v, list) else path, required=True) or ""
                     for i, x in enumerate(items))

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

    # -- identity and access
    def azure_ad(self, v: Any, path: str) -> AzureAd:
        m = self.mapping(v, path, {"tenant_id", "client_id", "client_secret", "token_url", "scope", "timeout"})
        tenant = self.string(m.get("tenant_id"), f"{path}.tenant_id")
        if tenant is not None and not re.fullmatch(r"[A-Za-z0-9.-]{1,128}", tenant):
            raise self.fail(f"{path}.tenant_id", "expected a tenant id or domain")
        if tenant is None and "token_url" not in m:
            raise self.fail(path, "needs tenant_id (or token_url)")
        default_url = f"https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token" if tenant else None
        if "client_secret" not in m:
            raise self.fail(f"{path}.client_secret", "is required (env: NAME or file: PATH)")
        return AzureAd(
            client_id=self.string(m.get("client_id"), f"{path}.client_id", required=True) or "",
            client_secret=self.secret(m.get("client_secret"), f"{path}.client_secret"),
            token_url=self.url(m.get("token_url"), f"{path}.token_url", default=default_url) or "",
            scope=self.string(m.get("scope"), f"{path}.scope", default=AzureAd.scope) or AzureAd.scope,
            timeout=self.duration(m.get("timeout"), f"{path}.timeout", AzureAd.timeout),
        )

    def redis(self, v: Any) -> RedisSettings | None:
        if v is None:
            return None
        m = self.mapping(v, "redis", {"url", "password", "key_prefix"})
        url = self.string(m.get("url"), "redis.url", required=True) or ""
        if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise self.fail("redis.url", "expected redis://HOST:PORT[/DB], rediss://… or unix://PATH")
        prefix = self.string(m.get("key_prefix"), "redis.key_prefix", default="tollgate") or "tollgate"
        if not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", prefix):
            raise self.fail("redis.key_prefix", "use letters, digits and . _ : -")
        password = self.secret(m["password"], "redis.password") if "password" in m else None
        return RedisSettings(url=url, password=password, key_prefix=prefix)

    def quota(self, v: Any, redis: RedisSettings | None, models: dict[str, ModelAlias]) -> QuotaSettings | None:
        if v is None:
            return None
        try:
            q = parse_quota(v, "quota", redis_url=redis.url if redis else None,
                            key_prefix=redis.key_prefix if redis else "tollgate")
        except ValueError as e:
            path, _, message = str(e).partition(": ")
            raise self.fail(path, message) from None
        for name, alias in models.items():  # refuse an unpriced model now, not by charging 0 later
            for i, t in enumerate(alias.targets):
                if q.prices.missing([t.model]):
                    raise self.fail(f"models.{name}.targets[{i}].model",
                                    f"no price for model {t.model!r}; add it under quota.prices "
                                    "or set quota.default_price")
        if q.store == "memory" and q.ledger_path is None:
            state = self.env.get("XDG_STATE_HOME") or (self.env.get("HOME", "/tmp") + "/.local/state")
            q = replace(q, ledger_path=state + "/tollgate/quota.sqlite3")
        elif q.ledger_path:
            q = replace(q, ledger_path=self.path(q.ledger_path))
        return q

    def teams(self, v: Any, declared: set[str], usable: set[str]) -> dict[str, Team]:
        m = self.mapping(v, "teams", set(v or {}) if isinstance(v, dict) else set())
        out: dict[str, Team] = {}
        for name, spec in m.items():
            path = f"teams.{name}"
            if not _NAME.match(str(name)):
                raise self.fail(path, "team names use letters, digits and . _ : / -")
            t = self.mapping(spec, path, {"models", "claim_values"})
            models: tuple[str, ...] | None = None
            if "models" in t:
                listed = self.strings(t["models"], f"{path}.models")
                for i, alias in enumerate(listed):
                    if alias != "*" and alias not in declared:
                        raise self.fail(f"{path}.models[{i}]", f"unknown model alias {alias!r}")
                models = None if "*" in listed else tuple(a for a in listed if a in usable)
            values = self.strings(t.get("claim_values"), f"{path}.claim_values") or (str(name),)
            out[str(name)] = Team(name=str(name), models=models, claim_values=values)
        return out

    def auth(self, v: Any, teams: dict[str, Team], redis: RedisSettings | None) -> AuthSettings:
        m = self.mapping(
            v, "auth", {"mode", "issuers", "default_team", "leeway", "max_token_bytes", "token_cache_size", "audit",
                        "deny_list"}
        )
        d = AuthSettings()
        mode = self.string(m.get("mode"), "auth.mode", default=d.mode) or d.mode
        if mode not in AUTH_MODES:
            raise self.fail("auth.mode", f"expected one of {', '.join(AUTH_MODES)}")
        leeway = self.seconds(m.get("leeway"), "auth.leeway", 30.0, lo=0.0, hi=300.0)
        raw = m.get("issuers") or []
        if not isinstance(raw, list):
            raise self.fail("auth.issuers", "expected a list")
        issuers = tuple(self.issuer(x, f"auth.issuers[{i}]", leeway) for i, x in enumerate(raw))
        seen: set[str] = set()
        for i, iss in enumerate(issuers):
            if iss.issuer in seen:
                raise self.fail(f"auth.issuers[{i}].issuer", f"issuer {iss.issuer!r} is listed twice")
            seen.add(iss.issuer)
        if mode == "jwt" and not issuers:
            raise self.fail("auth.issuers", "mode jwt needs at least one issuer")
        default_team = self.string(m.get("default_team"), "auth.default_team")
        if default_team is not None and default_team not in teams:
            raise self.fail("auth.default_team", f"unknown team {default_team!r} (teams: {', '.join(teams) or 'none'})")
        audit = self.string(m.get("audit"), "auth.audit", default="all") or "all"
        if audit not in ("all", "refusals"):
            raise self.fail("auth.audit", "expected all or refusals")
        return AuthSettings(
            mode=mode,
            issuers=issuers,
            default_team=default_team,
            max_token_bytes=self.integer(m.get("max_token_bytes"), "auth.max_token_bytes", d.max_token_bytes, 512,
                                         32 * 1024),
            token_cache_size=self.integer(m.get("token_cache_size"), "auth.token_cache_size", d.token_cache_size, 0,
                                          10_000_000),
            audit=audit,
            deny_list=self.deny_list(m.get("deny_list"), redis),
        )

    def seconds(self, v: Any, path: str, default: float, *, lo: float, hi: float) -> float:
        """A duration that may be zero."""
        if v in (0, "0", "0s"):
            return 0.0
        value = self.duration(v, path, default)
        if not lo <= value <= hi:
            raise self.fail(path, f"expected a duration from {lo:g}s to {hi:g}s")
        return value

    def issuer(self, v: Any, path: str, leeway: float) -> Issuer:
        m = self.mapping(
            v, path, {"issuer", "audiences", "audience", "jwks_url", "jwks_file", "jwks_ca_file", "dev_key_file",
                      "algorithms", "required_claims", "claims", "leeway", "jwks_cache_ttl",
                      "jwks_refresh_min_interval", "jwks_timeout"}
        )
        sources = [k for k in ("jwks_url", "jwks_file", "dev_key_file") if k in m]
        if len(sources) != 1:
            raise self.fail(path, "needs exactly one key source: jwks_url, jwks_file or dev_key_file")
        if "audience" in m and "audiences" in m:
            raise self.fail(f"{path}.audiences", "give audience or audiences, not both")
        aud_key = "audience" if "audience" in m else "audiences"
        audiences = self.strings(m.get(aud_key), f"{path}.{aud_key}")
        if not audiences:
            raise self.fail(f"{path}.audiences", "is required: the audience(s) your IdP puts in tokens for this gateway")
        algorithms = self.algorithms(m.get("algorithms"), f"{path}.algorithms")
        if "dev_key_file" in m and algorithms != ("ES256",) and "algorithms" in m:
            raise self.fail(f"{path}.algorithms", "a dev key signs with ES256 only")
        files = {k: self.path(self.string(m.get(k), f"{path}.{k}") or "") or None
                 for k in ("jwks_file", "jwks_ca_file", "dev_key_file")}
        return Issuer(
            issuer=self.string(m.get("issuer"), f"{path}.issuer", required=True) or "",
            audiences=audiences,
            jwks_url=self.url(m.get("jwks_url"), f"{path}.jwks_url"),
            jwks_file=files["jwks_file"],
            jwks_ca_file=files["jwks_ca_file"],
            dev_key_file=files["dev_key_file"],
            algorithms=("ES256",) if "dev_key_file" in m else algorithms,
            required_claims=self.strings(m.get("required_claims"), f"{path}.required_claims"),
            claims=self.claim_paths(m.get("claims"), f"{path}.claims"),
            leeway=self.seconds(m.get("leeway"), f"{path}.leeway", leeway, lo=0.0, hi=300.0),
            jwks_cache_ttl=self.duration(m.get("jwks_cache_ttl"), f"{path}.jwks_cache_ttl", Issuer.jwks_cache_ttl),
            jwks_refresh_min_interval=self.seconds(m.get("jwks_refresh_min_interval"),
                                                   f"{path}.jwks_refresh_min_interval",
                                                   Issuer.jwks_refresh_min_interval, lo=0.0, hi=3600.0),
            jwks_timeout=self.duration(m.get("jwks_timeout"), f"{path}.jwks_timeout", Issuer.jwks_timeout),
        )

    def algorithms(self, v: Any, path: str) -> tuple[str, ...]:
        if v is None:
            return Issuer.algorithms
        algs = self.strings(v, path)
        for i, a in enumerate(algs):
            where = f"{path}[{i}]" if isinstance(v, list) else path
            if a.lower() == "none" or a.upper().startswith("HS"):
                raise self.fail(where, f"{a} is never accepted: tokens must be signed with an asymmetric key")
            if a not in JWT_ALGORITHMS:
                raise self.fail(where, f"unknown algorithm {a!r} (expected some of {', '.join(JWT_ALGORITHMS)})")
        if not algs:
            raise self.fail(path, "expected at least one algorithm")
        return algs

    def claim_paths(self, v: Any, path: str) -> ClaimPaths:
        m = self.mapping(v, path, {"principal", "teams", "tier"})
        return ClaimPaths(
            principal=self.strings(m.get("principal"), f"{path}.principal") or ClaimPaths.principal,
            teams=self.strings(m.get("teams"), f"{path}.teams"),
            tier=self.strings(m.get("tier"), f"{path}.tier"),
        )

    def deny_list(self, v: Any, redis: RedisSettings | None) -> DenyListSettings:
        m = self.mapping(v, "auth.deny_list", {"file", "poll_interval", "on_redis_down"})
        file = self.string(m.get("file"), "auth.deny_list.file")
        if file is not None and redis is not None:
            raise self.fail("auth.deny_list.file", "the deny list lives in redis when redis is configured")
        if file is None and redis is None:
            state = self.env.get("XDG_STATE_HOME") or (self.env.get("HOME", "/tmp") + "/.local/state")
            file = state + "/tollgate/deny-list.json"
        policy = self.string(m.get("on_redis_down"), "auth.deny_list.on_redis_down", default="last_known")
        if policy not in ("last_known", "refuse"):
            raise self.fail("auth.deny_list.on_redis_down", "expected last_known or refuse")
        return DenyListSettings(
            file=self.path(file) if file else None,
            poll_interval=self.duration(m.get("poll_interval"), "auth.deny_list.poll_interval", 0.25),
            on_redis_down=policy or "last_known",
        )
