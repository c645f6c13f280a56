"""The only module that speaks SQL.

Every transaction is short: no transaction is ever open across an HTTP call. Every write
after the claim is fenced on the claim's lease token, so a worker whose lease was taken
over changes nothing.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import aiomysql
import pymysql

from worker import schema
from worker.config import DatabaseURL
from worker.models import Finished, Job, Outcome, RowState, SessionState

T = TypeVar("T")
DEADLOCK, LOCK_WAIT_TIMEOUT = 1213, 1205
TRANSIENT_ERRORS = frozenset({DEADLOCK, LOCK_WAIT_TIMEOUT})
UNKNOWN_DATABASE = 1049
ERROR_TEXT_MAX = 1000
TRANSACTION_TIMEOUT = 15.0  # seconds; a TimeoutError is an OSError, handled as an outage

# The state each outcome leaves a row in; PAUSE gives the row back without spending an attempt.
STATE_AFTER = {
    Outcome.SENT: RowState.SENT,
    Outcome.RETRY: RowState.PENDING,
    Outcome.PERMANENT: RowState.ERROR,
    Outcome.UNKNOWN: RowState.UNKNOWN,
    Outcome.PAUSE: RowState.PENDING,
}
SPENDS_ATTEMPT = frozenset({Outcome.SENT, Outcome.RETRY, Outcome.PERMANENT, Outcome.UNKNOWN})


class DatabaseError(Exception):
    """The database refused or could not be reached; the message is safe to log."""


class RefusedChange(Exception):
    """An operator command that does not apply (no such session, wrong state)."""


@dataclass(frozen=True, slots=True)
class SessionChange:
    session_id: int
    before: SessionState
    after: SessionState
    rows: int  # rows held back (pause), waiting again (resume) or closed (cancel)


@dataclass(frozen=True, slots=True)
class Recorded:
    written: int  # rows whose result was stored
    fenced_out: int  # rows another worker took over: nothing written for them


def _placeholders(count: int) -> str:
    return ",".join(["%s"] * count)


def _case(column: str, values: dict[int, Any], *, default: str | None = None) -> tuple[str, list[Any]]:
    """`CASE id WHEN 1 THEN %s ... ELSE <default> END` for per-row values in one UPDATE."""
    params: list[Any] = []
    whens = []
    for row_id, value in values.items():
        whens.append("WHEN %s THEN %s")
        params += [row_id, value]
    if not whens:
        return default or column, []
    return f"CASE id {' '.join(whens)} ELSE {default or column} END", params


async def with_transient_retry(action: Callable[[], Awaitable[T]], attempts: int = 5) -> T:
    """Retry a whole transaction on deadlock (1213) or lock-wait timeout (1205), with jitter."""
    for attempt in range(1, attempts + 1):
        try:
            return await action()
        except pymysql.err.OperationalError as exc:
            if exc.args[0] not in TRANSIENT_ERRORS or attempt == attempts:
                raise
            await asyncio.sleep(random.uniform(0, 0.02 * 2**attempt))
    raise AssertionError("unreachable")


class ConnectionPool:
    """A few connections to one database, handed out one transaction at a time.

    Written here rather than using aiomysql's Pool: that pool wakes no waiter when a closed
    connection is returned, so after an outage a claim could wait forever for a free slot.
    A semaphore counts the slots; a broken connection is dropped and replaced on demand.
    """

    def __init__(self, url: DatabaseURL, size: int) -> None:
        self._url = url
        self._slots = asyncio.Semaphore(size)
        self._idle: list[aiomysql.Connection] = []

    async def acquire(self) -> aiomysql.Connection:
        await self._slots.acquire()
        try:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
            return await aiomysql.connect(
                host=self._url.host,
                port=self._url.port,
                user=self._url.user,
                password=self._url.password,
                db=self._url.database,
                autocommit=False,
                charset="utf8mb4",
                connect_timeout=10,
                init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
            )
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn: aiomysql.Connection, *, broken: bool = False) -> None:
        if broken:
            conn.close()
        elif not conn.closed:
            self._idle.append(conn)
        self._slots.release()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


class Store:
    def __init__(self, pool: ConnectionPool, *, worker_id: str = "") -> None:
        self._pool = pool
        self.worker_id = worker_id

    @classmethod
    async def connect(
        cls, url: DatabaseURL, *, size: int = 4, worker_id: str = "", create_database: bool = False
    ) -> Store:
        """Open the pool and check the database answers (a clear error if it does not)."""
        if create_database:
            await _create_database(url)
        store = cls(ConnectionPool(url, size), worker_id=worker_id)
        try:
            await store.ping()
        except (pymysql.err.MySQLError, OSError) as exc:
            raise DatabaseError(f"cannot connect to {url.redacted()}: {_describe(exc)}") from None
        return store

    async def close(self) -> None:
        self._pool.close()

    @asynccontextmanager
    async def _connection(
        self, deadline: float | None = TRANSACTION_TIMEOUT
    ) -> AsyncIterator[aiomysql.Connection]:
        # aiomysql has no read timeout: a connection that died silently would hang forever
        # (and keep its row locks), so every use has a deadline.
        async with asyncio.timeout(deadline):
            conn = await self._pool.acquire()
            try:
                yield conn
            except BaseException:
                # A broken or cancelled connection must not go back to the pool half-used.
                self._pool.release(conn, broken=True)
                raise
            self._pool.release(conn)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiomysql.Cursor]:
        async with self._connection() as conn:
            async with conn.cursor() as cur:
                yield cur
            await conn.commit()

    async def ping(self) -> None:
        async with self._transaction() as cur:
            await cur.execute("SELECT 1")

    # -- schema ---------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        """Apply what is missing, under a named lock so two `migrate` runs do not race."""
        applied: list[int] = []
        async with self._connection(deadline=None) as conn, conn.cursor() as cur:
            await cur.execute("SELECT GET_LOCK('whatsapp_worker_migrate', 60)")
            (locked,) = await cur.fetchone()
            if locked != 1:
                raise DatabaseError("another migrate holds the lock whatsapp_worker_migrate")
            try:
                with _quiet_notes():
                    await cur.execute(schema.VERSION_TABLE)
                await cur.execute("SELECT version FROM whatsapp_worker_migrations")
                done = {row[0] for row in await cur.fetchall()}
                for migration in schema.MIGRATIONS:
                    if migration.version in done:
                        continue
                    for statement in migration.statements:
                        with _quiet_notes():
                            await cur.execute(statement)
                    await cur.execute(
                        "INSERT INTO whatsapp_worker_migrations (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
                    await conn.commit()
                    applied.append(migration.version)
            finally:
                await cur.execute("DO RELEASE_LOCK('whatsapp_worker_migrate')")
                await conn.commit()
        return applied

    async def schema_version(self) -> int:
        async with self._transaction() as cur:
            try:
                await cur.execute("SELECT MAX(version) FROM whatsapp_worker_migrations")
            except pymysql.err.ProgrammingError:
                return 0
            (version,) = await cur.fetchone()
            return int(version or 0)

    # -- the daemon's queries -------------------------------------------------------------

    CLAIM_SQL = (
        "SELECT id, sesion_id, cliente_id, telefono, mensaje, attempts FROM cola_envios"
        " WHERE estado = 'pendiente' AND next_attempt_at <= NOW(6){held}"
        " ORDER BY next_attempt_at, id LIMIT %s FOR UPDATE SKIP LOCKED"
    )

    async def claim(self, limit: int, *, lease_seconds: float) -> list[Job]:
        """Take up to `limit` due rows of sessions that may send, under a fresh lease token."""
        if limit <= 0:
            return []

        async def attempt() -> list[Job]:
            token = secrets.token_hex(16)
            async with self._transaction() as cur:
                await cur.execute(
                    "SELECT id FROM sesiones_envio WHERE estado IN (%s, %s)",
                    (SessionState.PAUSED, SessionState.CANCELLED),
                )
                held = [row[0] for row in await cur.fetchall()]
                held_sql = f" AND sesion_id NOT IN ({_placeholders(len(held))})" if held else ""
                await cur.execute(self.CLAIM_SQL.format(held=held_sql), (*held, limit))
                rows = await cur.fetchall()
                if not rows:
                    return []
                ids = [row[0] for row in rows]
                await cur.execute(
                    "UPDATE cola_envios SET estado = 'procesando', lease_owner = %s,"
                    " lease_token = %s, lease_expires_at = NOW(6) + INTERVAL %s MICROSECOND"
                    f" WHERE id IN ({_placeholders(len(ids))})",
                    (self.worker_id[:128], token, int(lease_seconds * 1_000_000), *ids),
                )
            return [Job(r[0], r[1], r[2], r[3], r[4], r[5], token) for r in rows]

        return await with_transient_retry(attempt)

    async def record(self, finished: Sequence[Finished]) -> Recorded:
        """Write a batch of results in one transaction, fenced on each row's lease token.

        A sent row becomes `enviado` and gains its `envios_whatsapp` row in the same commit.
        A row recovered as `desconocido` while this worker was cut off still carries its token:
        the result this worker knows replaces the guess.
        """
        if not finished:
            return Recorded(0, 0)

        async def attempt() -> Recorded:
            async with self._transaction() as cur:
                ids = [f.job.id for f in finished]
                await cur.execute(
                    f"SELECT id, lease_token FROM cola_envios WHERE id IN ({_placeholders(len(ids))})"
                    " AND estado IN ('procesando', 'desconocido') FOR UPDATE",
                    ids,
                )
                tokens = dict(await cur.fetchall())
                mine = [f for f in finished if tokens.get(f.job.id) == f.job.lease_token]
                if mine:
                    await self._write_results(cur, mine)
            return Recorded(len(mine), len(finished) - len(mine))

        return await with_transient_retry(attempt)

    async def _write_results(self, cur: aiomysql.Cursor, rows: list[Finished]) -> None:
        sent = {f.job.id: f.result.wamid for f in rows if f.result.outcome is Outcome.SENT}
        if sent:
            await self._write_sent(cur, sent)
        others = [f for f in rows if f.result.outcome is not Outcome.SENT]
        if others:
            await self._write_unsent(cur, others)

    @staticmethod
    async def _write_sent(cur: aiomysql.Cursor, wamids: dict[int, str | None]) -> None:
        """The common case, kept lean: `enviado` plus the `envios_whatsapp` row."""
        wamid_sql, wamid_params = _case("wamid", wamids)
        in_ids = _placeholders(len(wamids))
        await cur.execute(
            f"UPDATE cola_envios SET estado = 'enviado', wamid = {wamid_sql},"
            " attempts = attempts + 1, sent_at = NOW(6), last_error_code = NULL, last_error = NULL,"
            " lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL"
            f" WHERE id IN ({in_ids})",
            (*wamid_params, *wamids),
        )
        await cur.execute(
            "INSERT INTO envios_whatsapp (cola_id, sesion_id, cliente_id, telefono, wamid,"
            " fecha_envio) SELECT id, sesion_id, cliente_id, telefono, wamid, NOW()"
            f" FROM cola_envios WHERE id IN ({in_ids})",
            list(wamids),
        )

    @staticmethod
    async def _write_unsent(cur: aiomysql.Cursor, rows: list[Finished]) -> None:
        """Retry, error, unknown, pause: per-row state, attempt, delay and error in one UPDATE."""
        ids = [f.job.id for f in rows]
        state_sql, state_params = _case("estado", {f.job.id: STATE_AFTER[f.result.outcome] for f in rows})
        spent_sql, spent_params = _case(
            "0", {f.job.id: int(f.result.outcome in SPENDS_ATTEMPT) for f in rows}
        )
        delay_sql, delay_params = _case(
            "0", {f.job.id: int((f.result.retry_after or 0) * 1_000_000) for f in rows}
        )
        attempted = [f for f in rows if f.result.outcome in SPENDS_ATTEMPT]
        code_sql, code_params = _case("last_error_code", {f.job.id: f.result.error_code for f in attempted})
        text_sql, text_params = _case(
            "last_error",
            {f.job.id: (f.result.error_text or "")[:ERROR_TEXT_MAX] or None for f in attempted},
        )
        await cur.execute(
            f"UPDATE cola_envios SET estado = {state_sql}, attempts = attempts + {spent_sql},"
            f" next_attempt_at = IF(estado = 'pendiente',"
            f" NOW(6) + INTERVAL {delay_sql} MICROSECOND, next_attempt_at),"
            f" last_error_code = {code_sql}, last_error = {text_sql},"
            " lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL"
            f" WHERE id IN ({_placeholders(len(ids))})",
            (*state_params, *spent_params, *delay_params, *code_params, *text_params, *ids),
        )

    async def recover_expired(self) -> int:
        """Rows whose worker died: their request may have left, so they become unknown.

        The daemon claims only rows it sends at once, so every claimed row may be in flight.
        The lease token stays: a worker that was only cut off from the database can still
        write the result it holds in memory (see `record`).
        """

        return await self._update(
            "UPDATE cola_envios SET estado = 'desconocido', attempts = attempts + 1,"
            " last_error_code = NULL,"
            " last_error = CONCAT('lease of ', COALESCE(lease_owner, '?'),"
            " ' expired while the message may have been in flight'),"
            " lease_owner = NULL, lease_expires_at = NULL"
            " WHERE estado = 'procesando' AND lease_expires_at < NOW(6)"
        )

    async def _update(self, sql: str, args: Sequence[Any] = ()) -> int:
        """One statement in its own short transaction, retried on deadlock; rows changed."""

        async def attempt() -> int:
            async with self._transaction() as cur:
                await cur.execute(sql, args)
                return int(cur.rowcount)

        return await with_transient_retry(attempt)

    async def session_totals(self, session_ids: Iterable[int]) -> dict[int, tuple[int, int]]:
        """sesion_id -> (rows finished, rows in all), for progress lines."""
        ids = list(session_ids)
        if not ids:
            return {}
        async with self._transaction() as cur:
            await cur.execute(
                "SELECT sesion_id, SUM(estado IN ('enviado', 'error', 'desconocido')), COUNT(*)"
                f" FROM cola_envios WHERE sesion_id IN ({_placeholders(len(ids))})"
                " GROUP BY sesion_id",
                ids,
            )
            return {row[0]: (int(row[1]), int(row[2])) for row in await cur.fetchall()}

    async def complete_session(self, session_id: int) -> bool:
        """Mark an active session with nothing left to send as completed."""
        changed = await self._update(
            "UPDATE sesiones_envio SET estado = 'completada' WHERE id = %s"
            " AND estado = 'activa' AND NOT EXISTS (SELECT 1 FROM cola_envios"
            " WHERE sesion_id = %s AND estado IN ('pendiente', 'procesando'))",
            (session_id, session_id),
        )
        return changed == 1

    # -- producers and operators ----------------------------------------------------------

    async def enqueue(
        self, session_name: str, rows: Sequence[tuple[int | None, str, str]]
    ) -> tuple[int, int, int]:
        """Create (or reuse) a session by name and queue rows `(cliente_id, telefono, mensaje)`.

        One transaction: a failure leaves nothing behind. Returns (session id, new, already queued).
        """

        async def attempt() -> tuple[int, int, int]:
            async with self._transaction() as cur:
                await cur.execute(
                    "INSERT INTO sesiones_envio (nombre) VALUES (%s)"
                    " ON DUPLICATE KEY UPDATE id = LAST_INSERT_ID(id)",
                    (session_name,),
                )
                session_id = int(cur.lastrowid)
                await cur.execute("SELECT estado FROM sesiones_envio WHERE id = %s FOR UPDATE", (session_id,))
                (state,) = await cur.fetchone()
                if state == SessionState.CANCELLED:
                    raise RefusedChange(f"session {session_name!r} (#{session_id}) is cancelled")
                before = await self._count_rows(cur, session_id)
                if rows:
                    await cur.executemany(
                        "INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje)"
                        " VALUES (%s, %s, %s, %s) ON DUPLICATE KEY UPDATE id = id",
                        [(session_id, *row) for row in rows],
                    )
                added = await self._count_rows(cur, session_id) - before
                if added and state == SessionState.COMPLETED:
                    await cur.execute(
                        "UPDATE sesiones_envio SET estado = 'activa' WHERE id = %s", (session_id,)
                    )
            return session_id, added, len(rows) - added

        return await with_transient_retry(attempt)

    @staticmethod
    async def _count_rows(cur: aiomysql.Cursor, session_id: int) -> int:
        await cur.execute("SELECT COUNT(*) FROM cola_envios WHERE sesion_id = %s", (session_id,))
        (count,) = await cur.fetchone()
        return int(count)

    async def defer_template(self, name: str, seconds: float) -> int:
        """Hold back the waiting rows of one template (paused or disabled by Meta)."""

        delay = int(seconds * 1_000_000)
        return await self._update(
            "UPDATE cola_envios SET next_attempt_at = NOW(6) + INTERVAL %s MICROSECOND"
            " WHERE estado = 'pendiente' AND next_attempt_at < NOW(6) + INTERVAL %s MICROSECOND"
            " AND JSON_VALID(mensaje)"
            " AND JSON_UNQUOTE(JSON_EXTRACT(mensaje, '$.template.name')) = %s",
            (delay, delay, name),
        )

    async def set_session_state(self, session_id: int, state: SessionState) -> SessionChange:
        """pause / resume / cancel a session; says what changed."""
        allowed = {
            SessionState.PAUSED: (SessionState.ACTIVE,),
            SessionState.ACTIVE: (SessionState.PAUSED,),
            SessionState.CANCELLED: (SessionState.ACTIVE, SessionState.PAUSED),
        }[state]

        async def attempt() -> SessionChange:
            async with self._transaction() as cur:
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
            sql = "next_attempt_at = next_attempt_at + INTERVAL 100 YEAR"
            where = ""
        elif state is SessionState.ACTIVE:
            sql = "next_attempt_at = next_attempt_at - INTERVAL 100 YEAR"
            where = " AND next_attempt_at > NOW(6) + INTERVAL 50 YEAR"
        else:
            sql = (
                "estado = 'error', last_error_code = NULL,"
                " last_error = 'session cancelled by the operator: not sent'"
            )
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

    async def retry_session(self, session_id: int, *, include_unknown: bool) -> int:
        """Send `error` rows (and, only when asked, `desconocido` rows) again."""
        states = ("error", "desconocido") if include_unknown else ("error",)

        async def attempt() -> int:
            async with self._transaction() as cur:
                before = await self._lock_session(cur, session_id)
                if before == SessionState.CANCELLED:
                    raise RefusedChange(f"session #{session_id} is cancelled: nothing to retry")
                await cur.execute(
                    "UPDATE cola_envios SET estado = 'pendiente', attempts = 0,"
                    " next_attempt_at = NOW(6), lease_token = NULL"
                    f" WHERE sesion_id = %s AND estado IN ({_placeholders(len(states))})",
                    (session_id, *states),
                )
                count = int(cur.rowcount)
                if count and before == SessionState.COMPLETED:
                    await cur.execute(
                        "UPDATE sesiones_envio SET estado = 'activa' WHERE id = %s", (session_id,)
                    )
            return count

        return await with_transient_retry(attempt)

    @staticmethod
    async def _lock_session(cur: aiomysql.Cursor, session_id: int) -> SessionState:
        await cur.execute("SELECT estado FROM sesiones_envio WHERE id = %s FOR UPDATE", (session_id,))
        row = await cur.fetchone()
        if row is None:
            raise RefusedChange(f"there is no session #{session_id}")
        return SessionState(row[0])

    async def status(self, session_id: int | None = None) -> list[dict[str, Any]]:
        """Per-session progress: counts per state, sends in the last minute, top errors."""
        where, params = ("WHERE s.id = %s", [session_id]) if session_id is not None else ("", [])
        sessions: dict[int, dict[str, Any]] = {}
        async with self._transaction() as cur:
            await cur.execute(
                f"SELECT s.id, s.nombre, s.estado, s.created_at FROM sesiones_envio s {where} ORDER BY s.id",
                params,
            )
            for sid, name, state, created in await cur.fetchall():
                sessions[sid] = {
                    "id": sid,
                    "name": name,
                    "state": state,
                    "created_at": created.isoformat(),
                    "counts": {s.value: 0 for s in RowState},
                    "total": 0,
                    "sent_last_minute": 0,
                    "errors": [],
                }
            if not sessions:
                return []
            ids = list(sessions)
            in_ids = _placeholders(len(ids))
            await cur.execute(
                f"SELECT sesion_id, estado, COUNT(*) FROM cola_envios WHERE sesion_id IN ({in_ids})"
                " GROUP BY sesion_id, estado",
                ids,
            )
            for sid, state, count in await cur.fetchall():
                sessions[sid]["counts"][state] = int(count)
                sessions[sid]["total"] += int(count)
            await cur.execute(
                "SELECT sesion_id, COUNT(*) FROM envios_whatsapp"
                f" WHERE fecha_envio >= NOW() - INTERVAL 1 MINUTE AND sesion_id IN ({in_ids})"
                " GROUP BY sesion_id",
                ids,
            )
            for sid, count in await cur.fetchall():
                sessions[sid]["sent_last_minute"] = int(count)
            await cur.execute(
                "SELECT sesion_id, estado, last_error_code, COUNT(*), MAX(last_error)"
                " FROM cola_envios WHERE estado IN ('error', 'desconocido')"
                f" AND sesion_id IN ({in_ids}) GROUP BY sesion_id, estado, last_error_code"
                " ORDER BY COUNT(*) DESC",
                ids,
            )
            for sid, state, code, count, text in await cur.fetchall():
                sessions[sid]["errors"].append(
                    {"state": state, "code": code, "count": int(count), "example": text}
                )
        return list(sessions.values())


async def _create_database(url: DatabaseURL) -> None:
    try:
        conn = await aiomysql.connect(
            host=url.host, port=url.port, user=url.user, password=url.password, connect_timeout=10
        )
    except (pymysql.err.MySQLError, OSError) as exc:
        raise DatabaseError(f"cannot connect to {url.redacted()}: {_describe(exc)}") from None
    try:
        async with conn.cursor() as cur:
            name = url.database.replace("`", "``")
            with _quiet_notes():
                await cur.execute(f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4")
    finally:
        conn.close()


@contextmanager
def _quiet_notes() -> Iterator[None]:
    """`IF NOT EXISTS` DDL raises notes ("already exists") as Python warnings: expected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pymysql.Warning)
        yield


def _describe(exc: BaseException) -> str:
    if isinstance(exc, pymysql.err.MySQLError) and len(exc.args) >= 2:
        return f"({exc.args[0]}) {exc.args[1]}"
    return str(exc) or type(exc).__name__
