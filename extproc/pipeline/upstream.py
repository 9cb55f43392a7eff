"""What one target of an alias needs sent to it: path, host, body and credential.

The router-level stage prepares the primary target (index 0) itself, so Envoy's
first attempt needs no second gRPC stream; the per-attempt stage prepares any
other target Envoy picks (a fallback), from the same parsed request. Both keep
the target's translator on the exchange, where the router-level stage finds
it again to read the answer.

Targets are named ``ALIAS#INDEX``: in the endpoint metadata of each target's
cluster (``tollgate.target``), in the request header Envoy writes for each
attempt (``x-tollgate-chosen``), and in the response header that names the
target that answered (``x-tollgate-target``). A target whose provider holds a
pool of keys has extra slots after it, ``ALIAS#INDEX~K``: the same target, to
be tried with another key when a key was refused (see ``outcome.py``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from extproc.pipeline.runtime import Runtime
from extproc.providers.settings import Provider
from extproc.credentials.vault import INBOUND_CREDENTIAL_HEADERS
from extproc.pipeline.exchange import Exchange
from extproc.providers.registry import make_translator

ROUTE_HEADER = "x-tollgate-route"  # request: which alias's route (set by the router-level stage)
PREPARED_HEADER = "x-tollgate-prepared"  # request: the primary target's request is ready as it is
CHOSEN_HEADER = "x-tollgate-chosen"  # request, per attempt: the target Envoy picked (from its metadata)
TARGET_HEADER = "x-tollgate-target"  # response: the target that answered (from its metadata)
REQUEST_ID_HEADER = "x-tollgate-rid"  # response, per attempt: the request it answers (for outcome.py)
RETRY_HEADER = "x-tollgate-retry"  # response, per attempt: set when Envoy should try the next slot
MAX_KEY_SLOTS = 4  # extra slots per target: how many other keys one request may try on one target

# Headers a provider must not see from the client: credentials, and encodings we could not read.
# A fallback removes them too, which also drops the primary's credential from the retried request.
_DROP = (*INBOUND_CREDENTIAL_HEADERS, "accept-encoding", "anthropic-version", "anthropic-beta")


_SECRET_HEADERS = frozenset({"authorization", "x-api-key", "api-key"})


def target_tag(alias: str, index: int, key_slot: int = 0) -> str:
    return f"{alias}#{index}" + (f"~{key_slot}" if key_slot else "")


def parse_slot(tag: str) -> tuple[str, int, int] | None:
    """``ALIAS#INDEX[~K]`` as (alias, target index, key slot)."""
    alias, sep, rest = tag.rpartition("#")
    index, _, slot = rest.partition("~")
    if not sep or not alias or not index.isdigit() or not (slot.isdigit() or not slot):
        return None
    return alias, int(index), int(slot or 0)


def parse_target_tag(tag: str) -> tuple[str, int] | None:
    parsed = parse_slot(tag)
    return None if parsed is None else parsed[:2]


def key_slots(pool_size: int) -> int:
    """Slots a target gets in its alias's cluster: one, plus one per other key of its provider (capped)."""
    return 1 + min(max(pool_size - 1, 0), MAX_KEY_SLOTS)


def cap_field(provider: Provider) -> str:
    """Where this backend reads the output cap: ``max_tokens`` is refused by OpenAI's reasoning models,
    ``max_completion_tokens`` unknown to Azure API versions before 2024-09-01 (Anthropic reads either)."""
    if provider.type == "azure_openai" and (provider.api_version or "") < "2024-09-01":
        return "max_tokens"
    return "max_completion_tokens"


@dataclass(slots=True)
class Prepared:
    set_headers: dict[str, str]
    remove_headers: list[str]
    body: bytes | None  # None: the client's bytes go as they are


def prepare(gw: Runtime, ex: Exchange, index: int) -> Prepared:
    """Translate and authenticate ``ex`` for target ``index`` of its alias, and make it the current attempt.

    With quotas on, the admission's output cap goes into the body (a non-streamed
    request without one). Raises ``UpstreamError`` when the target's credential
    is not available.
    """
    _alias, target, provider = gw.config.target(ex.alias, index)
    # another key of the same provider, after one was refused: none this request has tried
    tried = frozenset(k for p, k in ex.tried_keys if p == provider.name) if ex.retry == "key" else frozenset()
    auth, slot = gw.vault.credential(provider, tried)
    translator = make_translator(provider, target, ex.endpoint, meter_text=ex.admission is not None)
    body = ex.body
    cap = ex.admission.output_cap if ex.admission is not None else None
    if cap is not None:
        body = {**body, cap_field(provider): cap}
    up = translator.request(body, b"")
    redacted = ex.guardrails is not None and ex.guardrails.redacted  # the guardrails replaced some of its text
    if up.body is None and (body is not ex.body or redacted):  # the translator keeps it, but it is not the client's
        up.body = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    elif up.body is None and ex.inbound != "openai":  # the client's bytes are in another schema
        up.body = ex.raw_body
    set_headers = {":path": up.path, ":authority": provider.authority, **up.headers, **auth}
    if up.body is not None:
        set_headers["content-length"] = str(len(up.body))
    ex.translators[index] = translator
    ex.secrets.extend(v.removeprefix("Bearer ") for k, v in auth.items() if k in _SECRET_HEADERS)
    ex.provider, ex.target_model, ex.last_attempt_status = provider.name, target.model, None
    ex.target_index, ex.key_slot, ex.retry = index, slot, None
    if slot is not None:
        ex.tried_keys.add((provider.name, slot))
    ex.outcomes.append([provider.name, None])
    ex.upstream_sent_at = time.monotonic()
    return Prepared(set_headers, [h for h in _DROP if h not in set_headers], up.body)
