"""The receiver's composition root (`whatsapp-worker webhook`): the writer, the settler, the
HTTP app, the metrics endpoint, signals and the systemd watchdog, until SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from aiohttp import web

from worker import __version__
from worker.config import ConfigError, Settings
from worker.exits import EX_IOERR, EX_OK
from worker.log import on_sink_lost
from worker.signals import stop_signals
from worker.store import Store
from worker.store.statuses import Stored
from worker.systemd import Notifier
from worker.webhook.app import LINGER, PATH, Receiver
from worker.webhook.connections import RESERVED_DESCRIPTORS, DescriptorBudget, descriptor_budget
from worker.webhook.metrics import WebhookMetrics, metrics_app
from worker.webhook.settler import Settler
from worker.webhook.writer import StatusWriter

SHUTDOWN_TIMEOUT = 10.0  # seconds for requests in progress to finish after SIGTERM
GC_THRESHOLD = 50_000  # allocations between young-generation collections (default 700)


async def run_receiver(settings: Settings, store: Store, *, log: Any) -> int:
    """Serve until SIGTERM/SIGINT/SIGHUP; then stop accepting, let requests in progress get
    their answer (their batch committed), and stop. Exit code: 0, or 74 when the log output
    was lost (a closed pipe): every status it acknowledged is stored, and the supervisor
    restarts it with a log that works, as it does the daemon."""
    metrics = WebhookMetrics()
    notifier = Notifier()
    watchdog = _Watchdog(notifier)
    settler = Settler(statuses=store.statuses, metrics=metrics, log=log, on_turn=watchdog.ping)

    def on_stored(stored: Stored) -> None:
        settler.poke()
        if stored.optouts:
            metrics.optouts.inc(stored.optouts)
            log.info("opted_out", source="keyword", phones=stored.optouts)
        if stored.said_before_removal:
            log.info(
                "optout_replay_ignored",
                stops=stored.said_before_removal,
                action="said before `optout remove`: not opted out again (Meta's retry or a replayed body)",
            )

    writer = StatusWriter(
        statuses=store.statuses, log=log, on_stored=on_stored, max_wait=settings.webhook_max_wait
    )
    budget = descriptor_budget(settings.webhook_max_connections)
    receiver = Receiver(
        settings=settings, writer=writer, metrics=metrics, log=log, max_connections=budget.max_connections
    )
    runner = web.AppRunner(
        receiver.app(),
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        lingering_time=LINGER,
        keepalive_timeout=settings.webhook_idle_timeout,  # aiohttp's default keeps one an hour
    )
    await runner.setup()
    assert runner.server is not None  # set by setup()
    receiver.connections.watch(runner.server)
    metrics_runner: web.AppRunner | None = None
    tasks: list[asyncio.Task[None]] = []
    _tune_gc()
    try:
        port = await _listen(runner, settings.webhook_host, settings.webhook_port, "WORKER_WEBHOOK_PORT")
        metrics_runner = await _serve_metrics(settings, metrics)
        tasks = [asyncio.create_task(writer.run()), asyncio.create_task(settler.run())]
        exit_code = await _until_stopped(settings, budget, port, notifier, log)
    finally:
        await runner.cleanup()  # no new requests; those in progress finish (their batch commits)
        writer.close()
        settler.stop()
        if tasks:
            await asyncio.gather(*tasks)
        if metrics_runner is not None:
            await metrics_runner.cleanup()
    log.info("webhook_stopped")
    return exit_code


def _tune_gc() -> None:
    """As the daemon does: start-up objects (modules, settings, the pool) never die, so they
    leave the collector's sight, and young objects are collected less often. A request's
    objects are freed by reference counting; the collector only looks for cycles, and the
    default thresholds made it run every few hundred allocations."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 50, 100)


async def _serve_metrics(settings: Settings, metrics: WebhookMetrics) -> web.AppRunner | None:
    """The receiver's own /metrics, when WORKER_WEBHOOK_METRICS_PORT asks for it."""
    if not settings.webhook_metrics_port:
        return None
    runner = web.AppRunner(metrics_app(metrics), access_log=None)
    await runner.setup()
    await _listen(runner, settings.metrics_host, settings.webhook_metrics_port, "WORKER_WEBHOOK_METRICS_PORT")
    return runner


async def _until_stopped(
    settings: Settings, budget: DescriptorBudget, port: int, notifier: Notifier, log: Any
) -> int:
    """Say it is ready, then wait for a stop signal (EX_OK) or a lost log output (EX_IOERR)."""
    stop = asyncio.Event()
    exit_code = EX_OK

    def on_signal(name: str) -> None:
        log.info("stop_requested", signal=name)
        notifier.notify(stopping=1)
        stop.set()

    def on_log_lost() -> None:
        nonlocal exit_code
        exit_code = EX_IOERR
        stop.set()

    on_sink_lost(on_log_lost)
    with stop_signals(on_signal):
        log.info(
            "webhook_started",
            version=__version__,
            host=settings.webhook_host,
            port=port,
            path=PATH,
            metrics_port=settings.webhook_metrics_port or None,
            database=settings.database.redacted(),
            max_connections=budget.max_connections,
            max_connections_wanted=budget.wanted if budget.lowered else None,
            open_files_limit=budget.open_files_limit,
            idle_timeout=settings.webhook_idle_timeout,
            unverified_bytes=settings.webhook_unverified_bytes,
        )
        _warn_if_lowered(budget, log)  # after webhook_started: the line tools wait for comes first
        notifier.notify(ready=1, status=f"listening on {settings.webhook_host}:{port}{PATH}")
        await stop.wait()
    return exit_code


def _warn_if_lowered(budget: DescriptorBudget, log: Any) -> None:
    """WORKER_WEBHOOK_MAX_CONNECTIONS did not fit the open files limit: say what is in force."""
    if budget.lowered:
        log.warning(
            "webhook_max_connections_lowered",
            wanted=budget.wanted,
            max_connections=budget.max_connections,
            open_files_limit=budget.open_files_limit,
            reserved=RESERVED_DESCRIPTORS,
            fix="raise LimitNOFILE= (systemd) or ulimits nofile (compose)",
        )


async def _listen(runner: web.AppRunner, host: str, port: int, variable: str) -> int:
    """Bind, and return the port (the one the system chose when 0 asked for any free one)."""
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        raise ConfigError(f"{variable} {port} on {host}: {exc.strerror or exc}") from None
    return int(runner.addresses[-1][1])


class _Watchdog:
    """WATCHDOG=1 when the settler's loop goes round (at least every SWEEP_EVERY), no more often
    than systemd asks for."""

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier
        self._last = 0.0

    def ping(self) -> None:
        every = self._notifier.watchdog_interval
        now = time.monotonic()
        if every is not None and now - self._last >= min(every, 1.0):
            self._last = now
            self._notifier.notify(watchdog=1)
