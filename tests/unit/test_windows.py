"""Quiet hours and the round-robin order, on a clock the test sets."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from worker.daemon.rotation import Rotation
from worker.store.claims import DueSession
from worker.windows import SendWindow, WindowError


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("window", "zone", "moment", "is_open"),
    [
        ("08:00-20:00", "America/Lima", "2026-12-01T12:59:00", False),  # 07:59 in Lima
        ("08:00-20:00", "America/Lima", "2026-12-01T13:00:00", True),  # 08:00 in Lima
        ("08:00-20:00", "America/Lima", "2026-12-02T00:59:00", True),  # 19:59 in Lima
        ("08:00-20:00", "America/Lima", "2026-12-02T01:00:00", False),  # 20:00: closed
        ("20:00-08:00", "UTC", "2026-12-01T03:00:00", True),  # overnight
        ("20:00-08:00", "UTC", "2026-12-01T12:00:00", False),
        ("09:00-17:00", "Europe/Madrid", "2026-03-29T07:30:00", True),  # 09:30 on the DST day
        ("09:00-17:00", "Europe/Madrid", "2026-03-28T07:30:00", False),  # 08:30 the day before
    ],
)
def test_a_window_is_open_only_between_its_local_times(
    window: str, zone: str, moment: str, is_open: bool
) -> None:
    assert SendWindow.parse(window, zone).is_open(at(moment)) is is_open


@pytest.mark.parametrize(
    ("window", "zone", "message"),
    [
        ("8-20", None, "08:00-20:00"),
        ("09:00-09:00", None, "same time"),
        ("08:00-20:00", "Mars/Base", "Mars/Base"),
    ],
)
def test_bad_windows_say_what_is_wrong(window: str, zone: str | None, message: str) -> None:
    with pytest.raises(WindowError, match=message):
        SendWindow.parse(window, zone)


def test_rotation_serves_sessions_round_robin_and_skips_closed_windows() -> None:
    wall = [at("2026-12-01T03:00:00")]  # 22:00 the evening before in Lima
    sessions = [
        DueSession(1, None, None, None),
        DueSession(2, None, "08:00-20:00", "America/Lima"),
        DueSession(3, None, None, None),
        DueSession(4, None, "nonsense", None),
    ]
    bad: list[int] = []

    async def read() -> list[DueSession]:
        return sessions

    rotation = Rotation(read=read, wall=lambda: wall[0], on_bad_window=lambda s, e: bad.append(s.id))
    assert rotation.held_now() == []  # not read yet: the gauge counts every session
    orders = [[s.id for s in asyncio.run(rotation.next_order())] for _ in range(2)]
    assert orders == [[3, 1], [1, 3]]  # session 2 sleeps, 4 has a window nobody can read
    assert bad == [4]
    assert sorted(rotation.held_now() or []) == [2, 4]  # what the queue_due gauge leaves out at night
    wall[0] = at("2026-12-01T14:00:00")  # 09:00 in Lima
    assert sorted(s.id for s in asyncio.run(rotation.next_order())) == [1, 2, 3]
    assert rotation.held_now() == [4]

    daemon_night = Rotation(read=read, wall=lambda: wall[0], daemon_window=SendWindow.parse("20:00-22:00"))
    assert asyncio.run(daemon_night.next_order()) == []  # the daemon's window holds every session
    assert daemon_night.held_now() is None
