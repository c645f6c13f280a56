"""Command line: parse arguments, load settings, set up logging, run."""

from __future__ import annotations

import argparse
import asyncio
import csv
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NamedTuple

from aiohttp import web

from worker import __version__, schema
from worker.config import ConfigError, Settings
from worker.daemon import Daemon, RunReport
from worker.enqueue import MAX_ERRORS_SHOWN, CsvError, MessageSpec, read_rows
from worker.exits import EX_CONFIG, EX_DATAERR, EX_IOERR, EX_OK, EX_SOFTWARE, EX_UNAVAILABLE
from worker.log import configure, get_logger, on_sink_lost
from worker.metrics import Metrics
from worker.metrics import serve as serve_metrics
from worker.models import RowState, SessionState
from worker.pidfile import AlreadyRunning, PidFile
from worker.sender import make_sender
from worker.signals import stop_signals
from worker.store import DatabaseError, RefusedChange, Store
from worker.store.migrations import SchemaMismatch
from worker.systemd import Notifier


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whatsapp-worker",
        description="Drain the cola_envios queue through the WhatsApp Cloud API, each message once.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    migrate = commands.add_parser("migrate", help="create or upgrade the schema (in place)")
    migrate.add_argument(
        "--dry-run", action="store_true", help="print what is found and every statement; change nothing"
    )

    enqueue = commands.add_parser("enqueue", help="queue a session's messages from a CSV file")
    enqueue.add_argument("--session", required=True, help="session name (re-used if it exists)")
    enqueue.add_argument("--template", help="approved template name")
    enqueue.add_argument("--language", help="template language code, e.g. es")
    enqueue.add_argument("--text", help="text body; {{1}}, {{2}}... take the extra CSV columns")
    enqueue.add_argument("--csv", required=True, type=Path, help="CSV with a phone column")

    run = commands.add_parser("run", help="run the daemon")
    run.add_argument("--once", action="store_true", help="drain what is due, then exit")
    run.add_argument(
        "--max", type=_positive, metavar="N", help="with --once: send at most N rows, then exit (a cron cap)"
    )

    retry = commands.add_parser("retry", help="send a session's failed rows again")
    retry.add_argument("--session", required=True, help="session id or name")
    retry.add_argument("--code", type=int, help="only rows whose last error had this code (e.g. 131026)")
    retry.add_argument(
        "--include-unknown",
        action="store_true",
        help="also re-send rows whose outcome is unknown (they may have been delivered already)",
    )
    for name, text in (
        ("pause", "stop sending a session (in-flight sends finish)"),
        ("resume", "send a paused session again"),
        ("cancel", "stop a session for good: its waiting rows end in error"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("--session", required=True, help="session id or name")

    rows = commands.add_parser("rows", help="list a session's rows in a state (failed work, for a person)")
    rows.add_argument("--session", required=True, help="session id or name")
    rows.add_argument(
        "--state",
        action="append",
        choices=[state.value for state in RowState],
        help="repeatable; default: error and desconocido",
    )
    rows.add_argument("--code", type=int, help="only rows whose last error had this code")
    rows.add_argument("--csv", action="store_true", help="CSV with a header, for a spreadsheet")

    prune = commands.add_parser("prune", help="delete finished rows (enviado, error) in small batches")
    prune.add_argument(
        "--older-than",
        required=True,
        type=_age,
        metavar="AGE",
        help="e.g. 30d, 12h: rows finished before that",
    )
    prune.add_argument(
        "--deliveries", action="store_true", help="also delete envios_whatsapp rows older than AGE"
    )
    prune.add_argument("--dry-run", action="store_true", help="count only")

    commands.add_parser("health", help="exit 0 if the local daemon is alive and making progress")

    status = commands.add_parser("status", help="per-session progress")
    status.add_argument("--session", help="only this session (id or name)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


AGE_UNITS = {"d": 86400, "h": 3600, "m": 60}


class Age(NamedTuple):
    seconds: int
    text: str


def _age(text: str) -> Age:
    """`30d`, `12h`, `90m`."""
    number, unit = text[:-1], text[-1:].lower()
    if unit not in AGE_UNITS or not number.isdigit() or int(number) < 1:
        raise argparse.ArgumentTypeError(f"an age like 30d, 12h or 90m, got {text!r}")
    return Age(int(number) * AGE_UNITS[unit], text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "max", None) is not None and not args.once:
        parser.error("--max goes with --once")
    try:
        settings = Settings.from_env(need_sender=args.command == "run")
        if args.command == "health":
            return health(settings)
    except ConfigError as exc:
        print(f"whatsapp-worker: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    configure(
        secrets=settings.secrets(),
        stream=sys.stderr if args.command != "run" else None,
        fmt=settings.log_format,
        level=settings.log_level,
    )
    command = COMMANDS[args.command]
    try:
        return _run_loop(command(settings, args))
    except ConfigError as exc:  # found after start-up (e.g. the metrics port is taken)
        print(f"whatsapp-worker: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except SchemaMismatch as exc:
        print(f"whatsapp-worker: {exc}", file=sys.stderr)
        return EX_CONFIG  # systemd does not restart on it: a restart cannot fix the schema
    except DatabaseError as exc:
        print(f"whatsapp-worker: database error: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except RefusedChange as exc:
        print(f"whatsapp-worker: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run_loop(coro: Coroutine[Any, Any, int]) -> int:
    if os.environ.get("WORKER_EVENT_LOOP", "uvloop") == "asyncio":
        return asyncio.run(coro)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _open_store(settings: Settings, *, size: int = 2, create: bool = False) -> Store:
    return await Store.connect(
        settings.database,
        size=size,
        worker_id=settings.worker_id,
        db_timeout=settings.db_timeout,
        create_database=create,
    )


async def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    """Upgrade in place; `--dry-run` prints what it found and would run, and changes nothing."""
    where = settings.database.redacted()
    if args.dry_run:
        return await _migrate_dry_run(settings)
    store = await _open_store(settings, create=True)
    try:
        applied = await store.migrations.migrate()
    finally:
        await store.close()
    if applied.steps:
        for line in applied.found:
            print(f"found: {line}")
        for step in applied.steps:
            print(f"done: {step.why}")
    if applied.steps or applied.versions:
        print(f"migrated {where} to version {schema.LATEST} ({len(applied.steps)} statement(s) run)")
    else:
        print(f"schema of {where} is up to date (version {schema.LATEST})")
    return EX_OK


async def _migrate_dry_run(settings: Settings) -> int:
    where = settings.database.redacted()
    try:
        store = await _open_store(settings)
    except DatabaseError as exc:
        if exc.code != 1049:  # ER_BAD_DB_ERROR: the database does not exist yet
            raise
        print(f"dry run of migrate on {where}: the database does not exist; migrate would create it and:")
        for table in schema.TABLES:
            print(f"{table.create()};")
        return EX_OK
    try:
        plan = await store.migrations.plan()
    finally:
        await store.close()
    print(f"dry run of migrate on {where}: nothing is changed")
    for line in plan.found:
        print(f"found: {line}")
    for line in plan.blockers:
        print(f"blocked: {line} (migrate changes nothing until this is fixed by hand)")
    if not plan.steps:
        print("would run nothing: the tables have everything this worker needs")
    for step in plan.steps:
        print(f"-- {step.why}\n{step.sql};")
    print(f"then record schema version {schema.LATEST} in whatsapp_worker_migrations")
    return EX_OK


async def cmd_enqueue(settings: Settings, args: argparse.Namespace) -> int:
    if (args.text is None) == (args.template is None):
        print(
            "whatsapp-worker: enqueue needs either --template NAME --language CODE or --text BODY",
            file=sys.stderr,
        )
        return 2
    if args.template is not None and not args.language:
        print("whatsapp-worker: --template needs --language CODE", file=sys.stderr)
        return 2
    session = args.session.strip()
    if not session or len(session) > 191:
        print("whatsapp-worker: --session must be 1 to 191 characters", file=sys.stderr)
        return 2
    try:
        rows = read_rows(args.csv, MessageSpec(args.template, args.language, args.text))
    except CsvError as exc:
        print(f"whatsapp-worker: {exc.path}: nothing was queued; fix these lines:", file=sys.stderr)
        for problem in exc.problems[:MAX_ERRORS_SHOWN]:
            print(f"  {problem}", file=sys.stderr)
        if len(exc.problems) > MAX_ERRORS_SHOWN:
            print(f"  ... and {len(exc.problems) - MAX_ERRORS_SHOWN} more", file=sys.stderr)
        return EX_DATAERR
    store = await _open_store(settings)
    try:
        await _require_schema(store)
        session_id, added, existing = await store.sessions.enqueue(session, rows)
    finally:
        await store.close()
    print(f"session #{session_id} {session!r}: queued {added} new message(s), {existing} already queued")
    return EX_OK


async def _require_schema(store: Store) -> None:
    """Every table, column, key and state the code needs, not only a version number.

    Raises SchemaMismatch (a DatabaseError): one line naming what is missing.
    """
    await store.migrations.require()


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
    try:
        code, reason = EX_OK, ""
        store = await _open_store(settings, size=4)
        try:
            await _require_schema(store)
            report = await _serve(settings, store, once=args.once, max_rows=args.max, log=log)
            code, reason = report.exit_code, report.reason or ""
            if reason:
                print(f"whatsapp-worker: {reason}", file=sys.stderr)
            return code
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
            await store.close()
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
    endpoint = await _serve_metrics(settings, store, metrics) if metrics else None
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


async def _serve_metrics(settings: Settings, store: Store, metrics: Metrics) -> web.AppRunner:
    async def refresh() -> None:
        try:
            due, age = await store.claims.queue_due()
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


def health(settings: Settings) -> int:
    """Healthy: a process holds the pidfile lock and its loop went round recently.

    Reads two local files and nothing else, so it is cheap enough for a container HEALTHCHECK.
    """
    holder = PidFile(settings.pidfile).holder()
    if holder is None:
        try:
            last = f"; the last run stopped {settings.last_exit_path.read_text().strip()}"
        except OSError:
            last = ""
        print(f"unhealthy: no daemon holds {settings.pidfile}{last}")
        return 1
    try:
        age = time.time() - settings.heartbeat_path.stat().st_mtime
    except OSError:
        print(f"unhealthy: daemon {holder} has not written {settings.heartbeat_path} yet")
        return 1
    if age > settings.heartbeat_max_age:
        print(
            f"unhealthy: daemon {holder} last went round {age:.0f}s ago "
            f"(more than {settings.heartbeat_max_age:.0f}s)"
        )
        return 1
    try:
        state = settings.heartbeat_path.read_text().strip()
    except OSError:
        state = ""
    # A pause (account error, API unreachable) is not a crash: still healthy, but said.
    paused = f" ({state.split(';')[0]})" if state.startswith("paused") else ""
    print(f"healthy{paused}: daemon {holder}, last went round {age:.1f}s ago")
    return EX_OK


async def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    store = await _open_store(settings)
    try:
        await _require_schema(store)
        session_id = None if args.session is None else await store.sessions.resolve(args.session)
        sessions = await store.sessions.status(session_id)
    finally:
        await store.close()
    if args.json:
        print(json.dumps({"sessions": sessions}, indent=2, default=str))
        return EX_OK
    if not sessions:
        print("no sessions")
        return EX_OK
    for session in sessions:
        print(_format_session(session))
    return EX_OK


def _format_session(session: dict[str, Any]) -> str:
    counts, total = session["counts"], session["total"]
    done = counts["enviado"] + counts["error"] + counts["desconocido"]
    percent = f"{100 * done // total}%" if total else "-"
    states = "  ".join(f"{state} {count}" for state, count in counts.items())
    lines = [
        f"#{session['id']} {session['name']}  ({session['state']})  [{done}/{total}] {percent}"
        f"  {session['sent_last_minute'] / 60:.1f} sent/s over the last minute",
        f"    {states}",
    ]
    for error in session["errors"][:5]:
        code = error["code"] if error["code"] is not None else "-"
        lines.append(f"    {error['state']} code {code} x{error['count']}: {error['example']}")
    return "\n".join(lines)


async def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    store = await _open_store(settings)
    try:
        await _require_schema(store)
        session_id = await store.sessions.resolve(args.session)
        change = await store.sessions.retry_session(
            session_id, include_unknown=args.include_unknown, code=args.code
        )
    finally:
        await store.close()
    which = "error and unknown-outcome" if args.include_unknown else "error"
    print(f"session #{session_id}: {change.queued} {which} row(s) queued again")
    if change.waiting:
        until = change.until.strftime("%Y-%m-%d %H:%M:%S UTC") if change.until else "?"
        print(
            f"session #{session_id}: {change.waiting} unknown row(s) left alone: the daemon that sent"
            f" them may still record their true result (until {until}); retry after that"
        )
    return EX_OK


ROW_COLUMNS = ("id", "telefono", "cliente_id", "estado", "attempts", "last_error_code", "last_error", "wamid")
ROWS_PAGE = 1000


async def cmd_rows(settings: Settings, args: argparse.Namespace) -> int:
    """Page through the rows by id, printing as it goes: memory stays flat for any session."""
    states = args.state or [RowState.ERROR.value, RowState.UNKNOWN.value]
    writer = csv.writer(sys.stdout) if args.csv else None
    if writer:
        writer.writerow(ROW_COLUMNS)
    store = await _open_store(settings)
    try:
        await _require_schema(store)
        session_id = await store.sessions.resolve(args.session)
        after, shown = 0, 0
        while page := await store.sessions.rows(
            session_id, states=states, code=args.code, after_id=after, limit=ROWS_PAGE
        ):
            for row in page:
                if writer:
                    writer.writerow([row[c] if row[c] is not None else "" for c in ROW_COLUMNS])
                else:
                    code = row["last_error_code"] if row["last_error_code"] is not None else "-"
                    print(
                        f"#{row['id']}  {row['telefono']}  {row['estado']}  attempts {row['attempts']}"
                        f"  code {code}  {row['last_error'] or ''}"
                    )
            after, shown = page[-1]["id"], shown + len(page)
    finally:
        await store.close()
    if not writer:
        print(f"{shown} row(s) of session #{session_id} in {', '.join(states)}", file=sys.stderr)
    return EX_OK


async def cmd_prune(settings: Settings, args: argparse.Namespace) -> int:
    store = await _open_store(settings)
    try:
        await _require_schema(store)
        pruned = await store.pruner.prune(
            args.older_than.seconds, deliveries=args.deliveries, dry_run=args.dry_run
        )
    finally:
        await store.close()
    verb = "would delete" if args.dry_run else "deleted"
    kept = "" if args.deliveries else "; envios_whatsapp kept"
    print(f"{verb} {pruned.rows} finished row(s) of cola_envios older than {args.older_than.text}", end="")
    print(f", {pruned.deliveries} of envios_whatsapp" if args.deliveries else kept)
    return EX_OK


SESSION_COMMANDS = {
    "pause": (SessionState.PAUSED, "paused: {rows} waiting row(s) held back"),
    "resume": (SessionState.ACTIVE, "resumed: {rows} row(s) waiting to be sent"),
    "cancel": (SessionState.CANCELLED, "cancelled: {rows} waiting row(s) closed as error, not sent"),
}


async def cmd_session_state(settings: Settings, args: argparse.Namespace) -> int:
    state, message = SESSION_COMMANDS[args.command]
    store = await _open_store(settings)
    try:
        await _require_schema(store)
        session_id = await store.sessions.resolve(args.session)
        change = await store.sessions.set_session_state(session_id, state)
    finally:
        await store.close()
    if change.before == change.after:
        print(f"session #{session_id} was already {change.after}: nothing changed")
    else:
        print(f"session #{session_id} {message.format(rows=change.rows)}")
    return EX_OK


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "migrate": cmd_migrate,
    "enqueue": cmd_enqueue,
    "run": cmd_run,
    "status": cmd_status,
    "retry": cmd_retry,
    "rows": cmd_rows,
    "prune": cmd_prune,
    "pause": cmd_session_state,
    "resume": cmd_session_state,
    "cancel": cmd_session_state,
}
