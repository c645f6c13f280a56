"""`status`: each session's progress, read-only, as the operator reads it.

No figure reads a session's sent rows, except the webhook counts of `status --session`: the
counts per state come off the per-session claim index, the errors from the session's error and
unknown rows alone, and what `prune` deleted from its per-session totals.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiomysql

from worker.models import (
    CANCELLED_REASON,
    OPTED_OUT_CODE,
    UNDELIVERABLE_CODE,
    RowState,
    SessionState,
)
from worker.store.claims import OPTED_OUT_REASON, UNDELIVERABLE_REASON
from worker.store.db import UTC_NOW as NOW
from worker.store.db import Database, placeholders

RATE_WINDOW = 60  # seconds of sends a session's rate is measured over
RATE_FLOOR = 1.0  # seconds: the shortest span a rate is divided by (the first sends)

# What a finished row counts as: its state, or, for an error row that was never a failed send,
# why it was closed.
CANCELLED = "cancelled"  # closed by `cancel`
OPTED_OUT = "opted_out"  # the phone opted out: closed unsent, or Meta answered 131050
SUPPRESSED = "suppressed"  # closed unsent: its number could not deliver to the phone before
NOT_SENT = (CANCELLED, OPTED_OUT, SUPPRESSED)
CLOSING_REASONS = (CANCELLED_REASON, OPTED_OUT_REASON, UNDELIVERABLE_REASON)
NO_CODE = -1  # whatsapp_worker_pruned.code of rows without one


def outcome_of(state: str, code: int | None, reason: str | None) -> str:
    """What a row counts as in `status` and in prune's totals."""
    if state != RowState.ERROR:
        return str(state)
    if code == OPTED_OUT_CODE or (code is None and reason == OPTED_OUT_REASON):
        return OPTED_OUT
    if code is None and reason == CANCELLED_REASON:
        return CANCELLED
    if code == UNDELIVERABLE_CODE and reason == UNDELIVERABLE_REASON:
        return SUPPRESSED
    return RowState.ERROR.value


