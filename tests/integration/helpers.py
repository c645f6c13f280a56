from __future__ import annotations

import asyncio
from collections.abc import Callable
from random import Random

from worker.config import DatabaseURL, Settings
from worker.daemon.loop import Daemon, RunReport
from worker.daemon.policy import decide
from worker.daemon.sender import make_sender
from worker.models import Finished, Job, Outcome, SendResult
from worker.store import Store


async def drain(
    settings: Settings, *, once: bool = True, until: Callable[[], bool] | None = None, seconds: float = 30.0
) -> RunReport:
    """Run an in-process daemon: `--once`, or until `until()` holds (checked between polls)."""
    store = await Store.connect(
        settings.database,
        size=4,
        worker_id=settings.worker_id,
        db_timeout=settings.db_timeout,
        phone_number_id=settings.phone_number_id,  # as `run` opens it
    )
    sender = make_sender(settings)
    daemon = Daemon.build(settings=settings, store=store, sender=sender)
    try:
        if until is None:
            return await asyncio.wait_for(daemon.run(once=once), seconds)
        task = asyncio.create_task(daemon.run())
        async with asyncio.timeout(seconds):
            while not await asyncio.to_thread(until):  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # polls the database, bounded by the timeout
        daemon.request_stop()
        return await task
    finally:
        await sender.close()
        await store.close()


def decided(job: Job, result: SendResult) -> Finished:
    """The result the daemon writes for any answer, decided as the daemon decides it."""
    settings = Settings(database=DatabaseURL("127.0.0.1", 3306, "root", "", "unused"))
    return Finished(job, decide(result, attempt=1, settings=settings, rng=Random()))


def sent(job: Job, wamid: str) -> Finished:
    """The result the daemon writes for a send Meta accepted."""
    return decided(job, SendResult(Outcome.SENT, wamid=wamid))


def unsent(job: Job, code: int = 131026) -> Finished:
    """The result the daemon writes for a permanent error (the row ends in `error`)."""
    return decided(job, SendResult(Outcome.PERMANENT, error_code=code, error_text="Message undeliverable"))
