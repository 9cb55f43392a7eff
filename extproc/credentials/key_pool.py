"""Several keys for one provider: spread requests over them, leave out the ones that stopped working.

A platform team often holds more than one key per provider (several projects,
a spare for rotation, keys of different organisations for more rate limit).
Requests take the keys in turn. A key that a provider answered 401 or 403 is
*quarantined*: left out until ``key_quarantine`` has passed (then it gets one
more chance) or until its value changes (a rotated Secret file). A key that got
a 429 with ``Retry-After`` *cools down* for that long; when every key is cooling,
the one that is ready soonest is used rather than none. When every key is
quarantined, one is still used (``insist``): the provider decides whether it
works again, not a guess here, and the alias's fallback policy what follows.

Keys are named by their position (``#0``, ``#1`` …) and where they come from
(``env:NAME``, ``file:PATH``) in logs and metrics; a value never leaves this
module except in the header sent to its provider.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class _Slot:
    read: Callable[[], str | None]  # the key's current value (a file is re-read when it changes)
    origin: str  # env:NAME or file:PATH, for logs
    quarantined_until: float = 0.0
    quarantined_value: str = ""  # a digest of the value that was refused: a new value is a new chance
    cooling_until: float = 0.0


@dataclass(frozen=True, slots=True)
class Pick:
    slot: int
    value: str


class KeyPool:
    def __init__(self, sources: list[tuple[Callable[[], str | None], str]], quarantine: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._slots = [_Slot(read, origin) for read, origin in sources]
        self._quarantine = quarantine
        self._clock = clock
        self._turn = 0

    def __len__(self) -> int:
        return len(self._slots)

    def origin(self, slot: int) -> str:
        return self._slots[slot].origin

    def pick(self, exclude: Iterable[int] = ()) -> Pick | None:
        """The next usable key after the last one given out, skipping ``exclude`` (keys this request
        already tried), quarantined and cooling ones; None when no key is left."""
        n = len(self._slots)
        if not n:
            return None
        now = self._clock()
        skip = set(exclude)
        start, self._turn = self._turn, (self._turn + 1) % n
        cooling: list[tuple[float, int, str]] = []
        for i in range(n):
            at = (start + i) % n
            s = self._slots[at]
            if at in skip:
                continue
            value = s.read()
            if not value or self._quarantined(s, value, now):
                continue
            if s.cooling_until > now:
                cooling.append((s.cooling_until, at, value))
                continue
            return Pick(at, value)
        if cooling:
            _, at, value = min(cooling)
            return Pick(at, value)
        return None

    def insist(self, exclude: Iterable[int] = ()) -> Pick | None:
        """``pick``, or else any key that has a value (untried ones first); None only when none has."""
        found = self.pick(exclude)
        if found is not None:
            return found
        skip = set(exclude)
        order = sorted(range(len(self._slots)), key=lambda at: at in skip)
        for at in order:
            value = self._slots[at].read()
            if value:
                return Pick(at, value)
        return None

    def quarantine(self, slot: int) -> bool:
        """Leave this key out (it was refused); False when it already was out."""
        s = self._slots[slot]
        value = s.read() or ""
        now = self._clock()
        if self._quarantined(s, value, now):
            return False
        s.quarantined_until, s.quarantined_value = now + self._quarantine, _digest(value)
        return True

    def cool_down(self, slot: int, seconds: float) -> None:
        s = self._slots[slot]
        s.cooling_until = max(s.cooling_until, self._clock() + seconds)

    def _quarantined(self, s: _Slot, value: str, now: float) -> bool:
        return s.quarantined_until > now and s.quarantined_value == _digest(value)


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()
