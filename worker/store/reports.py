"""`status`: each session's progress, read-only, as the operator reads it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from worker.models import CANCELLED_REASON, RowState, SessionState
from worker.store.db import UTC_NOW as NOW
from worker.store.db import Database, placeholders

RATE_WINDOW = 60  # seconds of sends a session's rate is measured over
RATE_FLOOR = 1.0  # seconds: the shortest span a rate is divided by (the first sends)
# -- name: status_sessions :many
STATUS_SESSIONS = "SELECT id, nombre, estado, created_at FROM sesiones_envio{where} ORDER BY id"
# -- name: status_counts :many
# Counts per state off the per-session claim index alone: no row is read.
STATUS_COUNTS = (
    "SELECT sesion_id, estado, COUNT(*) FROM cola_envios FORCE INDEX (ix_cola_envios_session_due)"
    " WHERE estado IN ({states}) AND sesion_id IN ({ids}) GROUP BY sesion_id, estado"
)
# -- name: status_finished :many
# One pass over the session's finished rows (no index holds these columns): errors by code with
# rows closed by a cancel apart, and what Meta's status webhooks recorded. Named index: its cost
# follows the session's finished rows, never the table's (left alone, MySQL walks the session's
# unique key, slower, and MariaDB may scan the whole table).
STATUS_FINISHED = (
    "SELECT sesion_id, estado, last_error_code,"
    " estado = 'error' AND last_error_code IS NULL AND last_error <=> %s AS cancelled,"
    " COUNT(*), COUNT(delivered_at), COUNT(read_at), COUNT(settled_at), MAX(last_error)"
    " FROM cola_envios FORCE INDEX (ix_cola_envios_session_due)"
    " WHERE estado IN ('enviado', 'error', 'desconocido') AND sesion_id IN ({ids})"
    " GROUP BY sesion_id, estado, last_error_code, cancelled"
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


class Reports:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def status(self, session_id: int | None = None) -> list[dict[str, Any]]:
        """Per-session progress: counts per state (cancelled rows apart from errors), the send
        rate over the last minute and the ETA at that rate, top errors, and what the status
        webhooks recorded (delivered, read, settled). `phase` says what the rows say, whatever
        the session's stored `state`.

        The counts come off an index; only the finished rows are read, in one pass.
        """
        where, params = (" WHERE id = %s", [session_id]) if session_id is not None else ("", [])
        sessions: dict[int, dict[str, Any]] = {}
        async with self._db.transaction() as cur:
            await cur.execute(STATUS_SESSIONS.format(where=where), params)
            for sid, name, state, created in await cur.fetchall():
                sessions[sid] = _new_status(sid, name, state, created)
            if not sessions:
                return []
            ids = list(sessions)
            in_ids = placeholders(len(ids))
            states = [s.value for s in RowState]
            await cur.execute(
                STATUS_COUNTS.format(states=placeholders(len(states)), ids=in_ids), (*states, *ids)
            )
            for sid, state, count in await cur.fetchall():
                sessions[sid]["counts"][state] = int(count)
            await cur.execute(STATUS_FINISHED.format(ids=in_ids), (CANCELLED_REASON, *ids))
            for sid, state, code, cancelled, count, delivered, read, settled, text in await cur.fetchall():
                session = sessions[sid]
                session["delivered"] += int(delivered)
                session["read"] += int(read)
                session["settled"] += int(settled)
                if cancelled:
                    session["cancelled"] += int(count)
                elif state != RowState.SENT:
                    session["errors"].append(
                        {"state": state, "code": code, "count": int(count), "example": text}
                    )
            await cur.execute(STATUS_RATE.format(ids=in_ids), (RATE_WINDOW + 1, *ids, RATE_WINDOW))
            for sid, count, since in await cur.fetchall():
                sessions[sid]["sent_last_minute"] = int(count)
                sessions[sid]["rate_window"] = round(max(float(since or 0), RATE_FLOOR), 3)
        for session in sessions.values():
            _derive(session)
        return list(sessions.values())


def _new_status(sid: int, name: str, state: str, created: datetime) -> dict[str, Any]:
    return {
        "id": sid,
        "name": name,
        "state": state,
        "created_at": created.isoformat(),
        "counts": {s.value: 0 for s in RowState},
        "total": 0,
        "cancelled": 0,  # rows closed by a cancel (under `error` in `counts`), never sent
        "delivered": 0,
        "read": 0,
        "settled": 0,  # unknown outcomes a status webhook settled
        "sent_last_minute": 0,
        "rate_window": float(RATE_WINDOW),
        "errors": [],
    }


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
        failed=counts[RowState.ERROR] - session["cancelled"],
        unknown=unknown,
        rate=round(rate, 2),
        eta_seconds=None,
    )
    state = session["state"]
    if state == SessionState.CANCELLED:
        phase = "cancelled"
    elif state == SessionState.PAUSED:
        phase = "paused"
    elif waiting:  # also a `completada` session producers added rows to
        phase = "sending" if rate > 0 or counts[RowState.PROCESSING] else "waiting"
    elif not total:
        phase = "empty"
    elif unknown:
        phase = "unresolved"  # finished, but some outcomes wait for a person (or a webhook)
    elif not sent:
        phase = "failed"
    else:
        phase = "completed"
    session["phase"] = phase
    if phase == "sending" and rate > 0:
        session["eta_seconds"] = round(waiting / rate, 1)
