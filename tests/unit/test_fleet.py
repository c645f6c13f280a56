"""The shared rate limit's arithmetic: shares, bursts and 130429, on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.fakeapi import busiest_second
from worker.daemon.fleet import Fleet, fleet_share
from worker.daemon.ratelimit import RateLimiter, RateLimits
from worker.store import Beat, DatabaseUnavailable, Live


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def greedy_sends(limiters: list[RateLimiter], clock: Clock, seconds: float) -> list[float]:
    """Every limiter takes every token it can, every millisecond."""
    sent: list[float] = []
    for _ in range(int(seconds * 1000)):
        clock.now += 0.001
        for limiter in limiters:
            got = limiter.take_now(1000)
            limiter.claimed(got, got)
            sent += [clock.now] * got
    return sent


@pytest.mark.parametrize(("limit", "live"), [(80, 1), (80, 3), (20, 3), (1000, 7), (10, 5)])
def test_live_daemons_greedy_together_stay_within_the_limit_in_every_second(limit: int, live: int) -> None:
    clock = Clock()
    limiters = []
    for _ in range(live):
        limiter = RateLimiter(limit, clock=clock)
        limiter.set_share(*fleet_share(limit, live))
        limiters.append(limiter)
    sent = greedy_sends(limiters, clock, 5.0)
    assert busiest_second(sent) <= limit
    # and the share is used, not wasted (below 4/s a daemon, whole tokens cost up to half)
    assert len(sent) / 5.0 >= (0.75 if limit / live >= 4 else 0.45) * limit


def test_claims_a_database_stall_held_up_send_late_with_no_burst_after_them() -> None:
    """Each daemon took its token, then its claim waited 0.7 s on the database: when the stall
    ends those sends go at once, and a bucket that filled up meanwhile must not add its own."""
    clock, limit, live = Clock(), 20, 3
    limiters = [RateLimiter(limit, clock=clock) for _ in range(live)]
    for limiter in limiters:
        limiter.set_share(*fleet_share(limit, live))
    sent: list[float] = []
    claims: dict[int, tuple[float, int]] = {}  # daemon -> (when its claim returns, tokens)
    for _ in range(6000):
        clock.now += 0.001
        returns_at = 2.7 if 2.0 <= clock.now < 2.7 else clock.now  # the stall
        for daemon, limiter in enumerate(limiters):
            if daemon in claims and claims[daemon][0] <= clock.now:  # the claim returns: send
                limiter.claimed(claims[daemon][1], claims[daemon][1])
                sent += [clock.now] * claims.pop(daemon)[1]
            if daemon not in claims and (got := limiter.take_now(8)):  # one claim at a time
                claims[daemon] = (returns_at, got)
    assert busiest_second(sent) <= limit * 0.97
    assert len(sent) >= 0.75 * limit * (6.0 - 0.7)  # the share is used outside the stall


def test_a_daemon_alone_gets_nearly_the_whole_limit() -> None:
    rate, burst = fleet_share(80, 1)
    assert rate + burst == pytest.approx(80 * 0.97) and burst == pytest.approx(80 * 0.97 / 20)


def test_130429_halves_the_rate_once_per_burst_and_it_recovers() -> None:
    clock = Clock()
    limiter = RateLimiter(80, clock=clock)
    limiter.set_share(76, 4)
    assert limiter.throttled() and limiter.rate == 38
    assert not limiter.throttled()  # the other answers of the same burst
    clock.now += 1.5
    assert limiter.throttled() and limiter.rate == pytest.approx(76 * (0.575 / 2))
    clock.now += 30
    limiter._refill()
    assert limiter.rate == 76


def test_a_blocked_or_fenced_limiter_lets_nothing_out() -> None:
    clock = Clock()
    limiter = RateLimiter(80, clock=clock)
    limiter.block()
    clock.now += 10
    assert limiter.take_now(5) == 0 and limiter.rate == 0
    limiter.set_share(10, 1, until=clock.now + 2)
    clock.now += 1
    assert limiter.take_now(5) == 1
    clock.now += 2  # no beat extended the fence
    assert limiter.take_now(5) == 0


class FakeDaemons:
    """The daemons table as one daemon sees it: how many are live, or the database away."""

    def __init__(self) -> None:
        self.live = 3
        self.away = False

    async def register(self, **_: object) -> None:
        self._check()

    async def forget_old(self) -> int:
        return 0

    async def beat(self, *_: object, **__: object) -> Live:
        self._check()
        return Live(self.live, {f"other:{i}": (60.0, 1.0) for i in range(self.live - 1)})

    async def stop(self) -> None:
        return None

    def _check(self) -> None:
        if self.away:
            raise DatabaseUnavailable("the database is away")


def test_a_daemon_back_from_a_silence_waits_like_a_newcomer_before_taking_a_share() -> None:
    clock, daemons = Clock(), FakeDaemons()
    limits = RateLimits(60)
    fleet = Fleet(
        daemons=daemons,  # type: ignore[arg-type]
        limiter=limits,
        limit=60,
        beat=1.0,
        status=lambda: Beat("sending", 0, 0, 0.0, 0.0),
        log=None,
        clock=clock,
    )

    def turn(seconds: float = 1.0) -> float:
        asyncio.run(fleet._turn())
        rate = limits.rate
        clock.now += seconds
        return rate

    assert [turn() for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(60 * 0.97 / 3)]  # settles first
    daemons.away = True
    for _ in range(5):  # the others count this daemon dead and take its share meanwhile
        turn()
    daemons.away, daemons.live = False, 1  # back first: it alone looks live
    assert [turn() for _ in range(3)] == [0.0, 0.0, 0.0]  # no full share before the others see it
    daemons.live = 3
    assert turn() == pytest.approx(60 * 0.97 / 3)
