"""Connections, transactions, and the translation of driver errors.

No module above the store imports the database driver: every failure leaves here as one of
three exceptions, so callers can tell "the database is away" (wait and retry) from "this
statement can never work as written" (stop and say why) from "the server refused a value in
this statement" (isolate the row and record why).
"""

from __future__ import annotations

import asyncio
import random
import re
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import aiomysql
import pymysql

from worker.config import DatabaseURL

T = TypeVar("T")
DEADLOCK, LOCK_WAIT_TIMEOUT = 1213, 1205
TRANSACTION_TIMEOUT = 15.0  # seconds (WORKER_DB_TIMEOUT); aiomysql has no read timeout of its own
# Queue times (due, leases) are UTC from the database clock: no host clock, no session time_zone.
UTC_NOW = "UTC_TIMESTAMP(6)"
COMMITTED = "_whatsapp_worker_committed"  # a cursor whose transaction `commit_with` ended
ROLLBACK_TIMEOUT = 2.0  # seconds for the rollback after a refused row, before the connection is dropped
# MySQL cuts GROUP_CONCAT at 1,024 bytes by default, and a strict session makes the cut an error:
# the operator's holds are read with it (one round trip per claim), and some 60 held numbers stopped
# every claim. MariaDB's default is this one.
GROUP_CONCAT_MAX = 1024 * 1024
USE_TIMEOUT = -1.0  # `connection(deadline=...)`: the Database's own timeout; None: no deadline
# Our own sessions are strict whatever the server's default: a value a column cannot hold is
# an error here, never a silent truncation (or an ENUM stored as '').
# Not NO_ZERO_DATE: PHP tables often default a column to '0000-00-00', and an INSERT that does
# not name that column would be refused. (MySQL warns, 3135, that strict mode should come with
# the zero-date modes: the mode is set where that warning is not fetched.)
SESSION_SQL_MODE = "STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION"
# What each server error means for a running daemon. The server passes through these states
# (a failover's read-only primary, a restart, a crowd, a lock): an outage, the same statement
# works later, nothing is dropped and the daemon never exits for them.
PASSING_STATES = {
    1040: "too many connections",
    1047: "Galera: this node is not ready (WSREP has not yet prepared node for application use)",
    1053: "server shutdown in progress",
    1158: "network read error",
    1159: "network read timed out",
    1160: "network write error",
    1161: "network write timed out",
    1203: "the user has too many connections",
    1205: "lock wait timeout",
    1213: "deadlock",
    1226: "a user resource limit was reached (max_queries_per_hour...)",
    1290: "read-only (--read-only / --super-read-only: a failover, maintenance, a demoted primary)",
    1317: "query interrupted",
    1637: "too many active concurrent transactions",
    1792: "read-only transaction",
    1836: "read-only mode",
    1927: "connection killed",
    1969: "MariaDB max_statement_time exceeded",
    3024: "MySQL max_execution_time exceeded",
    3100: "Group Replication refused the commit (this member is not writable)",
    3101: "Group Replication rolled the transaction back at commit",
    4031: "the server closed an idle connection",
}
# The client lost the server (connection refused, gone away, lost during a query...).
CLIENT_CODES = frozenset({2002, 2003, 2005, 2006, 2013, 2014, 2055})
UNAVAILABLE_CODES = frozenset(PASSING_STATES) | CLIENT_CODES
# The server refused a value of this statement: duplicate key, too long, wrong type, bad JSON...
# 1644: a trigger's own SIGNAL (an audit or validation trigger of the PHP application's).
ROW_LEVEL_CODES = frozenset({1048, 1062, 1264, 1265, 1292, 1366, 1406, 1452, 1644, 3140, 3819, 4025})
# Everything else is a statement no wait can fix. Refused privileges are told apart from a
# schema that lacks something: `migrate` cannot grant.
PRIVILEGE_CODES = frozenset({1044, 1142, 1143, 1227, 1370})


