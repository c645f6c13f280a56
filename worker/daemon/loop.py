"""The loop: claim as many rows as there are free slots and rate tokens, send, hand results
to the recorder, drain.

A claimed row is sent at once (tokens are taken before the claim), so the rows a worker holds
are exactly its sends in flight plus its results not yet written. The loop has one wait, and
it always has a timeout: the heartbeat beats in every state. Each claimed row is carried
through its send by `processor.RowProcessor` (validate, send, `policy.decide`, record); the
loop composes it with the heartbeat, the sending pause, the rate limiter and the drain.
"""

from __future__ import annotations

import asyncio
import functools
import random

from worker.config import Settings
from worker.daemon.control import RunReport
from worker.daemon.heartbeat import BEAT_EVERY
from worker.daemon.numbers import Room
from worker.daemon.parts import Parts
from worker.daemon.sender import Sender
from worker.exits import EX_OK, EX_SOFTWARE
from worker.metrics import Metrics
from worker.store import DatabaseError, Store
from worker.store.claims import MAX_SESSIONS
from worker.systemd import Notifier
from worker.waits import wait_any

__all__ = ["Daemon", "RunReport"]

RECOVERY_INTERVAL = 30.0  # seconds between sweeps for rows of dead workers (at most)
CAPPED_LOG_EVERY = 60.0  # seconds between two warnings that the sessions read was capped


