"""Applies stored statuses to their rows: at once after each write, and in a full sweep every
few seconds for statuses that arrived before the daemon's own result."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from worker.outage import Outage
from worker.store import DatabaseError
from worker.store.statuses import APPLY_BATCH, Applied, Statuses
from worker.waits import wait_any
from worker.webhook.metrics import WebhookMetrics

SWEEP_EVERY = 5.0  # seconds between full sweeps of the pending statuses
# Seconds from the start of one pass to the next, at the most: under load the writer commits a
# batch every few milliseconds, and a pass after each (six statements) cost more CPU than the
# writes themselves; one pass per gap applies a burst in fewer, larger transactions. An idle
# receiver still applies a status as soon as it is stored.
PASS_GAP = 0.05


class Settler:
    """Applies stored statuses: the new ones at once, all pending ones every SWEEP_EVERY."""

    def __init__(
        self, *, statuses: Statuses, metrics: WebhookMetrics, log: Any, on_turn: Callable[[], None]
    ) -> None:
        self._statuses = statuses
        self._metrics = metrics
        self._log = log
        self._on_turn = on_turn
        self._poke = asyncio.Event()
        self._stop = asyncio.Event()

    def poke(self) -> None:
        self._poke.set()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        # A pass reads again the statuses the pass before it read, when that one left none
        # waiting: MariaDB's SKIP LOCKED now and then skips a status its writer has committed (one
        # of a batch, while the next batch is being inserted), which then waited for the next
        # sweep, up to SWEEP_EVERY. After a pass that left statuses waiting for their row, the next
        # one starts past them as before: a row's waiting statuses are applied together, by a
        # sweep.
        cursor, previous, next_sweep, last_pass = 0, 0, 0.0, -PASS_GAP
        outage = Outage(self._log, down="statuses_not_applied", up="statuses_applied_again")
        while not self._stop.is_set():
            if (gap := last_pass + PASS_GAP - time.monotonic()) > 0:
                await wait_any(self._stop, seconds=gap)  # let a busy writer's batches gather
                continue
            last_pass = time.monotonic()
            self._poke.clear()
            full = time.monotonic() >= next_sweep
            if full:
                cursor, previous, next_sweep = 0, 0, time.monotonic() + SWEEP_EVERY
            try:
                reached, waiting = await self._apply_from(previous)
                previous, cursor = (cursor if not waiting else reached), max(cursor, reached)
                if full:
                    self._metrics.pending.set(await self._statuses.pending_count())
            except DatabaseError as exc:
                outage.failed(exc, action="retrying")
                next_sweep = 0.0  # start over from the first pending status once it answers
                await wait_any(self._stop, seconds=min(SWEEP_EVERY, 0.2 * 2**outage.failures))
                self._on_turn()
                continue
            except Exception:  # a bug: say so, keep receiving; the next sweep tries again
                self._log.exception("settler_failed")
                next_sweep = time.monotonic() + SWEEP_EVERY
            outage.recovered()
            self._on_turn()
            await wait_any(self._poke, self._stop, seconds=next_sweep - time.monotonic())

    async def _apply_from(self, cursor: int) -> tuple[int, int]:
        """(the last status read, how many were left waiting for their row)."""
        waiting = 0
        while True:
            applied = await self._statuses.apply_pending(after_id=cursor, limit=APPLY_BATCH)
            self._report(applied)
            self._on_turn()  # a long backlog is progress too
            waiting += applied.waiting
            if applied.seen < APPLY_BATCH:
                return max(cursor, applied.last_id), waiting
            cursor = applied.last_id

    def _report(self, applied: Applied) -> None:
        for mismatched in applied.mismatched:
            self._log.warning(
                "status_reference_mismatch",
                wamid=mismatched.wamid,
                job_id=mismatched.cola_id,
                reason=mismatched.reason,
                action="kept, not applied: a status of another installation or another recipient",
            )
        if applied.mismatched:
            self._metrics.mismatched.inc(len(applied.mismatched))
        for row_id, wamid in applied.earlier:
            self._log.warning(
                "status_of_an_earlier_send",
                job_id=row_id,
                wamid=wamid,
                action="the row was sent again after Meta had taken this send: a possible double message",
            )
        if applied.earlier:
            self._metrics.earlier_sends.inc(len(applied.earlier))
        for refused in applied.refused:
            self._log.error(
                "status_refused",
                wamid=refused.wamid,
                job_id=refused.cola_id,
                error=refused.reason,
                action="kept with the reason (whatsapp_worker_statuses.apply_error); the others are applied",
            )
        if applied.refused:
            self._metrics.refused.inc(len(applied.refused))
        for outcome, count in applied.settled.items():
            if count:
                self._metrics.settled.labels(outcome).inc(count)
        if applied.optouts:
            self._metrics.optouts.inc(applied.optouts)
        if applied.settled["sent"] or applied.settled["failed"]:
            self._log.info(
                "unknown_outcomes_settled",
                sent=applied.settled["sent"],
                failed=applied.settled["failed"],
                job_ids=applied.settled_ids[:100],
            )
        if applied.optouts:
            self._log.info("opted_out", source="131050", phones=applied.optouts)
