"""`status` and `health`: what the daemons and the sessions are doing."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from worker.cli.common import open_checked_store
from worker.cli.output import printable
from worker.config import LocalFiles, Settings
from worker.daemon.fleet import LIVE_HORIZON
from worker.exits import EX_OK
from worker.pidfile import PidFile
from worker.store import DatabaseError, Hold, Store
from worker.store.holds import ALL

# A daemon beats its row about once a second: one silent for longer (or for three of the
# WORKER_FLEET_BEAT this host is configured with, if more) is dead or cut off.
LIVE_WITHIN = 5.0
SEEN_WITHIN = 600.0  # seconds: stopped and dead daemons are shown this long
WATCH_EVERY = 2.0  # seconds between `status --watch` refreshes by default
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    health_parser = commands.add_parser(
        "health", help="exit 0 if the local daemon is alive and making progress"
    )
    health_parser.set_defaults(local=health)

    status = commands.add_parser("status", help="the daemons, any sending pause, and per-session progress")
    status.add_argument("--session", help="only this session (id or name), with its webhook counts")
    status.add_argument(
        "--all", action="store_true", help="finished and cancelled sessions too (default: the active ones)"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--watch",
        nargs="?",
        const=WATCH_EVERY,
        type=_interval,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {WATCH_EVERY:g}) until Ctrl-C",
    )
    status.set_defaults(handler=cmd_status)


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0.1 and 3600 seconds, got {text}")
    return value


def health(settings: LocalFiles) -> int:
    """Healthy: a process holds the pidfile lock and its loop went round recently.

    Reads two local files and nothing else, so it is cheap enough for a container HEALTHCHECK.
    """
    try:
        holder = PidFile(settings.pidfile).holder()
    except PermissionError as exc:
        print(
            f"unknown: this user may not read {settings.pidfile} ({exc.strerror}):"
            " run health as root or as the service's user (`sudo whatsapp-worker health`)"
        )
        return 1
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


@dataclass(frozen=True, slots=True)
class View:
    """What `status` was asked to show."""

    session_id: int | None  # one session (with its webhook counts), or the sessions below
    everything: bool  # `--all`: finished and cancelled sessions too
    live_within: float  # seconds: a daemon silent for longer is dead


async def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    store = await open_checked_store(settings)
    try:
        session_id = None if args.session is None else await store.sessions.resolve(args.session)
        # Dead: silent for longer than the fleet's own horizon (WORKER_FLEET_BEAT is shared).
        live_within = max(LIVE_WITHIN, LIVE_HORIZON * settings.fleet_beat)
        view = View(session_id, args.all, live_within)
        if args.watch is not None:
            return await _watch(store, view, every=args.watch, as_json=args.json)
        _write(_render(await _report(store, view), as_json=args.json))
    finally:
        await store.close()
    return EX_OK


async def _report(store: Store, view: View, *, watching: bool = False) -> dict[str, Any]:
    """The report; the webhook counts of `--session` read every sent row of it, so never under
    `--watch`."""
    daemons = await store.daemons.list(within=SEEN_WITHIN)
    webhooks = view.session_id is not None and not watching
    shown = await store.reports.status(view.session_id, everything=view.everything, webhooks=webhooks)
    holds = await store.holds.list()
    report = build_report(daemons, shown.sessions, live_within=view.live_within, holds=holds)
    report["finished_not_shown"] = shown.finished
    return report


async def _screen(store: Store, view: View, header: str) -> str:
    """One `--watch` frame for a terminal: the header, pauses and daemons always, then the
    sessions that fit (only those are read), then how many more there are."""
    daemons, holds = await store.daemons.list(within=SEEN_WITHIN), await store.holds.list()
    fleet = build_report(daemons, [], live_within=view.live_within, holds=holds)
    head = [header, "", *_head_lines(fleet), ""]
    columns, rows = shutil.get_terminal_size()
    room = rows - _rows_of(head, columns) - 1  # one row for the "+N more" line
    shown = await store.reports.status(
        view.session_id,
        everything=view.everything,
        limit=max(0, room // SESSION_ROWS_AT_LEAST),
        webhooks=False,
    )
    blocks = [_session_lines(session) for session in shown.sessions]
    tail = _finished_line(shown.finished) if shown.finished else None
    return "\n".join(fit_screen(head, blocks, unread=shown.unread, rows=rows, columns=columns, tail=tail))


async def _frame(store: Store, view: View, *, every: float, as_json: bool, terminal: bool) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    header = f"whatsapp-worker status  {stamp} UTC  every {every:g}s (Ctrl-C stops)"
    try:
        if terminal and not as_json:
            return CLEAR + await _screen(store, view, header)
        text = _render(await _report(store, view, watching=True), as_json=as_json, compact=True)
    except DatabaseError as exc:  # the database went away: say so, keep watching
        text = f"whatsapp-worker: database error: {exc}"
        if terminal and not as_json:
            return f"{CLEAR}{header}\n\n{text}"
    return text if as_json else f"--- {header}\n{text}\n"


async def _watch(store: Store, view: View, *, every: float, as_json: bool) -> int:
    """Redraw in place on a terminal, a new block each time elsewhere; Ctrl-C ends it (exit 0)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    terminal = sys.stdout.isatty()
    stopping = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            reading = asyncio.create_task(
                _frame(store, view, every=every, as_json=as_json, terminal=terminal)
            )
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                reading.cancel()
                with contextlib.suppress(BaseException):
                    await reading
                break
            # On a terminal the frame ends on its last row: a newline there would scroll the
            # header off a full screen.
            if not _write(reading.result(), end="" if terminal and not as_json else "\n"):
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stopping), every)
    finally:
        stopping.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if terminal and not as_json:
        _write("")  # the prompt starts below the last frame
    return EX_OK


