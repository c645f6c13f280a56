"""Quiet hours: a send window like `08:00-20:00` in a time zone, and whether it is open now.

Pure functions of the time they are given (tested on a fake clock); the daemon asks them before
each claim, so rows outside their window are never claimed and spend no attempt, and a retry
whose backoff ends at night simply waits for the next opening.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_WINDOW = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)")


class WindowError(ValueError):
    """A window or a time zone that cannot be read; the message says which and why."""


def zone(name: str | None) -> ZoneInfo:
    """An IANA time zone (`America/Lima`); None or empty: UTC."""
    try:
        if name and (name.startswith(("/", ".")) or ".." in name):
            raise ValueError(name)  # a path, not a zone name
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise WindowError(
            f"{name!r} is not a known time zone (an IANA name such as America/Lima or UTC)"
        ) from None


@dataclass(frozen=True, slots=True)
class SendWindow:
    start: time
    end: time
    tz: ZoneInfo

    @classmethod
    def parse(cls, text: str, tz_name: str | None = None) -> SendWindow:
        """`HH:MM-HH:MM` (an overnight window like 20:00-08:00 is allowed)."""
        match = _WINDOW.fullmatch(text.strip())
        if match is None:
            raise WindowError(f"{text!r} is not a window like 08:00-20:00 (24-hour HH:MM-HH:MM)")
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if (h1, m1) == (h2, m2):
            raise WindowError(f"{text!r} starts and ends at the same time")
        return cls(time(h1, m1), time(h2, m2), zone(tz_name))

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M} {self.tz.key}"

    def is_open(self, now: datetime) -> bool:
        """`now` is an aware datetime (the daemon passes UTC)."""
        local = now.astimezone(self.tz).time().replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end  # overnight


def open_now(windows: tuple[SendWindow | None, ...], now: datetime | None = None) -> bool:
    """Every window given (the daemon's, the session's) is open; None means no window."""
    moment = now or datetime.now(UTC)
    return all(w is None or w.is_open(moment) for w in windows)
