"""Render Envoy's bootstrap from the gateway config: one source of truth.

Shape of what comes out:

* one listener (HTTP/1.1 and HTTP/2 from clients) whose filter chain is the
  ``gateway`` ext_proc filter, then the router;
* one route per model alias, chosen by the ``x-tollgate-route`` header the
  gateway filter sets, with a retry policy that moves to the next target on
  the outcomes the alias's ``fallback_on`` names;
* per alias an aggregate cluster listing one cluster per target in fallback
  order (``previous_priorities`` makes every retry take the next one), and
  after a target whose provider holds several keys, one more per other key
  (key slots: the same target, tried with another key after a 401/403);
* the ``outcome`` ext_proc filter as an upstream filter, skipped by a matcher
  unless an attempt failed, which decides whether a failed status moves on;
* the ``attempt`` ext_proc filter as an upstream filter of the router, skipped
  for a primary target the ``gateway`` filter has prepared, so each fallback
  attempt is translated and authenticated for its own backend;
* local replies (Envoy's own errors) in OpenAI's error shape.

No credential is ever part of this config: keys are injected per request
(primary target) or per attempt (fallbacks).
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import yaml

from extproc.config import Address, GatewayConfig
from extproc.errors import error_object
from extproc.providers.settings import ModelAlias, Provider
from extproc.pipeline.messages import OWN_REPLY_KEY, OWN_REPLY_NAMESPACE
from extproc.pipeline.observe import OBSERVE_HEADER, REQUEST_ID_ATTRIBUTE
from extproc.pipeline.server import FILTER_METADATA_KEY
from extproc.pipeline.upstream import (
    CHOSEN_HEADER,
    PREPARED_HEADER,
    REQUEST_ID_HEADER,
    RETRY_HEADER,
    ROUTE_HEADER,
    TARGET_HEADER,
    key_slots,
    target_tag,
)

EXTPROC_CLUSTER = "tollgate_extproc"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
_T = "type.googleapis.com/"
_MANY = 1_000_000  # circuit-breaker ceilings: concurrency is governed by quotas, not by Envoy

# Connection-manager settings of the listener: HTTP/1.1 and h2c from clients, Envoy's own request ids,
# no whole-request timeout (long generations), a generous idle timeout for streams.
HCM_SETTINGS: dict[str, Any] = {
    "codec_type": "AUTO",
    "use_remote_address": True,
    "generate_request_id": True,
    "preserve_external_request_id": False,
    "always_set_request_id_in_response": True,
    "normalize_path": True,
    "merge_slashes": True,
    "request_timeout": "0s",
    "request_headers_timeout": "10s",
    "stream_idle_timeout": "600s",
    "common_http_protocol_options": {"idle_timeout": "300s", "headers_with_underscores_action": "REJECT_REQUEST"},
    "http2_protocol_options": {"max_concurrent_streams": 1024},
}


def render(cfg: GatewayConfig, *, demo_socket: str | None = None, ca_bundle: str = CA_BUNDLE) -> dict[str, Any]:
    """The bootstrap as a plain dict (dump it as YAML or JSON)."""
    clusters = [_extproc_cluster(cfg.extproc, cfg.envoy.max_exchanges * cfg.workers, cfg.workers)]
    routes = []
    for alias in cfg.models.values():
        slots = _slots(cfg, alias)
        for i, k in slots:
            clusters.append(_target_cluster(alias, i, cfg.providers[alias.targets[i].provider], demo_socket,
                                            ca_bundle, k))
        clusters.append(_aggregate_cluster(alias, slots))
        routes.append(_route(alias, len(slots)))
    routes.append(
        {
            "name": "no_route",
            "match": {"prefix": "/"},
            "direct_response": {"status": 500, "body": {"inline_string": "no model route was selected"}},
        }
    )
    return {
        "node": {"id": "tollgate", "cluster": "tollgate"},
        "admin": {"address": _socket(cfg.envoy.admin)},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _T + "envoy.extensions.resource_monitors.downstream_connections.v3."
                        "DownstreamConnectionsConfig",
                        "max_active_downstream_connections": 50_000,
                    },
                }
            ]
        },
        "static_resources": {"listeners": [_listener(cfg, routes)], "clusters": clusters},
        **({"layered_runtime": runtime_layers()} if cfg.envoy.ext_proc_close == "graceful" else {}),
    }


# Envoy's runtime guard for ending an ext_proc stream by half-closing it (see runtime_layers).
GRACEFUL_CLOSE_GUARD = "envoy.reloadable_features.ext_proc_graceful_grpc_close"


def runtime_layers() -> dict[str, Any]:
    """Envoy's runtime: ext_proc streams end with a half-close, never with a reset.

    Without this guard (off by default in Envoy 1.40) Envoy resets every ext_proc stream still open
    when its HTTP exchange ends: measured, every single one (``upstream_rq_tx_reset`` equals
    ``upstream_rq_total`` on the ext_proc cluster), even when the server has already sent its last
    answer and is about to end the call, because Envoy tears the filter down before the server's
    status arrives. grpcio's aio server then finishes the call on a cancelled stream, and the batch
    that fails there is never freed: 70-120 bytes of native memory per stream (grpc/grpc#43360;
    README, "Memory"). With the guard Envoy half-closes instead and waits (up to its 1 s
    remote-close timeout, in the background: no request waits) for the server's own end, which
    our server sends at once. The admin layer keeps ``/runtime_modify`` working, as without any
    runtime configured.
    """
    return {"layers": [{"name": "tollgate", "static_layer": {GRACEFUL_CLOSE_GUARD: True}},
                       {"name": "admin", "admin_layer": {}}]}


def render_yaml(cfg: GatewayConfig, **kw: Any) -> str:
    header = (
        "# Rendered by `tollgate render-envoy` from the gateway config; do not edit by hand.\n"
        f"# Source: {Path(cfg.source).name if not cfg.source.startswith('<') else cfg.source}\n"
    )
    return header + yaml.safe_dump(render(cfg, **kw), sort_keys=False, width=120)


def render_json(cfg: GatewayConfig, **kw: Any) -> str:
    return json.dumps(render(cfg, **kw), indent=1)


# --------------------------------------------------------------------------- pieces


def _socket(a: Address) -> dict[str, Any]:
    if a.unix_socket:
        return {"pipe": {"path": a.unix_socket}}
    return {"socket_address": {"address": a.host, "port_value": a.port}}


def _slots(cfg: GatewayConfig, alias: ModelAlias) -> list[tuple[int, int]]:
    """(target index, key slot) in the order Envoy tries them: each target, then its key slots."""
    out: list[tuple[int, int]] = []
    for i, t in enumerate(alias.targets):
        p = cfg.providers[t.provider]
        pool = len(p.api_keys) if p.azure_ad is None and p.type != "demo" else 0
        out.extend((i, k) for k in range(key_slots(pool)))
    return out


def _grpc_service(filter_role: str, cfg: GatewayConfig) -> dict[str, Any]:
    return {
        "envoy_grpc": {
            "cluster_name": EXTPROC_CLUSTER,
            "max_receive_message_length": 2 * cfg.limits.max_request_bytes + (1 << 20),
        },
        "initial_metadata": [{"key": FILTER_METADATA_KEY, "value": filter_role}],
        "retry_policy": EXTPROC_RETRY,
    }


# Opening an exchange's gRPC stream is retried when the connection to the Python server fails (it died
# and the standby has not bound its port yet: tens of milliseconds), so a request arriving in that gap is
# served instead of refused. Only a failed connection is retried: a stream refused by the circuit breaker
# (overload) is not, so refusals stay immediate. Envoy's back-off is jittered (each wait is random below
# base * 2^n, capped): five retries span ~0.3 s on average, 0.6 s at most, which is how much later a
# request is refused when no server comes back at all.
EXTPROC_RETRY: dict[str, Any] = {
    "retry_on": "connect-failure",
    "num_retries": 5,
    "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.250s"},
}


def _ms(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _error_json(message: str, type_: str, code: str) -> dict[str, Any]:
    return {"json_format": error_object(message, type_, code)}


def _local_reply(cfg: GatewayConfig) -> dict[str, Any]:
    limit = cfg.limits.max_request_bytes
    flags = ["UF", "UH", "URX", "UO", "UT", "UC", "UR", "NR", "DF", "UMSDR"]
    own_reply = {"metadata_filter": {"matcher": {"filter": OWN_REPLY_NAMESPACE, "path": [{"key": OWN_REPLY_KEY}],
                                                 "value": {"present_match": True}},
                                     "match_if_key_not_found": False}}
    def status_is(code: int) -> dict[str, Any]:
        return {"status_code_filter": {"comparison": {"op": "EQ", "value": {"default_value": code,
                                                                              "runtime_key": f"tg.{code}"}}}}

    return {
        "mappers": [
            {  # an error the gateway answered itself is already in OpenAI's shape: keep it as it is
                "filter": own_reply,
            },
            {  # HTTP/1.0 (Envoy's 426 asks for an upgrade)
                "filter": status_is(426),
                "body_format_override": _error_json(
                    "HTTP/1.1 or later is required", "invalid_request_error", "http_version_not_supported"),
            },
            {  # a request Envoy's codec refused: a garbage request line, a header with an underscore, ...
                "filter": status_is(400),
                "body_format_override": _error_json(
                    "malformed HTTP request (%RESPONSE_CODE_DETAILS%)", "invalid_request_error", "malformed_request"),
            },
            {  # a provider's answer larger than the buffer the answer stage reads it into
                "filter": {"extension_filter": {"name": "envoy.access_loggers.extension_filters.cel", "typed_config": {
                    "@type": _T + "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                    "expression": "response.code_details == 'response_payload_too_large'"}}},
                "status_code": 502,
                "body_format_override": _error_json(
                    f"the provider's answer is larger than the gateway's buffer of {limit} bytes "
                    "(limits.max_request_bytes)", "api_error", "upstream_response_too_large"),
            },
            {  # the Python server cannot be reached (down, restarting): fail closed, and say when to come back
                "filter": status_is(500),
                "status_code": 503,
                "headers_to_add": [{"header": {"key": "retry-after", "value": "1"},
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
                "body_format_override": _error_json(
                    "the gateway is unavailable right now; retry shortly", "api_error",
                    "gateway_unavailable"),
            },
            {  # Envoy's own refusal of oversized headers (e.g. a huge bearer token), before any filter runs
                "filter": {"status_code_filter": {"comparison": {"op": "EQ", "value": {"default_value": 431,
                                                                                        "runtime_key": "tg.431"}}}},
                "body_format_override": _error_json(
                    "request headers are too large", "invalid_request_error", "request_headers_too_large"
                ),
            },
            {
                "filter": {"status_code_filter": {"comparison": {"op": "EQ", "value": {"default_value": 413,
                                                                                        "runtime_key": "tg.413"}}}},
                "body_format_override": _error_json(
                    f"request body exceeds the gateway limit of {limit} bytes", "invalid_request_error",
                    "request_too_large"
                ),
            },
            {  # the whole-answer deadline (the route timeout) passed
                "filter": {"and_filter": {"filters": [status_is(504), {"response_flag_filter": {"flags": ["UT"]}}]}},
                "body_format_override": _error_json(
                    "no complete answer in time (%RESPONSE_CODE_DETAILS%); see the model's answer_timeout and "
                    "per_try_timeout", "api_error", "upstream_timeout"),
            },
            {
                "filter": {"response_flag_filter": {"flags": flags}},
                "body_format_override": _error_json(
                    "no provider could answer: %LOCAL_REPLY_BODY%", "api_error", "upstream_unavailable"
                ),
            },
            {  # a 504 that no upstream flag explains: the Python server did not answer a message in time
                # (overload, or a stuck server). Nothing was routed if it happened on the request side.
                "filter": status_is(504),
                "status_code": 503,
                "headers_to_add": [{"header": {"key": "retry-after", "value": "1"},
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
                "body_format_override": _error_json(
                    "the gateway is overloaded; retry shortly", "api_error", "gateway_overloaded"),
            },
            {
                "filter": {"status_code_filter": {"comparison": {"op": "GE", "value": {"default_value": 500,
                                                                                        "runtime_key": "tg.5xx"}}}},
                "body_format_override": {
                    **_error_json("gateway error: %LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)", "api_error",
                                  "gateway_error"),
                    "content_type": "application/json",
                },
            },
        ]
    }


def ext_proc_filter(name: str, role: str, cfg: GatewayConfig) -> dict[str, Any]:
    """An ext_proc filter talking to the Tollgate server as ``role``; both filters share this setup:
    fail closed, request headers and the buffered body, answers only when a stage switches them on."""
    return {
        "name": name,
        "typed_config": {
            "@type": _T + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": _grpc_service(role, cfg),
            "failure_mode_allow": False,
            "message_timeout": _ms(cfg.envoy.message_timeout),
            "allow_mode_override": True,
            "metadata_options": {"receiving_namespaces": {"untyped": [OWN_REPLY_NAMESPACE]}},
            "mutation_rules": {"allow_all_routing": True, "allow_envoy": False},
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SKIP",
                "request_body_mode": "BUFFERED",
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
        },
    }


def _listener(cfg: GatewayConfig, routes: list[dict[str, Any]]) -> dict[str, Any]:
    # the primary target's request is prepared here (path, host, credential), and every answer read; the
    # answer is read only for requests that will be routed (the headers stage switches it on), so Envoy's
    # own early replies (431 for oversized headers) never open a response exchange
    gateway_filter = ext_proc_filter("tollgate.gateway", "gateway", cfg)
    hcm = {
        "@type": _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "tollgate",
        **HCM_SETTINGS,
        "internal_address_config": {"cidr_ranges": []},
        # A client-chosen x-request-id is dropped before Envoy assigns its own, so two exchanges can never
        # share an id (the ext_proc server keys its exchanges by it).
        "early_header_mutation_extensions": [
            {
                "name": "tollgate.drop_client_request_id",
                "typed_config": {
                    "@type": _T + "envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                    "mutations": [{"remove": "x-request-id"}],
                },
            }
        ],
        "local_reply_config": _local_reply(cfg),
        "route_config": {
            "name": "tollgate",
            "virtual_hosts": [{"name": "tollgate", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            gateway_filter,
            *([_meter_filter(cfg)] if any(a.stream_chunks == "observe" for a in cfg.models.values()) else []),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": _T + "envoy.extensions.filters.http.router.v3.Router",
                    "suppress_envoy_headers": True,
                    "upstream_http_filters": _attempt_filters(cfg),
                },
            },
        ],
    }
    return {
        "name": "tollgate",
        "address": _socket(cfg.listen),
        "per_connection_buffer_limit_bytes": cfg.limits.max_request_bytes,
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


def _meter_filter(cfg: GatewayConfig) -> dict[str, Any]:
    """The ``meter`` ext_proc filter, for aliases with ``stream_chunks: observe`` (pipeline/observe.py).

    In ext_proc's observability mode: Envoy sends each chunk of the answer and
    waits for nothing, so the chunk moves on at once. It opens a gRPC stream
    only for a request the gateway stage marked (``x-tollgate-observe``; a
    matcher skips it otherwise, so other requests pay nothing), and only on the
    answer's first chunk, which carries the request id as an attribute. The
    server ends the call at the answer's last chunk: Envoy would otherwise
    keep an observability stream open for its deferred-close time, and every
    open stream counts against the ext_proc cluster's ``max_requests``. It
    fails open: a lost side stream costs the stream's reading (billed from
    the hold and the counted text), never the answer.
    """
    meter = ext_proc_filter("tollgate.meter", "meter", cfg)
    tc = meter["typed_config"]
    tc.update({"stat_prefix": "meter", "observability_mode": True, "failure_mode_allow": True, "allow_mode_override": False,
               "deferred_close_timeout": "1s", "response_attributes": [REQUEST_ID_ATTRIBUTE]})
    tc["processing_mode"].update({"request_header_mode": "SKIP", "request_body_mode": "NONE",
                                  "response_header_mode": "SKIP", "response_body_mode": "STREAMED"})
    marked = {"single_predicate": {
        "input": {"name": OBSERVE_HEADER, "typed_config": {
            "@type": _T + "envoy.type.matcher.v3.HttpRequestHeaderMatchInput", "header_name": OBSERVE_HEADER}},
        "value_match": {"exact": "1"}}}
    return {
        "name": "tollgate.meter_if_observed",
        "typed_config": {
            "@type": _T + "envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "extension_config": meter,
            "xds_matcher": {"matcher_list": {"matchers": [{
                "predicate": {"not_matcher": marked},
                "on_match": {"action": {"name": "skip", "typed_config": {
                    "@type": _T + "envoy.extensions.filters.common.matcher.action.v3.SkipFilter"}}},
            }]}},
        },
    }


def _attempt_filters(cfg: GatewayConfig) -> list[dict[str, Any]]:
    """The router's upstream filters, run once per attempt after Envoy chose the target.

    Envoy writes the chosen target (``ALIAS#INDEX``, from the endpoint metadata) into a request
    header. When that is the primary (``#0``) and the gateway stage prepared it (its own header
    says so), the ``attempt`` ext_proc filter is skipped: the first attempt costs no second gRPC
    stream. Any other target gets it and is prepared for itself, so a key is never sent to a host
    it was not prepared for. Both internal headers are removed before the request leaves.
    """
    header_mutation = _T + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
    def named(header: str, value: str = "%UPSTREAM_METADATA(tollgate:target)%") -> dict[str, Any]:
        return {"append": {"header": {"key": header, "value": value},
                           "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}

    # On the way back the same filter names the target on its answer, for the gateway stage to read. Being
    # an upstream filter, it marks only what came from a target: Envoy's own replies (no target reachable)
    # never pass the upstream chain, so they carry no name and pass as they are.
    choose = {
        "name": "tollgate.chosen_target",
        "typed_config": {
            "@type": header_mutation,
            "mutations": {"request_mutations": [named(CHOSEN_HEADER)],
                          "response_mutations": [named(TARGET_HEADER), named(REQUEST_ID_HEADER, "%REQ(x-request-id)%")]},
        },
    }
    attempt = ext_proc_filter("tollgate.attempt", "attempt", cfg)

    def header_is(name: str, match: dict[str, str]) -> dict[str, Any]:
        return {"single_predicate": {
            "input": {"name": name, "typed_config": {
                "@type": _T + "envoy.type.matcher.v3.HttpRequestHeaderMatchInput", "header_name": name}},
            "value_match": match}}

    skip_for_prepared_primary = {
        "name": "tollgate.attempt_unless_prepared",
        "typed_config": {
            "@type": _T + "envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "extension_config": attempt,
            "xds_matcher": {"matcher_list": {"matchers": [{
                "predicate": {"and_matcher": {"predicate": [
                    header_is(CHOSEN_HEADER, {"suffix": "#0"}), header_is(PREPARED_HEADER, {"exact": "1"})]}},
                "on_match": {"action": {"name": "skip", "typed_config": {
                    "@type": _T + "envoy.extensions.filters.common.matcher.action.v3.SkipFilter"}}},
            }]}},
        },
    }
    unchoose = {
        "name": "tollgate.internal_headers_removed",
        "typed_config": {"@type": header_mutation, "mutations": {"request_mutations": [
            {"remove": CHOSEN_HEADER}, {"remove": PREPARED_HEADER}]}},
    }
    codec = {
        "name": "envoy.filters.http.upstream_codec",
        "typed_config": {"@type": _T + "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"},
    }
    return [_outcome_filter(cfg), choose, skip_for_prepared_primary, unchoose, codec]


def _outcome_filter(cfg: GatewayConfig) -> dict[str, Any]:
    """The ``outcome`` ext_proc filter: each failed attempt's response headers, before Envoy decides to retry.

    First in the upstream chain, so on the way back it runs last and sees the target's name (and the
    request id) that ``tollgate.chosen_target`` adds. A matcher skips it for an answer that plainly
    succeeded (2xx or 3xx, JSON or an event stream), so only failures cost a gRPC stream; it sends no
    request phase at all.
    """
    observe = ext_proc_filter("tollgate.outcome", "outcome", cfg)
    observe["typed_config"]["processing_mode"].update({"request_header_mode": "SKIP", "request_body_mode": "NONE",
                                                      "response_header_mode": "SEND"})
    observe["typed_config"]["allow_mode_override"] = False

    def response_header(name: str, regex: str) -> dict[str, Any]:
        return {"single_predicate": {
            "input": {"name": name, "typed_config": {
                "@type": _T + "envoy.type.matcher.v3.HttpResponseHeaderMatchInput", "header_name": name}},
            "value_match": {"safe_regex": {"google_re2": {}, "regex": regex}}}}

    succeeded = {"and_matcher": {"predicate": [
        response_header(":status", "[23][0-9][0-9]"),
        response_header("content-type", "(?i)(application/json|text/event-stream).*"),
    ]}}
    return {
        "name": "tollgate.outcome_unless_succeeded",
        "typed_config": {
            "@type": _T + "envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "extension_config": observe,
            "xds_matcher": {"matcher_list": {"matchers": [{
                "predicate": succeeded,
                "on_match": {"action": {"name": "skip", "typed_config": {
                    "@type": _T + "envoy.extensions.filters.common.matcher.action.v3.SkipFilter"}}},
            }]}},
        },
    }


def retry_on(alias: ModelAlias) -> str:
    """Envoy's ``retry_on`` for an alias's ``fallback_on``.

    Statuses (5xx, 429, 401, 403, invalid answers) are decided per attempt by the ``outcome`` stage, which
    marks an answer to retry with a header (``retriable-headers``); key slots need that too. Failures
    without an answer are Envoy's: ``connect_failure`` is a refused or failed connection, ``timeout`` the
    per-try and first-byte timeouts, which Envoy retries as ``reset`` (so ``timeout`` also retries a
    connection reset mid-answer, and a refused connection).
    """
    kinds = ["retriable-headers"]
    if "connect_failure" in alias.fallback_on:
        kinds += ["connect-failure", "refused-stream"]
    if "timeout" in alias.fallback_on:
        kinds.append("reset")
    return ",".join(kinds)


def _route(alias: ModelAlias, slots: int) -> dict[str, Any]:
    # The whole-answer deadline; a second of slack lets the answer stage cut a late stream cleanly (an
    # error event) before Envoy's timeout would reset it. A plain answer past it is a 504 in OpenAI's shape.
    action: dict[str, Any] = {"cluster": _aggregate_name(alias), "timeout": _ms(alias.answer_timeout + 1.0)}
    policy: dict[str, Any] = {
        "retry_on": retry_on(alias),
        "retriable_headers": [{"name": RETRY_HEADER, "present_match": True}],
        "num_retries": max(slots - 1, 0),
        "per_try_timeout": _ms(alias.per_try_timeout),
        "per_try_idle_timeout": _ms(alias.first_byte_timeout),
        "retry_back_off": {"base_interval": "0.010s", "max_interval": "0.050s"},
        "retry_priority": {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {
                "@type": _T + "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                "update_frequency": 1,
            },
        },
        "host_selection_retry_max_attempts": 3,
    }
    action["retry_policy"] = policy
    return {
        "name": f"alias:{alias.name}",
        "match": {"prefix": "/", "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": alias.name}}]},
        "route": action,
        "request_headers_to_remove": [ROUTE_HEADER, *([OBSERVE_HEADER] if alias.stream_chunks == "observe" else [])],
    }


def _aggregate_name(alias: ModelAlias) -> str:
    return f"alias:{alias.name}"


def _target_name(alias: ModelAlias, index: int, key_slot: int = 0) -> str:
    return f"target:{target_tag(alias.name, index, key_slot)}"


def _aggregate_cluster(alias: ModelAlias, slots: list[tuple[int, int]]) -> dict[str, Any]:
    return {
        "name": _aggregate_name(alias),
        "connect_timeout": "5s",
        "lb_policy": "CLUSTER_PROVIDED",
        "circuit_breakers": circuit_breakers(),
        "cluster_type": {
            "name": "envoy.clusters.aggregate",
            "typed_config": {
                "@type": _T + "envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                "clusters": [_target_name(alias, i, k) for i, k in slots],
            },
        },
    }


def circuit_breakers() -> dict[str, Any]:
    limits = {k: _MANY for k in ("max_connections", "max_pending_requests", "max_requests", "max_retries")}
    return {"thresholds": [{"priority": "DEFAULT", **limits}]}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _target_cluster(
    alias: ModelAlias, index: int, p: Provider, demo_socket: str | None, ca_bundle: str, key_slot: int = 0
) -> dict[str, Any]:
    name = _target_name(alias, index, key_slot)
    if p.type == "demo":
        if not demo_socket:
            raise ValueError("the demo provider needs its socket path")
        address: dict[str, Any] = {"pipe": {"path": demo_socket}}
        kind = "STATIC"
    else:
        address = {"socket_address": {"address": p.host, "port_value": p.port}}
        kind = "STATIC" if _is_ip(p.host) else "STRICT_DNS"
    endpoint = {
        "metadata": {"filter_metadata": {"tollgate": {"target": target_tag(alias.name, index, key_slot)}}},
        "endpoint": {"address": address, "hostname": p.host},
    }
    cluster: dict[str, Any] = {
        "name": name,
        "type": kind,
        "connect_timeout": _ms(p.connect_timeout),
        "circuit_breakers": circuit_breakers(),
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                **({"auto_config": {"http_protocol_options": {}, "http2_protocol_options": {}}}
                   if p.tls else {"explicit_http_config": {"http_protocol_options": {}}}),
                "common_http_protocol_options": {"idle_timeout": "60s"},
            }
        },
    }
    if kind == "STRICT_DNS":
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if p.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": p.host,
                "common_tls_context": {
                    "validation_context": {
                        "trusted_ca": {"filename": ca_bundle},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": p.host}}],
                    }
                },
            },
        }
    return cluster


def _extproc_cluster(a: Address, max_exchanges: int, workers: int = 1) -> dict[str, Any]:
    """The Python server (one endpoint per worker process), with admission control in front of it.

    Every request Envoy routes holds one gRPC stream to the server for its
    whole life (a fallback attempt one more), so the circuit breaker's
    ``max_requests`` on this cluster caps the exchanges in flight. Past it
    the stream is refused at once and the client gets a 503 with
    ``Retry-After`` (the local reply for an unreachable ext_proc server)
    within milliseconds, before anything is routed; without the cap, excess
    load queues in the server until Envoy's per-message timeout answers 504
    (measured: tests/bench/overload.md).

    With several workers (``extproc.workers``) each is an endpoint of its own; ``LEAST_REQUEST`` sends a
    new stream to the worker with fewer streams open, which balances long generations better than turns.
    (One port shared with SO_REUSEPORT would not balance: Envoy keeps one or two long-lived HTTP/2
    connections per cluster and every stream on a connection lands on the process that accepted it.)
    Health checking is left to the connection: a killed worker refuses connections and Envoy's outlier
    detection ejects it until its replacement binds.
    """
    limits = {"max_connections": _MANY, "max_pending_requests": _MANY, "max_retries": _MANY,
              "max_requests": max_exchanges}
    return {
        "name": EXTPROC_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", **limits}]},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {
                        "connection_keepalive": {"interval": "30s", "timeout": "5s"},
                        "max_concurrent_streams": 100_000,
                    }
                },
            }
        },
        "load_assignment": {"cluster_name": EXTPROC_CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _socket(a.worker(i))}} for i in range(workers)]}]},
        **({"lb_policy": "LEAST_REQUEST", **_EJECT_DEAD_WORKER} if workers > 1 else {}),
    }


# A worker that is down (killed, its replacement not bound yet) is left out of the balancing: at once when a
# connection to it is refused (outlier detection), and by a gRPC health check every half second, which also
# brings its replacement back. Without them LEAST_REQUEST prefers the dead worker (it never has a stream
# open) and nearly every request fails until the replacement binds. No panic mode: with every worker down
# the answer is Envoy's fast 503 (Retry-After), never a stream sent to a known-dead worker.
_EJECT_DEAD_WORKER: dict[str, Any] = {
    "outlier_detection": {
        "consecutive_local_origin_failure": 1, "split_external_local_origin_errors": True,
        "enforcing_consecutive_local_origin_failure": 100, "interval": "0.5s", "base_ejection_time": "0.5s",
        "max_ejection_time": "2s", "max_ejection_percent": 100},
    "health_checks": [{
        "timeout": "0.5s", "interval": "0.5s", "unhealthy_threshold": 1, "healthy_threshold": 1,
        "no_traffic_interval": "0.5s", "grpc_health_check": {}}],
    "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
}


# --------------------------------------------------------------------------- checking


def typed_check(boot: dict[str, Any]) -> None:
    """Read the bootstrap into envoy-data-plane's typed Envoy messages; raise ValueError naming a bad field.

    A check that needs no Envoy binary, for `tollgate validate` and the tests. It is far too slow for
    any request path (seconds, mostly imports): the hot path uses upb messages instead.
    """
    import importlib

    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

    for url in sorted(_type_urls(boot)):
        module = url.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        try:
            importlib.import_module(f"envoy_data_plane.{module}")
        except ImportError:
            raise ValueError(f"unknown Envoy type {url}") from None
    try:
        Bootstrap.from_dict(boot)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a valid Envoy bootstrap: {e}") from None


def _type_urls(node: Any) -> set[str]:
    found: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            if isinstance(n.get("@type"), str):
                found.add(n["@type"])
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)
    return found