def _write(text: str, *, end: str = "\n") -> bool:
    """Print; False once the reader has gone (`status --watch | head`)."""
    try:
        print(text, end=end, flush=True)
    except BrokenPipeError:
        # Python would report the failed flush again at exit: point stdout at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return False
    return True


# -- the report (pure: rows in, what an operator reads out) ----------------------------------


def build_report(
    daemons: Sequence[dict[str, Any]],
    sessions: list[dict[str, Any]],
    *,
    live_within: float = LIVE_WITHIN,
    holds: Sequence[Hold] = (),
) -> dict[str, Any]:
    """The operator's holds, daemons marked live / dead / stopped, the sending pauses of the
    live ones, the sessions.

    Every time is the database's UTC clock: `beat_at + beat_age` is its "now".
    """
    order = {"live": 0, "dead": 1, "stopped": 2}
    fleet = sorted((_daemon(row, live_within) for row in daemons), key=lambda d: order[d["condition"]])
    pauses: dict[str, dict[str, Any]] = {}
    for daemon in fleet:
        reason = daemon["paused_reason"]
        if not daemon["live"] or not reason:
            continue
        pause = pauses.setdefault(reason, {"reason": reason, "since": None, "until": None, "daemons": []})
        pause["daemons"].append(daemon["worker_id"])
        since, until, now = daemon["paused_since"], daemon["paused_until"], daemon["now"]
        if since is not None and (pause["since"] is None or since < pause["since"]):
            pause["since"] = since
            pause["since_seconds"] = round((now - since).total_seconds(), 1)
        if until is not None and (pause["until"] is None or until > pause["until"]):
            pause["until"] = until
            pause["until_seconds"] = round((until - now).total_seconds(), 1)
    for daemon in fleet:
        del daemon["now"]
    held = [{"scope": h.scope, "reason": h.reason, "since": h.since} for h in holds]
    return {"holds": held, "daemons": fleet, "pauses": list(pauses.values()), "sessions": sessions}


def _daemon(row: dict[str, Any], live_within: float) -> dict[str, Any]:
    daemon = dict(row)
    age = float(daemon["beat_age"])
    daemon["now"] = daemon["beat_at"] + timedelta(seconds=age)
    daemon.update(
        beat_age=round(age, 1),
        rate=float(daemon["rate"]),
        rate_share=float(daemon["rate_share"]),
        live=daemon["stopped_at"] is None and age <= live_within,
    )
    daemon["condition"] = (
        "stopped" if daemon["stopped_at"] is not None else "live" if daemon["live"] else "dead"
    )
    return daemon


