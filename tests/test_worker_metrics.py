"""One /metrics for several workers: what the supervisor serves is the workers' series combined."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from extproc.telemetry.worker_metrics import WorkerExposition, combine, read_worker


def worker(requests: int, seconds: list[float], entries: int, budget_left: float) -> str:
    r = CollectorRegistry()
    Counter("tollgate_requests", "requests", ("alias",), registry=r).labels("gpt").inc(requests)
    h = Histogram("gen_ai_server_request_duration_seconds", "duration", ("alias",), buckets=(0.1, 1.0), registry=r)
    for s in seconds:
        h.labels("gpt").observe(s)
    Gauge("tollgate_cache_entries", "entries", registry=r).set(entries)
    Gauge("tollgate_budget_remaining_usd", "left", ("team",), registry=r).labels("ml").set(budget_left)
    return generate_latest(r).decode()


def samples(text_families) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_families for s in f.samples}


def test_counters_and_histograms_add_up_and_gauges_take_the_view_both_share():
    got = samples(combine([worker(3, [0.05, 0.5], 10, 40.0), worker(4, [2.0], 10, 38.5)]))
    assert got[("tollgate_requests_total", (("alias", "gpt"),))] == 7
    bucket = "gen_ai_server_request_duration_seconds_bucket"
    assert got[(bucket, (("alias", "gpt"), ("le", "0.1")))] == 1
    assert got[(bucket, (("alias", "gpt"), ("le", "1.0")))] == 2
    assert got[(bucket, (("alias", "gpt"), ("le", "+Inf")))] == 3
    assert got[("gen_ai_server_request_duration_seconds_count", (("alias", "gpt"),))] == 3
    assert got[("gen_ai_server_request_duration_seconds_sum", (("alias", "gpt"),))] == 2.55
    assert got[("tollgate_cache_entries", ())] == 10  # each worker's copy of one index: not 20
    assert got[("tollgate_budget_remaining_usd", (("team", "ml"),))] == 38.5  # the freshest of a shrinking amount
    assert not any(name.endswith("_created") for name, _ in got)


def test_a_worker_that_is_down_is_left_out_of_that_scrape(tmp_path):
    r = CollectorRegistry()
    Counter("tollgate_requests", "requests", registry=r).inc(5)
    up = WorkerExposition(r, str(tmp_path / "metrics-0.sock"))
    try:
        texts = [read_worker(str(tmp_path / "metrics-0.sock")), read_worker(str(tmp_path / "metrics-1.sock"))]
    finally:
        up.close()
    assert texts[1] == ""
    assert samples(combine(texts))[("tollgate_requests_total", ())] == 5
