"""One JSON line per finished exchange: who asked, what answered, what it cost, how fast."""

from __future__ import annotations

import json

from extproc.pipeline.exchange import Exchange


def access_record(ex: Exchange, now: float) -> str:
    u = ex.usage
    ttft = (ex.first_token_at - ex.received_at) if ex.first_token_at else None
    tpot = ex.tpot()
    overhead = ex.overhead()
    rec = {
        "request_id": ex.request_id,
        "endpoint": ex.endpoint,
        "api": ex.inbound,
        "alias": ex.alias,
        "provider": ex.provider,
        "principal": ex.principal,
        "team": ex.team,
        "tier": ex.tier,
        "model": ex.target_model,
        "response_model": ex.response_model,
        "attempts": ex.attempts,
        "attempt_outcomes": [f"{p}={s if s is not None else 'none'}" for p, s in ex.outcomes],
        "status": ex.status,
        "stream": ex.stream,
        "input_tokens": u.prompt_tokens if u else None,
        "output_tokens": u.completion_tokens if u else None,
        "cached_tokens": u.cached_tokens if u else None,
        "cost_usd": round(ex.cost_usd, 8),
        "cache": ex.cache,
        "ttft_ms": round(ttft * 1000, 2) if ttft is not None else None,
        "tpot_ms": round(tpot * 1000, 3) if tpot is not None else None,
        "duration_ms": round((now - ex.received_at) * 1000, 2),
        "overhead_ms": round(overhead * 1000, 3) if overhead is not None else None,
        "error": ex.error,
        "guardrails": ex.guardrails.summary() if ex.guardrails is not None else None,
    }
    return json.dumps(rec, separators=(",", ":"))
