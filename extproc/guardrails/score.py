"""``tollgate guardrails score``: run the live decision over a JSONL file and report precision and recall.

Each line is ``{"text": ..., "label": 0|1?, "kind": ...?}``. The text goes
through ``Engine.scan`` and ``Verdict`` exactly as a user message of a request
does (injection included). With ``--config`` the org policy of that config
decides; without, every detector is on with every national-ID locale and
injections block (``settings.score_settings``), so a line counts as caught
when any detector fires. Output: one line per input line (``--json``: one JSON
object each, in order: action, findings with detector, kind and span
``[start, end)`` in characters), then per kind of the data: recall on
label-1 lines and the share of label-0 lines that fired; and per detector kind:
precision. A line that is not JSON, or has no text, is reported as an error
line and counted apart; the run goes on.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Any, TextIO

from extproc.guardrails.engine import Engine, Verdict
from extproc.guardrails.settings import GuardrailSettings, score_settings


def add_parsers(sub: Any) -> None:
    g = sub.add_parser("guardrails", help="guardrail tools")
    gsub = g.add_subparsers(dest="guardrails_command", required=True)
    s = gsub.add_parser("score", help="run the guardrail decision over a JSONL file; precision/recall per kind")
    s.add_argument("--file", required=True, help="JSONL: {\"text\", \"label\"?, \"kind\"?} per line (- for stdin)")
    s.add_argument("--config", help="take the org policy from this gateway config (default: every detector on)")
    s.add_argument("--json", action="store_true", help="one JSON object per input line, then a JSON summary")


def score_command(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    settings = score_settings()
    if args.config:
        from extproc.config import ConfigError, load_config

        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            print(f"tollgate: {e}", file=sys.stderr)
            return 2
        if cfg.guardrails is None:
            print(f"tollgate: {args.config} has no guardrails section", file=sys.stderr)
            return 2
        settings = cfg.guardrails
    try:
        src = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8", errors="replace")
    except OSError as e:
        print(f"tollgate: cannot read {args.file}: {e.strerror}", file=sys.stderr)
        return 2
    with src:
        summary = score_lines(src, settings, out, as_json=args.json)
    if args.json:
        out.write(json.dumps({"summary": summary}) + "\n")
    else:
        _print_summary(summary, out)
    return 0


def score_lines(lines: Any, settings: GuardrailSettings, out: TextIO, *, as_json: bool) -> dict[str, Any]:
    engine = Engine(settings)
    policy = settings.policy
    by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # positives, caught, negatives, fired
    by_detector_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # lines fired, of which label 1
    errors = 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = _record(line)
        if isinstance(rec, str):
            errors += 1
            _emit(out, as_json, {"line": n, "error": rec}, f"{n}: error: {rec}")
            continue
        text, label, kind = rec
        found = engine.scan(text, policy, role="user")
        v = Verdict(policy.mode)
        v.add(found, policy)
        findings: list[dict[str, Any]] = [{"detector": f.detector, "kind": f.kind, "span": [f.start, f.end]} for f in found
                    if policy.action(f.kind) != "off"]
        fired = bool(findings)
        res: dict[str, Any] = {"line": n, "action": v.action, "findings": findings}
        if label is not None:
            res["label"] = label
        if kind is not None:
            res["kind"] = kind
        brief = ", ".join(f"{f['kind']}/{f['detector']}@{f['span'][0]}-{f['span'][1]}" for f in findings) or "-"
        _emit(out, as_json, res, f"{n}: {v.action} {brief}")
        if label is not None:
            k = by_kind[kind or "all"]
            if label:
                k[0] += 1
                k[1] += fired
            else:
                k[2] += 1
                k[3] += fired
            for dk in {f["kind"] for f in findings}:
                d = by_detector_kind[dk]
                d[0] += 1
                d[1] += bool(label)
    kinds = {k: {"positives": p, "recall": round(c / p, 4) if p else None,
                 "negatives": ng, "false_positive_rate": round(fp / ng, 4) if ng else None}
             for k, (p, c, ng, fp) in sorted(by_kind.items())}
    detectors = {k: {"fired": f, "precision": round(t / f, 4) if f else None}
                 for k, (f, t) in sorted(by_detector_kind.items())}
    return {"by_kind": kinds, "by_detector_kind": detectors, "error_lines": errors}


def _record(line: str) -> tuple[str, int | None, str | None] | str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return "expected a JSON object"
    text = obj.get("text")
    if not isinstance(text, str):
        return "no \"text\" string"
    label = obj.get("label")
    if isinstance(label, bool):
        label = int(label)
    if label is not None and label not in (0, 1):
        return "\"label\" must be 0 or 1"
    kind = obj.get("kind")
    return text, label, str(kind) if kind is not None else None


def _emit(out: TextIO, as_json: bool, obj: dict[str, Any], text: str) -> None:
    out.write((json.dumps(obj) if as_json else text) + "\n")


def _print_summary(s: dict[str, Any], out: TextIO) -> None:
    out.write("\nkind of data          positives  recall   negatives  false positives\n")
    for k, v in s["by_kind"].items():
        rec = f"{v['recall']:.3f}" if v["recall"] is not None else "  -  "
        fpr = f"{v['false_positive_rate']:.3f}" if v["false_positive_rate"] is not None else "  -  "
        out.write(f"{k:22s}{v['positives']:9d}  {rec:7s}{v['negatives']:10d}  {fpr}\n")
    out.write("\ndetector kind         lines fired  precision\n")
    for k, v in s["by_detector_kind"].items():
        out.write(f"{k:22s}{v['fired']:11d}  {v['precision']:.3f}\n")
    if s["error_lines"]:
        out.write(f"\n{s['error_lines']} line(s) could not be read (see above)\n")
