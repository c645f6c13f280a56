"""What the daemon says of itself: its row in the daemons table (what `status` shows of it) and
the one-line status of the heartbeat file and the systemd watchdog."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from worker.daemon.control import RunReport
from worker.daemon.fleet import Fleet
from worker.daemon.numbers import Numbers
from worker.store import Beat
from worker.store.holds import ALL


class Status:
    def __init__(
        self,
        *,
        numbers: Numbers,
        report: RunReport,
        stop: asyncio.Event,
        in_flight: set[Any],
        holds: Callable[[], frozenset[str]],
    ) -> None:
        self._numbers = numbers
        self._holds = holds  # the operator's holds (`pause --all`, `--number`)
        self._report = report
        self._stop = stop
        self._in_flight = in_flight
        self.fleet: Fleet | None = None  # set once built (the fleet beats this status)

    def beat(self) -> Beat:
        """This daemon's row in the daemons table."""
        sent = self._report.outcomes["sent"]
        reason = self._numbers.pauses.describe()
        if self._stop.is_set():
            state = "draining"
        elif reason is not None:
            state = "paused"
        elif self._in_flight:
            state = "sending"
        elif ALL in self._holds():  # `pause --all`: the fleet claims nothing until `resume --all`
            state = "held"
        else:  # nothing out: rows due but no rate token yet, or nothing due at all
            state = "throttled" if self._numbers.held_by_limit else "idle"
        return Beat(
            state=state,
            in_flight=len(self._in_flight),
            sent_total=sent,
            rate=self.fleet.rate(sent) if self.fleet is not None else 0.0,
            rate_share=self._numbers.limits.rate,
            paused_reason=reason,
            paused_for=self._numbers.pauses.remaining(),
        )

    def line(self) -> str:
        counts = self._report.outcomes
        totals = f"in flight {len(self._in_flight)}, sent {counts['sent']}, errors {counts['error']}"
        reason = self._numbers.pauses.describe()
        if reason is None:
            return f"sending: {totals}"
        return f"paused: {reason}; probing in {self._numbers.pauses.remaining():.0f}s; {totals}"