class DatabaseError(Exception):
    """Base of the store's errors; the message is safe to log (no password)."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class DatabaseUnavailable(DatabaseError):
    """The database could not be reached or dropped the connection: try again later."""


class StatementRefused(DatabaseError):
    """A statement the server will never accept as written (missing column or table,
    permission): retrying cannot help; usually the schema needs `whatsapp-worker migrate`."""

    @property
    def remedy(self) -> str:
        """What a person must do about it."""
        if self.code in PRIVILEGE_CODES:
            return "grant the database user SELECT, INSERT, UPDATE and DELETE on the worker's tables"
        return "run `whatsapp-worker migrate`"


class RowRefused(DatabaseError):
    """The server refused a value in this statement (duplicate key, too long, invalid):
    the statement may work for other rows."""


def translate(exc: BaseException) -> DatabaseError:
    """A driver or network exception as one of ours."""
    if isinstance(exc, DatabaseError):
        return exc
    if isinstance(exc, UnicodeError):  # a parameter the driver cannot encode (a lone surrogate)
        return RowRefused(f"a value cannot be encoded: {exc}")
    if isinstance(exc, pymysql.err.MySQLError):
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        text = describe(exc)
        if isinstance(exc, pymysql.err.InterfaceError) or code in UNAVAILABLE_CODES or code is None:
            return DatabaseUnavailable(text, code=code)
        if code in ROW_LEVEL_CODES:
            return RowRefused(text, code=code)
        return StatementRefused(text, code=code)
    return DatabaseUnavailable(describe(exc))


def describe(exc: BaseException) -> str:
    if isinstance(exc, pymysql.err.MySQLError) and len(exc.args) >= 2:
        return f"({exc.args[0]}) {exc.args[1]}"
    if isinstance(exc, TimeoutError):
        return f"no answer within {TRANSACTION_TIMEOUT:g}s"
    return str(exc) or type(exc).__name__


DRIVER_ERRORS = (pymysql.err.MySQLError, OSError, UnicodeError)


async def with_transient_retry(action: Callable[[], Awaitable[T]], attempts: int = 5) -> T:
    """Retry a whole transaction on deadlock (1213) or lock-wait timeout (1205), with jitter."""
    for attempt in range(1, attempts + 1):
        try:
            return await action()
        except DatabaseUnavailable as exc:
            if exc.code not in (DEADLOCK, LOCK_WAIT_TIMEOUT) or attempt == attempts:
                raise
            await asyncio.sleep(random.uniform(0, 0.02 * 2**attempt))
    raise AssertionError("unreachable")


def placeholders(count: int) -> str:
    return ",".join(["%s"] * count)


def id_list(ids: Iterable[int]) -> str:
    """Row ids written into the statement (`int` makes them safe to), sparing the driver the
    escaping of each one as a parameter."""
    return ",".join(str(int(i)) for i in ids)


def case(column: str, values: dict[int, Any], *, default: str | None = None) -> tuple[str, list[Any]]:
    """`CASE id WHEN 1 THEN %s ... ELSE <default> END` for per-row values in one UPDATE."""
    params: list[Any] = []
    whens = []
    for row_id, value in values.items():
        whens.append("WHEN %s THEN %s")
        params += [row_id, value]
    if not whens:
        return default or column, []
    return f"CASE id {' '.join(whens)} ELSE {default or column} END", params


async def commit_with(cur: aiomysql.Cursor, sql: str, args: Any = ()) -> int:
    """A transaction's last statement and its COMMIT in one round trip (aiomysql's connections
    take several statements at once); the rows its first statement changed. Nothing may follow
    it in the transaction: `transaction()` does not commit again. An error in either is raised here
    and the connection is dropped, which rolls the transaction back."""
    await cur.execute(f"{sql}; COMMIT", args)
    changed = int(cur.rowcount)
    while await cur.nextset():
        pass
    setattr(cur, COMMITTED, True)  # a mark of ours on the driver's object
    return changed


@contextmanager
def quiet_notes() -> Iterator[None]:
    """`IF NOT EXISTS` DDL raises notes ("already exists") as Python warnings: expected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pymysql.Warning)
        yield


async def open_connection(url: DatabaseURL, *, database: bool = True) -> aiomysql.Connection:
    conn = await aiomysql.connect(
        host=url.host,
        port=url.port,
        user=url.user,
        # aiomysql sends `password.encode("latin1")`: hand it the str whose latin-1 bytes are
        # the password's UTF-8 bytes, or a non-ASCII password could never log in.
        password=url.password.encode("utf-8").decode("latin-1"),
        db=url.database if database else None,
        autocommit=False,
        charset="utf8mb4",
        connect_timeout=10,
        # As the init command its MySQL warning (3135, see above) is not fetched: a warning
        # filter would not do, it is process-wide and these connections open concurrently.
        init_command=(
            f"SET SESSION sql_mode = '{SESSION_SQL_MODE}', SESSION group_concat_max_len = {GROUP_CONCAT_MAX}"
        ),
    )
    try:
        async with conn.cursor() as cur:
            await cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    except BaseException:
        conn.close()
        raise
    return conn


# The characters pymysql's `escape_string` escapes, with what it writes for each.
_ESCAPES = (
    ("\\", "\\\\"),
    ("\0", "\\0"),
    ("\n", "\\n"),
    ("\r", "\\r"),
    ("\x1a", "\\Z"),
    ("'", "\\'"),
    ('"', '\\"'),
)
_NEEDS_ESCAPE = re.compile("[" + re.escape("".join(char for char, _ in _ESCAPES)) + "]")