def _render(report: dict[str, Any], *, as_json: bool, compact: bool = False) -> str:
    if as_json:
        return json.dumps(report, indent=None if compact else 2, default=_json_value)
    finished = report.get("finished_not_shown", 0)
    lines = [*_head_lines(report), ""]
    if not report["sessions"]:
        lines.append("no active sessions" if finished else "no sessions")
    for session in report["sessions"]:
        lines += _session_lines(session)
    if finished:
        lines.append(_finished_line(finished))
    return "\n".join(lines)


def _head_lines(report: dict[str, Any]) -> list[str]:
    """What comes first, and stays on screen under `--watch`: the operator's holds, the pauses,
    then the daemons."""
    holds = [_hold_line(hold) for hold in report.get("holds", ())]
    return holds + [_pause_line(pause) for pause in report["pauses"]] + _daemon_lines(report["daemons"])


def _hold_line(hold: dict[str, Any]) -> str:
    what = "every number" if hold["scope"] == ALL else f"number {hold['scope']}"
    reason = f": {printable(hold['reason'])}" if hold["reason"] else ""
    return f"HELD by an operator since {_utc(hold['since'])}: {what}{reason} (`resume` lets it send)"


def _finished_line(count: int) -> str:
    return f"{count:,} finished session(s) not shown (status --all shows them)"


SESSION_ROWS_AT_LEAST = 2  # a session's head line and its counts


def fit_screen(
    head: list[str], blocks: list[list[str]], *, unread: int, rows: int, columns: int, tail: str | None = None
) -> list[str]:
    """The head whole, then the sessions' blocks that fit in `rows` (each line wraps to the rows
    it takes at `columns`), then `+N more session(s)` for the blocks cut and the `unread`
    sessions, or else `tail` if it fits."""
    lines, used = list(head), _rows_of(head, columns)
    for shown, block in enumerate(blocks):
        after = len(blocks) - shown - 1 + unread
        if used + _rows_of(block, columns) + (1 if after else 0) > rows:
            return [*lines, f"+{len(blocks) - shown + unread} more session(s)"]
        lines += block
        used += _rows_of(block, columns)
    if unread:
        return [*lines, f"+{unread} more session(s)"]
    if tail is not None and used + _rows_of([tail], columns) <= rows:
        lines.append(tail)
    return lines


