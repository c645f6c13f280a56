"""Producers' side of a session: `enqueue` queues a CSV file's rows (two streaming passes:
compare with what is queued, then insert in batches) and sets the session's settings."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial

from worker.messages import same_message
from worker.models import SessionState
from worker.store.claims import PARKED
from worker.store.db import UTC_NOW as NOW
from worker.store.db import Database, DatabaseError, escape_string, placeholders, with_transient_retry
from worker.store.sessions import RefusedChange

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
    state: str | None = None  # a SessionState, or a PHP application's own
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


# -- name: find_session :one (enqueue; legacy sessions may share a name: the first is meant)
FIND_SESSION = (
    "SELECT id, estado, phone_number_id, send_window, time_zone FROM sesiones_envio"
    " WHERE nombre = %s AND legacy_duplicate = 0"
)
# -- name: create_session :exec (lastrowid: the new or the existing session's id)
CREATE_SESSION = (
    "INSERT INTO sesiones_envio (nombre, estado, phone_number_id, send_window, time_zone)"
    " VALUES (%s, 'activa', %s, %s, %s)"
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
PARKED_TIME = f"SELECT COALESCE(CAST(%s AS DATETIME(6)), {NOW}) + {PARKED}"


class Producers:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def message_charset(self) -> str | None:
        """The character set of cola_envios.mensaje (an adopted table may be latin1)."""
        async with self._db.transaction() as cur:
            await cur.execute(
                "SELECT CHARACTER_SET_NAME AS charset FROM information_schema.COLUMNS WHERE TABLE_SCHEMA ="
                " DATABASE() AND TABLE_NAME = 'cola_envios' AND COLUMN_NAME = 'mensaje'"
            )
            row = await cur.fetchone()
        return None if row is None or row[0] is None else str(row[0])

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
        report.session_id, report.state = int(session_id), str(state)
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
        report.session_id, report.state, report.created = session_id, str(state), created
        return session_id

    async def _insert_batch(self, session_id: int, rows: Sequence[QueuedRow], at: datetime | None) -> int:
        """One transaction: the rows not queued yet are added; returns how many."""
        async with self._db.transaction() as cur:
            await cur.execute(LOCK_SESSION, (session_id,))
            row = await cur.fetchone()
            if row is None:
                raise RefusedChange(f"session #{session_id} was deleted during the import")
            state = str(row[0])  # a PHP application's own state (a draft) is kept as it is
            if state == SessionState.CANCELLED:
                raise RefusedChange(f"session #{session_id} was cancelled during the import")
            if state == SessionState.PAUSED:
                # A paused session's rows wait outside the claim range, as `pause` leaves them
                # (`resume` brings them back to their own time).
                await cur.execute(PARKED_TIME, (at,))
                (at,) = await cur.fetchone()
            await cur.execute(INSERT_ROWS.format(values=_values(session_id, rows, at)))
            added = int(cur.rowcount)
            if added and state == SessionState.COMPLETED:
                await cur.execute("UPDATE sesiones_envio SET estado = 'activa' WHERE id = %s", (session_id,))
        return added
