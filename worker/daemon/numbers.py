"""Sending numbers: what each may start now. Meta limits and pauses each number on its own, so
each has its own sending pause (and probe), its own token bucket at the fleet's share, and its
own count of sends in flight; one number's trouble never holds another up."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from worker.daemon.pause import Pauses
from worker.daemon.ratelimit import RateLimits
from worker.store.claims import DueSession

NO_SLOT_WAIT = 5.0  # seconds: a number whose probe is out waits; its answer wakes the loop


@dataclass(frozen=True, slots=True)
class Room:
    rows: int  # sends the number may start now (their tokens taken)
    wait: float  # seconds until it may start one, when `rows` is 0
    limited: bool = False  # a slot is free but the rate limit has no token for it yet


class Numbers:
    def __init__(self, *, default: str, rate_limit: float, concurrency: int) -> None:
        self.default = default
        self.pauses = Pauses()
        self.limits = RateLimits(rate_limit)
        self._concurrency = concurrency
        self._in_flight: Counter[str] = Counter()
        # The loop's last turn found due rows that only the rate limit held back (`throttled`).
        self.held_by_limit = False

    def group(self, sessions: list[DueSession]) -> dict[str, list[DueSession]]:
        """The sessions in the order given, grouped by sending number (first seen, first)."""
        groups: dict[str, list[DueSession]] = {}
        for session in sessions:
            groups.setdefault(session.phone_number_id or self.default, []).append(session)
        return groups

    def paused(self, number: str) -> float:
        """Seconds until the number's pause ends and its probe may go (0: not paused)."""
        return self.pauses.number(number).remaining()

    def room(self, number: str, free: int) -> Room:
        """Sends the number may start now (tokens taken), or how long until it may."""
        slots = self.pauses.number(number).slots(self._concurrency) - self._in_flight[number]
        if slots <= 0:
            return Room(0, NO_SLOT_WAIT)
        limiter = self.limits.number(number)
        tokens = limiter.take_now(min(free, slots))
        if tokens <= 0:
            return Room(0, limiter.wait_time(), limited=True)
        return Room(tokens, 0.0)

    def claimed(self, number: str, tokens: int, rows: int) -> None:
        """A claim that took `tokens` found `rows` rows (0: it failed), whose sends start now."""
        self.limits.number(number).claimed(tokens, rows)

    def started(self, number: str) -> None:
        self._in_flight[number] += 1

    def finished(self, number: str) -> None:
        self._in_flight[number] -= 1

    def throttled(self, number: str) -> float | None:
        """Meta said 130429 for this number: its new rate, or None when already lowered."""
        limiter = self.limits.number(number)
        return limiter.rate if limiter.throttled() else None
