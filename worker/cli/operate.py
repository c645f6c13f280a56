"""Acting on a session's rows: `retry`, `pause`, `resume`, `cancel`, `rows`, `prune`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from worker.cli.common import age, confirm, number_id, open_checked_store, parse_phone_or_none
from worker.cli.output import SafeCSV, printable
from worker.config import Settings
from worker.daemon.policy import classify_error
from worker.exits import EX_OK
from worker.messages import phone_variants
from worker.models import Outcome, RowState, SessionState, state_word
from worker.store import RefusedChange
from worker.store.claims import RECOVERED_DETAIL
from worker.store.holds import ALL
from worker.store.prune import Pruned
from worker.store.sessions import RetryPlan, RetryScope, RowStory


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    retry = commands.add_parser(
        "retry", help="send a session's failed rows again (says which, asks unless --yes)"
    )
    retry.add_argument("--session", required=True, help="session id or name")
    retry.add_argument("--code", type=int, help="only rows whose last error had this code (e.g. 130429)")
    retry.add_argument("--id", type=int, action="append", dest="ids", help="only this row (repeatable)")
    retry.add_argument("--phone", help="only this phone's rows (any form of the number)")
    unknown = retry.add_mutually_exclusive_group()
    unknown.add_argument(
        "--include-unknown",
        action="store_true",
        help="also re-send rows whose outcome is unknown (they may have been delivered already)",
    )
    unknown.add_argument(
        "--only-unknown",
        action="store_true",
        help="re-send only the rows whose outcome is unknown (they may have been delivered already)",
    )
    retry.add_argument(
        "--force",
        action="store_true",
        help="also rows whose error is permanent (131026 undeliverable, 100 bad parameter...):"
        " they fail again unless something changed",
    )
    retry.add_argument("--yes", action="store_true", help="send again without asking")
    retry.set_defaults(handler=cmd_retry)
    for name, text in (
        ("pause", "stop sending a session, one sending number or everything (in-flight sends finish)"),
        ("resume", "send a paused session, number or everything again"),
    ):
        command = commands.add_parser(name, help=text)
        which = command.add_mutually_exclusive_group(required=True)
        which.add_argument("--session", help="session id or name")
        which.add_argument("--all", action="store_true", help="every daemon of the fleet, every number")
        which.add_argument(
            "--number", type=number_id, metavar="PHONE_NUMBER_ID", help="one sending number, fleet-wide"
        )
        if name == "pause":
            command.add_argument("--reason", help="shown by `status` (with --all or --number)")
        command.set_defaults(handler=cmd_session_state)
    cancel = commands.add_parser("cancel", help="stop a session for good: its waiting rows end in error")
    cancel.add_argument("--session", required=True, help="session id or name")
    cancel.set_defaults(handler=cmd_session_state)

    rows = commands.add_parser(
        "rows", help="list a session's rows in a state (failed work, for a person), or one row's story"
    )
    rows.add_argument("--session", help="session id or name (required unless --id)")
    rows.add_argument(
        "--id",
        type=int,
        dest="row_id",
        help="one row's whole story: every attempt, each retry, Meta's statuses",
    )
    rows.add_argument(
        "--state",
        action="append",
        choices=[state.value for state in RowState],
        help="repeatable; default: error and desconocido",
    )
    rows.add_argument("--code", type=int, help="only rows whose last error had this code")
    rows.add_argument("--phone", help="only this phone's rows (any form of the number)")
    rows.add_argument("--client-id", type=int, help="only the rows of this cliente_id")
    rows.add_argument(
        "--csv", action="store_true", help="CSV with a header, for a spreadsheet (formulas neutralised)"
    )
    rows.set_defaults(handler=cmd_rows)

    prune = commands.add_parser("prune", help="delete finished rows (enviado, error) in small batches")
    prune.add_argument(
        "--older-than",
        required=True,
        type=age,
        metavar="AGE",
        help="90min, 12h, 30d or 4w: rows finished before that (a bare m is refused: minutes or months?)",
    )
    prune.add_argument(
        "--deliveries", action="store_true", help="also delete envios_whatsapp rows older than AGE"
    )
    prune.add_argument(
        "--statuses",
        action="store_true",
        help="also delete webhook statuses applied before AGE (they hold phones)",
    )
    prune.add_argument("--dry-run", action="store_true", help="say what it would delete, and stop")
    prune.add_argument("--yes", action="store_true", help="delete without asking (cron, systemd timers)")
    prune.set_defaults(handler=cmd_prune)


async def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    """Say which rows go again and which stay (permanent errors, unless --force); ask; send."""
    states = _retry_states(args)
    if args.code is not None and _permanent(args.code) and not args.force:
        raise RefusedChange(
            f"{args.code} is a permanent error: those rows would fail again. Nothing changed;"
            " add --force if what caused it has changed (a template fixed, a number now on WhatsApp)"
        )
    phones = _phone_forms(args.phone, settings) if args.phone else ()
    if phones is None:
        return 2
    store = await open_checked_store(settings)
    try:
        session_id = await store.sessions.resolve(args.session)
        scope = RetryScope(states, args.code, tuple(args.ids or ()), phones)
        plan = await store.sessions.retry_plan(session_id, scope)
        held = () if args.force else _permanent_codes(plan.groups)
        going = [(s, c, n) for s, c, n in plan.groups if not (s == "error" and c in held)]
        _print_retry_plan(session_id, plan, going, held)
        if not going:
            return EX_OK
        confirm("Send them again?", yes=args.yes)
        queued = await store.sessions.retry_session(session_id, dataclasses.replace(scope, skip_codes=held))
    finally:
        await store.close()
    print(f"session #{session_id}: {queued} row(s) queued again")
    return EX_OK


def _retry_states(args: argparse.Namespace) -> tuple[str, ...]:
    if args.only_unknown:
        return ("desconocido",)
    return ("error", "desconocido") if args.include_unknown else ("error",)


def _permanent_codes(groups: list[tuple[str, int | None, int]]) -> tuple[int, ...]:
    return tuple(sorted({c for s, c, _ in groups if s == "error" and c is not None and _permanent(c)}))


def _permanent(code: int | None) -> bool:
    """A code whose rows fail again if nothing changes (no code: the operator's call)."""
    return code is not None and classify_error(code, 400) is Outcome.PERMANENT


def _phone_forms(raw: str, settings: Settings) -> tuple[str, ...] | None:
    """Every form a row may hold the number in (Meta's 521 / 549 / ninth digit, with or without +)."""
    phone = parse_phone_or_none(raw, settings)
    if phone is None:
        return None
    return tuple(sorted({form for v in phone_variants(phone) for form in (v, v.lstrip("+"))}))


def _print_retry_plan(
    session_id: int, plan: RetryPlan, going: list[tuple[str, int | None, int]], held: tuple[int, ...]
) -> None:
    def codes(groups: Sequence[tuple[str, int | None, int]]) -> str:
        return ", ".join(f"{s} code {c if c is not None else '-'} x{n:,}" for s, c, n in groups)

    total = sum(n for _, _, n in going)
    listed = f" ({codes(going)})" if going else ""
    print(f"session #{session_id}: will queue {total:,} row(s) again{listed}")
    staying = [(s, c, n) for s, c, n in plan.groups if s == "error" and c in held]
    if staying:
        print(
            f"session #{session_id}: {sum(n for _, _, n in staying):,} row(s) with a permanent error stay"
            f" ({codes(staying)}): add --force to send them anyway"
        )
    if plan.waiting:
        until = plan.until.strftime("%Y-%m-%d %H:%M:%S UTC") if plan.until else "?"
        print(
            f"session #{session_id}: {plan.waiting} unknown row(s) left alone: the daemon that sent"
            f" them may still record their true result (until {until}); retry after that"
        )


ROW_COLUMNS = (
    "id",
    "telefono",
    "cliente_id",
    "estado",
    "attempts",
    "last_error_code",
    "updated_utc",
    "last_error",
    "wamid",
)
# The terminal view: a header and fixed widths (pages are printed as they come, memory flat).
ROW_VIEW = (
    ("id", "id", 9),
    ("phone", "telefono", 16),
    ("client_id", "cliente_id", 10),
    ("state", "estado", 11),
    ("tries", "attempts", 5),
    ("code", "last_error_code", 7),
    ("last change (UTC)", "updated_utc", 19),
    ("error", "last_error", 0),
)
ROWS_PAGE = 1000


async def cmd_rows(settings: Settings, args: argparse.Namespace) -> int:
    """Page through the rows by id, printing as it goes: memory stays flat for any session."""
    if args.row_id is not None:
        return await _show_story(settings, args.row_id)
    if args.session is None:
        raise RefusedChange("rows needs --session S (a session's rows) or --id N (one row's story)")
    states = args.state or [RowState.ERROR.value, RowState.UNKNOWN.value]
    phones = _phone_forms(args.phone, settings) if args.phone else ()
    if phones is None:
        return 2
    table = SafeCSV(ROW_COLUMNS) if args.csv else None
    store = await open_checked_store(settings)
    try:
        session_id = await store.sessions.resolve(args.session)
        after, shown = 0, 0
        filters = {"code": args.code, "phones": phones, "client_id": args.client_id}
        while page := await store.sessions.rows(
            session_id, states=states, after_id=after, limit=ROWS_PAGE, **filters
        ):
            if not table and not shown:
                print(_row_line({column: title for title, column, _ in ROW_VIEW}))
            for row in page:
                if table:
                    table.row(_when(row[c]) for c in ROW_COLUMNS)
                else:
                    print(_row_line(row))
            after, shown = page[-1]["id"], shown + len(page)
    finally:
        await store.close()
    if not table:
        print(f"{shown} row(s) of session #{session_id} in {', '.join(states)}", file=sys.stderr)
    return EX_OK


async def _show_story(settings: Settings, row_id: int) -> int:
    store = await open_checked_store(settings)
    try:
        story = await store.sessions.story(row_id)
    finally:
        await store.close()
    if story is None:
        raise RefusedChange(f"there is no row #{row_id} in cola_envios")
    for line in _story_lines(story):
        print(printable(line))
    return EX_OK


def _story_lines(story: RowStory) -> list[str]:
    """The row, then its attempts and retries and Meta's statuses, oldest first (UTC)."""
    r = story.row
    counted = (
        f" ({r['attempts'] - r['attempts_before_retry']} since the last retry)"
        if r["attempts_before_retry"]
        else ""
    )
    lines = [
        f"row #{r['id']}  session #{r['sesion_id']} {r['session_name'] or ''}".rstrip(),
        f"  phone {r['telefono']}  client_id {_or_dash(r['cliente_id'])}  state {r['estado']}"
        f"  attempts {r['attempts']}{counted}",
        f"  queued {_when(r['created_utc'])}  last change {_when(r['updated_utc'])}",
    ]
    if r["estado"] == "pendiente" and r["next_attempt_at"]:
        lines.append(f"  next attempt {_when(r['next_attempt_at'])}")
    if r["wamid"]:
        lines.append(f"  sent {_when(r['sent_at'])}  wamid {r['wamid']}")
    for label in ("delivered_at", "read_at", "settled_at"):
        if r[label]:
            lines.append(f"  {label.removesuffix('_at')} {_when(r[label])}")
    if r["last_error"] or r["last_error_code"] is not None:
        lines.append(f"  last error: code {_or_dash(r['last_error_code'])}  {r['last_error'] or ''}".rstrip())
    lines.append(
        f"history ({len(story.attempts)} attempt(s) not sent and retries; the send itself is above):"
    )
    for index, a in enumerate(story.attempts):
        was = f" (was {a['state']})" if a["outcome"] == "requeued" else ""
        code = _or_dash(a["code"])
        line = f"  {_when(a['at'])}  {a['outcome']}{was}  code {code}  {a['detail'] or ''}".rstrip()
        lines.append(line + _resolved_later(story, index))
    if story.statuses:
        lines.append("Meta's statuses:")
        for s in story.statuses:
            error = (
                f"  code {s['error_code']} {s['error_title'] or ''}" if s["error_code"] is not None else ""
            )
            lines.append(f"  {_when(s['at'])}  {s['status']}  {s['wamid']}{error}".rstrip())
    return lines


def _resolved_later(story: RowStory, index: int) -> str:
    """The sweep's `unknown` line (a worker's lease expired) once the row's true result came
    after it, said as such: the worker's own late result is the same attempt, not a second one.
    Only the worker's late result writes a line straight after it (`retry` writes `requeued`
    first); with no line after it, the row's state says whether the guess still stands (Meta's
    status may have settled it)."""
    guess = story.attempts[index]
    if guess["outcome"] != "unknown" or not str(guess["detail"] or "").startswith(RECOVERED_DETAIL):
        return ""
    later = story.attempts[index + 1 :]
    if later:
        return "" if later[0]["outcome"] in ("requeued", "unknown") else "  (resolved by the next line)"
    state = story.row["estado"]
    return f"  (resolved later: {state}, above)" if state in ("enviado", "error") else ""


def _or_dash(value: Any) -> Any:
    return "-" if value is None else value


def _row_line(row: dict[str, Any]) -> str:
    cells = [printable(_when(row[column]) if row[column] is not None else "-") for _, column, _ in ROW_VIEW]
    return "  ".join(c.ljust(width) for c, (_, _, width) in zip(cells, ROW_VIEW, strict=True)).rstrip()


def _when(value: Any) -> Any:
    return value.strftime("%Y-%m-%d %H:%M:%S") if isinstance(value, datetime) else value


async def cmd_prune(settings: Settings, args: argparse.Namespace) -> int:
    """Say what would go; with a person's yes (or --yes), delete it."""
    store = await open_checked_store(settings)
    try:
        options = {"deliveries": args.deliveries, "statuses": args.statuses}
        plan = await store.pruner.prune(args.older_than.seconds, dry_run=True, **options)
        _print_prune(plan, args, "would delete" if args.dry_run else "will delete")
        if args.dry_run or not (plan.rows or plan.deliveries or plan.statuses or plan.attempts):
            return EX_OK
        confirm("Delete them?", yes=args.yes)
        pruned = await store.pruner.prune(args.older_than.seconds, dry_run=False, **options)
    finally:
        await store.close()
    _print_prune(pruned, args, "deleted")
    return EX_OK


def _print_prune(pruned: Pruned, args: argparse.Namespace, verb: str) -> None:
    kept = "" if args.deliveries else "; envios_whatsapp kept"
    print(f"{verb} {pruned.rows} finished row(s) of cola_envios older than {args.older_than.text}", end="")
    if pruned.oldest and pruned.newest:
        span = f"{pruned.oldest:%Y-%m-%d %H:%M} to {pruned.newest:%Y-%m-%d %H:%M}"
        print(f" ({pruned.sessions} session(s), finished {span})", end="")
    print(f", {pruned.deliveries} of envios_whatsapp" if args.deliveries else kept, end="")
    print(
        " (and the rows that reference them: " + ", ".join(map(str, pruned.cascading)) + ")"
        if pruned.cascading
        else ""
    )
    if pruned.attempts:
        print(f"{verb} {pruned.attempts} attempt history row(s) older than {args.older_than.text}")
    if args.statuses:
        print(f"{verb} {pruned.statuses} applied webhook status(es) older than {args.older_than.text}")
    if pruned.kept:
        print(
            f"{pruned.kept} finished row(s) kept: rows of another table reference them"
            f" ({', '.join(map(str, pruned.keeping))})"
        )


SESSION_COMMANDS = {
    "pause": (SessionState.PAUSED, "paused: {rows} waiting row(s) held back"),
    "resume": (SessionState.ACTIVE, "resumed: {rows} held row(s) back in the queue"),
    "cancel": (SessionState.CANCELLED, "cancelled: {rows} waiting row(s) closed as error, not sent"),
}


async def cmd_session_state(settings: Settings, args: argparse.Namespace) -> int:
    if args.command != "cancel" and (args.all or args.number):
        return await _hold_command(settings, args)
    state, message = SESSION_COMMANDS[args.command]
    store = await open_checked_store(settings)
    try:
        session_id = await store.sessions.resolve(args.session)
        change = await store.sessions.set_session_state(session_id, state)
    finally:
        await store.close()
    already = state_word(change.after)
    if change.before == change.after and change.rows:
        print(
            f"session #{session_id} was already {already}:"
            f" {change.rows} row(s) an earlier pause held back are back in the queue"
        )
    elif change.before == change.after:
        print(f"session #{session_id} was already {already}: nothing changed")
    else:
        print(f"session #{session_id} {message.format(rows=change.rows)}")
    return EX_OK


async def _hold_command(settings: Settings, args: argparse.Namespace) -> int:
    """`pause|resume --all|--number ID`: a fleet-wide hold every daemon reads before it claims."""
    scope, what = (ALL, "every number") if args.all else (args.number, f"number {args.number}")
    store = await open_checked_store(settings)
    try:
        if args.command == "pause":
            changed = await store.holds.hold(scope, args.reason)
        else:
            changed = await store.holds.release(scope)
    finally:
        await store.close()
    if args.command == "pause":
        print(
            f"{what} paused: no daemon claims a row for it until `resume`; sends in flight finish"
            if changed
            else f"{what} was already paused: nothing changed"
        )
    elif changed:
        print(f"{what} resumed: daemons claim for it again (sessions paused one by one stay paused)")
    else:
        print(f"{what} was not paused: nothing changed")
    return EX_OK
