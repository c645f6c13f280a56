"""One daemon per host and pidfile: an flock held for the life of the process.

The pidfile only stops an operator from starting a second daemon by hand; two containers or
two hosts are kept apart by the database claim, not by this file.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType


class AlreadyRunning(Exception):
    """Another process holds the pidfile lock."""


class PidFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        # O_NOFOLLOW: a symlink planted at the path is refused instead of followed.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(str(self.path)) from None
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} - {stamp}\n".encode(), 0)
        self._fd = fd

    def holder(self) -> str | None:
        """`PID - timestamp` of the process holding the lock, or None if nobody holds it.
        PermissionError when this user may not look (systemd's runtime directory is the
        service's alone): that is not "no daemon"."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except PermissionError:
            raise
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return os.pread(fd, 200, 0).decode(errors="replace").strip() or "?"
            return None  # we could lock it: nobody holds it
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        # Emptied, not unlinked: unlinking under the lock races with a starter that has the
        # old inode open.
        os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> PidFile:
        self.acquire()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.release()