# -- name: all_sessions :many
ALL_SESSIONS = "SELECT id FROM sesiones_envio ORDER BY id"
# -- name: count_sessions :one
COUNT_SESSIONS = "SELECT COUNT(*) FROM sesiones_envio"
# -- name: open_sessions :many
# Sessions with rows waiting, in flight or of unknown outcome: a loose index scan (one index dive
# per session and state, "Using index for group-by" on MariaDB, "index skip scan" on MySQL), so
# finding them costs what their number does, never their rows.
OPEN_SESSIONS = (
    "SELECT estado, sesion_id FROM cola_envios FORCE INDEX (ix_cola_envios_session_due)"
    " WHERE estado IN ('pendiente', 'procesando', 'desconocido') GROUP BY estado, sesion_id"
)
# -- name: sessions_sent_lately :many
# Sessions that sent in the last window (a campaign that just ended is still shown), on the
# delivery history's date index (local time, as the PHP application writes it).
SESSIONS_SENT_LATELY = (
    "SELECT DISTINCT sesion_id FROM envios_whatsapp"
    " WHERE fecha_envio >= NOW() - INTERVAL %s SECOND AND sesion_id IS NOT NULL"
)
# -- name: status_sessions :many
STATUS_SESSIONS = "SELECT id, nombre, estado, created_at FROM sesiones_envio WHERE id IN ({ids}) ORDER BY id"
# -- name: status_counts :many
# Counts per state off the per-session claim index alone: no row is read. Grouped in the
# index's order: the other order sorts every counted entry in a temporary table (twice the time).
STATUS_COUNTS = (
    "SELECT sesion_id, estado, COUNT(*) FROM cola_envios FORCE INDEX (ix_cola_envios_session_due)"
    " WHERE estado IN ('pendiente', 'procesando', 'enviado', 'error', 'desconocido')"
    " AND sesion_id IN ({ids}) GROUP BY estado, sesion_id"
)
# -- name: status_not_sent :many
# The error and unknown rows by code and by why they were closed: an index range per session,
# and only these rows are read, never the sent ones. Named index: left alone, MySQL may walk
# the session's unique key (every row of it) and MariaDB the whole table.
STATUS_NOT_SENT = (
    "SELECT sesion_id, estado, last_error_code,"
    " IF(last_error IN (%s, %s, %s), last_error, NULL) AS closed_as, COUNT(*), MAX(last_error)"
    " FROM cola_envios FORCE INDEX (ix_cola_envios_session_due)"
    " WHERE estado IN ('error', 'desconocido') AND sesion_id IN ({ids})"
    " GROUP BY sesion_id, estado, last_error_code, closed_as"
)
# -- name: status_webhooks :many
# What Meta's status webhooks recorded: no index holds it, so this is one pass over the sent
# and failed rows of the sessions asked for (`status --session` only).
STATUS_WEBHOOKS = (
    "SELECT sesion_id, COUNT(delivered_at), COUNT(read_at), COUNT(settled_at)"
    " FROM cola_envios FORCE INDEX (ix_cola_envios_session_due)"
    " WHERE estado IN ('enviado', 'error') AND sesion_id IN ({ids}) GROUP BY sesion_id"
)
# -- name: status_pruned :many
# What prune deleted, per session, outcome and code (its unique key).
STATUS_PRUNED = (
    "SELECT sesion_id, outcome, code, pruned_rows, delivered_rows, read_rows, settled_rows, last_error"
    " FROM whatsapp_worker_pruned WHERE sesion_id IN ({ids})"
)
# -- name: status_first_due :one
# A session's earliest waiting row (NULL, due at once, sorts first): one index dive. A time later
# than now means nothing waits to go now: a schedule (`enqueue --at`) or a retry's backoff. One
# statement per session: as a correlated subquery over several, MySQL or MariaDB (each its own)
# sorts every waiting row of the session instead.
STATUS_FIRST_DUE = (
    f"SELECT next_attempt_at, next_attempt_at > {NOW}"
    " FROM cola_envios FORCE INDEX (ix_cola_envios_session_due)"
    " WHERE estado = 'pendiente' AND sesion_id = %s ORDER BY next_attempt_at LIMIT 1"
)
# -- name: status_rate :many
# The sends of the last window, found on the delivery history's date index (local time to the
# second: one second of slack) and timed by the row's `sent_at` (UTC, microseconds). Returns
# how many, and how long ago the first of them went out.
STATUS_RATE = (
    f"SELECT e.sesion_id, COUNT(*), TIMESTAMPDIFF(MICROSECOND, MIN(c.sent_at), {NOW}) / 1e6"
    " FROM envios_whatsapp e JOIN cola_envios c ON c.id = e.cola_id"
    " WHERE e.fecha_envio >= NOW() - INTERVAL %s SECOND AND e.sesion_id IN ({ids})"
    f" AND c.sent_at > {NOW} - INTERVAL %s SECOND"
    " GROUP BY e.sesion_id"
)


@dataclass(frozen=True, slots=True)
class SessionsReport:
    sessions: list[dict[str, Any]]  # each session's figures, in id order
    unread: int = 0  # sessions chosen but beyond the limit asked for: not read
    finished: int = 0  # sessions left out as finished (all of them are read with `everything`)


class Reports:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def status(
        self,
        session_id: int | None = None,
        *,
        everything: bool = False,
        limit: int | None = None,
        webhooks: bool | None = None,
    ) -> SessionsReport:
        """Per-session progress: counts per state (rows closed by a cancel, for an opted-out
        phone or for a suppressed one apart from errors), the send rate over the last minute and
        the ETA at that rate, when a scheduled session starts, top errors, and what prune
        deleted. `phase` says what the rows say, whatever the session's stored `state`.

        The sessions are `session_id`, or every session with `everything`, or else the open
        ones: rows waiting, in flight or of unknown outcome, or a send in the last minute. Only
        the first `limit` are read. `webhooks` (by default with `session_id`) adds what Meta's
        status webhooks recorded, the one figure that reads every sent row.
        """
        async with self._db.transaction() as cur:
            chosen, finished = await _choose(cur, session_id, everything)
            read = chosen if limit is None else chosen[: max(0, limit)]
            sessions = await _figures(
                cur, read, webhooks=session_id is not None if webhooks is None else webhooks
            )
        return SessionsReport(sessions, unread=len(chosen) - len(read), finished=finished)


