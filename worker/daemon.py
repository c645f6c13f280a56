"""The loop: claim as many rows as there are free slots and rate tokens, send, record, drain.

A claimed row is sent at once (tokens are taken before the claim), so the rows a worker holds
are exactly its sends in flight. Results go to a Recorder that writes them in batches.
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
from typing import Any

import pymysql

from worker.config import Settings
from worker.log import get_logger
from worker.messages import InvalidMessage, normalize_phone, parse_message
from worker.models import Finished, Job, Outcome, SendResult
from worker.ratelimit import RateLimiter
from worker.recorder import Recorder
from worker.retry import backoff
from worker.sender import MAINTENANCE_CODE, TEMPLATE_DEAD_CODES, TEMPLATE_PAUSED_CODE, Sender
from worker.store import DatabaseError, Store
from worker.systemd import Notifier

DB_ERRORS = (DatabaseError, pymysql.err.MySQLError, OSError)
RECOVERY_INTERVAL = 30.0  # seconds between sweeps for rows of dead workers (at most)
BEAT_EVERY = 5.0  # the loop goes round at least this often, even while paused
MAINTENANCE_PAUSE = 60.0  # 131057: Meta says about a minute
MARKETING_LIMIT_DELAY = 24 * 3600.0  # 131049: Meta asks for at least 24 h
MARKETING_LIMIT_CODE = 131049


@dataclass
class RunReport:
    outcomes: Counter[str] = field(default_factory=Counter)
    drained: bool = True  # False when the drain timeout cancelled sends


class Daemon:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        sender: Sender,
        notifier: Notifier | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._sender = sender
        self._notifier = notifier or Notifier()
        self._rng = rng or random.Random()
        self._log = get_logger(worker_id=settings.worker_id)
        self._limiter = RateLimiter(settings.rate_limit)
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._recorder = Recorder(store=store, log=self._log, on_written=self._wake.set)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._forced = asyncio.Event()
        self._paused_until = 0.0
        self._probing = False  # after a pause: one send at a time until one succeeds
        self._held_templates: dict[str, float] = {}
        self._db_down_since: float | None = None
        self._last_watchdog = 0.0
        self._last_beat = 0.0
        self._heartbeat = settings.heartbeat_path
        self.report = RunReport()
        # Claim in batches when busy: one claim per freed slot would make the database the
        # bottleneck; "no more rows than free slots" still holds.
        self._batch_min = max(1, settings.concurrency // 10)

    # -- control --------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: drain. Second call: stop waiting for in-flight sends."""
        if self._stop.is_set():
            self._forced.set()
        self._stop.set()
        self._wake.set()

    @contextmanager
    def signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT request a graceful stop while inside; old handlers come back after."""
        loop = asyncio.get_running_loop()

        def handler(signame: str) -> None:
            self._log.info("stop_requested", signal=signame, in_flight=len(self._in_flight))
            self._notifier.notify(stopping=1, status="draining in-flight sends")
            self.request_stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, handler, sig.name)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    # -- the loop -------------------------------------------------------------------------

    async def run(self, *, once: bool = False) -> RunReport:
        recorder = asyncio.create_task(self._recorder.run(), name="recorder")
        try:
            await self._dispatch(once=once)
        finally:
            await self._drain()
            self._recorder.close(grace=self._settings.drain_timeout)
            await asyncio.shield(recorder)
        self._log.info("stopped", drained=self.report.drained, **self.report.outcomes)
        return self.report

    async def _dispatch(self, *, once: bool) -> None:
        next_recovery = 0.0
        recovery_every = min(RECOVERY_INTERVAL, self._settings.lease_seconds / 2)
        while not self._stop.is_set():
            self._wake.clear()
            now = time.monotonic()
            self._beat(now)
            if now >= next_recovery:
                next_recovery = now + recovery_every
                await self._recover()
            if now < self._paused_until:
                await self._sleep(min(self._paused_until - now, BEAT_EVERY))
                continue
            slots = 1 if self._probing else self._settings.concurrency
            # A row holds its slot until its result is written: the rows this worker has
            # claimed never exceed WORKER_CONCURRENCY, so a crash leaves at most that many unknown.
            free = slots - len(self._in_flight) - self._recorder.pending
            if free < (self._batch_min if self._in_flight else 1):
                await self._wake.wait()
                continue
            claimed = await self._claim(free)
            if claimed is None:
                continue  # database trouble: _claim waited already
            if claimed:
                continue
            if once:
                if not self._in_flight and not self._recorder.pending:
                    return  # nothing due and nothing in flight: done
                await self._wake.wait()
                continue
            await self._sleep(self._settings.poll_interval * self._rng.uniform(0.8, 1.2))

    async def _claim(self, free: int) -> int | None:
        """Claim and start up to `free` sends; None when the database failed."""
        tokens = await self._limiter.take(free)
        try:
            jobs = await self._store.claim(tokens, lease_seconds=self._settings.lease_seconds)
        except DB_ERRORS as exc:
            self._limiter.refund(tokens)
            await self._database_down(exc)
            return None
        self._database_up()
        self._limiter.refund(tokens - len(jobs))
        for job in jobs:
            task = asyncio.create_task(self._process(job), name=f"send-{job.id}")
            self._in_flight.add(task)
            task.add_done_callback(self._on_done)
        return len(jobs)

    def _on_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()

    async def _recover(self) -> None:
        try:
            count = await self._store.recover_expired()
        except DB_ERRORS as exc:
            await self._database_down(exc)
            return
        if count:
            self._log.warning("expired_leases_recovered", rows=count, state="desconocido")

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once on stop or when a slot frees up."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, seconds))
        except TimeoutError:
            pass

    # -- one row --------------------------------------------------------------------------

    async def _process(self, job: Job) -> None:
        log = self._log.bind(job_id=job.id, sesion_id=job.sesion_id, attempt=job.attempts + 1)
        try:
            result = await self._attempt(job)
        except asyncio.CancelledError:
            # Cancelled after the drain timeout: the request may already be on the wire.
            result = SendResult(Outcome.UNKNOWN, error_text="send cancelled at shutdown")
            self._finish(job, self._settle(job, result, log))
            raise
        except Exception as exc:  # a bug must not leave the row claimed with no word
            log.exception("send_crashed")
            result = SendResult(Outcome.UNKNOWN, error_text=f"worker error: {type(exc).__name__}")
        result = self._settle(job, result, log)
        if result.error_code == TEMPLATE_PAUSED_CODE or result.error_code in TEMPLATE_DEAD_CODES:
            await self._hold_template(job, result)
        self._finish(job, result)

    async def _attempt(self, job: Job) -> SendResult:
        try:
            if normalize_phone(job.telefono) != job.telefono:
                raise InvalidMessage(f"phone {job.telefono!r} is not in E.164 form")
            message = parse_message(job.mensaje)
        except InvalidMessage as exc:
            return SendResult(Outcome.PERMANENT, error_text=f"invalid row: {exc}")
        return await self._sender.send(job, message)

    def _finish(self, job: Job, result: SendResult) -> None:
        self.report.outcomes[result.outcome.value] += 1
        self._recorder.add(Finished(job, result))

    def _settle(self, job: Job, result: SendResult, log: Any) -> SendResult:
        """Turn a raw outcome into what the row becomes, and log it once."""
        attempt = job.attempts + 1
        fields = {"code": result.error_code, "reason": result.error_text}
        match result.outcome:
            case Outcome.SENT:
                self._probing = False
                log.info("message_sent", wamid=result.wamid)
            case Outcome.RETRY if attempt >= self._settings.max_attempts:
                result = SendResult(
                    Outcome.PERMANENT,
                    error_code=result.error_code,
                    error_text=f"gave up after {attempt} attempts: {result.error_text}",
                )
                log.error("message_failed", code=result.error_code, reason=result.error_text)
            case Outcome.RETRY:
                delay = (
                    MARKETING_LIMIT_DELAY
                    if result.error_code == MARKETING_LIMIT_CODE
                    else backoff(
                        attempt,
                        base=self._settings.retry_base,
                        cap=self._settings.retry_cap,
                        rng=self._rng,
                    )
                )
                result = SendResult(
                    Outcome.RETRY,
                    error_code=result.error_code,
                    error_text=result.error_text,
                    retry_after=delay,
                )
                log.warning("message_retry_scheduled", delay=round(delay, 3), **fields)
            case Outcome.PERMANENT:
                log.error("message_failed", **fields)
            case Outcome.UNKNOWN:
                log.error("message_outcome_unknown", **fields)
            case Outcome.PAUSE if result.error_code == TEMPLATE_PAUSED_CODE:
                result = SendResult(
                    Outcome.PAUSE,
                    error_code=result.error_code,
                    error_text=result.error_text,
                    retry_after=self._settings.template_pause_seconds,
                )
            case Outcome.PAUSE:
                seconds = self._settings.pause_seconds
                if result.error_code == MAINTENANCE_CODE:
                    seconds = min(seconds, MAINTENANCE_PAUSE)
                self._pause(result, seconds)
        return result

    def _pause(self, result: SendResult, seconds: float) -> None:
        """Stop claiming for `seconds`; then probe with one send before opening up again."""
        if time.monotonic() >= self._paused_until:
            self._log.error(
                "sending_paused",
                code=result.error_code,
                reason=result.error_text,
                seconds=seconds,
                action="rows go back untouched; one probe send after the pause",
            )
        self._paused_until = time.monotonic() + seconds
        self._probing = True

    async def _hold_template(self, job: Job, result: SendResult) -> None:
        """Meta paused or disabled a template: hold back its other waiting rows."""
        name = str(json.loads(job.mensaje)["template"]["name"])
        now = time.monotonic()
        if self._held_templates.get(name, 0.0) > now:
            return
        seconds = self._settings.template_pause_seconds
        self._held_templates[name] = now + seconds
        try:
            held = await self._store.defer_template(name, seconds)
        except DB_ERRORS as exc:
            self._held_templates.pop(name, None)
            self._log.error("template_hold_failed", template=name, error=str(exc))
            return
        self._log.error(
            "template_held",
            template=name,
            code=result.error_code,
            reason=result.error_text,
            rows=held,
            seconds=seconds,
        )

    # -- stop -----------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Wait for in-flight sends up to the drain timeout (or a second signal), then cancel."""
        if not self._in_flight:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.drain_timeout
        self._log.info("draining", in_flight=len(self._in_flight), timeout=self._settings.drain_timeout)
        forced = asyncio.ensure_future(self._forced.wait())
        try:
            while self._in_flight and not self._forced.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.wait(
                    {*self._in_flight, forced},
                    timeout=remaining,
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            forced.cancel()
        if self._in_flight:
            self.report.drained = False
            pending = set(self._in_flight)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # -- database health and watchdog -----------------------------------------------------

    async def _database_down(self, exc: BaseException) -> None:
        if self._db_down_since is None:
            self._db_down_since = time.monotonic()
            self._log.error("database_unavailable", error=str(exc) or type(exc).__name__)
        await self._sleep(min(5.0, self._settings.poll_interval * 2))

    def _database_up(self) -> None:
        if self._db_down_since is not None:
            self._log.warning(
                "database_available", after_seconds=round(time.monotonic() - self._db_down_since, 1)
            )
            self._db_down_since = None

    def _beat(self, now: float) -> None:
        """The loop went round: touch the heartbeat file (`health`) and ping systemd's watchdog.

        Paused or waiting for the database still counts as alive: a restart would lose the
        results held in memory. Only a loop that stops going round goes stale.
        """
        if now - self._last_beat < 1.0:
            return
        self._last_beat = now
        try:
            self._heartbeat.touch(exist_ok=True)
        except OSError:
            pass  # `health` will report the stale heartbeat; sending must not stop for it
        interval = self._notifier.watchdog_interval
        if interval and now - self._last_watchdog >= interval / 2:
            self._last_watchdog = now
            self._notifier.notify(watchdog=1, status=self._status_line())

    def _status_line(self) -> str:
        counts = self.report.outcomes
        return f"in flight {len(self._in_flight)}, sent {counts['sent']}, errors {counts['permanent']}"
