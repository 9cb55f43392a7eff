"""The ``providers:`` and ``models:`` sections: where requests can go, and the aliases clients call.

A provider is one backend account (its type picks the translator, its keys
come from env vars or files); an alias lists its targets, each a provider and
that provider's model name, in fallback order. A provider with ``when_env``
whose variable is unset is switched off, and so are the targets on it; an
alias left with no target is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from extproc.config import Reader, SecretRef
from extproc.credentials.settings import AzureAd, parse_azure_ad

PROVIDER_TYPES = ("openai", "azure_openai", "anthropic", "demo")
DEMO_BASE_URL = "http://tollgate-demo/v1"  # served in-process; Envoy reaches it over a unix socket
_DEFAULT_URLS = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com", "demo": DEMO_BASE_URL}
_PROVIDER_KEYS = {"type", "base_url", "api_key", "api_keys", "api_version", "anthropic_version", "default_max_tokens",
                  "organization", "project", "connect_timeout", "when_env", "azure_ad", "key_quarantine"}
# What may move a request on to the alias's next target (``models.<alias>.fallback_on``).
FALLBACK_OUTCOMES = ("5xx", "429", "401", "403", "timeout", "connect_failure", "invalid_answer")
DEFAULT_FALLBACK_ON = frozenset({"5xx", "429", "timeout", "connect_failure"})  # what Tollgate always did


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
    key_quarantine: float = 600.0  # a key answered 401/403: left out of the pool this long (or until it changes)

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
    owned_by: str = "tollgate"
    answer_timeout: float = 600.0  # the whole answer, streamed or not, from the request's end
    min_bytes_per_second: float = 16.0  # a stream slower than this on average (after first_byte_timeout) is cut
    fallback_on: frozenset[str] = DEFAULT_FALLBACK_ON  # outcomes of an attempt that move on to the next target
    stream_chunks: str = "hold"  # "observe": streamed chunks pass without waiting on the gateway (see answer.py)


def parse_providers(r: Reader, v: Any) -> dict[str, Provider | None]:
    """Every provider by name; None for one switched off by its ``when_env``."""
    m = r.named(v, "providers")
    if not m:
        raise r.fail("providers", "at least one provider is required")
    return {str(name): parse_provider(r, str(name), spec, f"providers.{name}") for name, spec in m.items()}


def parse_provider(r: Reader, name: str, v: Any, path: str) -> Provider | None:
    r.name(name, path, "provider names")
    m = r.mapping(v, path, _PROVIDER_KEYS)
    when = r.string(m.get("when_env"), f"{path}.when_env")
    if when and not r.env.get(when):
        return None  # an optional provider whose variable is not set
    ptype = r.string(m.get("type"), f"{path}.type", required=True) or ""
    if ptype not in PROVIDER_TYPES:
        raise r.fail(f"{path}.type", f"unknown provider type {ptype!r} (expected one of {', '.join(PROVIDER_TYPES)})")
    base_url = _base_url(r, m, path, ptype)
    keys = _api_keys(r, m, path)
    azure_ad = parse_azure_ad(r, m.get("azure_ad"), f"{path}.azure_ad") if "azure_ad" in m else None
    if azure_ad is not None and ptype != "azure_openai":
        raise r.fail(f"{path}.azure_ad", "only azure_openai providers authenticate with Azure AD")
    if azure_ad is not None and keys:
        raise r.fail(f"{path}.azure_ad", "give api_key(s) or azure_ad, not both")
    if ptype in ("openai", "azure_openai", "anthropic") and not keys and azure_ad is None:
        raise r.fail(path, "needs api_key (env: NAME or file: PATH)" + (" or azure_ad" if ptype == "azure_openai" else ""))
    api_version = r.string(m.get("api_version"), f"{path}.api_version")
    if ptype == "azure_openai" and not api_version:
        raise r.fail(f"{path}.api_version", "is required for azure_openai (e.g. 2024-10-21)")
    return Provider(
        name=name,
        type=ptype,
        base_url=base_url.rstrip("/"),
        api_keys=keys,
        api_version=api_version,
        anthropic_version=r.string(m.get("anthropic_version"), f"{path}.anthropic_version", default="2023-06-01")
        or "2023-06-01",
        default_max_tokens=r.integer(m.get("default_max_tokens"), f"{path}.default_max_tokens", 4096, 1, 1_000_000),
        organization=r.string(m.get("organization"), f"{path}.organization"),
        project=r.string(m.get("project"), f"{path}.project"),
        connect_timeout=r.duration(m.get("connect_timeout"), f"{path}.connect_timeout", 5.0),
        azure_ad=azure_ad,
        key_quarantine=r.duration(m.get("key_quarantine"), f"{path}.key_quarantine", 600.0, hi=86400.0),
    )


def _base_url(r: Reader, m: dict[str, Any], path: str, ptype: str) -> str:
    base_url = r.string(m.get("base_url"), f"{path}.base_url", default=_DEFAULT_URLS.get(ptype))
    if ptype == "azure_openai" and not base_url:
        raise r.fail(f"{path}.base_url", "is required for azure_openai (https://RESOURCE.openai.azure.com)")
    parts = urlsplit(base_url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise r.fail(f"{path}.base_url", "expected an http(s) URL such as https://api.openai.com/v1")
    return base_url or ""


def _api_keys(r: Reader, m: dict[str, Any], path: str) -> tuple[SecretRef, ...]:
    if "api_key" in m and "api_keys" in m:
        raise r.fail(f"{path}.api_keys", "give api_key or api_keys, not both")
    if "api_key" in m:
        return (r.secret(m["api_key"], f"{path}.api_key"),)
    raw = m.get("api_keys") or []
    if not isinstance(raw, list):
        raise r.fail(f"{path}.api_keys", "expected a list")
    return tuple(r.secret(item, f"{path}.api_keys[{i}]") for i, item in enumerate(raw))


def parse_models(r: Reader, v: Any, providers: dict[str, Provider | None]) -> dict[str, ModelAlias]:
    m = r.named(v, "models")
    out: dict[str, ModelAlias] = {}
    for name, spec in m.items():
        alias = parse_alias(r, str(name), spec, f"models.{name}", providers)
        if alias is not None:
            out[alias.name] = alias
    if not out:
        raise r.fail("models", "at least one model alias with a usable target is required")
    return out


def parse_alias(r: Reader, name: str, v: Any, path: str, providers: dict[str, Provider | None]) -> ModelAlias | None:
    r.name(name, path, "model aliases")
    m = r.mapping(v, path, {"targets", "per_try_timeout", "first_byte_timeout", "retry_on_429", "owned_by",
                            "answer_timeout", "min_bytes_per_second", "fallback_on", "stream_chunks"})
    raw = m.get("targets")
    if not isinstance(raw, list) or not raw:
        raise r.fail(f"{path}.targets", "expected a non-empty list of {provider, model}")
    targets = []
    for i, t in enumerate(raw):
        tp = f"{path}.targets[{i}]"
        tm = r.mapping(t, tp, {"provider", "model"})
        prov = r.string(tm.get("provider"), f"{tp}.provider", required=True) or ""
        model = r.string(tm.get("model"), f"{tp}.model", required=True) or ""
        if prov not in providers:
            raise r.fail(f"{tp}.provider", f"unknown provider {prov!r} (known: {', '.join(sorted(providers))})")
        if providers[prov] is None:
            continue  # optional provider switched off
        targets.append(Target(prov, model))
    if not targets:
        return None
    return ModelAlias(
        name=name,
        targets=tuple(targets),
        per_try_timeout=r.duration(m.get("per_try_timeout"), f"{path}.per_try_timeout", 60.0),
        first_byte_timeout=r.duration(m.get("first_byte_timeout"), f"{path}.first_byte_timeout", 30.0),
        owned_by=r.string(m.get("owned_by"), f"{path}.owned_by", default="tollgate") or "tollgate",
        answer_timeout=r.duration(m.get("answer_timeout"), f"{path}.answer_timeout", 600.0, lo=1.0, hi=86400.0),
        min_bytes_per_second=_rate(r, m.get("min_bytes_per_second"), f"{path}.min_bytes_per_second", 16.0),
        fallback_on=parse_fallback_on(r, m, path),
        stream_chunks=_stream_chunks(r, m.get("stream_chunks"), f"{path}.stream_chunks", targets, providers),
    )


def _stream_chunks(r: Reader, v: Any, path: str, targets: list[Target], providers: dict[str, Provider | None]) -> str:
    """``hold`` (the default: every chunk waits for the gateway) or ``observe`` (chunks pass at once, read
    on the side). Observing suits only answers that pass unchanged: every target must speak OpenAI's API."""
    mode = r.string(v, path, default="hold") or "hold"
    if mode not in ("hold", "observe"):
        raise r.fail(path, f"expected hold or observe, not {mode!r}")
    if mode == "observe":
        other = [t.provider for t in targets if (p := providers[t.provider]) is not None
                 and p.type not in ("openai", "azure_openai")]
        if other:
            raise r.fail(path, f"observe needs targets that answer in OpenAI's stream format; {other[0]!r} does not "
                               "(its chunks are translated, which needs them held)")
    return mode