def escape_string(value: str) -> str:
    """pymysql's `escape_string`, character for character, and about six times faster on the
    text we send. Its per-character `translate` took 8 µs for a status's 300-byte JSON (every
    quote is escaped), the receiver's largest cost of its own after aiohttp; seven replaces in C
    take 1.3 µs. The backslash goes first, so no later replacement's backslash is doubled."""
    if _NEEDS_ESCAPE.search(value) is None:
        return value
    for char, escaped in _ESCAPES:
        value = value.replace(char, escaped)
    return value


# The driver escapes every string parameter with pymysql's function: it gets this one, whose
# output is the same (tests/unit/test_store_escape.py compares every character).
aiomysql.connection.escape_string = escape_string


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
            return await open_connection(self._url)
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


class Database:
    """The pool plus the two ways to use it: a connection, or a transaction that commits."""

    def __init__(self, url: DatabaseURL, *, size: int = 4, timeout: float = TRANSACTION_TIMEOUT) -> None:
        self.url = url
        self.timeout = timeout
        self._pool = ConnectionPool(url, size)

    @classmethod
    async def connect(
        cls,
        url: DatabaseURL,
        *,
        size: int = 4,
        db_timeout: float = TRANSACTION_TIMEOUT,
        create_database: bool = False,
    ) -> Database:
        """Open the pool and check the database answers (a clear error if it does not)."""
        if create_database:
            await _create_database(url)
        db = cls(url, size=size, timeout=db_timeout)
        try:
            await db.ping()
        except DatabaseError as exc:
            raise type(exc)(f"cannot connect to {url.redacted()}: {exc}", code=exc.code) from None
        return db

    def close(self) -> None:
        self._pool.close()

    @asynccontextmanager
    async def connection(self, deadline: float | None = USE_TIMEOUT) -> AsyncIterator[aiomysql.Connection]:
        """A pooled connection; every driver error leaves as one of ours.

        aiomysql has no read timeout: a connection that died silently would hang forever (and
        keep its row locks), so every use has a deadline.
        """
        try:
            async with asyncio.timeout(self.timeout if deadline == USE_TIMEOUT else deadline):
                conn = await self._pool.acquire()
                try:
                    yield conn
                except BaseException as exc:
                    # A broken or cancelled connection must not go back to the pool half-used.
                    if _row_refused(exc):  # the server answers: free the rows' locks now
                        await _roll_back(conn)
                    self._pool.release(conn, broken=True)
                    raise
                self._pool.release(conn)
        except DRIVER_ERRORS as exc:
            raise translate(exc) from None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiomysql.Cursor]:
        async with self.connection() as conn:
            async with conn.cursor() as cur:
                yield cur
            if not getattr(cur, COMMITTED, False):  # the body ended with `commit_with`
                await conn.commit()

    async def ping(self) -> None:
        async with self.transaction() as cur:
            await cur.execute("SELECT 1")

    async def update(self, sql: str, args: Any = ()) -> int:
        """One statement in its own short transaction, retried on deadlock; rows changed."""

        async def attempt() -> int:
            async with self.transaction() as cur:
                await cur.execute(sql, args)
                return int(cur.rowcount)

        return await with_transient_retry(attempt)


def _row_refused(exc: BaseException) -> bool:
    """The server refused a value (as `translate` classes it): the connection still answers,
    and its transaction holds locks."""
    return isinstance(exc, (*DRIVER_ERRORS, DatabaseError)) and isinstance(translate(exc), RowRefused)


async def _roll_back(conn: aiomysql.Connection) -> None:
    """Roll back before the connection is dropped. Closing alone leaves the locks until the
    server notices the close, and a retry that reads with SKIP LOCKED (the statuses' settler
    splitting a refused batch) would skip the very rows it is retrying."""
    try:
        async with asyncio.timeout(ROLLBACK_TIMEOUT):
            await conn.rollback()
    except (*DRIVER_ERRORS, TimeoutError):
        pass  # dropped all the same: the server rolls back when it notices


async def _create_database(url: DatabaseURL) -> None:
    try:
        conn = await open_connection(url, database=False)
    except DRIVER_ERRORS as exc:
        raise translate(exc) from None
    try:
        async with conn.cursor() as cur:
            name = url.database.replace("`", "``")
            with quiet_notes():
                await cur.execute(f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4")
    except DRIVER_ERRORS as exc:
        raise translate(exc) from None
    finally:
        conn.close()
