"""What a detector reports: where in the text, which detector, which rule it belongs to.

A finding never carries the matched text itself, only its span, so nothing
downstream (metrics, logs, errors, the score command's output) can leak it by
accident. Code that must replace the value (redaction) reads it from the text
it scanned, at the span.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str  # the rule it falls under: card, iban, national_id, phone, email, private_key, credential, injection, …
    detector: str  # what recognised it: luhn_card, aws_access_key_id, us_ssn, …
    start: int  # [start, end) in characters of the scanned text
    end: int
    key: str = ""  # normalised value (e.g. digits only) so the same card is the same placeholder; never logged


def drop_overlaps(found: list[Finding]) -> list[Finding]:
    """Keep the earliest, then longest, of overlapping findings, so a redaction never cuts another in half."""
    if len(found) < 2:
        return found
    found.sort(key=lambda f: (f.start, -(f.end - f.start)))
    out: list[Finding] = []
    for f in found:
        if out and f.start < out[-1].end:
            continue
        out.append(f)
    return out
