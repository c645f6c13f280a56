"""`enqueue`: queue a session's messages from a CSV file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worker.cli.common import open_checked_store
from worker.config import Settings
from worker.enqueue import MAX_ERRORS_SHOWN, CsvError, MessageSpec, read_rows
from worker.exits import EX_DATAERR, EX_OK


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    enqueue = commands.add_parser("enqueue", help="queue a session's messages from a CSV file")
    enqueue.add_argument("--session", required=True, help="session name (re-used if it exists)")
    enqueue.add_argument("--template", help="approved template name")
    enqueue.add_argument("--language", help="template language code, e.g. es")
    enqueue.add_argument("--text", help="text body; {{1}}, {{2}}... take the extra CSV columns")
    enqueue.add_argument("--csv", required=True, type=Path, help="CSV with a phone column")
    enqueue.set_defaults(handler=cmd_enqueue)


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
    store = await open_checked_store(settings)
    try:
        session_id, added, existing = await store.sessions.enqueue(session, rows)
    finally:
        await store.close()
    print(f"session #{session_id} {session!r}: queued {added} new message(s), {existing} already queued")
    return EX_OK
