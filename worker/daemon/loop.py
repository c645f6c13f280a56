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
from collections import Counter
from dataclasses import dataclass, field

from worker.config import Settings
from worker.daemon.fleet import Fleet
from worker.daemon.heartbeat import BEAT_EVERY, Heartbeat
from worker.daemon.numbers import Numbers
from worker.daemon.processor import RowProcessor
from worker.daemon.recorder import Recorder
from worker.daemon.rotation import Rotation
from worker.daemon.sender import Sender
from worker.exits import EX_CONFIG, EX_OK, EX_SOFTWARE, EX_TEMPFAIL
from worker.log import get_logger
from worker.metrics import Metrics
from worker.store import Beat, DatabaseError, DatabaseUnavailable, StatementRefused, Store
from worker.store.claims import MAX_SESSIONS
from worker.systemd import Notifier
from worker.waits import wait_any

RECOVERY_INTERVAL = 30.0  # seconds between sweeps for rows of dead workers (at most)
CAPPED_LOG_EVERY = 60.0  # seconds between two warnings that the sessions read was capped


@dataclass
class RunReport:
    outcomes: Counter[str] = field(default_factory=Counter)
    drained: bool = True  # False when sends were cancelled or results could not be written
    lost: int = 0  # results that never reached the database
    exit_code: int = EX_OK
    reason: str | None = None  # why the run ended early, for the one line `run` prints


