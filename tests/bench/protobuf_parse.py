"""How much one ext_proc message costs to parse and build with each protobuf binding.

Compares the upb-generated messages from xds-protos (what the server uses) with
envoy-data-plane's betterproto2 dataclasses, on a request-headers message shaped
like what Envoy sends for an OpenAI SDK call, and on building a header-mutation answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as upb

HEADERS = {
    ":authority": "127.0.0.1:10000", ":path": "/v1/chat/completions", ":method": "POST", ":scheme": "http",
    "content-type": "application/json", "accept": "application/json", "user-agent": "OpenAI/Python 2.3.0",
    "x-stainless-lang": "python", "x-stainless-package-version": "2.3.0", "x-stainless-os": "Linux",
    "x-stainless-arch": "x64", "x-stainless-runtime": "CPython", "x-stainless-runtime-version": "3.11.7",
    "authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.payload.signature", "content-length": "2048",
    "x-forwarded-proto": "http", "x-request-id": "5b1c2d4e-8f9a-4b3c-9d2e-1f0a3b4c5d6e",
    "x-stainless-retry-count": "0", "accept-encoding": "gzip, deflate",
}


def wire() -> bytes:
    m = upb.ProcessingRequest()
    for k, v in HEADERS.items():
        m.request_headers.headers.headers.add(key=k, raw_value=v.encode())
    return m.SerializeToString()


def per_call(fn: Callable[[], object], seconds: float = 0.5) -> float:
    """Median of five timed batches, in microseconds per call."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.05:
        fn()
        n += 1
    batch = max(1, int(n * seconds / 0.05 / 5))
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - t) / batch * 1e6)
    return sorted(samples)[2]


def measure() -> list[tuple[str, float, float]]:
    from envoy_data_plane.envoy.config.core.v3 import HeaderValue, HeaderValueOption
    from envoy_data_plane.envoy.service.ext_proc.v3 import (
        CommonResponse,
        HeaderMutation,
        HeadersResponse,
        ProcessingRequest,
        ProcessingResponse,
    )

    data = wire()

    def upb_parse() -> object:
        m = upb.ProcessingRequest.FromString(data)
        return {h.key: h.raw_value for h in m.request_headers.headers.headers}

    def bp_parse() -> object:
        m = ProcessingRequest.parse(data)
        return {h.key: h.raw_value for h in m.request_headers.headers.headers}

    def upb_build() -> bytes:
        r = upb.ProcessingResponse()
        add = r.request_headers.response.header_mutation.set_headers.add
        for k in ("x-tollgate-route", ":path", "authorization"):
            add(header=base_pb2.HeaderValue(key=k, raw_value=b"value"))
        return r.SerializeToString()

    def bp_build() -> bytes:
        hm = HeaderMutation(set_headers=[HeaderValueOption(header=HeaderValue(key=k, raw_value=b"value"))
                                         for k in ("x-tollgate-route", ":path", "authorization")])
        r = ProcessingResponse(request_headers=HeadersResponse(response=CommonResponse(header_mutation=hm)))
        return bytes(r)

    assert upb_parse() == bp_parse()
    return [
        ("parse a request-headers message (19 headers)", per_call(upb_parse), per_call(bp_parse)),
        ("build and serialise a header-mutation answer", per_call(upb_build), per_call(bp_build)),
    ]


def table() -> str:
    rows = ["", "## Protobuf bindings: one ext_proc message (`python -m tests.bench.protobuf_parse`)", "",
            "Why the hot path uses xds-protos' upb messages and not envoy-data-plane's dataclasses.", "",
            "| operation | upb (xds-protos) µs | betterproto2 (envoy-data-plane) µs | ratio |", "|---|---:|---:|---:|"]
    for name, a, b in measure():
        rows.append(f"| {name} | {a:.2f} | {b:.1f} | {b / a:.0f}× |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
