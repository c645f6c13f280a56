"""`enqueue`: queue a session's messages from a CSV file (see worker/enqueue.py for the passes)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TextIO, TypeVar

from worker.campaign_csv import (
    MAX_ERRORS_SHOWN,
    BadFlag,
    CsvError,
    CsvSource,
    MessageSpec,
    describe,
    phone_number_id,
    schedule,
    send_window,
    time_zone,
)
from worker.cli.common import open_checked_store
from worker.config import Settings
from worker.exits import EX_DATAERR, EX_OK
from worker.store.producers import EnqueueReport, EnqueueRequest

EX_USAGE = 2  # what argparse returns for a bad command line
PROGRESS_EVERY = 0.25  # seconds between two refreshes of the progress line

T = TypeVar("T", bound=Sequence[object])


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    enqueue = commands.add_parser(
        "enqueue",
        help="queue a session's messages from a CSV file",
        description=(
            "Queue one message per CSV row. Header: phone (or telefono, teléfono; required), client_id"
            " (optional); every other column, in order, is a template body parameter or fills {{1}},"
            " {{2}}... of --text. Values must not hold control characters (nor, in a template parameter,"
            " line breaks, tabs or more than 4 spaces in a row)."
            " The whole file is checked before anything is queued; re-running it queues nothing twice."
        ),
    )
    enqueue.add_argument("--session", required=True, help="session name (re-used if it exists)")
    enqueue.add_argument("--template", help="approved template name")
    enqueue.add_argument("--language", help="template language code, e.g. es")
    enqueue.add_argument("--text", help="text body; {{1}}, {{2}}... take the extra CSV columns")
    enqueue.add_argument(
        "--csv", required=True, type=Path, help="CSV with a phone (or telefono) column (, ; or tab)"
    )
    enqueue.add_argument(
        "--at", metavar="'YYYY-MM-DD HH:MM'", help="send the new rows from this local time (see --timezone)"
    )
    enqueue.add_argument(
        "--timezone",
        metavar="ZONE",
        help="IANA time zone of --at and --window, e.g. America/Lima (default UTC)",
    )
    enqueue.add_argument(
        "--window", metavar="HH:MM-HH:MM", help="send this session's rows only between these local times"
    )
    enqueue.add_argument(
        "--phone-number-id", metavar="ID", help="send from this number (default: WHATSAPP_PHONE_NUMBER_ID)"
    )
    enqueue.add_argument(
        "--keep-queued",
        action="store_true",
        help="when a phone is already queued with another message, keep that one and add the new phones",
    )
    enqueue.add_argument(
        "--dry-run", action="store_true", help="check the file and say what would be queued; write nothing"
    )
    enqueue.set_defaults(handler=cmd_enqueue)


async def cmd_enqueue(settings: Settings, args: argparse.Namespace) -> int:
    try:
        request, spec = _request(args)
    except BadFlag as exc:
        print(f"whatsapp-worker: {exc}", file=sys.stderr)
        return EX_USAGE
    progress = Progress(sys.stderr)
    try:
        source = CsvSource(args.csv, spec)
    except CsvError as exc:
        return _refuse_file(exc)
    for name in source.unused:
        print(f"whatsapp-worker: note: column {name!r} is not used by --text", file=sys.stderr)
    store = await open_checked_store(settings)
    try:
        source.column_charset = await store.producers.message_charset()
        source.default_country = settings.default_country
        report = await store.producers.enqueue(
            request,
            progress.count(source.read(first=True), "checked"),
            lambda: progress.count(source.read(first=False), "queued", of=progress.checked),
        )
    except CsvError as exc:
        progress.done()  # before the problems are printed
        return _refuse_file(exc)
    finally:
        progress.done()
        await store.close()
    return _tell(args, request, report)


def _request(args: argparse.Namespace) -> tuple[EnqueueRequest, MessageSpec]:
    if (args.text is None) == (args.template is None):
        raise BadFlag("enqueue needs either --template NAME --language CODE or --text BODY")
    if args.template is not None and not (args.template.strip() and args.language and args.language.strip()):
        raise BadFlag("--template needs a name and --language CODE")
    if args.text is not None and not args.text.strip():
        raise BadFlag("--text is empty")
    session = args.session.strip()
    if not session or len(session) > 191:
        raise BadFlag("--session must be 1 to 191 characters")
    zone = time_zone(args.timezone) if args.timezone is not None else None
    if zone is not None and args.at is None and args.window is None:
        raise BadFlag("--timezone goes with --at or --window")
    window = send_window(args.window) if args.window is not None else None
    request = EnqueueRequest(
        session=session,
        next_attempt_at=schedule(args.at, zone or time_zone("UTC")) if args.at is not None else None,
        phone_number_id=phone_number_id(args.phone_number_id) if args.phone_number_id is not None else None,
        send_window=window,
        time_zone=(zone.key if zone is not None else "UTC") if window is not None else None,
        keep_queued=args.keep_queued,
        dry_run=args.dry_run,
    )
    return request, MessageSpec(args.template, args.language, args.text)


def _refuse_file(exc: CsvError) -> int:
    print(f"whatsapp-worker: {exc.path}: nothing was queued; fix these lines:", file=sys.stderr)
    for problem in exc.problems[:MAX_ERRORS_SHOWN]:
        print(f"  {problem}", file=sys.stderr)
    if exc.total > len(exc.problems[:MAX_ERRORS_SHOWN]):
        print(f"  ... and {exc.total - len(exc.problems[:MAX_ERRORS_SHOWN]):,} more", file=sys.stderr)
    return EX_DATAERR


def _tell_dry_run(name: str, request: EnqueueRequest, report: EnqueueReport, settings: list[str]) -> None:
    print(f"dry run: {name}{'' if report.session_id else ' (new)'}: nothing was written")
    kept = " (kept: --keep-queued)" if report.differing and request.keep_queued else ""
    print(
        f"  {report.rows:,} row(s) in the file: {report.added:,} new, {report.identical:,} already"
        f" queued with the same message, {report.differing:,} queued with another message{kept}"
    )
    if report.sample is not None:
        print(f"  sample message: {describe(report.sample, 200)}")
    for line in settings:
        print(f"  would set {line}")
    _notes(request, report)


def _tell(args: argparse.Namespace, request: EnqueueRequest, report: EnqueueReport) -> int:
    """Say what happened (or would), on stdout; refusals and notes on stderr."""
    name = (
        f"session #{report.session_id} {request.session!r}"
        if report.session_id
        else f"session {request.session!r}"
    )
    refused = bool(report.differing and not request.keep_queued)
    settings = _settings(request, report)
    if request.dry_run:
        _tell_dry_run(name, request, report, settings)
    if refused:
        assert report.example is not None
        phone, old, new = report.example
        print(
            f"whatsapp-worker: {name}: {report.differing:,} row(s) of {args.csv} would queue a different"
            f" message than the one already queued for the same phone, e.g. {phone}:\n"
            f"  queued:    {describe(old)}\n"
            f"  this file: {describe(new)}\n"
            f"{'a real run would queue nothing' if request.dry_run else 'nothing was queued'}:"
            " to keep the queued messages and add only the new phones, run again with --keep-queued"
            " (or use a new --session name for the new message).",
            file=sys.stderr,
        )
        return EX_DATAERR
    if request.dry_run:
        return EX_OK
    created = " (new)" if report.created else ""
    print(
        f"{name}{created}: queued {report.added:,} new message(s),"
        f" {report.rows - report.added:,} already queued"
        + (
            f" ({report.differing:,} of them with another message, kept as queued)"
            if report.differing
            else ""
        )
    )
    for line in settings:
        print(f"  {'' if report.created else 'changed '}{line}")
    _notes(request, report)
    return EX_OK


def _settings(request: EnqueueRequest, report: EnqueueReport) -> list[str]:
    """The session settings this run sets or changes, as `what: new (was old)`."""
    before = report.before
    lines = []
    if request.phone_number_id is not None:
        old = before["phone_number_id"] if before else None
        if before is None or old != request.phone_number_id:
            was = "" if before is None else f" (was {old or 'the default number'})"
            lines.append(f"sending number: {request.phone_number_id}{was}")
    if request.send_window is not None:
        new = f"{request.send_window} {request.time_zone}"
        old_window = before["send_window"] if before else None
        old = f"{old_window} {before['time_zone'] or 'UTC'}" if before and old_window else None
        if before is None or old != new:
            was = "" if before is None else f" (was {old or 'none: any time'})"
            lines.append(f"send window: {new}{was}")
    return lines


def _notes(request: EnqueueRequest, report: EnqueueReport) -> None:
    at = request.next_attempt_at
    if at is None:
        return
    when = f"{at:%Y-%m-%d %H:%M} UTC"
    if report.now is not None and at <= report.now:
        print(f"whatsapp-worker: note: --at {when} is in the past: the new rows are due now", file=sys.stderr)
    else:
        print(f"  new rows due from {when}")
    if report.rows - report.added > 0 and not request.dry_run:
        print(
            "whatsapp-worker: note: --at applies to the new rows only; rows already queued keep their time",
            file=sys.stderr,
        )


class Progress:
    """One line on a terminal, refreshed in place a few times a second; nothing on a pipe."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._live = stream.isatty()
        self._shown = False
        self._last = 0.0
        self.checked = 0  # valid rows of the first pass: the total of the second's line

    def count(self, batches: Iterable[T], verb: str, *, of: int = 0) -> Iterator[T]:
        """Pass the batches through, counting their rows on the line: at the first batch, at
        most every PROGRESS_EVERY seconds after it, and once more at the end of the pass."""
        done, started = 0, time.monotonic()
        for batch in batches:
            done += len(batch)
            if verb == "checked":
                self.checked = done
            now = time.monotonic()
            if self._live and (done == len(batch) or now - self._last >= PROGRESS_EVERY):
                self._draw(verb, done, of, now - started)
                self._last = now
            yield batch
        if self._live and done:
            self._draw(verb, done, of, time.monotonic() - started)

    def _draw(self, verb: str, done: int, of: int, seconds: float) -> None:
        total = f" of {of:,}" if of else ""
        rate = f" ({done / seconds:,.0f}/s)" if seconds > 0.5 else ""
        self._stream.write(f"\r{verb} {done:,}{total} rows{rate}\x1b[K")
        self._stream.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = False