class Daemon:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        sender: Sender,
        notifier: Notifier | None = None,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._claims = store.claims
        self._notifier = notifier or Notifier()
        self._rng = rng or random.Random()
        self._log = get_logger(worker_id=settings.worker_id)
        self._numbers = Numbers(
            default=settings.phone_number_id, rate_limit=settings.rate_limit, concurrency=settings.concurrency
        )
        self._stop = asyncio.Event()
        self._forced = asyncio.Event()
        self._wake = asyncio.Event()
        self._recorder = Recorder(
            results=store.results,
            log=self._log,
            on_written=self._wake.set,
            on_fatal=self._on_fatal,
            on_outage=self._database_failed,
        )
        self._in_flight: set[asyncio.Task[None]] = set()
        self._rows = RowProcessor(
            settings=settings,
            sender=sender,
            recorder=self._recorder,
            claims=store.claims,
            pauses=self._numbers.pauses,
            log=self._log,
            rng=self._rng,
            metrics=metrics,
            on_pause=self._paused,
            on_throttled=self._throttled,
            optouts=store.optouts,
        )
        self._fleet = Fleet(
            daemons=store.daemons,
            limiter=self._numbers.limits,
            limit=settings.rate_limit,
            beat=settings.fleet_beat,
            status=self._beat,
            log=self._log,
        )
        self._rotation = Rotation(
            read=store.claims.sessions_due,
            daemon_window=settings.send_window,
            on_bad_window=lambda session, error: self._log.error(
                "session_window_unreadable", sesion_id=session.id, error=error, action="held"
            ),
        )
        self._heartbeat = Heartbeat(path=settings.heartbeat_path, notifier=self._notifier)
        self._db_down = False
        self._capped_logged_at = float("-inf")
        self._once = False
        self._rows_left: int | None = None  # `run --once --max N`
        self._signals = 0
        self.report = RunReport(outcomes=self._rows.outcomes)
        if metrics:
            metrics.in_flight.set_function(lambda: len(self._in_flight))
            metrics.unwritten.set_function(lambda: self._recorder.pending)
        # Claim in batches when busy: one claim per freed slot would make the database the
        # bottleneck; "no more rows than free slots" still holds.
        self._batch_min = max(1, settings.concurrency // 4)

    # -- control --------------------------------------------------------------------------

    def request_stop(self, *, exit_code: int | None = None, reason: str | None = None) -> None:
        """Stop claiming and drain; the first reason given is the one reported."""
        if exit_code is not None and self.report.exit_code == EX_OK:
            self.report.exit_code, self.report.reason = exit_code, reason
        self._stop.set()
        self._wake.set()

    def force_stop(self) -> None:
        """Stop waiting for in-flight sends (a second signal)."""
        self._forced.set()
        self.request_stop()

    def on_signal(self, name: str) -> None:
        """A stop signal (see `worker.signals`): the first drains, a second stops waiting."""
        self._notifier.notify(stopping=1, status="draining in-flight sends")
        self._signals += 1
        if self._signals > 1:  # a second signal, not an internal stop, ends the wait
            self.force_stop()
        self.request_stop()
        self._log.info("stop_requested", signal=name, in_flight=len(self._in_flight))

    def _on_fatal(self) -> None:
        error = self._recorder.fatal
        if isinstance(error, StatementRefused):
            self.request_stop(exit_code=EX_CONFIG, reason=f"the database refuses our statements: {error}")
        else:
            self.request_stop(exit_code=EX_SOFTWARE, reason=f"results cannot be written: {error}")

    # -- the loop -------------------------------------------------------------------------

    async def run(self, *, once: bool = False, max_rows: int | None = None) -> RunReport:
        """`once`: drain what is due, then stop; `max_rows`: claim at most that many rows."""
        self._once = once
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
            self._heartbeat.beat(self._status_line)
            await asyncio.wait({task}, timeout=BEAT_EVERY)
        await task

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        recovery_every = min(RECOVERY_INTERVAL, self._settings.lease_seconds / 2)
        next_recovery = 0.0
        while not self._stop.is_set():
            self._wake.clear()
            self._heartbeat.beat(self._status_line)
            if loop.time() >= next_recovery and await self._recover():
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
            self._database_failed(exc)
            return min(BEAT_EVERY, self._settings.poll_interval * 2)
        claimed, held = 0, float("inf")  # held: when a number kept back by its pace may go
        for number, sessions in self._numbers.group(order).items():
            room, wait = self._room(number, free - claimed)
            if room <= 0:
                held = min(held, wait)
                continue
            got = await self._claim(number, room, [s.id for s in sessions])
            if got is None:
                return min(BEAT_EVERY, self._settings.poll_interval * 2)  # database trouble
            claimed += got
            if claimed >= free or self._stop.is_set():
                break
        if claimed:
            return 0.0
        if held < float("inf"):
            return max(0.005, held)  # due rows wait for a token or a pause: not done
        if not order:
            self._rotation.forget()  # new sessions may have come: read them at the next turn
            if self._claims.capped:  # more sessions than one read takes: read on at once
                self._scan_capped()
                return 0.0
        if self._once:
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

    def _room(self, number: str, free: int) -> tuple[int, float]:
        """Rows a number may start now, or how long until it may (a paused number under
        `run --once` ends the run)."""
        paused = self._numbers.paused(number)
        if paused > 0:
            self._paused()
            return 0, paused
        return self._numbers.room(number, free)

    async def _wait(self, seconds: float) -> None:
        """The loop's only wait: stop, a freed slot or a written batch, or the timeout."""
        await wait_any(self._wake, seconds=min(seconds, BEAT_EVERY))

    def _paused(self) -> None:
        """Sending paused: under `run --once` (cron) the run ends here, rows untouched."""
        if self._once:
            reason = self._numbers.pauses.describe() or "sending paused"
            self.request_stop(exit_code=EX_TEMPFAIL, reason=f"sending paused ({reason}); rows left untouched")

    async def _claim(self, number: str, tokens: int, sessions: list[int]) -> int | None:
        """Claim and start up to `tokens` sends of one number's sessions; None when the
        database failed."""
        try:
            jobs = await self._claims.claim(
                tokens, lease_seconds=self._settings.lease_seconds, sessions=sessions
            )
        except DatabaseError as exc:
            self._numbers.unused(number, tokens)
            self._database_failed(exc)
            return None
        self._database_up()
        if jobs.opted_out:
            self._log.warning("opted_out_rows_closed", rows=jobs.opted_out, state="error")
        self._numbers.unused(number, tokens - len(jobs))
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

    async def _recover(self) -> bool:
        """The periodic sweep: rows of dead workers, rows of cancelled sessions, rows a pause
        parked in a session that was re-activated some other way."""
        try:
            recovered = await self._claims.recover_expired()
            closed = await self._claims.close_cancelled()
            unparked = await self._claims.unpark_active()
        except DatabaseError as exc:
            self._database_failed(exc)
            return False
        if recovered.rows:
            self._log.warning("expired_leases_recovered", rows=recovered.rows, state="desconocido")
        for row_id, error in recovered.kept_in_flight:
            self._log.error(
                "row_state_refused",
                job_id=row_id,
                error=error,
                action="kept procesando with the reason; never re-sent",
            )
        if closed:
            self._log.warning("cancelled_rows_closed", rows=closed, state="error")
        if unparked:
            self._log.warning("held_rows_released", rows=unparked, reason="their session is no longer paused")
        return True

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
            self._heartbeat.beat(self._status_line)
            self._wake.clear()
            await wait_any(self._wake, seconds=min(remaining, BEAT_EVERY))
        if self._in_flight:
            self.report.drained = False
            pending = set(self._in_flight)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # -- database health ------------------------------------------------------------------

    def _database_failed(self, exc: DatabaseError) -> None:
        if not isinstance(exc, DatabaseUnavailable):
            # 1054, 1146, 1142, a refused value in our own claim: no wait can fix it.
            remedy = exc.remedy if isinstance(exc, StatementRefused) else "run `whatsapp-worker migrate`"
            self._log.error("database_refused_statement", code=exc.code, error=str(exc), action=remedy)
            self.request_stop(
                exit_code=EX_CONFIG, reason=f"the database refuses our statements ({exc}): {remedy}"
            )
            return
        if not self._db_down:
            self._db_down = True
            self._log.error("database_unavailable", error=str(exc))
        if self._once:  # under cron: give the pidfile back; the next run tries again
            self.request_stop(exit_code=EX_TEMPFAIL, reason=f"database unavailable ({exc}); try again later")

    def _database_up(self) -> None:
        if self._db_down:
            self._db_down = False
            self._log.warning("database_available")

    def sessions_held(self) -> list[int] | None:
        """The sessions held by quiet hours now; None: the daemon's own window holds them all."""
        return self._rotation.held_now()

    def _throttled(self, number: str) -> None:
        """Meta said 130429 (too many messages for this number): slow down, then recover."""
        rate = self._numbers.throttled(number)
        if rate is not None:
            self._log.warning("rate_lowered", code=130429, phone_number_id=number, rate=round(rate, 2))

    def _beat(self) -> Beat:
        """This daemon's row in the daemons table (what `status` shows of it)."""
        sent = self.report.outcomes["sent"]
        reason = self._numbers.pauses.describe()
        if self._stop.is_set():
            state = "draining"
        elif reason is not None:
            state = "paused"
        else:
            state = "sending" if self._in_flight else "idle"
        return Beat(
            state=state,
            in_flight=len(self._in_flight),
            sent_total=sent,
            rate=self._fleet.rate(sent),
            rate_share=self._numbers.limits.rate,
            paused_reason=reason,
            paused_for=self._numbers.pauses.remaining(),
        )

    def _status_line(self) -> str:
        counts = self.report.outcomes
        totals = f"in flight {len(self._in_flight)}, sent {counts['sent']}, errors {counts['error']}"
        reason = self._numbers.pauses.describe()
        if reason is None:
            return f"sending: {totals}"
        return f"paused: {reason}; probing in {self._numbers.pauses.remaining():.0f}s; {totals}"
