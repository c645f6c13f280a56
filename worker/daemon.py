"""The loop: claim as many rows as there are free slots and rate tokens, send, hand results
to the recorder, drain.

A claimed row is sent at once (tokens are taken before the claim), so the rows a worker holds
are exactly its sends in flight plus its results not yet written. The loop has one wait, and
it always has a timeout: the heartbeat beats in every state. What a send's answer means is
decided by `policy.decide` (pure); the loop only carries the decision out: record it first,
then pause, hold or log.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from worker.config import Settings
from worker.heartbeat import BEAT_EVERY, Heartbeat
from worker.log import get_logger
from worker.messages import MESSAGE_MAX_BYTES, InvalidMessage, normalize_phone, parse_message
from worker.metrics import Metrics
from worker.models import Job, Outcome, SendResult
from worker.pause import PauseReason, SendingPause, TemplateHolds
from worker.policy import Decision, Finished, decide
from worker.ratelimit import RateLimiter
from worker.recorder import Recorder
from worker.sender import Sender
from worker.store import DatabaseError, DatabaseUnavailable, StatementRefused, Store
from worker.systemd import Notifier

RECOVERY_INTERVAL = 30.0  # seconds between sweeps for rows of dead workers (at most)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
EX_OK, EX_SOFTWARE, EX_IOERR, EX_TEMPFAIL, EX_CONFIG = 0, 70, 74, 75, 78


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
        self._sender = sender
        self._notifier = notifier or Notifier()
        self._rng = rng or random.Random()
        self._metrics = metrics
        self._log = get_logger(worker_id=settings.worker_id)
        self._limiter = RateLimiter(settings.rate_limit)
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
        self._pause = SendingPause()
        self._holds = TemplateHolds()
        self._heartbeat = Heartbeat(path=settings.heartbeat_path, notifier=self._notifier)
        self._db_down = False
        self._once = False
        self._rows_left: int | None = None  # `run --once --max N`
        self._signals = 0
        self.report = RunReport()
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

    @contextmanager
    def signals(self) -> Iterator[None]:
        """SIGTERM, SIGINT and SIGHUP request a graceful stop while inside; the old handlers
        come back after. (SIGHUP: a closed terminal must not kill a drain half-way.)"""
        loop = asyncio.get_running_loop()

        def handler(signame: str) -> None:
            self._notifier.notify(stopping=1, status="draining in-flight sends")
            self._signals += 1
            if self._signals > 1:  # a second signal, not an internal stop, ends the wait
                self.force_stop()
            self.request_stop()
            self._log.info("stop_requested", signal=signame, in_flight=len(self._in_flight))

        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, handler, sig.name)
        try:
            yield
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)

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
        paused = self._pause.remaining()
        if paused > 0:
            if self._once:
                self._stop_once_for_pause()
                return 0.0
            return paused
        slots = self._pause.slots(self._settings.concurrency)
        # A send frees its slot when its answer arrives; results not yet written have their
        # own cap. The rows this worker holds never exceed WORKER_CONCURRENCY plus
        # WORKER_MAX_UNWRITTEN, so a crash leaves at most that many unknown.
        pending = self._recorder.pending
        if pending >= self._settings.unwritten_cap:
            return BEAT_EVERY  # a written batch wakes the loop
        free = slots - len(self._in_flight)
        if self._rows_left is not None:
            if self._rows_left <= 0:  # the cap of this cron run is reached: finish what is out
                return BEAT_EVERY if self._in_flight or self._recorder.pending else None
            free = min(free, self._rows_left)
        batch = self._batch_min if self._rows_left is None else min(self._batch_min, self._rows_left)
        if free < (batch if self._in_flight else 1):
            return BEAT_EVERY  # a finished send or a written batch wakes the loop
        tokens = await self._limiter.take(free, max_wait=BEAT_EVERY)
        if tokens == 0 or self._stop.is_set():
            self._limiter.refund(tokens)
            return 0.0  # go round (and beat) before waiting for tokens again
        claimed = await self._claim(tokens)
        if claimed is None:
            return min(BEAT_EVERY, self._settings.poll_interval * 2)  # database trouble
        if claimed:
            return 0.0
        if self._once:
            if not self._in_flight and not self._recorder.pending:
                return None  # nothing due and nothing in flight: done
            return BEAT_EVERY
        return self._settings.poll_interval * self._rng.uniform(0.8, 1.2)

    async def _wait(self, seconds: float) -> None:
        """The loop's only wait: stop, a freed slot or a written batch, or the timeout."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=min(seconds, BEAT_EVERY))
        except TimeoutError:
            pass

    def _stop_once_for_pause(self) -> None:
        reason = self._pause.reason
        text = (
            f"code {reason.code}: {reason.text}"
            if reason and reason.code is not None
            else (reason.text if reason else "sending paused")
        )
        self.request_stop(exit_code=EX_TEMPFAIL, reason=f"sending paused ({text}); rows left untouched")

    async def _claim(self, tokens: int) -> int | None:
        """Claim and start up to `tokens` sends; None when the database failed."""
        try:
            jobs = await self._claims.claim(tokens, lease_seconds=self._settings.lease_seconds)
        except DatabaseError as exc:
            self._limiter.refund(tokens)
            self._database_failed(exc)
            return None
        self._database_up()
        self._limiter.refund(tokens - len(jobs))
        if self._rows_left is not None:
            self._rows_left -= len(jobs)
        for job in jobs:
            task = asyncio.create_task(self._process(job), name=f"send-{job.id}")
            self._in_flight.add(task)
            task.add_done_callback(self._on_done)
        return len(jobs)

    def _on_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()

    async def _recover(self) -> bool:
        """The periodic sweep: rows of dead workers, and rows of cancelled sessions."""
        try:
            count = await self._claims.recover_expired()
            closed = await self._claims.close_cancelled()
        except DatabaseError as exc:
            self._database_failed(exc)
            return False
        if count:
            self._log.warning("expired_leases_recovered", rows=count, state="desconocido")
        if closed:
            self._log.warning("cancelled_rows_closed", rows=closed, state="error")
        return True

    # -- one row --------------------------------------------------------------------------

    async def _process(self, job: Job) -> None:
        started = time.monotonic()
        try:
            result = await self._attempt(job)
        except asyncio.CancelledError:
            # Cancelled after the drain timeout: the request may already be on the wire.
            result = SendResult(Outcome.UNKNOWN, error_text="send cancelled at shutdown")
            self._finish(job, result, time.monotonic() - started)
            raise
        except Exception as exc:  # a bug must not leave the row claimed with no word
            result = SendResult(Outcome.UNKNOWN, error_text=f"worker error: {type(exc).__name__}: {exc}")
        decision = self._finish(job, result, time.monotonic() - started)
        if decision.hold_template:
            await self._hold_template(job, decision)

    async def _attempt(self, job: Job) -> SendResult:
        try:
            if job.mensaje is None:
                raise InvalidMessage(f"mensaje is {job.mensaje_bytes} bytes, more than {MESSAGE_MAX_BYTES}")
            if normalize_phone(job.telefono) != job.telefono:
                raise InvalidMessage(f"phone {job.telefono!r} is not in E.164 form")
            message = parse_message(job.mensaje)
        except InvalidMessage as exc:
            return SendResult(Outcome.PERMANENT, error_text=f"invalid row: {exc}")
        return await self._sender.send(job, message)

    def _finish(self, job: Job, result: SendResult, seconds: float) -> Decision:
        """Record first; everything after (pause, counters, the log line) only observes."""
        decision = decide(result, attempt=job.attempts + 1, settings=self._settings, rng=self._rng)
        self._recorder.add(Finished(job, decision))
        self.report.outcomes[decision.metric] += 1
        if self._metrics:
            self._metrics.finished(decision.metric, seconds)
        if decision.pause:
            self._start_pause(decision)
        elif result.outcome is Outcome.SENT and self._pause.succeeded():
            self._log.warning("sending_resumed")
            if self._metrics:
                self._metrics.paused(None)
        self._log_decision(job, decision)
        return decision

    def _log_decision(self, job: Job, decision: Decision) -> None:
        context = {"job_id": job.id, "sesion_id": job.sesion_id, "attempt": job.attempts + 1}
        if decision.event == "message_sent":
            self._log.info("message_sent", **context, wamid=decision.wamid)
        elif decision.event == "message_retry_scheduled":
            self._log.warning(
                decision.event,
                **context,
                code=decision.error_code,
                reason=decision.error_text,
                delay=round(decision.delay, 3),
            )
        elif decision.event in ("message_failed", "message_outcome_unknown"):
            self._log.error(decision.event, **context, code=decision.error_code, reason=decision.error_text)

    def _start_pause(self, decision: Decision) -> None:
        assert decision.pause is not None
        reason = PauseReason(decision.error_code, decision.error_text or decision.event)
        if self._metrics:
            self._metrics.paused(
                str(decision.error_code) if decision.error_code is not None else "unreachable"
            )
        if self._pause.trip(decision.pause, reason):
            self._log.error(
                decision.event,
                code=decision.error_code,
                reason=decision.error_text,
                seconds=decision.pause,
                action="rows go back untouched; one probe send after the pause",
            )
        if self._once:
            self._stop_once_for_pause()

    async def _hold_template(self, job: Job, decision: Decision) -> None:
        """Meta paused or disabled a template: hold back its other waiting rows."""
        assert decision.hold_template is not None and job.mensaje is not None
        name = str(json.loads(job.mensaje)["template"]["name"])
        if not self._holds.start(name, decision.hold_template):
            return
        try:
            held = await self._claims.defer_template(name, decision.hold_template)
        except DatabaseError as exc:
            self._holds.cancel(name)
            self._log.error("template_hold_failed", template=name, error=str(exc))
            return
        self._log.error(
            "template_held",
            template=name,
            code=decision.error_code,
            reason=decision.error_text,
            rows=held,
            seconds=decision.hold_template,
        )

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
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=min(remaining, BEAT_EVERY))
            except TimeoutError:
                pass
        if self._in_flight:
            self.report.drained = False
            pending = set(self._in_flight)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # -- database health ------------------------------------------------------------------

    def _database_failed(self, exc: DatabaseError) -> None:
        if not isinstance(exc, DatabaseUnavailable):
            # 1054, 1146, a refused value in our own claim: no retry can fix it.
            self._log.error("database_refused_statement", code=exc.code, error=str(exc))
            self.request_stop(
                exit_code=EX_CONFIG,
                reason=f"the database refuses our statements ({exc}): run `whatsapp-worker migrate`",
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

    def _status_line(self) -> str:
        counts = self.report.outcomes
        totals = f"in flight {len(self._in_flight)}, sent {counts['sent']}, errors {counts['error']}"
        reason = self._pause.reason
        if reason is None:
            return f"sending: {totals}"
        code = f"code {reason.code}: " if reason.code is not None else ""
        return f"paused: {code}{reason.text}; probing in {self._pause.remaining():.0f}s; {totals}"
