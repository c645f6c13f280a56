"""Stored statuses: the requests waiting at one moment are written in one transaction, and
each request is answered only after that commit (an outage answers 503: Meta retries)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.outage import Outage
from worker.store import DatabaseError, DatabaseUnavailable, RowRefused
from worker.store.statuses import Statuses, Stored
from worker.waits import wait_any
from worker.webhook.parse import Parsed

BATCH_MAX_STATUSES = 2000  # statuses + opt-outs per transaction (whole requests only)
BATCH_MAX_BYTES = 4 * 1024 * 1024  # raw statuses per transaction (max_allowed_packet is 16 MiB+)
IDLE_WAIT = 1.0  # seconds an idle writer waits before it looks again (every wait has a timeout)
QUEUE_MAX = 50_000  # statuses waiting for the writer; beyond it requests get 503 at once


class Overloaded(DatabaseUnavailable):
    """Statuses already wait too long (or too many wait) for the database: answer 503 at once."""


@dataclass(slots=True)
class _Waiting:
    parsed: Parsed
    done: asyncio.Future[Stored]
    size: int
    raw_bytes: int
    queued_at: float


class StatusWriter:
    """Writes the statuses of concurrent requests in one transaction per batch.

    A request waits for the commit of the batch that holds it (`submit`). While one batch is
    being written the next one gathers, so a slow database makes batches bigger rather than
    queueing one transaction per request.
    """

    def __init__(
        self,
        *,
        statuses: Statuses,
        log: Any,
        on_stored: Callable[[Stored], None],
        max_wait: float = 1.0,  # WORKER_WEBHOOK_MAX_WAIT
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._statuses = statuses
        self._max_wait = max_wait
        self._clock = clock
        self._writing_since: float | None = None  # when the oldest request of the batch being written came
        self._log = log
        self._on_stored = on_stored
        self._queue: deque[_Waiting] = deque()
        self._queued = 0
        self._ready = asyncio.Event()
        self._closing = False
        self._outage = Outage(log, down="statuses_not_written", up="statuses_written_again")

    def overloaded(self) -> str | None:
        """Why a new request would wait too long, or None. Past this point a request is answered
        503 at once (Meta retries) rather than slowly: when statuses come faster than the database
        takes them, or the database stalls, the answers stay fast and the memory flat."""
        oldest = self._writing_since  # the batch being written came before anything queued
        if oldest is None and self._queue:
            oldest = self._queue[0].queued_at
        if oldest is not None and (waited := self._clock() - oldest) > self._max_wait:
            return f"statuses have waited {waited:.2f}s for the database (limit {self._max_wait:g}s)"
        if self._queued >= QUEUE_MAX:
            return f"{self._queued} statuses already wait for the database"
        return None

    async def submit(self, parsed: Parsed) -> Stored:
        """Resolves once the request's statuses are committed; raises DatabaseError if not."""
        if self._closing:
            raise DatabaseUnavailable("the receiver is stopping")
        if reason := self.overloaded():
            raise Overloaded(reason)
        if self._queued + parsed.size > QUEUE_MAX:
            raise Overloaded(f"{self._queued} statuses already wait for the database")
        done: asyncio.Future[Stored] = asyncio.get_running_loop().create_future()
        raw_bytes = sum(len(s.raw) for s in parsed.statuses)
        self._queue.append(_Waiting(parsed, done, parsed.size, raw_bytes, self._clock()))
        self._queued += parsed.size
        self._ready.set()
        return await done

    def close(self) -> None:
        """Write what is queued, then stop."""
        self._closing = True
        self._ready.set()

    async def run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._ready.clear()
                await wait_any(self._ready, seconds=IDLE_WAIT)
                continue
            batch = self._take()
            self._writing_since = batch[0].queued_at
            try:
                await self._write(batch)
            except Exception as exc:  # a bug must not leave requests waiting forever
                self._log.exception("status_writer_failed")
                for waiting in batch:
                    _answer(waiting, DatabaseError(f"{type(exc).__name__}: {exc}"))
            finally:
                self._writing_since = None

    def _take(self) -> list[_Waiting]:
        batch: list[_Waiting] = []
        size = raw = 0
        while self._queue:
            head = self._queue[0]
            if batch and (size + head.size > BATCH_MAX_STATUSES or raw + head.raw_bytes > BATCH_MAX_BYTES):
                break
            batch.append(self._queue.popleft())
            size, raw = size + head.size, raw + head.raw_bytes
        self._queued -= size
        return batch

    async def _write(self, batch: list[_Waiting]) -> None:
        """One transaction for the batch; a refused value is isolated to its request."""
        statuses = [s for w in batch for s in w.parsed.statuses]
        optouts = [o for w in batch for o in w.parsed.optouts]
        try:
            stored = await self._statuses.store(statuses, optouts)
        except RowRefused as exc:
            if len(batch) == 1:
                self._log.error("statuses_refused", statuses=len(statuses), code=exc.code, error=str(exc))
                _answer(batch[0], exc)
                return
            middle = len(batch) // 2
            await self._write(batch[:middle])
            await self._write(batch[middle:])
            return
        except DatabaseError as exc:
            self._outage.failed(exc, requests=len(batch), action="answered 503: Meta retries")
            for waiting in batch:
                _answer(waiting, exc)
            return
        self._outage.recovered()
        for waiting in batch:
            _answer(waiting, stored)
        self._on_stored(stored)


def _answer(waiting: _Waiting, outcome: Stored | Exception) -> None:
    """Wake a request's handler, unless it is gone (cancelled at shutdown after its deadline)."""
    if waiting.done.done():
        return
    if isinstance(outcome, Exception):
        waiting.done.set_exception(outcome)
    else:
        waiting.done.set_result(outcome)
