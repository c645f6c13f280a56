"""A dependency that goes away and comes back (the database, for the daemon and the receiver
alike), logged once each way: an error when it first fails, a warning with the number of failed
tries when it works again, never a line per try."""

from __future__ import annotations

from typing import Any


class Outage:
    def __init__(self, log: Any, *, down: str, up: str) -> None:
        self._log = log
        self._down = down
        self._up = up
        self.failures = 0  # tries failed since it last worked (a backoff's exponent)

    @property
    def down(self) -> bool:
        return self.failures > 0

    def failed(self, error: object, **fields: Any) -> None:
        self.failures += 1
        if self.failures == 1:
            self._log.error(self._down, error=str(error), **fields)

    def recovered(self) -> None:
        if self.failures:
            self._log.warning(self._up, retries=self.failures)
            self.failures = 0
