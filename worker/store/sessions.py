"""Operators' commands on a session: resolve a name or id, pause / resume / cancel, retry, rows.

Producers' enqueue is in `producers.py`, the read-only progress report of `status` in
`reports.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiomysql

from worker.models import CANCELLED_REASON, SessionState, state_word
from worker.store.claims import IS_PARKED, PARKED, UNPARK
from worker.store.db import UTC_NOW as NOW
from worker.store.db import Database, placeholders, with_transient_retry
from worker.store.results import LATE_RESULT_WINDOW


class RefusedChange(Exception):
    """An operator command that does not apply (no such session, wrong state)."""


@dataclass(frozen=True, slots=True)
class SessionChange:
    session_id: int
    before: str  # a SessionState, or a PHP application's own (a draft)
    after: str
    rows: int  # rows held back (pause), waiting again (resume) or closed (cancel)


@dataclass(frozen=True, slots=True)
class RetryPlan:
    groups: list[tuple[str, int | None, int]]  # (state, last error code, rows) that would go again
    waiting: int  # unknown rows whose true result may still arrive: left alone
    until: datetime | None  # UTC; when the last of those can no longer change


@dataclass(frozen=True, slots=True)
class RowStory:
    row: dict[str, Any]  # cola_envios' columns (times in UTC) and the session's name
    attempts: list[dict[str, Any]]  # whatsapp_worker_attempts, oldest first
    statuses: list[dict[str, Any]]  # Meta's statuses about it, oldest first


@dataclass(frozen=True, slots=True)
class RetryScope:
    """Which of a session's rows `retry` sends again. Never a legacy copy (`legacy_duplicate >
    0`: sending it would be the old bug's second message), never an unknown row whose true
    result may still arrive."""

    states: tuple[str, ...] = ("error",)
    code: int | None = None  # only rows whose last error had it
    ids: tuple[int, ...] = ()
    phones: tuple[str, ...] = ()  # every form of the numbers
    skip_codes: tuple[int, ...] = ()  # error rows with these codes stay (permanent errors)

    def where(self, table: str = "") -> tuple[str, list[Any]]:
        """The conditions after `sesion_id = %s`, on `table.` columns, and their arguments."""
        t = f"{table}." if table else ""
        sql = f" AND {t}estado IN ({placeholders(len(self.states))}) AND {t}legacy_duplicate = 0"
        args: list[Any] = list(self.states)
        if self.code is not None:
            sql, args = sql + f" AND {t}last_error_code = %s", [*args, self.code]
        for column, values in ((f"{t}id", self.ids), (f"{t}telefono", self.phones)):
            if values:
                sql, args = sql + f" AND {column} IN ({placeholders(len(values))})", [*args, *values]
        if self.skip_codes:
            sql += (
                f" AND NOT ({t}estado = 'error' AND COALESCE({t}last_error_code IN"
                f" ({placeholders(len(self.skip_codes))}), FALSE))"
            )
            args += self.skip_codes
        # unqualified: those columns are cola_envios' alone, also where it is joined (`c`)
        return sql + f" AND NOT ({_LATE_OPEN})", args


# The late-result window of results.py: the lease plus one more lease length.
_LATE_OPEN = (
    f"estado = 'desconocido' AND lease_token IS NOT NULL AND COALESCE({LATE_RESULT_WINDOW} > {NOW}, FALSE)"
)
# -- name: result_may_arrive :one
RESULT_MAY_ARRIVE = (
    f"SELECT COUNT(*), MAX({LATE_RESULT_WINDOW}) FROM cola_envios WHERE sesion_id = %s AND {_LATE_OPEN}"
)
# -- name: list_rows :many
LIST_ROWS = (
    "SELECT id, telefono, cliente_id, estado, attempts, last_error_code, last_error, wamid,"
    " CONVERT_TZ(updated_at, @@session.time_zone, '+00:00') AS updated_utc"
    " FROM cola_envios WHERE sesion_id = %s AND estado IN ({states}){filters} AND id > %s"
    " ORDER BY id LIMIT %s"
)
# -- name: retry_plan :many
# What `retry` would send again, by state and last code, before it asks.
RETRY_PLAN = (
    "SELECT estado, last_error_code, COUNT(*) FROM cola_envios WHERE sesion_id = %s{scope}"
    " GROUP BY estado, last_error_code ORDER BY estado, last_error_code"
)
# -- name: row_story :one
ROW_STORY = (
    "SELECT c.id, c.sesion_id, s.nombre AS session_name, c.telefono, c.cliente_id, c.estado, c.attempts,"
    " c.attempts_before_retry, CONVERT_TZ(c.created_at, @@session.time_zone, '+00:00') AS created_utc,"
    " c.next_attempt_at, c.sent_at, c.wamid, c.delivered_at, c.read_at, c.settled_at, c.last_error_code,"
    " c.last_error, CONVERT_TZ(c.updated_at, @@session.time_zone, '+00:00') AS updated_utc"
    " FROM cola_envios c LEFT JOIN sesiones_envio s ON s.id = c.sesion_id WHERE c.id = %s"
)
# -- name: row_attempts :many
ROW_ATTEMPTS = (
    "SELECT attempted_at AS at, outcome, state, code, detail FROM whatsapp_worker_attempts"
    " WHERE cola_id = %s ORDER BY id"
)
# -- name: row_statuses :many
# Meta's statuses about the row (its wamid's), as stored by the webhook receiver.
ROW_STATUSES = (
    "SELECT COALESCE(status_at, received_at) AS at, status, wamid, error_code, error_title"
    " FROM whatsapp_worker_statuses WHERE cola_id = %s ORDER BY at, id"
)
# -- name: record_requeued :exec
# What each row was when an operator sent it again: its next attempt overwrites the row.
RECORD_REQUEUED = (
    "INSERT INTO whatsapp_worker_attempts (cola_id, attempted_at, outcome, state, code, detail)"
    f" SELECT id, {NOW}, 'requeued', estado, last_error_code, last_error FROM cola_envios"
    " WHERE sesion_id = %s{scope}"
)
# -- name: retry_rows :exec
# `attempts` is kept (the row's whole story); the attempts spent so far no longer count
# against WORKER_MAX_ATTEMPTS: the claim reads `attempts - attempts_before_retry`.
RETRY_ROWS = (
    "UPDATE cola_envios SET estado = 'pendiente', attempts_before_retry = attempts,"
    " next_attempt_at = NULL, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,"
    " claimed_at = NULL WHERE sesion_id = %s{scope}"
)

# -- name: lift_suppressions :exec
# The undeliverable holds (131026) of the phones `retry` sends again: the operator decided.
LIFT_SUPPRESSIONS = (
    "DELETE s FROM whatsapp_worker_suppressions s JOIN cola_envios c ON c.telefono = s.telefono"
    " WHERE c.sesion_id = %s{scope}"
)

# `status`. Its cost must not grow with a session's sent rows beyond one pass over them.


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
                if before == state:  # rows parked by a pause another way undid are unparked still
                    rows = (
                        await self._park_rows(cur, session_id, state) if state is SessionState.ACTIVE else 0
                    )
                    return SessionChange(session_id, before, before, rows)
                # `resume` also activates a session in a PHP application's own state (a draft):
                # the operator's explicit choice to send it.
                php_state = before not in {s.value for s in SessionState}
                if before not in allowed and not (state is SessionState.ACTIVE and php_state):
                    raise RefusedChange(
                        f"session #{session_id} is {state_word(before)}: cannot become {state_word(state)}"
                    )
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
            sql = f"next_attempt_at = COALESCE(next_attempt_at, {NOW}) + {PARKED}"
            where = f" AND NOT COALESCE({IS_PARKED}, FALSE)"
        elif state is SessionState.ACTIVE:
            sql = UNPARK
            where = f" AND {IS_PARKED}"
        else:
            sql = f"estado = 'error', last_error_code = NULL, last_error = '{CANCELLED_REASON}'"
            where = ""
        await cur.execute(
            f"UPDATE cola_envios SET {sql} WHERE sesion_id = %s AND estado = 'pendiente'{where}",
            (session_id,),
        )
        return int(cur.rowcount)

    async def story(self, row_id: int) -> RowStory | None:
        """One row as it is now, each attempt that did not send it and each `retry`, and Meta's
        statuses about it; None when there is no such row."""
        async with self._db.transaction() as cur:
            row = await _dicts(cur, ROW_STORY, (row_id,))
            if not row:
                return None
            attempts = await _dicts(cur, ROW_ATTEMPTS, (row_id,))
            statuses = await _dicts(cur, ROW_STATUSES, (row_id,))
        return RowStory(row[0], attempts, statuses)

    async def rows(
        self,
        session_id: int,
        *,
        states: Sequence[str],
        code: int | None,
        after_id: int,
        limit: int,
        phones: Sequence[str] = (),
        client_id: int | None = None,
    ) -> list[dict[str, Any]]:
        """One page of a session's rows in the given states, by id (keyset: flat however deep);
        `phones`: only rows for one of these (every form of one number); `client_id`: its rows."""
        filters, args = "", list[Any]()
        for column, value in (("last_error_code", code), ("cliente_id", client_id)):
            if value is not None:
                filters, args = filters + f" AND {column} = %s", [*args, value]
        if phones:
            filters, args = filters + f" AND telefono IN ({placeholders(len(phones))})", [*args, *phones]
        sql = LIST_ROWS.format(states=placeholders(len(states)), filters=filters)
        async with self._db.transaction() as cur:
            return await _dicts(cur, sql, (session_id, *states, *args, after_id, limit))

    async def retry_plan(self, session_id: int, scope: RetryScope) -> RetryPlan:
        """What `retry_session(scope)` would send again now, and the unknown rows it would not."""
        sql, args = scope.where()
        async with self._db.transaction() as cur:
            await cur.execute(RETRY_PLAN.format(scope=sql), (session_id, *args))
            groups = [(str(s), None if c is None else int(c), int(n)) for s, c, n in await cur.fetchall()]
            waiting, until = 0, None
            if "desconocido" in scope.states:
                await cur.execute(RESULT_MAY_ARRIVE, (session_id,))
                waiting, until = await cur.fetchone()
        return RetryPlan(groups, int(waiting or 0), until)

    async def retry_session(self, session_id: int, scope: RetryScope) -> int:
        """Send the rows in `scope` again (the CLI decides which, and asks first).

        An unknown row whose worker may still write its true result (its lease token is set
        and the late-result window is open) is left alone: re-sending it now could duplicate
        a message that was in fact delivered.
        """
        sql, args = scope.where()
        joined_sql, joined_args = scope.where("c")

        async def attempt() -> int:
            async with self._db.transaction() as cur:
                before = await self._lock_session(cur, session_id)
                if before == SessionState.CANCELLED:
                    raise RefusedChange(f"session #{session_id} is cancelled: nothing to retry")
                # the operator's decision to try again lifts the phones' 131026 holds too
                await cur.execute(LIFT_SUPPRESSIONS.format(scope=joined_sql), (session_id, *joined_args))
                await cur.execute(RECORD_REQUEUED.format(scope=sql), (session_id, *args))
                await cur.execute(RETRY_ROWS.format(scope=sql), (session_id, *args))
                count = int(cur.rowcount)
                if count and before == SessionState.COMPLETED:
                    await cur.execute(
                        "UPDATE sesiones_envio SET estado = 'activa' WHERE id = %s", (session_id,)
                    )
            return count

        return await with_transient_retry(attempt)

    @staticmethod
    async def _lock_session(cur: aiomysql.Cursor, session_id: int) -> str:
        await cur.execute("SELECT estado FROM sesiones_envio WHERE id = %s FOR UPDATE", (session_id,))
        row = await cur.fetchone()
        if row is None:
            raise RefusedChange(f"there is no session #{session_id}")
        return str(row[0])


async def _dicts(cur: aiomysql.Cursor, sql: str, args: Sequence[Any]) -> list[dict[str, Any]]:
    await cur.execute(sql, args)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]
