"""One claimed row, from its send to its record: validate, send, decide, hand the decision to
the recorder; then, only observing, trip the sending pause, hold a template, count and log.

The daemon's loop decides when rows are claimed; this decides nothing about the loop except
through `on_pause` (a sending pause under `run --once` ends the run).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from worker.config import Settings
from worker.daemon.pause import PauseReason, Pauses, TemplateHolds
from worker.daemon.policy import THROTTLED, decide
from worker.daemon.recorder import Recorder
from worker.daemon.sender import Sender
from worker.messages import MESSAGE_MAX_BYTES, InvalidMessage, normalize_phone, parse_message
from worker.metrics import Metrics
from worker.models import (
    OPTED_OUT_CODE,
    SOURCE_META,
    UNDELIVERABLE_CODE,
    Decision,
    Finished,
    Job,
    Outcome,
    RowState,
    SendResult,
)
from worker.store import Claims, DatabaseError
from worker.store.optouts import Optouts
from worker.store.suppressions import Suppressions


class RowProcessor:
    def __init__(
        self,
        *,
        settings: Settings,
        sender: Sender,
        recorder: Recorder,
        claims: Claims,
        pauses: Pauses,
        log: Any,
        rng: random.Random,
        metrics: Metrics | None,
        on_pause: Callable[[], None],
        on_throttled: Callable[[str], None] = lambda number: None,
        optouts: Optouts | None = None,
        suppressions: Suppressions | None = None,
    ) -> None:
        self._settings = settings
        self._sender = sender
        self._recorder = recorder
        self._claims = claims
        self._pauses = pauses
        self._default_number = settings.phone_number_id
        self._holds = TemplateHolds()
        self._log = log
        self._rng = rng
        self._metrics = metrics
        self._on_pause = on_pause
        self._on_throttled = on_throttled
        self._optouts = optouts
        self._suppressions = suppressions
        self.outcomes: Counter[str] = Counter()  # by Decision.metric

    async def process(self, job: Job) -> None:
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
        if decision.error_code == OPTED_OUT_CODE:
            await self._record_opt_out(job, decision)
        if decision.error_code == UNDELIVERABLE_CODE and decision.state is RowState.ERROR:
            await self._record_undeliverable(job, decision)

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
        self.outcomes[decision.metric] += 1
        if self._metrics:
            self._metrics.finished(decision.metric, seconds)
        number = job.phone_number_id or self._default_number
        if decision.error_code == THROTTLED:
            self._on_throttled(number)
        if decision.pause:
            self._start_pause(number, decision)
        elif result.outcome is Outcome.SENT and self._pauses.number(number).succeeded(
            time.monotonic() - seconds
        ):
            self._log.warning("sending_resumed", phone_number_id=number)
            if self._metrics:
                self._metrics.paused(self._pause_labels())
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

    def _pause_labels(self) -> set[tuple[str, str]]:
        return {(n, p.reason.label) for n, p in self._pauses.active().items() if p.reason is not None}

    def _start_pause(self, number: str, decision: Decision) -> None:
        assert decision.pause is not None
        reason = PauseReason(decision.error_code, decision.error_text or decision.event)
        fresh = self._pauses.number(number).trip(decision.pause, reason)
        if self._metrics:
            self._metrics.paused(self._pause_labels())
        if fresh:
            self._log.error(
                decision.event,
                phone_number_id=number,
                code=decision.error_code,
                reason=decision.error_text,
                seconds=decision.pause,
                action="rows go back untouched; one probe send after the pause",
            )
        self._on_pause()

    async def _record_opt_out(self, job: Job, decision: Decision) -> None:
        """Meta says the user stopped marketing messages (131050): never send to them again."""
        if self._optouts is None:
            return
        try:
            added = await self._optouts.add(job.telefono, SOURCE_META, decision.error_text)
        except DatabaseError as exc:
            self._log.error("opt_out_not_recorded", job_id=job.id, code=OPTED_OUT_CODE, error=str(exc))
            return
        if added:
            self._log.warning("opted_out", job_id=job.id, source=SOURCE_META)

    async def _record_undeliverable(self, job: Job, decision: Decision) -> None:
        """Meta could not deliver to this phone from this number (131026): the next campaigns'
        rows for it are closed unsent for WORKER_UNDELIVERABLE_DAYS instead of failing again."""
        seconds = int(self._settings.undeliverable_days * 86400)
        if self._suppressions is None or seconds <= 0:
            return
        number = job.phone_number_id or self._default_number
        try:
            await self._suppressions.add(
                number, job.telefono, decision.error_code, decision.error_text, seconds
            )
        except DatabaseError as exc:
            self._log.error("undeliverable_not_recorded", job_id=job.id, error=str(exc))

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
