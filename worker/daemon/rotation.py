"""Which sessions the next claim serves, and in what order: fair share and quiet hours.

The claim gives each session an equal share of its rows (see store/claims.py); this decides
the order, turning it one step per claim so that no session is always first (round-robin),
and leaves out sessions whose send window (or the daemon's) is closed right now. The list of
sessions with waiting rows is read at most once per `REFRESH` seconds: a paused or cancelled
session has no due row left for the claim to take meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from worker.store.claims import DueSession
from worker.windows import SendWindow, WindowError, open_now

REFRESH = 1.0  # seconds between reads of the sessions with waiting rows


class Rotation:
    def __init__(
        self,
        *,
        read: Callable[[], Awaitable[list[DueSession]]],
        daemon_window: SendWindow | None = None,
        on_bad_window: Callable[[DueSession, str], None] = lambda session, error: None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._read = read
        self._daemon_window = daemon_window
        self._on_bad_window = on_bad_window
        self._clock = clock
        self._wall = wall
        self._sessions: list[DueSession] = []
        self._windows: dict[tuple[str | None, str | None], SendWindow | None] = {}
        self._read_at = float("-inf")
        self._turn = 0

    def forget(self) -> None:
        """Read the sessions again at the next claim (nothing was due in the cached list)."""
        self._read_at = float("-inf")

    def held_now(self) -> list[int] | None:
        """Ids of the sessions (as last read) whose windows are closed now; None when the
        daemon's own window is closed: every session is held."""
        now = self._wall()
        if not open_now((self._daemon_window,), now):
            return None
        return [s.id for s in self._sessions if not self._open(s, now)]

    async def next_order(self) -> list[DueSession]:
        """Sessions to claim from, a different one first each time; [] when none may send."""
        if self._clock() - self._read_at >= REFRESH:
            self._sessions = await self._read()
            self._read_at = self._clock()
        now = self._wall()
        if not open_now((self._daemon_window,), now):
            return []
        sessions = [s for s in self._sessions if self._open(s, now)]
        if not sessions:
            return []
        self._turn = (self._turn + 1) % len(sessions)
        return sessions[self._turn :] + sessions[: self._turn]

    def _open(self, session: DueSession, now: datetime) -> bool:
        key = (session.send_window, session.time_zone)
        if key not in self._windows:
            try:
                window = (
                    SendWindow.parse(session.send_window, session.time_zone) if session.send_window else None
                )
            except WindowError as exc:
                # A producer wrote a window we cannot read: hold the session rather than risk a
                # message at 3 a.m.; the log says why.
                self._on_bad_window(session, str(exc))
                self._windows[key] = CLOSED
                return False
            self._windows[key] = window
        window = self._windows[key]
        return window is not CLOSED and open_now((window,), now)


CLOSED = SendWindow.parse("00:00-00:01")  # a marker for an unreadable window: never open
