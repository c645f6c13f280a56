"""Two small state machines the daemon composes: the sending pause and template holds.

The sending pause is a circuit breaker: an account-level error or an unreachable API opens it
for a while; then one probe send goes out, and only a success closes it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PauseReason:
    code: int | None
    text: str

    def __str__(self) -> str:
        return f"code {self.code}: {self.text}" if self.code is not None else self.text

    @property
    def label(self) -> str:
        """For a metric label: the code, or what happened (never a phone or a row)."""
        return str(self.code) if self.code is not None else "unreachable"


class SendingPause:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until = 0.0
        self._probing = False
        self._tripped_at = float("-inf")
        self.reason: PauseReason | None = None

    def trip(self, seconds: float, reason: PauseReason) -> bool:
        """Stop sending for `seconds`, then probe. True when this starts a new pause."""
        now = self._clock()
        fresh = now >= self._until and not self._probing
        self._tripped_at = now
        self._until = max(self._until, now + seconds)
        self._probing = True
        self.reason = reason
        return fresh

    def remaining(self) -> float:
        return max(0.0, self._until - self._clock())

    def slots(self, concurrency: int) -> int:
        """Sends allowed in flight: one probe after a pause, all once a send succeeded."""
        return 1 if self._probing else concurrency

    def succeeded(self, started: float) -> bool:
        """A send started at `started` (monotonic) went through; True when that closes a pause.
        A send already on its way when the pause began proves nothing about the account now."""
        if started < self._tripped_at:
            return False
        closed = self._probing
        self._probing = False
        self.reason = None
        return closed


class Pauses:
    """One sending pause per number: an account error on one number does not stop another."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._pauses: dict[str, SendingPause] = {}

    def number(self, number: str) -> SendingPause:
        pause = self._pauses.get(number)
        if pause is None:
            pause = self._pauses[number] = SendingPause(clock=self._clock)
        return pause

    def active(self) -> dict[str, SendingPause]:
        """The numbers paused or probing now, with their pause."""
        return {n: p for n, p in self._pauses.items() if p.reason is not None}

    def describe(self) -> str | None:
        """`number 123: code 190: ... | number 456: ...`, or None when every number may send."""
        active = self.active()
        if not active:
            return None
        return " | ".join(f"number {n}: {p.reason}" for n, p in sorted(active.items()))

    def remaining(self) -> float:
        """Seconds until the first paused number may probe (0 when none is paused)."""
        waits = [p.remaining() for p in self._pauses.values() if p.remaining() > 0]
        return min(waits) if waits else 0.0


class TemplateHolds:
    """Templates Meta paused or disabled, held back until a monotonic deadline."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}

    def start(self, name: str, seconds: float) -> bool:
        """True when `name` was not held yet (the caller then holds its rows)."""
        now = self._clock()
        if self._until.get(name, 0.0) > now:
            return False
        self._until[name] = now + seconds
        return True

    def cancel(self, name: str) -> None:
        self._until.pop(name, None)
