"""Writes send results in batches, and logs per-session progress.

Results wait in memory until written: a database that goes away delays the write, it never
loses a result or causes a re-send (the rows stay claimed under this worker's lease). A batch
the database refuses is split until the refusing row is isolated; that row gets its own
recorded reason, and every other row of the batch is written.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from worker.daemon.heartbeat import BEAT_EVERY
from worker.daemon.progress import Progress
from worker.models import Finished, RowState
from worker.outage import Outage
from worker.store import DatabaseError, DatabaseUnavailable, Recorded, Results, RowRefused
from worker.waits import wait_any

BATCH_MAX = 500


class Recorder:
    def __init__(
        self,
        *,
        results: Results,
        log: Any,
        on_written: Callable[[], None],
        on_fatal: Callable[[], None],
        on_outage: Callable[[DatabaseUnavailable], None],
    ) -> None:
        self._results = results
        self._on_written = on_written
        self._on_fatal = on_fatal
        self._on_outage = on_outage
        self._log = log
        self._queue: list[Finished] = []
        self._ready = asyncio.Event()
        self._closing = False
        self._deadline: float | None = None
        self.progress = Progress(results=results, log=log)
        self.lost = 0  # results that could not be written at all
        self.fatal: DatabaseError | None = None  # a statement the database will never accept

    @property
    def pending(self) -> int:
        return len(self._queue)

    def add(self, finished: Finished) -> None:
        self._queue.append(finished)
        self._ready.set()

    def close(self, *, grace: float) -> None:
        """Write what is left; give up after `grace` seconds if the database stays away."""
        self._closing = True
        self._deadline = time.monotonic() + grace
        self._ready.set()

    async def run(self) -> None:
        try:
            await self._run()
        except Exception as exc:  # a bug must not leave results unwritten with no word
            self._log.exception("recorder_crashed")
            self.fatal = DatabaseError(f"the result writer crashed: {type(exc).__name__}: {exc}")
            self._give_up("results_not_writable", str(self.fatal))
            self._on_fatal()

    async def _run(self) -> None:
        outage = Outage(self._log, down="results_not_written", up="results_written_after_outage")
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._ready.clear()
                await wait_any(self._ready, seconds=BEAT_EVERY)
                continue
            batch = self._queue[:BATCH_MAX]
            try:
                recorded = await self._write(batch)
            except DatabaseUnavailable as exc:
                outage.failed(exc, rows=len(batch), action="kept in memory; retrying")
                self._on_outage(exc)
                if self._closing and self._deadline is not None and time.monotonic() > self._deadline:
                    self._give_up("results_lost_at_shutdown", str(exc))
                    return
                await asyncio.sleep(min(5.0, 0.1 * 2 ** min(outage.failures, 6)))
                continue
            except DatabaseError as exc:  # a statement the server will never accept: schema
                self.fatal = exc
                self._give_up("results_not_writable", str(exc))
                self._on_fatal()
                return
            outage.recovered()
            del self._queue[: len(batch)]
            self._on_written()
            self._fenced_out(recorded.fenced_out)
            self.progress.note(batch)

    def _fenced_out(self, rows: Sequence[Finished]) -> None:
        """Results nobody may write any more (the row was taken over, or the late-result window
        closed). A message Meta accepted is named with its wamid: it is the only trace left."""
        for finished in rows:
            if finished.decision.state is RowState.SENT:
                self.lost += 1
                self._log.error(
                    "sent_result_fenced_out",
                    job_id=finished.job.id,
                    sesion_id=finished.job.sesion_id,
                    wamid=finished.decision.wamid,
                    action="Meta accepted it, but the row belongs to someone else now",
                )
        if rows:
            self._log.warning(
                "lease_lost", rows=len(rows), action="results not written: another worker owns the rows"
            )

    async def _write(self, batch: Sequence[Finished]) -> Recorded:
        """Record a batch; a refused batch is split in halves until the refused row is alone."""
        try:
            return await self._results.record(batch)
        except RowRefused as exc:
            if len(batch) == 1:
                await self._refused(batch[0], exc)
                return Recorded(1)
            middle = len(batch) // 2
            first = await self._write(batch[:middle])
            second = await self._write(batch[middle:])
            return Recorded(first.written + second.written, first.fenced_out + second.fenced_out)

    async def _refused(self, finished: Finished, exc: RowRefused) -> None:
        job = finished.job
        self._log.error(
            "result_refused", job_id=job.id, sesion_id=job.sesion_id, code=exc.code, error=str(exc)
        )
        try:
            if await self._results.record_refused(finished, str(exc)):
                return
        except RowRefused:
            pass
        self.lost += 1
        self._log.error("result_lost", job_id=job.id, sesion_id=job.sesion_id, error=str(exc))

    def _give_up(self, event: str, error: str) -> None:
        self.lost += len(self._queue)
        self._log.error(
            event, rows=len(self._queue), error=error, action="rows become unknown when their lease expires"
        )
        for finished in self._queue:
            if finished.decision.state is RowState.SENT:  # the only trace of an accepted message
                self._log.error("sent_result_lost", job_id=finished.job.id, wamid=finished.decision.wamid)
        self._queue.clear()
