"""A token bucket for sends per second, sized by the fleet's share and slowed by 130429.

The bound it keeps: in any interval of T seconds a bucket lets out at most `burst + rate * T`
sends. The fleet (daemon/fleet.py) picks each daemon's rate and burst so that the sum over all
live daemons stays within the number's limit in every one-second window.

The bound is on sends, not on takes: tokens are taken before the claim, and a claim the
database holds up (a lock, a stall, a failover) sends late. Its tokens count against the bucket
until its sends start, so the bucket does not fill up behind it and let a burst out with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

THROTTLE_FACTOR = 0.5  # a 130429 ("too many messages") halves the rate...
THROTTLE_FLOOR = 0.05  # ...down to 5% of the share at most
RECOVERY_PER_SECOND = 0.05  # and it grows back by 5% of the share each second without one
THROTTLE_DEBOUNCE = 1.0  # the answers of one burst count once
BLOCKED_WAIT = 0.25  # seconds a blocked limiter sleeps before the loop goes round


class RateLimiter:
    """`take_now(n)` takes up to `n` tokens for a claim; `claimed` says how many of its sends
    start now and gives back the tokens of rows it did not find.

    The daemon takes tokens before it claims rows, so a claimed row is sent at once and
    never waits in memory for its turn. A rate of 0 means no limit (WORKER_RATE_LIMIT=0);
    `block()` (a newcomer not yet counted by the others, or a daemon that lost the fleet
    table) lets nothing out until `set_share` is called again.
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._share = rate
        self._capacity = burst if burst is not None else max(1.0, rate / 10)
        self._tokens = self._capacity
        self._stamp = clock()
        self._factor = 1.0
        self._throttled_at = float("-inf")
        self._blocked = False
        self._until = float("inf")
        self._unsent = 0  # tokens taken for a claim whose sends have not started yet

    @property
    def rate(self) -> float:
        """Sends per second allowed now (the share, slowed while Meta says 130429; 0 blocked)."""
        return 0.0 if self._blocked else self._share * self._factor

    def set_share(self, rate: float, burst: float, *, until: float = float("inf")) -> None:
        """Send at `rate` with at most `burst` at once, until the monotonic time `until`
        (the fleet's fence: a daemon that cannot beat stops sending on its own)."""
        self._refill()
        self._share, self._capacity, self._blocked = rate, burst, False
        self._tokens = min(self._tokens, burst - self._unsent)
        self._until = until

    def block(self) -> None:
        self._refill()
        self._blocked, self._tokens = True, 0.0

    def throttled(self) -> bool:
        """Meta answered 130429: halve the rate (once per burst). True when it was lowered."""
        now = self._clock()
        if self._share <= 0 or now - self._throttled_at < THROTTLE_DEBOUNCE:
            return False
        self._refill()
        self._throttled_at = now
        self._factor = max(THROTTLE_FLOOR, self._factor * THROTTLE_FACTOR)
        self._tokens = min(self._tokens, 1.0)
        return True

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._stamp
        self._stamp = now
        if self._blocked:
            return
        self._tokens = min(self._capacity - self._unsent, self._tokens + elapsed * self.rate)
        self._factor = min(1.0, self._factor + elapsed * RECOVERY_PER_SECOND)

    def take_now(self, wanted: int) -> int:
        """Up to `wanted` tokens without waiting (0 when none is there)."""
        if self._blocked or self._clock() > self._until:
            return 0
        if self._share <= 0:
            return wanted
        self._refill()
        got = max(0, min(wanted, int(self._tokens)))
        self._tokens -= got
        self._unsent += got
        return got

    def wait_time(self) -> float:
        """Seconds until the next token (a blocked limiter is asked again soon)."""
        if self._blocked or self._clock() > self._until:
            return BLOCKED_WAIT
        if self._share <= 0:
            return 0.0
        self._refill()
        return max(0.0, (1 - self._tokens) / self.rate)

    def claimed(self, taken: int, sent: int) -> None:
        """A claim that took `taken` tokens starts `sent` sends now: their tokens stop holding
        the bucket down, and those of rows it did not find go back into it."""
        self._refill()  # up to now with the claim's tokens still held
        self._unsent = max(0, self._unsent - taken)
        unused = taken - sent
        if self._share > 0 and not self._blocked and unused > 0:
            self._tokens = min(self._capacity - self._unsent, self._tokens + unused)


class RateLimits:
    """One bucket per sending number (Meta limits each number on its own), all sized by the
    same fleet share; a 130429 slows only the number it came from."""

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._share: tuple[float, float, float] | None = None  # rate, burst, until
        self._blocked = False
        self._limiters: dict[str, RateLimiter] = {}

    def number(self, number: str) -> RateLimiter:
        limiter = self._limiters.get(number)
        if limiter is None:
            limiter = self._limiters[number] = RateLimiter(self._rate)
            if self._blocked:
                limiter.block()
            elif self._share is not None:
                rate, burst, until = self._share
                limiter.set_share(rate, burst, until=until)
        return limiter

    def block(self) -> None:
        self._blocked = True
        for limiter in self._limiters.values():
            limiter.block()

    def set_share(self, rate: float, burst: float, *, until: float = float("inf")) -> None:
        self._blocked, self._share = False, (rate, burst, until)
        for limiter in self._limiters.values():
            limiter.set_share(rate, burst, until=until)

    @property
    def rate(self) -> float:
        """The share each number gets now (for the daemons table)."""
        if self._blocked:
            return 0.0
        return self._share[0] + self._share[1] if self._share else self._rate