async def _choose(cur: aiomysql.Cursor, session_id: int | None, everything: bool) -> tuple[list[int], int]:
    """The sessions to show, in id order, and how many finished ones are left out."""
    if session_id is not None:
        return [session_id], 0
    if everything:
        await cur.execute(ALL_SESSIONS)
        return [int(sid) for (sid,) in await cur.fetchall()], 0
    chosen = await _open_sessions(cur)
    await cur.execute(SESSIONS_SENT_LATELY, (RATE_WINDOW + 1,))
    chosen.update(int(sid) for (sid,) in await cur.fetchall())
    await cur.execute(COUNT_SESSIONS)
    (count,) = await cur.fetchone()
    return sorted(chosen), max(0, int(count) - len(chosen))


async def _open_sessions(cur: aiomysql.Cursor) -> set[int]:
    """Sessions with rows waiting, in flight or of unknown outcome."""
    await cur.execute(OPEN_SESSIONS)
    return {int(sid) for _, sid in await cur.fetchall()}


async def _figures(cur: aiomysql.Cursor, ids: list[int], *, webhooks: bool) -> list[dict[str, Any]]:
    if not ids:
        return []
    await cur.execute(STATUS_SESSIONS.format(ids=placeholders(len(ids))), ids)
    sessions = {
        sid: _new_status(sid, name, state, created) for sid, name, state, created in await cur.fetchall()
    }
    if not sessions:
        return []
    if webhooks:
        for session in sessions.values():
            session.update(delivered=0, read=0, settled=0)
    await _read_counts(cur, sessions)
    await _read_pruned(cur, sessions, webhooks=webhooks)
    if webhooks:
        await _read_webhooks(cur, sessions)
    await _read_rates(cur, sessions)
    await _read_first_due(cur, sessions)
    for session in sessions.values():
        _derive(session)
    return list(sessions.values())


async def _read_counts(cur: aiomysql.Cursor, sessions: dict[int, dict[str, Any]]) -> None:
    """Rows per state, and the error and unknown rows by outcome and code."""
    ids = list(sessions)
    await cur.execute(STATUS_COUNTS.format(ids=placeholders(len(ids))), ids)
    for sid, state, count in await cur.fetchall():
        sessions[sid]["counts"][state] += int(count)
    await cur.execute(STATUS_NOT_SENT.format(ids=placeholders(len(ids))), (*CLOSING_REASONS, *ids))
    for sid, state, code, closed_as, count, text in await cur.fetchall():
        _add_outcome(sessions[sid], outcome_of(state, code, closed_as), state, code, int(count), text)


async def _read_pruned(cur: aiomysql.Cursor, sessions: dict[int, dict[str, Any]], *, webhooks: bool) -> None:
    """What prune deleted: counted as if the rows were still there."""
    ids = list(sessions)
    await cur.execute(STATUS_PRUNED.format(ids=placeholders(len(ids))), ids)
    for sid, outcome, code, count, delivered, read, settled, text in await cur.fetchall():
        session = sessions[sid]
        state = RowState.SENT.value if outcome == RowState.SENT else RowState.ERROR.value
        session["counts"][state] += int(count)
        session["pruned"] += int(count)
        if state == RowState.ERROR:
            _add_outcome(session, outcome, state, None if code == NO_CODE else code, int(count), text)
        if webhooks:
            _add_webhooks(session, int(delivered), int(read), int(settled))


async def _read_webhooks(cur: aiomysql.Cursor, sessions: dict[int, dict[str, Any]]) -> None:
    ids = list(sessions)
    await cur.execute(STATUS_WEBHOOKS.format(ids=placeholders(len(ids))), ids)
    for sid, delivered, read, settled in await cur.fetchall():
        _add_webhooks(sessions[sid], int(delivered), int(read), int(settled))


