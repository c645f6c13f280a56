"""`status` and `health`: what the daemons and the sessions are doing."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from worker.cli.common import open_checked_store
from worker.config import Settings
from worker.exits import EX_OK
from worker.pidfile import PidFile


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    health_parser = commands.add_parser(
        "health", help="exit 0 if the local daemon is alive and making progress"
    )
    health_parser.set_defaults(local=health)

    status = commands.add_parser("status", help="per-session progress")
    status.add_argument("--session", help="only this session (id or name)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=cmd_status)


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
    store = await open_checked_store(settings)
    try:
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
