"""What the daemon's parts tell the loop, in one place: a stop (a signal, the log output lost,
a fatal result writer), a sending pause under cron, Meta's 130429, a database that is away or
refuses a statement. The parts are handed this object's methods; the loop reads its events and
its report."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from worker.daemon.numbers import Numbers
from worker.exits import EX_CONFIG, EX_OK, EX_SOFTWARE, EX_TEMPFAIL
from worker.outage import Outage
from worker.store import DatabaseError, DatabaseUnavailable, StatementRefused
from worker.store.holds import ALL
from worker.systemd import Notifier


@dataclass
class RunReport:
    outcomes: Counter[str] = field(default_factory=Counter)
    drained: bool = True  # False when sends were cancelled or results could not be written
    lost: int = 0  # results that never reached the database
    exit_code: int = EX_OK
    reason: str | None = None  # why the run ended early, for the one line `run` prints


class Control:
    def __init__(self, *, numbers: Numbers, notifier: Notifier, log: Any) -> None:
        self.stop = asyncio.Event()  # stop claiming and drain
        self.forced = asyncio.Event()  # stop waiting for in-flight sends too
        self.wake = asyncio.Event()  # a slot was freed, a batch written, or a stop asked
        self.report = RunReport()
        self.once = False  # `run --once`: a pause or an outage ends the run (cron tries again)
        self._numbers = numbers
        self._notifier = notifier
        self._log = log
        self._signals = 0
        self._database = Outage(log, down="database_unavailable", up="database_available")
        self.held: frozenset[str] = frozenset()  # the operator's holds, as the last read found them

    def request_stop(self, *, exit_code: int | None = None, reason: str | None = None) -> None:
        """Stop claiming and drain; the first reason given is the one reported."""
        if exit_code is not None and self.report.exit_code == EX_OK:
            self.report.exit_code, self.report.reason = exit_code, reason
        self.stop.set()
        self.wake.set()

    def force_stop(self) -> None:
        """Stop waiting for in-flight sends (a second signal)."""
        self.forced.set()
        self.request_stop()

    def signal(self, name: str, *, in_flight: int) -> None:
        """A stop signal (see `worker.signals`): the first drains, a second stops waiting."""
        self._notifier.notify(stopping=1, status="draining in-flight sends")
        self._signals += 1
        if self._signals > 1:  # a second signal, not an internal stop, ends the wait
            self.force_stop()
        self.request_stop()
        self._log.info("stop_requested", signal=name, in_flight=in_flight)

    def results_fatal(self, error: DatabaseError | None) -> None:
        """The result writer cannot go on: a statement the database refuses, or a bug."""
        if isinstance(error, StatementRefused):
            self.request_stop(exit_code=EX_CONFIG, reason=f"the database refuses our statements: {error}")
        else:
            self.request_stop(exit_code=EX_SOFTWARE, reason=f"results cannot be written: {error}")

    def holds(self, scopes: frozenset[str]) -> None:
        """The operator's holds (`pause --all` / `--number ID`) as the last read of the sessions
        found them: said when they change, so a daemon (or a `run --once`) that sends nothing
        because of them says why."""
        if scopes == self.held:
            return
        self.held = scopes
        if scopes:
            numbers = "every number" if ALL in scopes else ", ".join(sorted(scopes))
            self._log.warning(
                "sending_held",
                numbers=numbers,
                action="their rows wait: `whatsapp-worker resume --all` (or `--number ID`) sends them",
            )
        else:
            self._log.info("sending_released")

    def paused(self) -> None:
        """Sending paused: under `run --once` (cron) the run ends here, rows untouched."""
        if self.once:
            reason = self._numbers.pauses.describe() or "sending paused"
            self.request_stop(exit_code=EX_TEMPFAIL, reason=f"sending paused ({reason}); rows left untouched")

    def throttled(self, number: str) -> None:
        """Meta said 130429 (too many messages for this number): slow down, then recover."""
        rate = self._numbers.throttled(number)
        if rate is not None:
            self._log.warning("rate_lowered", code=130429, phone_number_id=number, rate=round(rate, 2))

    def database_failed(self, exc: DatabaseError) -> None:
        if not isinstance(exc, DatabaseUnavailable):
            # 1054, 1146, 1142, a refused value in our own claim: no wait can fix it.
            remedy = exc.remedy if isinstance(exc, StatementRefused) else "run `whatsapp-worker migrate`"
            self._log.error("database_refused_statement", code=exc.code, error=str(exc), action=remedy)
            self.request_stop(
                exit_code=EX_CONFIG, reason=f"the database refuses our statements ({exc}): {remedy}"
            )
            return
        self._database.failed(exc)
        if self.once:  # under cron: give the pidfile back; the next run tries again
            self.request_stop(exit_code=EX_TEMPFAIL, reason=f"database unavailable ({exc}); try again later")

    def database_up(self) -> None:
        self._database.recovered()
