"""The daemon's composition root: its sender, metrics endpoint, signals and log sink around
the loop. `cli/run.py` takes the pidfile and opens the store, then calls `serve`."""

from __future__ import annotations

import gc
from typing import Any

from aiohttp import web

from worker import __version__
from worker.config import ConfigError, Settings
from worker.daemon.loop import Daemon, RunReport
from worker.daemon.sender import make_sender
from worker.exits import EX_IOERR
from worker.log import on_sink_lost
from worker.metrics import Metrics
from worker.metrics import serve as serve_metrics
from worker.signals import stop_signals
from worker.store import DatabaseError, Store
from worker.systemd import Notifier


async def serve(settings: Settings, store: Store, *, once: bool, max_rows: int | None, log: Any) -> RunReport:
    notifier = Notifier()
    sender = make_sender(settings)
    metrics = Metrics() if settings.metrics_port else None
    daemon = Daemon.build(settings=settings, store=store, sender=sender, notifier=notifier, metrics=metrics)
    endpoint = await _serve_metrics(settings, store, metrics, daemon) if metrics else None
    log.info(
        "started",
        version=__version__,
        sender=settings.sender,
        once=once,
        concurrency=settings.concurrency,
        rate_limit=settings.rate_limit,
        database=settings.database.redacted(),
        pidfile=str(settings.pidfile),
    )
    notifier.notify(ready=1, status="sending")
    _tune_gc()
    # A log reader that went away (a closed pipe) must not cost a result: logging only
    # observes. The daemon then drains, records everything and exits 74 so the supervisor
    # restarts it with a working log sink, instead of sending on with nobody watching.
    on_sink_lost(lambda: daemon.request_stop(exit_code=EX_IOERR, reason="the log output was closed"))
    try:
        with stop_signals(daemon.on_signal):
            report = await daemon.run(once=once, max_rows=max_rows)
    finally:
        await sender.close()
        if endpoint:
            await endpoint.cleanup()
    return report


async def _serve_metrics(settings: Settings, store: Store, metrics: Metrics, daemon: Daemon) -> web.AppRunner:
    async def refresh() -> None:
        try:
            # rows of sessions held by quiet hours are waiting, not late: the alerts on these
            # gauges would fire every night otherwise
            held = daemon.sessions_held()
            due, age = (0, 0.0) if held is None else await store.claims.queue_due(held)
        except DatabaseError:
            return  # the scrape still answers, with the last known values
        metrics.queue_due.set(due)
        metrics.oldest_due_age.set(age)

    try:
        return await serve_metrics(
            metrics, host=settings.metrics_host, port=settings.metrics_port, refresh=refresh
        )
    except OSError as exc:
        raise ConfigError(
            f"WORKER_METRICS_PORT {settings.metrics_port} on {settings.metrics_host}: {exc.strerror}"
        ) from None


GC_THRESHOLD = 50_000  # allocations between young-generation collections (default 700)


def _tune_gc() -> None:
    """Start-up objects (modules, settings, the pool) never die: move them out of the
    collector's sight, and collect young objects less often. Per-message objects are freed by
    reference counting; the collector only looks for cycles, and the default thresholds made
    it run every few hundred allocations (16-18% of the daemon's CPU)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 50, 100)