def _rows_of(lines: list[str], columns: int) -> int:
    """Terminal rows the lines take, each wrapped at `columns`."""
    return sum(max(1, -(-_width(line) // max(1, columns))) for line in lines)


def _width(text: str) -> int:
    """Columns a line takes: wide (CJK, most emoji) characters two, combining marks none."""
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text
    )


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _pause_line(pause: dict[str, Any]) -> str:
    text = "PAUSED"
    if pause["since"] is not None:
        text += f" since {_utc(pause['since'])} ({_age(pause['since_seconds'])} ago)"
    if pause["until"] is not None:
        left = pause["until_seconds"]
        probe = f"probe in {_age(left)}" if left > 0 else "probing now"
        text += f" until {_utc(pause['until'])} ({probe})"
    daemons = ", ".join(pause["daemons"])
    return f"{text}: {printable(pause['reason'])}  [{printable(daemons)}]"


NUMERIC = (1, 6, 7, 8)  # right-aligned columns
DAEMON_COLUMNS = (
    "host",
    "pid",
    "version",
    "started (UTC)",
    "beat",
    "state",
    "in flight",
    "sent/s",
    "share/s",
)


def _daemon_lines(daemons: list[dict[str, Any]]) -> list[str]:
    live = [d for d in daemons if d["live"]]
    if not daemons:
        minutes = SEEN_WITHIN / 60
        return [f"daemons: none seen in the last {minutes:.0f} minutes: nothing is sending"]
    total = sum(d["rate"] for d in live)
    lines = [f"daemons: {len(live)} live of {len(daemons)} seen, {total:.1f} sent/s together"]
    rows = [DAEMON_COLUMNS]
    for d in daemons:
        alive = d["condition"] == "live"
        state = d["state"] if alive else d["condition"].upper()
        rows.append(
            (
                printable(d["host"]),
                str(d["pid"]),
                d["version"],
                _utc(d["started_at"], zone=False),
                _age(d["beat_age"]),
                state,
                str(d["in_flight"]) if alive else "-",
                f"{d['rate']:.1f}" if alive else "-",
                f"{d['rate_share']:.1f}" if alive and d["rate_share"] else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(DAEMON_COLUMNS))]
    for row in rows:
        cells = [
            c.rjust(w) if i in NUMERIC else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


PHASES = {
    "sending": "sending",
    "waiting": "waiting",
    "paused": "PAUSED by the operator",
    "cancelled": "CANCELLED",
    "completed": "completed",
    "failed": "finished, nothing sent",
    "empty": "empty",
}


NOT_SENT_WORDS = (("cancelled", "cancelled"), ("opted_out", "opted out"), ("suppressed", "suppressed"))


def _session_lines(s: dict[str, Any]) -> list[str]:
    counts = s["counts"]
    states = [("enviado", s["sent"]), ("error", s["failed"])]
    states += [(word, s[kind]) for kind, word in NOT_SENT_WORDS if s[kind]]  # never sent, not errors
    states += [
        ("desconocido", s["unknown"]),
        ("pendiente", counts["pendiente"]),
        ("procesando", counts["procesando"]),
    ]
    tally = "    " + "  ".join(f"{name} {count:,}" for name, count in states)
    if s["pruned"]:
        tally += f"  (pruned {s['pruned']:,})"
    lines = [_session_head(s), tally]
    if s["delivered"] is not None and (s["sent"] or s["settled"]):
        lines.append(
            f"    delivered {s['delivered']:,}{_share(s['delivered'], s['sent'])}"
            f"  read {s['read']:,}{_share(s['read'], s['sent'])}"
            f"  settled by webhooks {s['settled']:,}"
        )
    for error in s["errors"][:5]:
        code = error["code"] if error["code"] is not None else "-"
        lines.append(f"    {error['state']} code {code} x{error['count']:,}: {printable(error['example'])}")
    return lines


def _session_head(s: dict[str, Any]) -> str:
    phase, due = s["phase"], s["next_due"]
    if phase == "unresolved":
        label = f"finished, {s['unknown']:,} unknown outcome(s) to resolve"
    elif phase == "scheduled":
        label = f"scheduled, starts {_minute(due)} UTC"
    elif phase == "waiting" and due is not None:
        label = f"waiting, next row due {_minute(due)} UTC"  # a retry's backoff
    else:
        label = PHASES.get(phase, phase)
    head = f"#{s['id']} {printable(s['name'])}  {label}  "
    if phase == "cancelled":
        head += f"[{s['sent']:,} sent, {s['cancelled']:,} cancelled (not sent) of {s['total']:,}]"
    else:
        percent = f" {100 * s['done'] // s['total']}%" if s["total"] else ""
        head += f"[{s['done']:,}/{s['total']:,}]{percent}"
    if s["rate"] or (s["waiting"] and due is None):  # no rate for rows that may not go yet
        window = "minute" if s["rate_window"] >= 59.5 else _age(s["rate_window"])
        head += f"  {s['rate']:.1f} sent/s (last {window})"
    if s["eta_seconds"] is not None:
        head += f"  ETA {_age(s['eta_seconds'])}"
    return head


def _minute(iso: str) -> str:
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M")


def _share(part: int, whole: int) -> str:
    return f" ({100 * part // whole}%)" if whole else ""


def _utc(moment: datetime, *, zone: bool = True) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") + (" UTC" if zone else "")


def _age(seconds: float) -> str:
    """0.4s, 41s, 4m02s, 2h03m, 3d04h."""
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"
