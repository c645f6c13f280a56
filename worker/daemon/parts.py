"""The daemon's parts, built and wired in one place: each part is handed the `Control`'s methods
(what it tells the loop) instead of callbacks into the loop, and the loop receives them built."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

from worker.config import Settings
from worker.daemon.control import Control
from worker.daemon.fleet import Fleet
from worker.daemon.heartbeat import Heartbeat
from worker.daemon.numbers import Numbers
from worker.daemon.processor import RowProcessor
from worker.daemon.recorder import Recorder
from worker.daemon.rotation import Rotation
from worker.daemon.sender import Sender
from worker.daemon.status import Status
from worker.daemon.sweep import Sweep
from worker.log import get_logger
from worker.metrics import Metrics
from worker.store import Claims, Store
from worker.systemd import Notifier


@dataclass(frozen=True, slots=True)
class Parts:
    control: Control
    claims: Claims
    numbers: Numbers
    recorder: Recorder
    rows: RowProcessor
    fleet: Fleet
    rotation: Rotation
    heartbeat: Heartbeat
    status: Status
    sweep: Sweep
    in_flight: set[asyncio.Task[None]]  # the sends under way (shared with the status)
    rng: random.Random
    log: Any

    @classmethod
    def build(
        cls,
        *,
        settings: Settings,
        store: Store,
        sender: Sender,
        notifier: Notifier | None = None,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
    ) -> Parts:
        notifier = notifier or Notifier()
        rng = rng or random.Random()
        log = get_logger(worker_id=settings.worker_id)
        numbers = Numbers(
            default=settings.phone_number_id, rate_limit=settings.rate_limit, concurrency=settings.concurrency
        )
        control = Control(numbers=numbers, notifier=notifier, log=log)
        recorder, rows = _sending(
            settings=settings,
            store=store,
            sender=sender,
            control=control,
            numbers=numbers,
            rng=rng,
            log=log,
            metrics=metrics,
        )
        control.report.outcomes = rows.outcomes
        in_flight: set[asyncio.Task[None]] = set()
        status = Status(
            numbers=numbers,
            report=control.report,
            stop=control.stop,
            in_flight=in_flight,
            holds=lambda: control.held,
        )
        fleet = Fleet(
            daemons=store.daemons,
            limiter=numbers.limits,
            limit=settings.rate_limit,
            beat=settings.fleet_beat,
            status=status.beat,
            log=log,
        )
        status.fleet = fleet
        if metrics:
            metrics.in_flight.set_function(lambda: len(in_flight))
            metrics.unwritten.set_function(lambda: recorder.pending)
        heartbeat = Heartbeat(path=settings.heartbeat_path, notifier=notifier)
        return cls(
            control=control,
            claims=store.claims,
            numbers=numbers,
            recorder=recorder,
            rows=rows,
            fleet=fleet,
            rotation=_rotation(settings, store, log),
            heartbeat=heartbeat,
            status=status,
            sweep=Sweep(claims=store.claims, control=control, log=log),
            in_flight=in_flight,
            rng=rng,
            log=log,
        )


def _sending(
    *,
    settings: Settings,
    store: Store,
    sender: Sender,
    control: Control,
    numbers: Numbers,
    rng: random.Random,
    log: Any,
    metrics: Metrics | None,
) -> tuple[Recorder, RowProcessor]:
    """The path of one row: its processor (send, decide) and the recorder of its result."""
    recorder = Recorder(
        results=store.results,
        log=log,
        on_written=control.wake.set,
        on_fatal=lambda: control.results_fatal(recorder.fatal),
        on_outage=control.database_failed,
    )
    rows = RowProcessor(
        settings=settings,
        sender=sender,
        recorder=recorder,
        claims=store.claims,
        pauses=numbers.pauses,
        log=log,
        rng=rng,
        metrics=metrics,
        on_pause=control.paused,
        on_throttled=control.throttled,
        optouts=store.optouts,
        suppressions=store.suppressions,
    )
    return recorder, rows


def _rotation(settings: Settings, store: Store, log: Any) -> Rotation:
    """Which sessions the next claim serves; a window nobody can read holds its session."""
    return Rotation(
        read=store.claims.sessions_due,
        daemon_window=settings.send_window,
        on_bad_window=lambda session, error: log.error(
            "session_window_unreadable", sesion_id=session.id, error=error, action="held"
        ),
    )
