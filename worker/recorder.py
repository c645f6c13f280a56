"""Writes send results in batches, and logs per-session progress.

Results wait in memory until written: a database that goes away delays the write, it never
loses a result or causes a re-send (the rows stay claimed under this worker's lease).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pymysql

from worker.models import Finished, Outcome
from worker.store import DatabaseError, Store

BATCH_MAX = 500
PROGRESS_EVERY = 1.0  # seconds between progress lines per session
TOTALS_REFRESH = 10.0  # seconds before session totals are re-read (other daemons send too)
FINAL = frozenset({Outcome.SENT, Outcome.PERMANENT, Outcome.UNKNOWN})
DB_ERRORS = (DatabaseError, pymysql.err.MySQLError, OSError)


class Recorder:
    def __init__(self, *, store: Store, log: Any, on_written: Callable[[], None]) -> None:
        self._store = store
        self._on_written = on_written
        self._log = log
        self._queue: list[Finished] = []
        self._ready = asyncio.Event()
        self._closing = False
        self._deadline: float | None = None
        self._progress = Progress(store=store, log=log)

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
        failures = 0
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            batch = self._queue[:BATCH_MAX]
            try:
                recorded = await self._store.record(batch)
            except DB_ERRORS as exc:
                failures += 1
                if failures == 1:
                    self._log.error(
                        "results_not_written",
                        rows=len(batch),
                        error=str(exc),
                        action="kept in memory; retrying",
                    )
                if self._closing and self._deadline is not None and time.monotonic() > self._deadline:
                    self._log.error(
                        "results_lost_at_shutdown",
                        rows=len(self._queue),
                        action="rows become unknown when their lease expires",
                    )
                    return
                await asyncio.sleep(min(5.0, 0.1 * 2**failures))
                continue
            if failures:
                self._log.warning("results_written_after_outage", retries=failures)
                failures = 0
            del self._queue[: len(batch)]
            self._on_written()
            if recorded.fenced_out:
                self._log.warning(
                    "lease_lost",
                    rows=recorded.fenced_out,
                    action="results not written: another worker owns the rows",
                )
            try:
                await self._progress.update(batch)
            except DB_ERRORS:
                pass  # progress lines are best effort


@dataclass
class _SessionProgress:
    done: int
    total: int
    read_at: float
    logged_at: float = 0.0
    completed: bool = False


class Progress:
    """`[12/27]`-style progress per session at info level, at most once a second."""

    def __init__(self, *, store: Store, log: Any) -> None:
        self._store = store
        self._log = log
        self._sessions: dict[int, _SessionProgress] = {}

    async def update(self, batch: list[Finished]) -> None:
        finished = Counter(f.job.sesion_id for f in batch if f.result.outcome in FINAL)
        if not finished:
            return
        now = time.monotonic()
        stale = [
            sid
            for sid in finished
            if sid not in self._sessions or now - self._sessions[sid].read_at > TOTALS_REFRESH
        ]
        fresh = await self._store.session_totals(stale)
        for sid, count in finished.items():
            if sid in fresh:
                done, total = fresh[sid]
                logged = self._sessions[sid].logged_at if sid in self._sessions else 0.0
                self._sessions[sid] = _SessionProgress(done, total, now, logged)
            else:
                self._sessions[sid].done += count
            await self._report(sid, self._sessions[sid], now)

    async def _report(self, sid: int, entry: _SessionProgress, now: float) -> None:
        complete = entry.done >= entry.total
        if not complete and now - entry.logged_at < PROGRESS_EVERY:
            return
        entry.logged_at = now
        self._log.info(
            "session_progress",
            sesion_id=sid,
            done=entry.done,
            total=entry.total,
            progress=f"[{entry.done}/{entry.total}]",
        )
        if complete and not entry.completed:
            entry.completed = True  # one attempt per totals refresh, not one per batch
            if await self._store.complete_session(sid):
                self._log.info("session_completed", sesion_id=sid, total=entry.total)
