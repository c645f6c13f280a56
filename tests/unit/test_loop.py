"""The loop's own decisions, with no database: an in-memory store and a sender that holds each
send until the test lets it go. What it must decide: never claim more rows than it has free
slots, send each claimed row once, record every result, and end a `--once` run only when
nothing is due, in flight or unwritten."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker.config import DatabaseURL, Settings
from worker.daemon.loop import Daemon
from worker.models import Finished, Job, Outcome, RowState, SendResult
from worker.store import Live, Recorded
from worker.store.claims import Claimed, DueSession, Recovered
from worker.store.results import SessionTotals

MESSAGE = '{"type":"text","text":{"body":"hola"}}'


class MemoryClaims:
    def __init__(self, rows: int) -> None:
        self.waiting = list(range(1, rows + 1))
        self.limits: list[int] = []  # what each claim asked for
        self.capped = False
        self.held: frozenset[str] = frozenset()  # the operator holds nothing
        self._tokens = itertools.count()

    async def sessions_due(self) -> list[DueSession]:
        return [DueSession(1, None, None, None)] if self.waiting else []

    async def claim(
        self, limit: int, *, lease_seconds: float, sessions: Sequence[int] | None = None
    ) -> Claimed:
        self.limits.append(limit)
        taken, self.waiting = self.waiting[:limit], self.waiting[limit:]
        token = f"t{next(self._tokens)}"
        return Claimed(Job(i, 1, f"+5198{i:07d}", MESSAGE, 0, token) for i in taken)

    async def give_back_uncertain(self) -> None:
        return None

    async def recover_expired(self) -> Recovered:
        return Recovered(0)

    async def close_cancelled(self) -> int:
        return 0

    async def unpark_active(self) -> int:
        return 0


class MemoryResults:
    def __init__(self) -> None:
        self.written: dict[int, Finished] = {}

    async def record(self, finished: Sequence[Finished]) -> Recorded:
        for item in finished:
            assert item.job.id not in self.written, f"row {item.job.id} recorded twice"
            self.written[item.job.id] = item
        return Recorded(len(finished))

    async def session_totals(self, session_ids: Any) -> dict[int, SessionTotals]:
        return {}

    async def live_rows(self, session_ids: Any) -> dict[int, int]:
        return {}

    async def rows_added(self, session_id: int, after_id: int) -> tuple[int, int]:
        return 0, after_id

    async def complete_session(self, session_id: int) -> bool:
        return False


class MemoryDaemons:
    async def register(self, **_: Any) -> None:
        return None

    async def forget_old(self) -> int:
        return 0

    async def beat(self, *_: Any, **__: Any) -> Live:
        return Live(1, {})

    async def stop(self) -> None:
        return None


class MemoryStore:
    def __init__(self, rows: int) -> None:
        self.claims = MemoryClaims(rows)
        self.results = MemoryResults()
        self.daemons = MemoryDaemons()
        self.optouts = None
        self.suppressions = None


class HeldSender:
    """Each send waits until the test releases it; counts what is in flight."""

    def __init__(self, full: int) -> None:
        self.sent: list[int] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.release = asyncio.Event()
        self.full = asyncio.Event()  # `full` sends are held at once
        self._full_at = full

    async def send(self, job: Job, message: dict[str, Any]) -> SendResult:
        self.sent.append(job.id)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.in_flight >= self._full_at:
            self.full.set()
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1
        return SendResult(Outcome.SENT, wamid=f"wamid.{job.id}")

    async def close(self) -> None:
        return None


def settings(tmp_path: Path, concurrency: int) -> Settings:
    return Settings(
        database=DatabaseURL("127.0.0.1", 3306, "root", "", "unused"),
        concurrency=concurrency,
        rate_limit=0.0,
        poll_interval=0.01,
        pidfile=tmp_path / "worker.pid",
    )


async def test_the_loop_claims_no_more_than_its_free_slots_and_sends_each_row_once(tmp_path: Path) -> None:
    store, sender = MemoryStore(rows=50), HeldSender(full=8)
    daemon = Daemon.build(settings=settings(tmp_path, concurrency=8), store=store, sender=sender)  # type: ignore[arg-type]
    run = asyncio.create_task(daemon.run(once=True))
    await asyncio.wait_for(sender.full.wait(), 10)  # the first claim fills the slots, then the loop waits
    assert store.claims.limits == [8] and len(sender.sent) == 8
    sender.release.set()  # every send answers from now on
    report = await asyncio.wait_for(run, 10)

    assert sorted(sender.sent) == list(range(1, 51))  # each row sent once
    assert sender.most_in_flight <= 8 and all(limit <= 8 for limit in store.claims.limits)
    assert sorted(store.results.written) == list(range(1, 51))
    assert {f.decision.state for f in store.results.written.values()} == {RowState.SENT}
    assert report.outcomes["sent"] == 50 and report.exit_code == 0 and report.lost == 0


async def test_a_once_run_with_nothing_due_ends_at_once(tmp_path: Path) -> None:
    store, sender = MemoryStore(rows=0), HeldSender(full=1)
    daemon = Daemon.build(settings=settings(tmp_path, concurrency=4), store=store, sender=sender)  # type: ignore[arg-type]
    report = await asyncio.wait_for(daemon.run(once=True), 10)
    assert sender.sent == [] and store.claims.limits == [] and report.exit_code == 0
