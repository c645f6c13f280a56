"""`run`: the daemon, with its pidfile, metrics endpoint and last-exit note."""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Any

from aiohttp import web

from worker import __version__
from worker.cli.common import open_checked_store, positive
from worker.config import ConfigError, Settings
from worker.daemon import Daemon, RunReport
from worker.exits import EX_CONFIG, EX_IOERR, EX_OK, EX_SOFTWARE, EX_UNAVAILABLE
from worker.log import get_logger, on_sink_lost
from worker.metrics import Metrics
from worker.metrics import serve as serve_metrics
from worker.pidfile import AlreadyRunning, PidFile
from worker.sender import make_sender
from worker.signals import stop_signals
from worker.store import DatabaseError, Store
from worker.store.migrations import SchemaMismatch
from worker.systemd import Notifier


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = commands.add_parser("run", help="run the daemon")
    run.add_argument("--once", action="store_true", help="drain what is due, then exit")
    run.add_argument(
        "--max", type=positive, metavar="N", help="with --once: send at most N rows, then exit (a cron cap)"
    )
    run.set_defaults(handler=cmd_run, needs_sender=True)


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    log = get_logger(worker_id=settings.worker_id)
    pidfile = PidFile(settings.pidfile)
    try:
        pidfile.acquire()
    except AlreadyRunning:
        print(
            f"whatsapp-worker: another instance is already processing "
            f"(pidfile {settings.pidfile} is locked); exiting"
        )
        return EX_OK
    except OSError as exc:
        print(
            f"whatsapp-worker: cannot open pidfile {settings.pidfile}: {exc.strerror}",
            file=sys.stderr,
        )
        return EX_CONFIG
    code, reason = EX_OK, ""
    try:
        # one connection each for the loop, the recorder, progress lines and the fleet beat, one spare
        store = await open_checked_store(settings, size=5)
        try:
            report = await _serve(settings, store, once=args.once, max_rows=args.max, log=log)
            code, reason = report.exit_code, report.reason or ""
            if reason:
                print(f"whatsapp-worker: {reason}", file=sys.stderr)
            return code
        finally:
            await store.close()
    except DatabaseError as exc:
        code, reason = (EX_CONFIG if isinstance(exc, SchemaMismatch) else EX_UNAVAILABLE), str(exc)
        raise
    except ConfigError as exc:  # found after start-up (the metrics port is taken)
        code, reason = EX_CONFIG, str(exc)
        raise
    except Exception as exc:  # a crash: `health` should still say what happened
        code, reason = EX_SOFTWARE, f"crashed: {type(exc).__name__}: {exc}"
        raise
    finally:
        _record_last_exit(settings, code, reason)
        pidfile.release()


def _record_last_exit(settings: Settings, code: int, reason: str) -> None:
    """Leave why the daemon stopped next to its pidfile, for `health` (best effort)."""
    path = settings.last_exit_path
    try:
        if code == EX_OK:
            path.unlink(missing_ok=True)
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            path.write_text(f"{stamp} exit {code}: {reason or 'see the log'}\n")
    except OSError:
        pass


async def _serve(
    settings: Settings, store: Store, *, once: bool, max_rows: int | None, log: Any
) -> RunReport:
    notifier = Notifier()
    sender = make_sender(settings)
    metrics = Metrics() if settings.metrics_port else None
    daemon = Daemon(settings=settings, store=store, sender=sender, notifier=notifier, metrics=metrics)
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
