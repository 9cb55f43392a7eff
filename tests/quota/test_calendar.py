"""Budget periods are calendar days and months in the configured zone."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from extproc.quota import calendar
from extproc.quota.clock import ManualClock
from extproc.quota.limits import Budget, Reservation, ScopeLimits
from extproc.quota.memory_store import MemoryQuotaStore

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
USD = 1_000_000


def at(tz: ZoneInfo, *parts: int) -> float:
    return datetime(*parts, tzinfo=tz).timestamp()  # type: ignore[misc]


def hours(a: int, b: int) -> float:
    return (b - a) / 3_600_000


def test_days_start_at_local_midnight_and_last_23_or_25_hours_at_dst_changes() -> None:
    spring = calendar.boundaries("day", BERLIN, at(BERLIN, 2026, 3, 29, 12))
    assert spring[1] == int(at(BERLIN, 2026, 3, 29) * 1000)
    assert [hours(spring[i], spring[i + 1]) for i in range(3)] == [24, 23, 24]
    autumn = calendar.boundaries("day", BERLIN, at(BERLIN, 2026, 10, 25, 23, 59))
    assert [hours(autumn[i], autumn[i + 1]) for i in range(3)] == [24, 25, 24]


def test_months_start_on_the_first_and_roll_over_the_year() -> None:
    b = calendar.boundaries("month", NEW_YORK, at(NEW_YORK, 2026, 12, 31, 23, 30))
    starts = [datetime.fromtimestamp(x / 1000, NEW_YORK).strftime("%Y-%m-%d %H:%M") for x in b]
    assert starts == ["2026-11-01 00:00", "2026-12-01 00:00", "2027-01-01 00:00", "2027-02-01 00:00"]
    assert calendar.period_end("month", NEW_YORK, b[1]) == b[2]


def test_the_store_picks_the_period_that_holds_its_own_time() -> None:
    b = calendar.boundaries("day", BERLIN, at(BERLIN, 2026, 6, 1, 12))
    assert calendar.window_of(b, b[1]) == 1
    assert calendar.window_of(b, b[1] - 1) == 0
    assert calendar.window_of(b, b[3]) is None


def test_an_unknown_zone_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match="Mars/Olympus"):
        calendar.zone("Mars/Olympus")


async def test_a_daily_budget_resets_at_midnight_in_the_configured_zone() -> None:
    clock = ManualClock(at(NEW_YORK, 2026, 7, 4, 23, 59))
    store = MemoryQuotaStore(tz=NEW_YORK, clock=clock)
    team = ScopeLimits("team:ml", None, (Budget("day", 50 * USD),))
    late = await store.reserve([team], 0, 50 * USD, lease_seconds=600)
    assert isinstance(late, Reservation)
    assert (await store.reserve([team], 0, 1, lease_seconds=600)).retry_after == 60  # type: ignore[union-attr]
    clock.advance(61)
    fresh = await store.reserve([team], 0, 1 * USD, lease_seconds=600)
    assert isinstance(fresh, Reservation) and fresh.windows != late.windows
    # Settling the request that started yesterday refunds yesterday, not today.
    await store.settle(late, 0, 10 * USD)
    after = await store.reserve([team], 0, 0, lease_seconds=600)
    assert [s.remaining for s in after.states] == [49 * USD]  # type: ignore[union-attr]