class Daemon:
    """The loop over its built parts (`Parts.build`); `Daemon.build` builds them too."""

    def __init__(self, *, settings: Settings, parts: Parts) -> None:
        self._settings = settings
        self._parts = parts
        self._control = parts.control
        self._claims = parts.claims
        self._numbers = parts.numbers
        self._recorder = parts.recorder
        self._rows = parts.rows
        self._fleet = parts.fleet
        self._rotation = parts.rotation
        self._heartbeat = parts.heartbeat
        self._status = parts.status
        self._sweep = parts.sweep
        self._in_flight = parts.in_flight
        self._rng = parts.rng
        self._log = parts.log
        self._stop, self._forced, self._wake = parts.control.stop, parts.control.forced, parts.control.wake
        self.report = parts.control.report
        self._capped_logged_at = float("-inf")
        self._rows_left: int | None = None  # `run --once --max N`
        # Claim in batches when busy: one claim per freed slot would make the database the
        # bottleneck; "no more rows than free slots" still holds.
        self._batch_min = max(1, settings.concurrency // 4)

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
    ) -> Daemon:
        parts = Parts.build(
            settings=settings, store=store, sender=sender, notifier=notifier, rng=rng, metrics=metrics
        )
        return cls(settings=settings, parts=parts)

    # -- control (see control.py) ---------------------------------------------------------

    def request_stop(self, *, exit_code: int | None = None, reason: str | None = None) -> None:
        """Stop claiming and drain; the first reason given is the one reported."""
        self._control.request_stop(exit_code=exit_code, reason=reason)

    def on_signal(self, name: str) -> None:
        """A stop signal (see `worker.signals`): the first drains, a second stops waiting."""
        self._control.signal(name, in_flight=len(self._in_flight))

    # -- the loop -------------------------------------------------------------------------

    async def run(self, *, once: bool = False, max_rows: int | None = None) -> RunReport:
        """`once`: drain what is due, then stop; `max_rows`: claim at most that many rows."""
        self._control.once = once
        self._rows_left = max_rows
        recorder = asyncio.create_task(self._recorder.run(), name="recorder")
        progress = asyncio.create_task(self._recorder.progress.run(), name="progress")
        fleet = asyncio.create_task(self._fleet.run(), name="fleet")
        try:
            await self._dispatch()
        finally:
            # One budget for the whole stop: in-flight sends, then the results still unwritten.
            deadline = asyncio.get_running_loop().time() + self._settings.drain_timeout
            await self._drain(deadline)
            self._recorder.close(grace=max(1.0, deadline - asyncio.get_running_loop().time()))
            await self._wait_for(recorder)
            self._recorder.progress.stop()  # a last progress line, then completion
            await self._wait_for(progress)
            await self._give_back_uncertain()
            self._fleet.stop()
            await self._wait_for(fleet)
        self.report.lost = self._recorder.lost + self._recorder.pending
        if self.report.lost:
            self.report.drained = False
            if self.report.exit_code == EX_OK:
                self.report.exit_code = EX_SOFTWARE
                self.report.reason = f"{self.report.lost} result(s) could not be written"
        self._log.info(
            "stopped",
            drained=self.report.drained,
            lost=self.report.lost,
            exit_code=self.report.exit_code,
            **self.report.outcomes,
        )
        return self.report

    async def _give_back_uncertain(self) -> None:
        try:
            await self._claims.give_back_uncertain()
        except DatabaseError as exc:  # their leases expire; they are recovered as unknown then
            self._log.error("uncertain_claims_not_given_back", error=str(exc))

    async def _wait_for(self, task: asyncio.Task[None]) -> None:
        """Wait for the recorder without giving up the heartbeat."""
        while not task.done():
            self._heartbeat.beat(self._status.line)
            await asyncio.wait({task}, timeout=BEAT_EVERY)
        await task

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        recovery_every = min(RECOVERY_INTERVAL, self._settings.lease_seconds / 2)
        next_recovery = 0.0
        while not self._stop.is_set():
            self._wake.clear()
            self._heartbeat.beat(self._status.line)
            if loop.time() >= next_recovery and await self._sweep.run():
                next_recovery = loop.time() + recovery_every
            wait = await self._step()
            if wait is None:
                return
            if wait > 0:
                await self._wait(wait)

    async def _step(self) -> float | None:
        """Do what is due now; returns how long to wait (0: go round at once; None: done)."""
        # A send frees its slot when its answer arrives; results not yet written have their
        # own cap. The rows this worker holds never exceed WORKER_CONCURRENCY plus
        # WORKER_MAX_UNWRITTEN, so a crash leaves at most that many unknown.
        pending = self._recorder.pending
        if pending >= self._settings.unwritten_cap:
            return BEAT_EVERY  # a written batch wakes the loop
        free = self._settings.concurrency - len(self._in_flight)
        if self._rows_left is not None:
            if self._rows_left <= 0:  # the cap of this cron run is reached: finish what is out
                return BEAT_EVERY if self._in_flight or self._recorder.pending else None
            free = min(free, self._rows_left)
        batch = self._batch_min if self._rows_left is None else min(self._batch_min, self._rows_left)
        if free < (batch if self._in_flight else 1):
            return BEAT_EVERY  # a finished send or a written batch wakes the loop
        try:
            order = await self._rotation.next_order()
        except DatabaseError as exc:
            self._control.database_failed(exc)
            return min(BEAT_EVERY, self._settings.poll_interval * 2)
        self._control.holds(self._claims.held)
        claimed, held = 0, float("inf")  # held: when a number kept back by its pace may go
        limited = False  # due rows that only the rate limit keeps back (the beat says `throttled`)
        for number, sessions in self._numbers.group(order).items():
            room = self._room(number, free - claimed)
            if room.rows <= 0:
                held, limited = min(held, room.wait), limited or room.limited
                continue
            got = await self._claim(number, room.rows, [s.id for s in sessions])
            if got is None:
                return min(BEAT_EVERY, self._settings.poll_interval * 2)  # database trouble
            claimed += got
            if claimed >= free or self._stop.is_set():
                break
        self._numbers.held_by_limit = limited
        if claimed:
            return 0.0
        if held < float("inf"):
            return max(0.005, held)  # due rows wait for a token or a pause: not done
        if not order:
            self._rotation.forget()  # new sessions may have come: read them at the next turn
            if self._claims.capped:  # more sessions than one read takes: read on at once
                self._scan_capped()
                return 0.0
        if self._control.once:
            if not self._in_flight and not self._recorder.pending:
                return None  # nothing due and nothing in flight: done
            return BEAT_EVERY
        return self._settings.poll_interval * self._rng.uniform(0.8, 1.2)

    def _scan_capped(self) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._capped_logged_at >= CAPPED_LOG_EVERY:
            self._capped_logged_at = now
            self._log.warning(
                "sessions_scan_capped",
                sessions_per_read=MAX_SESSIONS,
                action="more sessions hold waiting rows than one read takes: the next read goes on",
            )

    def _room(self, number: str, free: int) -> Room:
        """Rows a number may start now, or how long until it may (a paused number under
        `run --once` ends the run)."""
        paused = self._numbers.paused(number)
        if paused > 0:
            self._control.paused()
            return Room(0, paused)
        return self._numbers.room(number, free)

    async def _wait(self, seconds: float) -> None:
        """The loop's only wait: stop, a freed slot or a written batch, or the timeout."""
        await wait_any(self._wake, seconds=min(seconds, BEAT_EVERY))

    async def _claim(self, number: str, tokens: int, sessions: list[int]) -> int | None:
        """Claim and start up to `tokens` sends of one number's sessions; None when the
        database failed."""
        try:
            jobs = await self._claims.claim(
                tokens, lease_seconds=self._settings.lease_seconds, sessions=sessions
            )
        except DatabaseError as exc:
            self._numbers.claimed(number, tokens, 0)
            self._control.database_failed(exc)
            return None
        self._control.database_up()
        if jobs.opted_out:
            self._log.warning("opted_out_rows_closed", rows=jobs.opted_out, state="error")
        if jobs.undeliverable:
            self._log.warning("undeliverable_rows_closed", rows=jobs.undeliverable, state="error")
        self._numbers.claimed(number, tokens, len(jobs))
        if self._rows_left is not None:
            self._rows_left -= len(jobs)
        for job in jobs:
            task = asyncio.create_task(self._rows.process(job), name=f"send-{job.id}")
            self._in_flight.add(task)
            self._numbers.started(number)
            task.add_done_callback(functools.partial(self._on_done, number=number))
        return len(jobs)

    def _on_done(self, task: asyncio.Task[None], *, number: str) -> None:
        self._in_flight.discard(task)
        self._numbers.finished(number)
        self._wake.set()

    # -- stop -----------------------------------------------------------------------------

    async def _drain(self, deadline: float) -> None:
        """Wait for in-flight sends until `deadline` (or a second signal), then cancel."""
        if not self._in_flight:
            return
        loop = asyncio.get_running_loop()
        self._log.info("draining", in_flight=len(self._in_flight), timeout=self._settings.drain_timeout)
        while self._in_flight and not self._forced.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._heartbeat.beat(self._status.line)
            self._wake.clear()
            await wait_any(self._wake, seconds=min(remaining, BEAT_EVERY))
        if self._in_flight:
            self.report.drained = False
            pending = set(self._in_flight)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def sessions_held(self) -> list[int] | None:
        """The sessions held by quiet hours now; None: the daemon's own window holds them all."""
        return self._rotation.held_now()
