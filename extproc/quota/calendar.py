"""Calendar periods of budgets, aligned to midnight in a configured time zone.

A sidecar's own clock may be off by seconds (or worse), so it never decides
which day it is. It hands the store three neighbouring periods around its own
idea of now — as four boundaries in ms since the epoch — and the store picks
the one that holds *its* time (Redis ``TIME``). Days are calendar days, so a
day at a daylight-saving change lasts 23 or 25 hours.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

Boundaries = tuple[int, int, int, int]


def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``; ValueError if there is none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (expected an IANA name such as UTC or Europe/Berlin)") from None


def boundaries(period: str, tz: ZoneInfo, now: float) -> Boundaries:
    """Starts of the previous, current and next period, and the end of the next (ms)."""
    today = datetime.fromtimestamp(now, tz).date()
    if period == "day":
        firsts = [today + timedelta(days=n) for n in (-1, 0, 1, 2)]
    elif period == "month":
        first = today.replace(day=1)
        firsts = [_add_months(first, n) for n in (-1, 0, 1, 2)]
    else:
        raise ValueError(f"a budget period is day or month, not {period!r}")
    b = [_midnight_ms(d, tz) for d in firsts]
    return b[0], b[1], b[2], b[3]


def window_of(bounds: Boundaries, now_ms: int) -> int | None:
    """Index (0..2) of the period in ``bounds`` holding ``now_ms``, or None."""
    for i in range(3):
        if bounds[i] <= now_ms < bounds[i + 1]:
            return i
    return None


def _add_months(first: date, n: int) -> date:
    y, m = divmod(first.month - 1 + n, 12)
    return date(first.year + y, m + 1, 1)


def _midnight_ms(d: date, tz: ZoneInfo) -> int:
    # A zone may skip midnight itself (a few switch DST at 00:00): fold=0 then
    # lands on the first instant of the day, which is what a period start means.
    local = datetime(d.year, d.month, d.day, tzinfo=tz)
    return int(local.timestamp() * 1000)


def period_end(period: str, tz: ZoneInfo, start_ms: int) -> int:
    """The end (ms) of the period that starts at ``start_ms``."""
    start = datetime.fromtimestamp(start_ms / 1000, tz).date()
    if period == "day":
        return _midnight_ms(start + timedelta(days=1), tz)
    return _midnight_ms(_add_months(start.replace(day=1), 1), tz)
