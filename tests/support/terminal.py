"""A command run in a pseudo-terminal of a fixed size: what a person at a terminal sees, and
what they type (a prompt's answer, a `--watch` screen)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time
from typing import Any


class Terminal:
    def __init__(self, command: list[str], env: dict[str, str], *, rows: int = 24, columns: int = 80) -> None:
        self._command, self._env, self._size = command, env, (rows, columns)
        self._master = -1
        self._process: subprocess.Popen[bytes] | None = None
        self.screen = b""  # everything the command wrote so far

    def __enter__(self) -> Terminal:
        self._master, child = pty.openpty()
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", *self._size, 0, 0))
        self._process = subprocess.Popen(
            self._command, stdin=child, stdout=child, stderr=child, env=self._env, start_new_session=True
        )
        os.close(child)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)
        os.close(self._master)

    def read_until(self, marker: bytes, seconds: float = 30) -> str:
        """What the command wrote up to and including `marker` (AssertionError if it never does)."""
        start = len(self.screen)
        deadline = time.monotonic() + seconds
        while marker not in self.screen[start:]:
            if not self._read(deadline - time.monotonic()):
                raise AssertionError(f"never saw {marker!r}; the screen: {self.screen[-2000:]!r}")
        end = self.screen.index(marker, start) + len(marker)
        return self.screen[start:end].decode(errors="replace")

    def write(self, keys: bytes) -> None:
        os.write(self._master, keys)

    def finish(self, seconds: float = 60) -> tuple[int, str]:
        """Wait for the command to end: its exit code and what it wrote since the last read."""
        assert self._process is not None
        start = len(self.screen)
        deadline = time.monotonic() + seconds
        while self._read(deadline - time.monotonic()):
            pass
        return self._process.wait(max(0.1, deadline - time.monotonic())), self.screen[start:].decode(
            errors="replace"
        )

    def _read(self, seconds: float) -> bool:
        """Read what is there within `seconds`; False at the end of output or of the time."""
        if seconds <= 0 or not select.select([self._master], [], [], seconds)[0]:
            return False
        try:
            data = os.read(self._master, 65536)
        except OSError:  # EIO: the command closed the terminal (it ended)
            return False
        self.screen += data
        return bool(data)
