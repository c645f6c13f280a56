"""Producers' and operators' commands: enqueue, pause / resume / cancel, retry, status."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

import aiomysql
from pymysql.converters import escape_string

from worker.messages import same_message
from worker.models import CANCELLED_REASON, RowState, SessionState
from worker.store.db import UTC_NOW as NOW
from worker.store.db import Database, DatabaseError, placeholders, with_transient_retry
from worker.store.results import LATE_RESULT_WINDOW


class RefusedChange(Exception):
    """An operator command that does not apply (no such session, wrong state)."""


@dataclass(frozen=True, slots=True)
class SessionChange:
    session_id: int
    before: SessionState
    after: SessionState
    rows: int  # rows held back (pause), waiting again (resume) or closed (cancel)


@dataclass(frozen=True, slots=True)
class RetryChange:
    queued: int
    waiting: int  # unknown rows whose true result may still arrive
    until: datetime | None  # UTC; when the last of those can no longer change


# (cliente_id, telefono, mensaje JSON)
QueuedRow = tuple[int | None, str, str]
# The session settings enqueue may set: (column, value now, value asked for).
SESSION_SETTINGS = ("phone_number_id", "send_window", "time_zone")


@dataclass(frozen=True, slots=True)
class EnqueueRequest:
    session: str  # the name (a new session is created under it)
    next_attempt_at: datetime | None = None  # UTC, for the rows this run adds; None: due now
    phone_number_id: str | None = None  # None here and below: leave the session's as it is
    send_window: str | None = None  # 'HH:MM-HH:MM'
    time_zone: str | None = None  # IANA name of the window's zone (set with send_window)
    keep_queued: bool = False  # rows queued with another message stay; new phones are added
    dry_run: bool = False


@dataclass(slots=True)
class EnqueueReport:
    session_id: int | None = None  # None: the session does not exist (yet, on a dry run)
    state: SessionState | None = None
    created: bool = False
    written: bool = False  # False: a dry run, or refused because queued messages differ
    rows: int = 0  # valid rows in the file
    added: int = 0  # new rows queued (dry run: that would be queued)
    identical: int = 0  # first pass: already queued with the same message
    differing: int = 0  # first pass: already queued with another message
    example: tuple[str, str, str] | None = None  # a differing row: (phone, queued, this file's)
    sample: str | None = None  # the first message of the file
    changes: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    before: dict[str, str | None] | None = None  # the session's settings before (None: new)
    now: datetime | None = None  # the database's UTC clock at the start


def _values(session_id: int, rows: Sequence[QueuedRow], at: datetime | None) -> str:
    """`(1,7,'+51...','{...}',NULL),...`: the driver's own escaping of a string, without its
    per-parameter dispatch, which cost more than the whole insert at a million rows."""
    head = f"({int(session_id)},"
    tail = "NULL)" if at is None else f"'{at:%Y-%m-%d %H:%M:%S.%f}')"
    return ",".join(
        f"{head}{'NULL' if client is None else int(client)},'{escape_string(phone)}',"
        f"'{escape_string(message)}',{tail}"
        for client, phone, message in rows
    )


def _session_changes(
    current: Sequence[str | None] | None, request: EnqueueRequest
) -> list[tuple[str, str | None, str | None]]:
    """The settings the request changes on a session (`current`: its values; None: new)."""
    wanted = {
        "phone_number_id": request.phone_number_id,
        "send_window": request.send_window,
        "time_zone": request.time_zone if request.send_window is not None else None,
    }
    now = dict(zip(SESSION_SETTINGS, current or (None, None, None), strict=True))
    return [(c, now[c], wanted[c]) for c in SESSION_SETTINGS if wanted[c] is not None and wanted[c] != now[c]]


# The late-result window of results.py: the lease plus one more lease length.
_LATE_OPEN = (
    f"estado = 'desconocido' AND lease_token IS NOT NULL AND COALESCE({LATE_RESULT_WINDOW} > {NOW}, FALSE)"
)
# -- name: result_may_arrive :one
RESULT_MAY_ARRIVE = (
    f"SELECT COUNT(*), MAX({LATE_RESULT_WINDOW}) FROM cola_envios WHERE sesion_id = %s AND {_LATE_OPEN}"
)
# -- name: find_session :one (enqueue; legacy sessions may share a name: the first is meant)
FIND_SESSION = (
    "SELECT id, estado, phone_number_id, send_window, time_zone FROM sesiones_envio"
    " WHERE nombre = %s AND legacy_duplicate = 0"
)
# -- name: create_session :exec (lastrowid: the new or the existing session's id)
CREATE_SESSION = (
    "INSERT INTO sesiones_envio (nombre, phone_number_id, send_window, time_zone) VALUES (%s, %s, %s, %s)"
    " ON DUPLICATE KEY UPDATE id = LAST_INSERT_ID(id)"
)
# -- name: lock_session :one
LOCK_SESSION = (
    "SELECT estado, phone_number_id, send_window, time_zone FROM sesiones_envio WHERE id = %s FOR UPDATE"
)
# -- name: queued_messages :many (on the unique key (sesion_id, telefono, legacy_duplicate))
QUEUED_MESSAGES = (
    "SELECT telefono, mensaje FROM cola_envios"
    " WHERE sesion_id = %s AND legacy_duplicate = 0 AND telefono IN ({phones})"
)
# -- name: insert_rows :exec (one multi-row INSERT per batch, its VALUES made by _values; a
# phone the session already has is left as it is: affected rows count the new ones only)
INSERT_ROWS = (
    "INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje, next_attempt_at)"
    " VALUES {values} ON DUPLICATE KEY UPDATE id = id"
)
# -- name: parked_time :one (as `pause` moves a waiting row; `resume` moves it back)
PARKED_TIME = f"SELECT COALESCE(CAST(%s AS DATETIME(6)), {NOW}) + INTERVAL 100 YEAR"
# -- name: list_rows :many
LIST_ROWS = (
    "SELECT id, telefono, cliente_id, estado, attempts, last_error_code, last_error, wamid"
    " FROM cola_envios WHERE sesion_id = %s AND estado IN ({states}){code} AND id > %s"
    " ORDER BY id LIMIT %s"
)
# -- name: retry_rows :exec
# Never a legacy copy (`legacy_duplicate > 0`): sending it would be the old bug's second message.
RETRY_ROWS = (
    "UPDATE cola_envios SET estado = 'pendiente', attempts = 0, next_attempt_at = NULL,"
    " lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, claimed_at = NULL"
    " WHERE sesion_id = %s AND estado IN ({states}) AND legacy_duplicate = 0{code}"
    f" AND NOT ({_LATE_OPEN})"
)

# `status`. Its cost must not grow with a session's sent rows beyond one pass over them.
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


class Sessions:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def resolve(self, ref: str) -> int:
        """A session's id from its id or its name (an id wins when a name is also digits)."""
        ref = ref.strip()
        async with self._db.transaction() as cur:
            if ref.isdigit():
                await cur.execute("SELECT id FROM sesiones_envio WHERE id = %s", (int(ref),))
                if (row := await cur.fetchone()) is not None:
                    return int(row[0])
            await cur.execute("SELECT id FROM sesiones_envio WHERE nombre = %s ORDER BY id", (ref,))
            ids = [int(row[0]) for row in await cur.fetchall()]
        if not ids:
            raise RefusedChange(f"there is no session {ref!r} (neither an id nor a name)")
        if len(ids) > 1:  # legacy sessions may share a name
            raise RefusedChange(
                f"several sessions are named {ref!r} (#{', #'.join(map(str, ids))}): use the id"
            )
        return ids[0]

    async def enqueue(
        self,
        request: EnqueueRequest,
        first_pass: Iterable[Sequence[QueuedRow]],
        second_pass: Callable[[], Iterable[Sequence[QueuedRow]]],
    ) -> EnqueueReport:
        """Create (or reuse) a session by name and queue rows `(cliente_id, telefono, mensaje)`.

        `first_pass` is read whole before anything is written (it raises at its end if the
        file is bad), and each of its batches is compared with what the session already
        queued. Nothing is written on a dry run, or when a queued message differs and
        `keep_queued` is not set. Then the session is created or updated, and `second_pass`
        is inserted one batch per transaction: a failure part-way leaves the committed batches
        queued, and the same import run again adds the rest (the unique key (sesion_id,
        telefono) meets the rows already there).
        """
        report = EnqueueReport()
        found = await with_transient_retry(partial(self._find_session, request, report))
        compare = found is not None and await self._has_rows(found)
        for batch in first_pass:
            report.rows += len(batch)
            if report.sample is None and batch:
                report.sample = batch[0][2]
            if found is not None and compare:
                await self._compare(found, batch, report)
            else:
                report.added += len(batch)
        if request.dry_run or (report.differing and not request.keep_queued):
            return report
        new, report.added = report.added, 0
        session_id = await with_transient_retry(partial(self._open_session, request, report))
        report.written = True
        try:
            for batch in second_pass() if new else ():  # nothing new: no second pass
                report.added += await with_transient_retry(
                    partial(self._insert_batch, session_id, batch, request.next_attempt_at)
                )
        except (DatabaseError, RefusedChange) as exc:
            note = (
                f"; {report.added:,} new row(s) of this file had been queued: once the cause is fixed,"
                " run the same command again to queue the rest (no phone is queued twice)"
            )
            if isinstance(exc, DatabaseError):
                raise type(exc)(f"{exc}{note}", code=exc.code) from None
            raise RefusedChange(f"{exc}{note}") from None
        return report

    async def _find_session(self, request: EnqueueRequest, report: EnqueueReport) -> int | None:
        async with self._db.transaction() as cur:
            await cur.execute(f"SELECT {NOW}")
            (report.now,) = await cur.fetchone()
            await cur.execute(FIND_SESSION, (request.session,))
            row = await cur.fetchone()
        if row is None:
            report.changes = _session_changes(None, request)
            return None
        session_id, state, *settings = row
        if state == SessionState.CANCELLED:
            raise RefusedChange(f"session {request.session!r} (#{session_id}) is cancelled")
        report.session_id, report.state = int(session_id), SessionState(state)
        report.changes = _session_changes(settings, request)
        report.before = dict(zip(SESSION_SETTINGS, settings, strict=True))
        return int(session_id)

    async def _has_rows(self, session_id: int) -> bool:
        async with self._db.transaction() as cur:
            await cur.execute("SELECT 1 FROM cola_envios WHERE sesion_id = %s LIMIT 1", (session_id,))
            return await cur.fetchone() is not None

    async def _compare(self, session_id: int, rows: Sequence[QueuedRow], report: EnqueueReport) -> None:
        """Count the rows that are new, queued with the same message, or queued with another."""
        async with self._db.transaction() as cur:
            await cur.execute(
                QUEUED_MESSAGES.format(phones=placeholders(len(rows))),
                (session_id, *(phone for _, phone, _ in rows)),
            )
            queued: dict[str, str] = dict(await cur.fetchall())
        for _, phone, message in rows:
            old = queued.get(phone)
            if old is None:
                report.added += 1
            elif same_message(old, message):
                report.identical += 1
            else:
                report.differing += 1
                if report.example is None:
                    report.example = (phone, old, message)

    async def _open_session(self, request: EnqueueRequest, report: EnqueueReport) -> int:
        """Create the session, or lock it, refuse a cancelled one and update its settings."""
        async with self._db.transaction() as cur:
            await cur.execute(
                CREATE_SESSION,
                (request.session, request.phone_number_id, request.send_window, request.time_zone),
            )
            session_id, created = int(cur.lastrowid), cur.rowcount == 1
            await cur.execute(LOCK_SESSION, (session_id,))
            state, *settings = await cur.fetchone()
            if state == SessionState.CANCELLED:
                raise RefusedChange(f"session {request.session!r} (#{session_id}) is cancelled")
            report.changes = [] if created else _session_changes(settings, request)
            report.before = None if created else dict(zip(SESSION_SETTINGS, settings, strict=True))
            if report.changes:
                await cur.execute(
                    f"UPDATE sesiones_envio SET {', '.join(f'{c} = %s' for c, _, _ in report.changes)}"
                    " WHERE id = %s",
                    (*(new for _, _, new in report.changes), session_id),
                )
        report.session_id, report.state, report.created = session_id, SessionState(state), created
        return session_id

    async def _insert_batch(self, session_id: int, rows: Sequence[QueuedRow], at: datetime | None) -> int:
        """One transaction: the rows not queued yet are added; returns how many."""
        async with self._db.transaction() as cur:
            await cur.execute(LOCK_SESSION, (session_id,))
            row = await cur.fetchone()
            if row is None:
                raise RefusedChange(f"session #{session_id} was deleted during the import")
            state = SessionState(row[0])
            if state is SessionState.CANCELLED:
                raise RefusedChange(f"session #{session_id} was cancelled during the import")
            if state is SessionState.PAUSED:
                # A paused session's rows wait outside the claim range, as `pause` leaves them
                # (`resume` brings them back to their own time).
                await cur.execute(PARKED_TIME, (at,))
                (at,) = await cur.fetchone()
            await cur.execute(INSERT_ROWS.format(values=_values(session_id, rows, at)))
            added = int(cur.rowcount)
            if added and state is SessionState.COMPLETED:
                await cur.execute("UPDATE sesiones_envio SET estado = 'activa' WHERE id = %s", (session_id,))
        return added

    async def set_session_state(self, session_id: int, state: SessionState) -> SessionChange:
        """pause / resume / cancel a session; says what changed."""
        # A completed session still sends the rows producers add to it: it can be paused or
        # cancelled like an active one.
        allowed = {
            SessionState.PAUSED: (SessionState.ACTIVE, SessionState.COMPLETED),
            SessionState.ACTIVE: (SessionState.PAUSED,),
            SessionState.CANCELLED: (SessionState.ACTIVE, SessionState.PAUSED, SessionState.COMPLETED),
        }[state]

        async def attempt() -> SessionChange:
            async with self._db.transaction() as cur:
                before = await self._lock_session(cur, session_id)
                if before == state:
                    return SessionChange(session_id, before, before, 0)
                if before not in allowed:
                    raise RefusedChange(f"session #{session_id} is {before}: cannot become {state}")
                await cur.execute("UPDATE sesiones_envio SET estado = %s WHERE id = %s", (state, session_id))
                rows = await self._park_rows(cur, session_id, state)
            return SessionChange(session_id, before, state, rows)

        return await with_transient_retry(attempt)

    @staticmethod
    async def _park_rows(cur: aiomysql.Cursor, session_id: int, state: SessionState) -> int:
        """Move a held session's waiting rows out of (or back into) the claim range.

        Shifting `next_attempt_at` by a century keeps the claim scan short however many rows a
        paused session holds, and shifting back restores each row's own schedule exactly.
        """
        if state is SessionState.PAUSED:
            sql = f"next_attempt_at = COALESCE(next_attempt_at, {NOW}) + INTERVAL 100 YEAR"
            where = ""
        elif state is SessionState.ACTIVE:
            sql = "next_attempt_at = next_attempt_at - INTERVAL 100 YEAR"
            where = f" AND next_attempt_at > {NOW} + INTERVAL 50 YEAR"
        else:
            sql = f"estado = 'error', last_error_code = NULL, last_error = '{CANCELLED_REASON}'"
            where = ""
        await cur.execute(
            f"UPDATE cola_envios SET {sql} WHERE sesion_id = %s AND estado = 'pendiente'{where}",
            (session_id,),
        )
        if state is SessionState.ACTIVE:
            await cur.execute(
                "SELECT COUNT(*) FROM cola_envios WHERE sesion_id = %s AND estado = 'pendiente'",
                (session_id,),
            )
            (count,) = await cur.fetchone()
            return int(count)
        return int(cur.rowcount)

    async def rows(
        self, session_id: int, *, states: Sequence[str], code: int | None, after_id: int, limit: int
    ) -> list[dict[str, Any]]:
        """One page of a session's rows in the given states, by id (keyset: flat however deep)."""
        code_sql, code_args = (" AND last_error_code = %s", (code,)) if code is not None else ("", ())
        async with self._db.transaction() as cur:
            await cur.execute(
                LIST_ROWS.format(states=placeholders(len(states)), code=code_sql),
                (session_id, *states, *code_args, after_id, limit),
            )
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]

    async def retry_session(
        self, session_id: int, *, include_unknown: bool, code: int | None = None
    ) -> RetryChange:
        """Send `error` rows (and, only when asked, `desconocido` rows) again.

        An unknown row whose worker may still write its true result (its lease token is set
        and the late-result window is open) is left alone: re-sending it now could duplicate
        a message that was in fact delivered. `code`: only rows whose last error had it.
        """
        states = ("error", "desconocido") if include_unknown else ("error",)
        code_sql, code_args = (" AND last_error_code = %s", (code,)) if code is not None else ("", ())

        async def attempt() -> RetryChange:
            async with self._db.transaction() as cur:
                before = await self._lock_session(cur, session_id)
                if before == SessionState.CANCELLED:
                    raise RefusedChange(f"session #{session_id} is cancelled: nothing to retry")
                waiting, until = 0, None
                if include_unknown:
                    await cur.execute(RESULT_MAY_ARRIVE, (session_id,))
                    waiting, until = await cur.fetchone()
                await cur.execute(
                    RETRY_ROWS.format(states=placeholders(len(states)), code=code_sql),
                    (session_id, *states, *code_args),
                )
                count = int(cur.rowcount)
                if count and before == SessionState.COMPLETED:
                    await cur.execute(
                        "UPDATE sesiones_envio SET estado = 'activa' WHERE id = %s", (session_id,)
                    )
            return RetryChange(count, int(waiting or 0), until)

        return await with_transient_retry(attempt)

    @staticmethod
    async def _lock_session(cur: aiomysql.Cursor, session_id: int) -> SessionState:
        await cur.execute("SELECT estado FROM sesiones_envio WHERE id = %s FOR UPDATE", (session_id,))
        row = await cur.fetchone()
        if row is None:
            raise RefusedChange(f"there is no session #{session_id}")
        return SessionState(row[0])

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