def _rate(r: Reader, v: Any, path: str, default: float) -> float:
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1e9:
        raise r.fail(path, "expected a number of bytes per second, 0 or more (0 turns the rule off)")
    return float(v)


def parse_fallback_on(r: Reader, m: dict[str, Any], path: str) -> frozenset[str]:
    """Which attempt outcomes move on to the next target; without the key, what Tollgate always did
    (``retry_on_429: false``, the older setting, takes 429 out of that)."""
    if "fallback_on" not in m:
        if r.boolean(m.get("retry_on_429"), f"{path}.retry_on_429", True):
            return DEFAULT_FALLBACK_ON
        return DEFAULT_FALLBACK_ON - {"429"}
    if "retry_on_429" in m:
        raise r.fail(f"{path}.retry_on_429", "give fallback_on or retry_on_429, not both (429 goes in fallback_on)")
    items = m["fallback_on"]
    if not isinstance(items, list):
        raise r.fail(f"{path}.fallback_on", f"expected a list of {', '.join(FALLBACK_OUTCOMES)}")
    out = set()
    for i, item in enumerate(items):
        name = str(item)  # YAML reads 401 and 429 as numbers
        if name not in FALLBACK_OUTCOMES:
            raise r.fail(f"{path}.fallback_on[{i}]", f"unknown outcome {name!r} (expected {', '.join(FALLBACK_OUTCOMES)})")
        out.add(name)
    return frozenset(out)
