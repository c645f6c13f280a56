"""The fleet: this daemon's row in the daemons table, and its share of the number's rate limit.

Every daemon beats its row about once a second and, in the same transaction, counts the live
daemons (beaten within `LIVE_HORIZON` beats). Its share of `WORKER_RATE_LIMIT` is then
`fleet_share(limit, live)`: no database round trip per message, only one per beat. Three
rules keep the sum of all daemons within the limit in every one-second window:

- a newcomer sends nothing for `SETTLE` beats, so every other daemon has counted it (and
  lowered its own share) before it takes one;
- a daemon that could not beat for `FENCE` beats stops sending by itself (the others are about
  to count it dead and raise theirs), and when it beats again it waits like a newcomer;
- each share is split into a rate and a burst with `live * (rate + burst) <= limit`, the most
  a token bucket can let out in one second.
A dead daemon's share is taken over once its row is `LIVE_HORIZON` beats old.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from worker import __version__
from worker.daemon.ratelimit import RateLimits
from worker.store import Beat, Daemons, DatabaseError, DatabaseUnavailable, Live
from worker.waits import wait_any

SETTLE = 2.5  # beats a newcomer waits before sending
FENCE = 2.0  # beats without a successful beat after which a daemon stops sending
LIVE_HORIZON = 3.0  # beats after which a silent daemon counts as dead
BURST_SHARE = 20  # a bucket holds at most 1/20 of a second's share (at least one token)
HEADROOM = 0.97  # of the limit: the time between taking a token and the request reaching Meta varies
RATE_WINDOW = 60.0  # seconds over which the daemon's own rate is measured for `status`


def fleet_share(limit: float, live: int) -> tuple[float, float]:
    """(rate, burst) for each of `live` daemons sharing `limit` sends per second."""
    per_daemon = limit * HEADROOM / max(1, live)
    burst = max(1.0, per_daemon / BURST_SHARE)
    rate = per_daemon - burst
    if rate <= 0:  # fewer than two sends a second each: no bucket can be that exact
        rate = per_daemon / 2
    return rate, burst


class Fleet:
    def __init__(
        self,
        *,
        daemons: Daemons,
        limiter: RateLimits,
        limit: float,
        beat: float,
        status: Callable[[], Beat],
        log: Any,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._daemons = daemons
        self._limiter = limiter
        self._limit = limit
        self._beat = beat
        self._status = status
        self._log = log
        self._clock = clock
        self._stop = asyncio.Event()
        self._registered_at: float | None = None
        self._last_beat = float("inf")  # when the last good beat started (none yet)
        self._sent: deque[tuple[float, int]] = deque()
        self.live = 1
        self._differ: dict[str, tuple[float | None, float | None]] = {}  # the last mismatch logged
        # A daemon that beats more slowly than this one must not look dead between its beats.
        self._slowest_beat = beat
        if limit > 0:
            limiter.block()  # until the others have counted this daemon

    def stop(self) -> None:
        self._stop.set()

    def rate(self, sent_total: int) -> float:
        """This daemon's sends per second over the last minute (or since it started)."""
        now = self._clock()
        self._sent.append((now, sent_total))
        while self._sent and now - self._sent[0][0] > RATE_WINDOW:
            self._sent.popleft()
        first_at, first_total = self._sent[0]
        span = now - first_at
        return (sent_total - first_total) / span if span >= 1.0 else 0.0

    async def run(self) -> None:
        """Beat until `stop()`, then mark the row stopped (best effort)."""
        try:
            while not self._stop.is_set():
                await self._turn()
                await wait_any(self._stop, seconds=self._beat)
        finally:
            try:
                await self._daemons.stop()
            except DatabaseError:
                pass  # the row goes stale and counts as dead after LIVE_HORIZON beats

    def _fleet_limit(self, live: Live) -> float:
        """The smallest limit any live daemon has: a fleet configured unevenly keeps to the
        strictest of them, and says so loudly once per change."""
        differ = {
            worker: settings
            for worker, settings in live.settings.items()
            if settings != (self._limit, self._beat) and settings != (None, None)  # None: older version
        }
        if differ != self._differ:
            self._differ = differ
            if differ:
                self._log.error(
                    "fleet_settings_differ",
                    rate_limit=self._limit,
                    fleet_beat=self._beat,
                    others={worker: {"rate_limit": s[0], "fleet_beat": s[1]} for worker, s in differ.items()},
                    action="every daemon of a number needs the same WORKER_RATE_LIMIT and WORKER_FLEET_BEAT;"
                    " the fleet keeps to the smallest limit meanwhile",
                )
        beats = [s[1] for s in live.settings.values() if s[1] is not None]
        self._slowest_beat = max([self._slowest_beat, *beats])
        limits = [s[0] for s in live.settings.values() if s[0] is not None and s[0] > 0]
        return min([self._limit, *limits])

    async def _turn(self) -> None:
        started = self._clock()
        try:
            if self._registered_at is None:
                await self._daemons.register(
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    version=__version__,
                    rate_limit=self._limit,
                    fleet_beat=self._beat,
                )
                await self._daemons.forget_old()  # rows of daemons gone for a day
                self._registered_at = started
            live = await self._daemons.beat(self._status(), horizon=LIVE_HORIZON * self._slowest_beat)
        except DatabaseUnavailable:
            return  # the fence set at the last good beat stops sending in time
        except DatabaseError as exc:  # refused: no retry helps; sending stays fenced meanwhile
            self._log.error("fleet_beat_refused", error=str(exc), action="not sending until it beats")
            return
        except Exception:  # the fleet row is for others; never take sending down with it
            self._log.exception("fleet_beat_failed")
            return
        assert self._registered_at is not None
        self.live = live.count
        limit = self._fleet_limit(live)
        if started - self._last_beat > FENCE * self._beat:
            # Silent long enough for the others to count this daemon dead and take its share:
            # it joins again like a newcomer (after a database outage, every daemon does).
            self._registered_at = started
            if self._limit > 0:
                self._limiter.block()
        self._last_beat = started
        if self._limit <= 0:
            return
        if started - self._registered_at < SETTLE * self._beat:
            return  # still blocked: the others may not have counted this daemon yet
        rate, burst = fleet_share(limit, self.live)
        self._limiter.set_share(rate, burst, until=started + FENCE * self._beat)
