"""Liveness: the heartbeat file that `health` reads, and systemd's watchdog.

The loop calls `beat()` every time it goes round, and it goes round at least every
`BEAT_EVERY` seconds in every state (sending, idle, paused, waiting for the database), because
its only wait has that timeout. Paused or waiting for the database still counts as alive: a
restart would throw away the results held in memory. Only a loop that stops going round (a
hung event loop, a log write blocked on a full pipe) goes stale.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

from worker.systemd import Notifier

BEAT_EVERY = 5.0  # seconds: the loop's longest wait
TOUCH_EVERY = 1.0  # the file is touched at most this often


class Heartbeat:
    def __init__(
        self, *, path: Path, notifier: Notifier, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._path = path
        self._notifier = notifier
        self._clock = clock
        self._touched = float("-inf")
        self._pinged = float("-inf")
        self._writing: asyncio.Future[None] | None = None

    def beat(self, status: Callable[[], str]) -> None:
        """The loop went round. `status` is one line (`sending: ...` or `paused: ...`) that
        `health` prints and systemd shows as the unit's status."""
        now = self._clock()
        if now - self._touched >= TOUCH_EVERY and (self._writing is None or self._writing.done()):
            self._touched = now
            self._start_write(status())
        # Ping on every beat (at most once a second), not only every WATCHDOG_USEC/2: a beat
        # just before a turn held up by slow database calls must not be the last for too long.
        interval = self._notifier.watchdog_interval
        if interval and now - self._pinged >= min(TOUCH_EVERY, interval / 2):
            self._pinged = now
            self._notifier.notify(watchdog=1, status=status())

    def _start_write(self, line: str) -> None:
        """Write in a thread: replacing a file can wait tens of milliseconds on a busy disk (ext4
        flushes the new file's data at the rename), and the loop must not. One write at a time:
        a write stuck on the disk leaves the file stale, as `health` should see it."""
        try:
            self._writing = asyncio.get_running_loop().run_in_executor(None, self._write, line)
        except RuntimeError:  # no running loop (a caller outside the daemon)
            self._write(line)

    def _write(self, line: str) -> None:
        """Replace the file whole (a reader never sees half a line); its mtime is the beat."""
        scratch = self._path.with_name(self._path.name + ".new")
        try:
            scratch.write_text(line + "\n")
            os.replace(scratch, self._path)
        except OSError:
            pass  # `health` reports the stale file; sending must not stop for it
