"""Per-session progress lines (`[12/27]`) and session completion, off the result writer's path.

The recorder only notes which sessions it wrote results for; this task reads the database at
most once a second. A session's rows are counted in full once; after that each refresh reads
only what changes (its live rows on the claim index, and rows added since on the primary key),
so its cost does not grow with finished rows, and a slow read never holds a result write up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from worker.models import Finished, RowState
from worker.store import DatabaseError, Results
from worker.waits import wait_any

PROGRESS_EVERY = 1.0  # seconds between progress lines
FINAL = frozenset({RowState.SENT, RowState.ERROR, RowState.UNKNOWN})


@dataclass
class _Session:
    total: int
    highest_id: int
    done: int = 0
    completed: bool = False


class Progress:
    def __init__(self, *, results: Results, log: Any) -> None:
        self._results = results
        self._log = log
        self._touched: set[int] = set()
        self._sessions: dict[int, _Session] = {}
        self._stop = asyncio.Event()

    def note(self, batch: Sequence[Finished]) -> None:
        """Sessions whose rows just finished (called by the recorder; no I/O)."""
        self._touched.update(f.job.sesion_id for f in batch if f.decision.state in FINAL)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Report every PROGRESS_EVERY seconds; a last time after `stop()`."""
        while not self._stop.is_set():
            await wait_any(self._stop, seconds=PROGRESS_EVERY)
            await self.report()

    async def report(self) -> None:
        touched, self._touched = self._touched, set()
        if not touched:
            return
        try:
            await self._refresh(touched)
            for sid in sorted(touched):
                await self._report(sid, self._sessions[sid])
        except DatabaseError:
            self._touched |= touched  # best effort: the next turn tries again
        except Exception:  # progress lines are best effort: never take the daemon's stop with them
            self._log.exception("progress_failed")

    async def _refresh(self, touched: set[int]) -> None:
        first = await self._results.session_totals(t for t in touched if t not in self._sessions)
        for sid, totals in first.items():
            self._sessions[sid] = _Session(totals.total, totals.highest_id, totals.done)
        known = [sid for sid in touched if sid not in first]
        for sid in known:  # a producer may keep adding rows to a running session
            added, highest = await self._results.rows_added(sid, self._sessions[sid].highest_id)
            entry = self._sessions[sid]
            entry.total, entry.highest_id = entry.total + added, highest
            entry.completed = entry.completed and not added
        for sid, live in (await self._results.live_rows(known)).items():
            self._sessions[sid].done = max(0, self._sessions[sid].total - live)

    async def _report(self, sid: int, entry: _Session) -> None:
        self._log.info(
            "session_progress",
            sesion_id=sid,
            done=entry.done,
            total=entry.total,
            progress=f"[{entry.done}/{entry.total}]",
        )
        if entry.done >= entry.total and not entry.completed:
            entry.completed = True
            if await self._results.complete_session(sid):  # checks the rows itself
                self._log.info("session_completed", sesion_id=sid, total=entry.total)
