"""`run`: the daemon, with its pidfile, metrics endpoint and last-exit note."""

from __future__ import annotations

import argparse
import sys
import time

from worker.cli.common import open_checked_store, positive
from worker.config import ConfigError, Settings
from worker.daemon.serve import serve
from worker.exits import EX_CONFIG, EX_OK, EX_SOFTWARE, EX_UNAVAILABLE
from worker.log import get_logger
from worker.pidfile import AlreadyRunning, PidFile
from worker.store import DatabaseError
from worker.store.migrations import SchemaMismatch


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
            report = await serve(settings, store, once=args.once, max_rows=args.max, log=log)
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
