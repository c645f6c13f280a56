"""A token bucket for sends per second on this daemon."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class RateLimiter:
    """`take(n)` waits for at least one token and takes up to `n`; `refund` gives unused back.

    The daemon takes tokens before it claims rows, so a claimed row is sent at once and
    never waits in memory for its turn. A rate of 0 means no limit.
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._capacity = burst if burst is not None else max(1.0, rate / 10)
        self._tokens = self._capacity
        self._clock = clock
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    async def take(self, wanted: int, *, max_wait: float) -> int:
        """Up to `wanted` tokens; 0 when none comes within `max_wait` seconds (the caller's
        loop must go round: a very low rate never holds the heartbeat up)."""
        if self._rate <= 0:
            return wanted
        self._refill()
        if self._tokens < 1:
            await asyncio.sleep(min(max_wait, (1 - self._tokens) / self._rate))
            self._refill()
            if self._tokens < 1:
                return 0
        got = min(wanted, int(self._tokens))
        self._tokens -= got
        return got

    def refund(self, count: int) -> None:
        if self._rate > 0 and count > 0:
            self._tokens = min(self._capacity, self._tokens + count)