async def _read_first_due(cur: aiomysql.Cursor, sessions: dict[int, dict[str, Any]]) -> None:
    """When the waiting rows of each idle session may go, if none may now (a session that is
    sending has rows due)."""
    for sid, session in sessions.items():
        idle = not session["counts"][RowState.PROCESSING] and not session["sent_last_minute"]
        if session["counts"][RowState.PENDING] and idle:
            await cur.execute(STATUS_FIRST_DUE, (sid,))
            due, later = await cur.fetchone()
            session["next_due"] = due.isoformat() if later else None


async def _read_rates(cur: aiomysql.Cursor, sessions: dict[int, dict[str, Any]]) -> None:
    ids = list(sessions)
    await cur.execute(STATUS_RATE.format(ids=placeholders(len(ids))), (RATE_WINDOW + 1, *ids, RATE_WINDOW))
    for sid, count, since in await cur.fetchall():
        sessions[sid]["sent_last_minute"] = int(count)
        sessions[sid]["rate_window"] = round(max(float(since or 0), RATE_FLOOR), 3)


def _new_status(sid: int, name: str, state: str, created: datetime) -> dict[str, Any]:
    return {
        "id": sid,
        "name": name,
        "state": state,
        "created_at": created.isoformat(),
        "counts": {s.value: 0 for s in RowState},  # per state as stored, pruned rows included
        "total": 0,
        "pruned": 0,  # rows prune deleted, counted in every figure
        **{kind: 0 for kind in NOT_SENT},  # error rows never sent (under `error` in `counts`)
        # what the status webhooks recorded (None: not read, see STATUS_WEBHOOKS)
        "delivered": None,
        "read": None,
        "settled": None,  # unknown outcomes a status webhook settled
        "sent_last_minute": 0,
        "rate_window": float(RATE_WINDOW),
        "next_due": None,  # UTC: the earliest waiting row's time, when none is due now
        "errors": [],
    }


def _add_outcome(
    session: dict[str, Any], outcome: str, state: str, code: int | None, count: int, text: str
) -> None:
    if outcome in NOT_SENT:
        session[outcome] += count
        return
    for error in session["errors"]:  # one group per state and code, whatever closed it
        if (error["state"], error["code"]) == (state, code):
            error["count"] += count
            error["example"] = error["example"] or text
            return
    session["errors"].append({"state": state, "code": code, "count": count, "example": text})


def _add_webhooks(session: dict[str, Any], delivered: int, read: int, settled: int) -> None:
    session["delivered"] += delivered
    session["read"] += read
    session["settled"] += settled


def _derive(session: dict[str, Any]) -> None:
    """The figures an operator reads: done and waiting rows, rate, ETA, and the phase."""
    counts = session["counts"]
    total = sum(counts.values())
    waiting = counts[RowState.PENDING] + counts[RowState.PROCESSING]
    sent, unknown = counts[RowState.SENT], counts[RowState.UNKNOWN]
    rate = session["sent_last_minute"] / session["rate_window"]
    session["errors"].sort(key=lambda e: -e["count"])
    session.update(
        total=total,
        done=total - waiting,
        waiting=waiting,
        in_flight=counts[RowState.PROCESSING],
        sent=sent,
        failed=counts[RowState.ERROR] - sum(session[kind] for kind in NOT_SENT),
        unknown=unknown,
        rate=round(rate, 2),
        eta_seconds=None,
    )
    if not counts[RowState.PENDING] or counts[RowState.PROCESSING]:
        session["next_due"] = None  # a row in flight: it is running, not waiting for a time
    session["phase"] = _phase(session)
    if session["phase"] == "sending" and rate > 0:
        session["eta_seconds"] = round(waiting / rate, 1)


def _phase(session: dict[str, Any]) -> str:
    state = session["state"]
    if state == SessionState.CANCELLED:
        return "cancelled"
    if state == SessionState.PAUSED:
        return "paused"
    if session["waiting"]:  # also a `completada` session producers added rows to
        if session["rate"] > 0 or session["in_flight"]:
            return "sending"
        if session["next_due"] is not None and not session["done"]:
            return "scheduled"  # nothing has gone yet, and nothing may before that time
        return "waiting"
    if not session["total"]:
        return "empty"
    if session["unknown"]:
        return "unresolved"  # finished, but some outcomes wait for a person (or a webhook)
    if not session["sent"]:
        return "failed"
    return "completed"
