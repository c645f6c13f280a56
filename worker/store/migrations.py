"""Schema migrations (`whatsapp-worker migrate`): read what exists, upgrade it in place.

The tables usually exist already: the PHP application created them years ago and keeps
writing to them. So a migration is not a fixed list of statements but a plan computed from
`information_schema` each time: create what is missing, add missing columns (with the same
definitions a fresh database gets), widen `estado`, number legacy duplicates, add missing keys.
Every step checks before it alters; MySQL commits each DDL statement on its own, so a migrate
killed half-way simply finds less to do on its next run. Nothing is dropped, narrowed or
deleted; the PHP columns and their values are left as they are.

Runs under a named lock so two migrates do not race. `check()` is what every command asks
at start: the list of what the code needs and does not find.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomysql
import pymysql

from worker.models import SENDABLE_STATES
from worker.store import schema
from worker.store.db import (
    DRIVER_ERRORS,
    LOCK_WAIT_TIMEOUT,
    ROW_LEVEL_CODES,
    Database,
    DatabaseError,
    StatementRefused,
    describe,
    quiet_notes,
    translate,
)
from worker.store.prune import foreign_keys_into_queue

MIGRATE_LOCK = "whatsapp_worker_migrate"
# MyISAM (MySQL's default until 5.5), Aria, MEMORY: `FOR UPDATE SKIP LOCKED` locks nothing and
# a rollback undoes nothing, so two daemons would claim and send the same row.
NEEDS_INNODB = "the claim's row locks and transactions need InnoDB"
DUPLICATE_KEY = 1062
# Columns each INSERT of ours names: a PHP column outside these must have a default.
INSERTED = {
    "sesiones_envio": {"nombre", "estado"},
    "cola_envios": {"sesion_id", "cliente_id", "telefono", "mensaje"},
    "envios_whatsapp": {"cola_id", "sesion_id", "cliente_id", "telefono", "wamid", "fecha_envio"},
}


class TableBusy(DatabaseError):
    """Another connection holds a table's lock longer than `WORKER_DDL_LOCK_WAIT`: migrate
    stopped before that statement (what ran before it stays; the same command resumes)."""

    def __init__(self, step: Step, holders: list[Holder], wait: int) -> None:
        who = "; ".join(h.text for h in holders) or "a connection this user cannot see (grant PROCESS)"
        kill = f" (or end it: KILL {holders[0].id})" if len(holders) == 1 else ""
        super().__init__(
            f"{step.why}: waited {wait}s for the table's lock, held by {who}. Nothing more was changed:"
            f" run the same command again when that transaction ends{kill}",
            code=LOCK_WAIT_TIMEOUT,
        )
        self.holders = holders


@dataclass(frozen=True, slots=True)
class Holder:
    id: int
    text: str


class SchemaMismatch(DatabaseError):
    """The database lacks what this worker needs (or migrate cannot add it safely)."""

    def __init__(self, problems: list[str], *, hint: str = "run `whatsapp-worker migrate`") -> None:
        super().__init__(f"schema is not ready for this worker: {'; '.join(problems)}: {hint}")
        self.problems = problems


@dataclass(frozen=True, slots=True)
class FoundColumn:
    name: str
    column_type: str  # e.g. enum('pendiente','enviado'), int(11), varchar(32)
    data_type: str
    nullable: bool
    default: str | None  # normalised: None for "no default" and DEFAULT NULL alike
    extra: str
    charset: str | None
    collation: str | None
    comment: str

    @property
    def enum_values(self) -> list[str] | None:
        if self.data_type != "enum":
            return None
        return [v.replace("''", "'") for v in re.findall(r"'((?:[^']|'')*)'", self.column_type)]

    @property
    def generated(self) -> bool:
        return any(word in self.extra.upper() for word in ("GENERATED", "VIRTUAL", "STORED"))


@dataclass(slots=True)
class FoundTable:
    name: str
    engine: str  # '' for a view
    collation: str
    size: int = 0  # bytes of data and indexes, as information_schema estimates them
    columns: dict[str, FoundColumn] = field(default_factory=dict)
    indexes: dict[str, tuple[bool, tuple[str, ...]]] = field(default_factory=dict)  # name -> unique, cols


@dataclass(slots=True)
class Gaps:
    """What one existing table lacks, compared with the target."""

    columns: list[schema.Column] = field(default_factory=list)
    state_values: list[str] = field(default_factory=list)
    state_default: str | None = None  # the wrong default found (or "none")
    state_unusable: str | None = None  # a state column migrate cannot widen
    next_attempt: str | None = None  # next_attempt_at is not "NULL DEFAULT NULL"
    keys: list[schema.Key] = field(default_factory=list)
    no_default: list[str] = field(default_factory=list)  # NOT NULL, no default, not inserted by us
    engine: str | None = None  # the engine found, when it is not InnoDB

    def problems(self, table: schema.Table) -> list[str]:
        out = []
        if self.engine is not None:
            out.append(f"{table.name} is {self.engine or 'not a table'}: {NEEDS_INNODB}")
        out += [f"{table.name}.{c.name} is missing" for c in self.columns]
        state = f"{table.name}.{table.state.column}"
        if self.state_unusable:
            out.append(f"{state} {self.state_unusable}")
        out += [f"{state} lacks {v!r}" for v in self.state_values]
        if self.state_default:
            out.append(f"{state} defaults to {self.state_default}, not {table.state.default!r}")
        if self.next_attempt:
            out.append(f"{table.name}.next_attempt_at is {self.next_attempt}, not NULL DEFAULT NULL")
        for key in self.keys:
            kind = "unique key" if key.unique else "index"
            out.append(f"{table.name} has no {kind} on ({', '.join(key.guarantee)})")
        out += [
            f"{table.name}.{name} is NOT NULL without a default (our INSERTs do not name it)"
            for name in self.no_default
        ]
        return out


@dataclass(frozen=True, slots=True)
class Step:
    sql: str
    why: str
    # A unique key may meet a duplicate a producer inserted after the numbering: number again.
    renumber: str | None = None

    @property
    def table(self) -> str:
        """The table this statement changes."""
        match = re.match(r"(?:ALTER TABLE|UPDATE|CREATE TABLE(?: IF NOT EXISTS)?)\s+`?(\w+)", self.sql)
        return match.group(1) if match else ""


@dataclass(slots=True)
class Plan:
    found: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)  # what migrate will not change for you


@dataclass(frozen=True, slots=True)
class Applied:
    found: list[str]
    steps: list[Step]
    versions: list[int]  # versions newly recorded in whatsapp_worker_migrations
    notes: list[str] = field(default_factory=list)  # what took more than one try, and why


class Migrations:
    def __init__(self, db: Database, *, sendable: Sequence[str] = SENDABLE_STATES) -> None:
        self._db = db
        self._sendable = tuple(sendable)

    async def plan(self) -> Plan:
        """What migrate would find and do; reads only (`migrate --dry-run`)."""
        async with self._db.connection(deadline=None) as conn, conn.cursor() as cur:
            found = await _inspect(cur)
            plan = await _plan(cur, found)
            await _plan_first_run(cur, plan, found, self._sendable)
            await conn.commit()
        return plan

    async def migrate(self, *, lock_wait: int = 10) -> Applied:
        """Upgrade in place, step by step; raises SchemaMismatch if it cannot, TableBusy when
        a table's lock was not free within `lock_wait` seconds."""
        try:
            async with self._db.connection(deadline=None) as conn, conn.cursor() as cur:
                await cur.execute("SELECT GET_LOCK(%s, 60)", (MIGRATE_LOCK,))
                (locked,) = await cur.fetchone()
                if locked != 1:
                    raise DatabaseError(f"another migrate holds the lock {MIGRATE_LOCK}")
                # An ALTER waits for the table's metadata lock, and every statement of the PHP
                # application on that table queues behind the waiting ALTER: the server's
                # default wait (a day, a year) would freeze the application.
                await cur.execute(
                    "SET SESSION lock_wait_timeout = %s, innodb_lock_wait_timeout = %s",
                    (lock_wait, lock_wait),
                )
                try:
                    return await _migrate(conn, cur, lock_wait)
                finally:
                    await conn.rollback()
                    await cur.execute("DO RELEASE_LOCK(%s)", (MIGRATE_LOCK,))
                    await conn.commit()
        except DRIVER_ERRORS as exc:
            raise translate(exc) from None

    async def check(self) -> list[str]:
        """Everything the code needs and does not find (tables, columns, keys, states)."""
        async with self._db.connection() as conn, conn.cursor() as cur:
            found = await _inspect(cur)
            await conn.commit()
        problems: list[str] = []
        for table in schema.TABLES:
            if table.name not in found:
                problems.append(f"table {table.name} is missing")
            else:
                problems += _gaps(found[table.name], table).problems(table)
        return problems

    async def require(self) -> None:
        """Raise SchemaMismatch naming what is missing."""
        problems = await self.check()
        if problems:
            raise SchemaMismatch(problems)

    async def schema_version(self) -> int:
        try:
            async with self._db.transaction() as cur:
                await cur.execute("SELECT MAX(version) FROM whatsapp_worker_migrations")
                (version,) = await cur.fetchone()
        except StatementRefused:
            return 0
        return int(version or 0)


async def _migrate(conn: aiomysql.Connection, cur: aiomysql.Cursor, lock_wait: int) -> Applied:
    with quiet_notes():
        await cur.execute(schema.VERSION_TABLE)
    plan = await _plan(cur, await _inspect(cur))
    if plan.blockers:
        raise SchemaMismatch(plan.blockers, hint="fix these by hand, then run `whatsapp-worker migrate`")
    notes: list[str] = []
    for step in plan.steps:
        try:
            if (note := await _execute(conn, cur, step)) is not None:
                notes.append(note)
        except pymysql.err.MySQLError as exc:
            await conn.rollback()
            code = exc.args[0] if exc.args else None
            if code == LOCK_WAIT_TIMEOUT:
                raise TableBusy(step, await _lock_holders(cur, step.table), lock_wait) from None
            # a value refused under a trigger (a narrow ENUM, its SIGNAL): the trigger's doing
            triggers = await _triggers(cur, step.table) if code in TRIGGER_REFUSALS else []
            if not triggers:
                raise
            raise _trigger_refused(step.why, step.table, triggers, exc) from None
    await _probe_states(conn, cur)
    found = await _inspect(cur)
    problems = [p for t in schema.TABLES for p in _gaps(found[t.name], t).problems(t)]
    if problems:
        raise SchemaMismatch(problems, hint="migrate could not fix this")
    await cur.execute("SELECT version FROM whatsapp_worker_migrations")
    done = {row[0] for row in await cur.fetchall()}
    versions = [m for m in schema.MIGRATIONS if m.version not in done]
    if versions:
        await cur.executemany(
            "INSERT INTO whatsapp_worker_migrations (version, name) VALUES (%s, %s)",
            [(m.version, m.name) for m in versions],
        )
    await conn.commit()
    return Applied(plan.found, plan.steps, [m.version for m in versions], notes)


# A unique key is built online while the PHP producer keeps inserting; a copy it inserts during
# the build fails the build at its end. The copies are numbered again and the key built again,
# online up to ONLINE_BUILDS times; then once more with the table's writes held (LOCK TABLES)
# from the numbering to the end of the build, so that no copy can come in between: migrate
# finishes on a live table in a bounded number of tries (the producer's INSERTs wait meanwhile).
ONLINE_BUILDS = 3


async def _execute(conn: aiomysql.Connection, cur: aiomysql.Cursor, step: Step) -> str | None:
    """Run one step; returns a note for the operator when it took more than one try."""
    with quiet_notes():
        if step.renumber is None:
            await cur.execute(step.sql)
            await conn.commit()
            return None
        for build in range(1, ONLINE_BUILDS + 1):
            try:
                await cur.execute(step.sql)
            except pymysql.err.IntegrityError as exc:
                if exc.args[0] != DUPLICATE_KEY:
                    raise
                await cur.execute(step.renumber)
                await conn.commit()
                continue
            await conn.commit()
            if build == 1:
                return None
            return (
                f"{step.why}: a producer inserted copies during the build: numbered again {build - 1} time(s)"
            )
        started = time.monotonic()
        await cur.execute(f"LOCK TABLES {step.table} WRITE, {step.table} AS t WRITE")
        try:
            await cur.execute(step.renumber)
            await cur.execute(step.sql)
            await conn.commit()
        finally:
            await cur.execute("UNLOCK TABLES")
    return (
        f"{step.why}: a producer kept inserting copies during {ONLINE_BUILDS} online builds: the last"
        f" numbering and build held the table's writes for {time.monotonic() - started:.1f}s"
    )


async def _inspect(cur: aiomysql.Cursor) -> dict[str, FoundTable]:
    """Our three tables as they are. Columns are aliased: key case differs between servers."""
    # information_schema warns about other databases' tables under concurrent DDL: not ours
    with quiet_notes():
        return await _read_tables(cur)


async def _read_tables(cur: aiomysql.Cursor) -> dict[str, FoundTable]:
    names = [t.name for t in schema.TABLES]
    marks = ",".join(["%s"] * len(names))
    await cur.execute(
        "SELECT TABLE_NAME AS name, ENGINE AS engine, TABLE_COLLATION AS collation,"
        " COALESCE(DATA_LENGTH, 0) + COALESCE(INDEX_LENGTH, 0) AS size"
        f" FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME IN ({marks})",
        names,
    )
    tables = {
        _s(r[0]): FoundTable(_s(r[0]), _s(r[1]), _s(r[2]), int(r[3] or 0)) for r in await cur.fetchall()
    }
    await cur.execute(
        "SELECT TABLE_NAME AS tbl, COLUMN_NAME AS name, COLUMN_TYPE AS column_type,"
        " DATA_TYPE AS data_type, IS_NULLABLE AS nullable, COLUMN_DEFAULT AS dflt, EXTRA AS extra,"
        " CHARACTER_SET_NAME AS charset, COLLATION_NAME AS collation, COLUMN_COMMENT AS comment"
        " FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE()"
        f" AND TABLE_NAME IN ({marks}) ORDER BY TABLE_NAME, ORDINAL_POSITION",
        names,
    )
    for r in await cur.fetchall():
        table = tables.get(_s(r[0]))
        if table is not None:
            name = _s(r[1])
            table.columns[name] = FoundColumn(
                name,
                _s(r[2]),
                _s(r[3]).lower(),
                _s(r[4]) == "YES",
                _default(r[5]),
                _s(r[6]),
                _s(r[7]) or None,
                _s(r[8]) or None,
                _s(r[9]),
            )
    await cur.execute(
        "SELECT TABLE_NAME AS tbl, INDEX_NAME AS name, NON_UNIQUE AS non_unique, COLUMN_NAME AS col"
        " FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE()"
        f" AND TABLE_NAME IN ({marks}) ORDER BY TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX",
        names,
    )
    for r in await cur.fetchall():
        table = tables.get(_s(r[0]))
        if table is not None:
            unique, cols = table.indexes.get(_s(r[1]), (not int(r[2]), ()))
            table.indexes[_s(r[1])] = (unique, (*cols, _s(r[3])))
    return tables


async def _plan_foreign_keys(cur: aiomysql.Cursor, plan: Plan) -> None:
    """A foreign key into the queue, from one of our tables or the PHP application's: what it
    means for `prune` (the same keys prune reads)."""
    with quiet_notes():
        keys = await foreign_keys_into_queue(cur)
    for key in keys:
        plan.found.append(f"{key} references cola_envios: {key.meaning_for_prune()}")


# A value of a latin1 column whose bytes are UTF-8 (PHP's old mysql_* connections wrote UTF-8
# text through a latin1 connection): read as latin1 "Campaña" would be sent as "CampaÃ±a".
# Counted: bytes that are valid UTF-8 (they convert back unchanged) with a multi-byte character
# in them; a real latin1 "é" (one byte, E9) is not valid UTF-8 and is not counted.
# -- name: utf8_in_latin1 :one
UTF8_IN_LATIN1 = (
    "SELECT COUNT(*), MIN(id) FROM (SELECT id, CAST(CONVERT(mensaje USING latin1) AS BINARY) AS b"
    " FROM cola_envios WHERE estado = 'pendiente') x"
    " WHERE CAST(CONVERT(b USING utf8mb4) AS BINARY) = b"
    " AND CHAR_LENGTH(CONVERT(b USING utf8mb4)) < LENGTH(b)"
)
# -- name: phones_without_plus :one
PHONES_WITHOUT_PLUS = (
    "SELECT COUNT(*), MIN(telefono) FROM cola_envios WHERE estado = 'pendiente' AND telefono NOT LIKE '+%%'"
)


async def _plan_queue_contents(cur: aiomysql.Cursor, plan: Plan, found: FoundTable) -> None:
    """What the waiting rows hold that the daemon would refuse or garble."""
    if "estado" not in found.columns or "telefono" not in found.columns:
        return
    await cur.execute(PHONES_WITHOUT_PLUS)
    count, example = await cur.fetchone()
    if count:
        plan.found.append(
            f"cola_envios: {count} waiting row(s) have a phone without '+' (e.g. {_s(example)!r}): the daemon"
            " ends them in error (E.164 needs the +); fix them first, e.g."
            " UPDATE cola_envios SET telefono = CONCAT('+', telefono) WHERE estado = 'pendiente'"
            " AND telefono NOT LIKE '+%'"
        )
    mensaje = found.columns.get("mensaje")
    if mensaje is None or (mensaje.charset or "").lower() != "latin1":
        return
    await cur.execute(UTF8_IN_LATIN1)
    count, example = await cur.fetchone()
    if count:
        plan.blockers.append(
            f"cola_envios.mensaje is latin1 but {count} waiting row(s) hold UTF-8 bytes"
            f" (e.g. row #{example}): they would be sent garbled. If every row of the column was"
            " written that way (PHP's old mysql_* defaults), convert it without changing a byte:"
            f" ALTER TABLE cola_envios MODIFY mensaje {mensaje.data_type.upper().replace('TEXT', 'BLOB')};"
            f" ALTER TABLE cola_envios MODIFY mensaje {mensaje.data_type.upper()} CHARACTER SET utf8mb4"
            f" {'NULL' if mensaje.nullable else 'NOT NULL'}"
        )


# What a trigger's refusal looks like: a value its table cannot hold, or its own SIGNAL (1644).
# (A duplicate key is the key step's own matter.)
TRIGGER_REFUSALS = ROW_LEVEL_CODES - {DUPLICATE_KEY}

# -- name: triggers :many
TRIGGERS = (
    "SELECT TRIGGER_NAME AS name, ACTION_TIMING AS timing, EVENT_MANIPULATION AS event,"
    " ACTION_STATEMENT AS statement FROM information_schema.TRIGGERS"
    " WHERE TRIGGER_SCHEMA = DATABASE() AND EVENT_OBJECT_TABLE = %s ORDER BY TRIGGER_NAME"
)


@dataclass(frozen=True, slots=True)
class Trigger:
    name: str
    timing: str  # BEFORE, AFTER
    event: str  # INSERT, UPDATE, DELETE
    statement: str


async def _triggers(cur: aiomysql.Cursor, table: str) -> list[Trigger]:
    with quiet_notes():
        await cur.execute(TRIGGERS, (table,))
    return [Trigger(_s(r[0]), _s(r[1]), _s(r[2]), _s(r[3])) for r in await cur.fetchall()]


def _trigger_refused(what: str, table: str, triggers: list[Trigger], exc: BaseException) -> SchemaMismatch:
    names = ", ".join(f"{t.name} ({t.timing} {t.event})" for t in triggers)
    return SchemaMismatch(
        [f"{what}: the server refused it: {describe(exc)}"],
        hint=f"{table} has the trigger(s) {names}, which cannot store what the worker writes:"
        " widen the column the trigger writes to (or drop the trigger), then run `whatsapp-worker migrate`",
    )


async def _probe_states(conn: aiomysql.Connection, cur: aiomysql.Cursor) -> None:
    """With triggers on cola_envios, try each state of ours on one row and roll it back: a
    trigger that cannot store one would stop the daemon's writes on every row later."""
    table = schema.COLA_ENVIOS
    triggers = await _triggers(cur, table.name)
    if not any(t.event == "UPDATE" for t in triggers):
        return
    await cur.execute("SELECT MIN(id) FROM cola_envios")
    (row_id,) = await cur.fetchone()
    if row_id is None:
        return
    for state in table.state.values:
        try:
            await cur.execute("UPDATE cola_envios SET estado = %s WHERE id = %s", (state, row_id))
        except pymysql.err.MySQLError as exc:
            await conn.rollback()
            if exc.args and exc.args[0] == LOCK_WAIT_TIMEOUT:
                probe = Step(f"UPDATE {table.name} SET estado = {state!r}", f"{table.name}: try {state!r}")
                raise TableBusy(probe, await _lock_holders(cur, table.name), 0) from None
            if not exc.args or exc.args[0] not in TRIGGER_REFUSALS:
                raise
            raise _trigger_refused(f"cola_envios.estado = {state!r}", table.name, triggers, exc) from None
        finally:
            await conn.rollback()


# -- name: metadata_lock_holders :many
# MySQL: who holds a lock on the table (performance_schema, on by default since 8.0).
METADATA_LOCK_HOLDERS = (
    "SELECT t.PROCESSLIST_ID AS id, t.PROCESSLIST_USER AS user, t.PROCESSLIST_HOST AS host,"
    " t.PROCESSLIST_COMMAND AS command, t.PROCESSLIST_TIME AS idle, t.PROCESSLIST_INFO AS info"
    " FROM performance_schema.metadata_locks m JOIN performance_schema.threads t"
    " ON t.THREAD_ID = m.OWNER_THREAD_ID WHERE m.OBJECT_TYPE = 'TABLE' AND m.OBJECT_SCHEMA = DATABASE()"
    " AND m.OBJECT_NAME = %s AND m.LOCK_STATUS = 'GRANTED' AND t.PROCESSLIST_ID <> CONNECTION_ID()"
)
# -- name: open_transactions :many
# MariaDB (performance_schema is off by default): the connections with a transaction open,
# oldest first; one of them holds the table.
OPEN_TRANSACTIONS = (
    "SELECT p.ID AS id, p.USER AS user, p.HOST AS host, p.COMMAND AS command, p.TIME AS idle,"
    " p.INFO AS info, x.trx_started AS started FROM information_schema.INNODB_TRX x"
    " JOIN information_schema.PROCESSLIST p ON p.ID = x.trx_mysql_thread_id"
    " WHERE p.ID <> CONNECTION_ID() ORDER BY x.trx_started"
)


async def _lock_holders(cur: aiomysql.Cursor, table: str) -> list[Holder]:
    """The connections that hold `table`'s lock, as a person can find and end them."""
    rows: list[Any] = []
    try:
        await cur.execute(METADATA_LOCK_HOLDERS, (table,))
        rows = list(await cur.fetchall())
    except pymysql.err.MySQLError:
        pass  # no performance_schema access: the other way
    open_transaction = ""
    if not rows:
        try:
            await cur.execute(OPEN_TRANSACTIONS)
            rows = list(await cur.fetchall())
        except pymysql.err.MySQLError:
            return []
        open_transaction = ", a transaction open"
    holders = []
    for r in rows:
        command, idle, info = _s(r[3]).lower(), r[4], _s(r[5])
        state = "idle" if command in ("sleep", "") else command
        doing = f"running {info[:80]!r}" if info else f"{state} for {idle}s"
        holders.append(
            Holder(int(r[0]), f"connection {r[0]} ({_s(r[1])}@{_s(r[2])}{open_transaction}, {doing})")
        )
    return holders


def _s(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)


def _default(raw: Any) -> str | None:
    """MariaDB quotes literal defaults and says 'NULL'; MySQL does neither."""
    if raw is None:
        return None
    text = _s(raw)
    if text == "NULL":
        return None
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("''", "'")
    return text


def _gaps(found: FoundTable, table: schema.Table) -> Gaps:
    gaps = Gaps()
    if found.engine.lower() != "innodb":
        gaps.engine = found.engine
    gaps.columns = [c for c in table.columns if c.name not in found.columns]
    state = found.columns.get(table.state.column) if table.state.column else None
    if state is not None:
        values = state.enum_values
        if values is not None:
            gaps.state_values = [v for v in table.state.values if v not in values]
        elif state.data_type not in ("varchar", "char") or _length(state) < max(map(len, table.state.values)):
            gaps.state_unusable = f"is {state.column_type}: it cannot hold {table.state.values}"
        if table.state.default_required and state.default != table.state.default:
            gaps.state_default = repr(state.default) if state.default is not None else "nothing"
    nxt = found.columns.get("next_attempt_at")
    if table is schema.COLA_ENVIOS and nxt is not None and (not nxt.nullable or nxt.default is not None):
        gaps.next_attempt = f"{'NULL' if nxt.nullable else 'NOT NULL'} DEFAULT {nxt.default}"
    gaps.keys = [k for k in table.keys if not _has_key(found, k)]
    ours = {c.name for c in table.columns}
    gaps.no_default = [
        c.name
        for c in found.columns.values()
        if not c.nullable
        and c.default is None
        and "auto_increment" not in c.extra.lower()
        and not c.generated
        and c.name not in INSERTED.get(table.name, set())
        and c.name not in ours
    ]
    return gaps


def _length(column: FoundColumn) -> int:
    match = re.search(r"\((\d+)\)", column.column_type)
    return int(match.group(1)) if match else 0


def _has_key(found: FoundTable, key: schema.Key) -> bool:
    for unique, cols in found.indexes.values():
        if key.unique:
            if unique and set(cols) in (set(key.columns), set(key.guarantee)):
                return True
        elif cols[: len(key.columns)] == key.columns:
            return True
    return False


async def _plan(cur: aiomysql.Cursor, found: dict[str, FoundTable]) -> Plan:
    plan = Plan()
    for table in schema.TABLES:
        existing = found.get(table.name)
        if existing is None:
            plan.found.append(f"{table.name}: missing")
            plan.steps.append(Step(table.create(), f"create {table.name}"))
        else:
            await _plan_table(cur, plan, existing, table)
    return plan


async def _plan_table(cur: aiomysql.Cursor, plan: Plan, found: FoundTable, table: schema.Table) -> None:
    """What one existing table holds, and the steps that upgrade it: the engine first, then the
    columns and the state, then the keys (numbering legacy duplicates), then the old rows."""
    name = table.name
    await cur.execute(f"SELECT COUNT(*) FROM {name}")
    (count,) = await cur.fetchone()
    plan.found.append(f"{name}: {count} row(s), {found.engine}, {found.collation}")
    await _plan_surroundings(cur, plan, found, table)
    if "id" not in found.columns:
        plan.blockers.append(f"{name} has no id column")
        return
    gaps = _gaps(found, table)
    _plan_engine(plan, found, gaps, count)
    if gaps.no_default:
        plan.blockers += gaps.problems(table)[-len(gaps.no_default) :]
    if gaps.state_unusable:
        plan.blockers.append(f"{name}.{table.state.column} {gaps.state_unusable}")
    _plan_columns(plan, found, table, gaps)
    keep = _keep_auto_updated(found, {c.name for c in table.columns})
    waiting_copies = await _plan_numbering(cur, plan, found, table, gaps, keep)
    if table is schema.COLA_ENVIOS and table.state.column in found.columns:
        await _plan_lost_rows(cur, plan, found, keep)
    _plan_key_step(plan, table, gaps, keep)
    if table is schema.COLA_ENVIOS:
        if schema.LEGACY_DUPLICATE in found.columns:  # numbered by an interrupted earlier run
            await cur.execute(
                f"SELECT COUNT(*) FROM cola_envios"
                f" WHERE {schema.LEGACY_DUPLICATE} > 0 AND estado = 'pendiente'"
            )
            waiting_copies += int((await cur.fetchone())[0])
        keyed = any(k.unique and schema.LEGACY_DUPLICATE in k.columns for k in gaps.keys)
        _plan_waiting_copies(plan, keep, waiting_copies, keyed=keyed)


async def _plan_surroundings(
    cur: aiomysql.Cursor, plan: Plan, found: FoundTable, table: schema.Table
) -> None:
    """What lives around the table: triggers, foreign keys, the PHP columns, the waiting rows."""
    name = table.name
    for trigger in await _triggers(cur, name):
        plan.found.append(
            f"{name}: trigger {trigger.name} ({trigger.timing} {trigger.event}): {trigger.statement[:160]!r}:"
            " it runs with every change of ours; migrate tries each state of ours under it (and rolls"
            " back), and stops naming it if it refuses one"
        )
    if table is schema.COLA_ENVIOS:
        await _plan_foreign_keys(cur, plan)
        await _plan_queue_contents(cur, plan, found)
    ours = {c.name for c in table.columns}
    theirs = [c for c in found.columns if c not in ours]
    if theirs:
        plan.found.append(f"{name}: columns of the PHP application, kept as they are: {', '.join(theirs)}")


def _plan_engine(plan: Plan, found: FoundTable, gaps: Gaps, count: int) -> None:
    """A table that is not InnoDB is converted first (or, a view, refused)."""
    if gaps.engine == "":
        plan.blockers.append(f"{found.name} is a view, not a table: {NEEDS_INNODB}")
    elif gaps.engine is not None:
        plan.found.append(
            f"{found.name}: {gaps.engine}: {NEEDS_INNODB} (without them two daemons send the same row);"
            f" converted first: the table is copied ({count} row(s), {_megabytes(found.size)}),"
            " and the PHP application's writes to it wait until the copy ends"
        )
        plan.steps.append(
            Step(f"ALTER TABLE {found.name} ENGINE=InnoDB", f"{found.name}: convert {gaps.engine} to InnoDB")
        )


def _plan_columns(plan: Plan, found: FoundTable, table: schema.Table, gaps: Gaps) -> None:
    """One ALTER for the missing columns, the widened state ENUM and next_attempt_at."""
    name = table.name
    alter: list[str] = [f"ADD COLUMN {c.name} {c.ddl}" for c in gaps.columns]
    if gaps.columns:
        plan.found.append(f"{name}: missing columns: {', '.join(c.name for c in gaps.columns)}")
        plan.found.append(
            f"{name}: after this, an INSERT INTO {name} VALUES (...) without a column list fails"
            " (1136, column count): every producer must name its columns"
        )
    state = found.columns.get(table.state.column) if table.state.column else None
    if state is not None:
        plan.found.append(f"{name}.{state.name}: {state.column_type} DEFAULT {state.default!r}")
        if gaps.state_values and state.enum_values is not None:
            plan.found.append(f"{name}.{state.name}: appends {', '.join(map(repr, gaps.state_values))}")
            default = table.state.default if table.state.default_required else state.default
            alter.append(_widen(state, gaps.state_values, default))
        elif gaps.state_default:
            alter.append(f"ALTER COLUMN {state.name} SET DEFAULT '{table.state.default}'")
        if gaps.state_default:
            plan.found.append(
                f"{name}.{state.name}: default {gaps.state_default} becomes {table.state.default!r}"
                " (producers insert without naming it)"
            )
    if gaps.next_attempt:
        nxt = found.columns["next_attempt_at"]
        if nxt.data_type != "datetime":
            plan.blockers.append(f"{name}.next_attempt_at is {nxt.column_type}, not DATETIME(6)")
        else:
            plan.found.append(f"{name}.next_attempt_at: {gaps.next_attempt} becomes NULL DEFAULT NULL (UTC)")
            alter.append(f"MODIFY COLUMN next_attempt_at {table.column('next_attempt_at').ddl}")
    if alter:
        plan.steps.append(Step(f"ALTER TABLE {name} " + ", ".join(alter), f"{name}: columns"))


async def _plan_numbering(
    cur: aiomysql.Cursor, plan: Plan, found: FoundTable, table: schema.Table, gaps: Gaps, keep: str
) -> int:
    """Legacy duplicates numbered before their unique key is added; returns the waiting copies."""
    waiting_copies = 0
    for key in gaps.keys:
        if key.unique and schema.LEGACY_DUPLICATE in key.columns:
            waiting_copies += await _find_duplicates(cur, plan, found, key)
            plan.steps.append(
                Step(
                    _renumber(table.name, key.guarantee, keep),
                    f"{table.name}: number legacy duplicates of ({', '.join(key.guarantee)})",
                )
            )
    return waiting_copies


def _plan_key_step(plan: Plan, table: schema.Table, gaps: Gaps, keep: str) -> None:
    """The missing keys in one ALTER (numbering again if a producer added a copy meanwhile)."""
    if not gaps.keys:
        return
    name = table.name
    plan.found.append(f"{name}: missing keys: {', '.join(k.name for k in gaps.keys)}")
    unique = next((k for k in gaps.keys if k.unique and schema.LEGACY_DUPLICATE in k.columns), None)
    plan.steps.append(
        Step(
            f"ALTER TABLE {name} " + ", ".join(f"ADD {k.ddl()}" for k in gaps.keys),
            f"{name}: keys",
            renumber=_renumber(name, unique.guarantee, keep) if unique else None,
        )
    )


# The column a PHP table most often keeps a row's creation time in, in that order.
CREATED_COLUMNS = ("created_at", "fecha_creacion", "creado", "fecha_alta", "fecha")
FIRST_RUN_SESSIONS = 10  # sessions listed by the dry run's first-run preview


async def _plan_first_run(
    cur: aiomysql.Cursor, plan: Plan, found: dict[str, FoundTable], sendable: tuple[str, ...]
) -> None:
    """What the first `run` after this migrate would send: per session state, and the biggest
    sessions (the PHP application's own states are held unless WORKER_SEND_STATES names them)."""
    queue, sessions = found.get("cola_envios"), found.get("sesiones_envio")
    if queue is None or "estado" not in queue.columns or sessions is None:
        return
    state = "COALESCE(s.estado, '(NULL)')" if "estado" in sessions.columns else "'activa'"
    label = f"IF(s.id IS NULL, '(no session row)', {state})"
    created = next((c for c in CREATED_COLUMNS if c in queue.columns), None)
    oldest = f"MIN(c.{created})" if created else "MIN(c.id)"
    source = (
        "FROM cola_envios c LEFT JOIN sesiones_envio s ON s.id = c.sesion_id WHERE c.estado = 'pendiente'"
    )
    await cur.execute(f"SELECT {label}, COUNT(DISTINCT c.sesion_id), COUNT(*), {oldest} {source} GROUP BY 1")
    by_state = [(_s(r[0]), int(r[1]), int(r[2]), r[3]) for r in await cur.fetchall()]
    sent = {"(no session row)", *sendable}
    what = "oldest created" if created else "lowest id"
    for name, count, rows, first in sorted(by_state):
        action = (
            "sent by the first run"
            if name in sent
            else f"held (WORKER_SEND_STATES={name} sends them, or `resume --session ID` one session)"
        )
        plan.found.append(
            f"sessions {name!r}: {count} session(s), {rows} waiting row(s) ({what} {first}): {action}"
        )
    total = sum(rows for name, _, rows, _ in by_state if name in sent)
    plan.found.append(f"first run: sends up to {total} waiting row(s) (less the legacy copies above)")
    await cur.execute(
        f"SELECT c.sesion_id, MAX(s.nombre), MAX({label}), COUNT(*), {oldest} {source}"
        f" GROUP BY c.sesion_id ORDER BY COUNT(*) DESC, c.sesion_id LIMIT {FIRST_RUN_SESSIONS}"
    )
    for session_id, name, state_name, rows, first in await cur.fetchall():
        action = "sent" if _s(state_name) in sent else "held"
        described = f"session #{session_id} {_s(name)!r} ({_s(state_name)})"
        plan.found.append(f"{described}: {rows} waiting row(s), {what} {first}: {action}")


def _megabytes(size: int) -> str:
    return f"{size / 1_048_576:.1f} MB"


def _widen(state: FoundColumn, missing: list[str], default: str | None) -> str:
    """The ENUM with the missing values appended: never narrowed, never reordered."""
    values = ",".join(_quote(v) for v in [*(state.enum_values or []), *missing])
    charset = f" CHARACTER SET {state.charset}" if state.charset else ""
    collation = f" COLLATE {state.collation}" if state.collation else ""
    comment = f" COMMENT {_quote(state.comment)}" if state.comment else ""
    null = "NULL" if state.nullable else "NOT NULL"
    keep_default = f" DEFAULT {_quote(default)}" if default is not None else ""
    return f"MODIFY COLUMN {state.name} ENUM({values}){charset}{collation} {null}{keep_default}{comment}"


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def _keep_auto_updated(found: FoundTable, ours: set[str]) -> str:
    """`SET col = col` for PHP columns with ON UPDATE CURRENT_TIMESTAMP: our UPDATEs leave them."""
    return "".join(
        f", t.{c.name} = t.{c.name}"
        for c in found.columns.values()
        if c.name not in ours and "on update" in c.extra.lower()
    )


def _renumber(table: str, group: tuple[str, ...], keep: str) -> str:
    """0 for the first row (lowest id) of each group, 1, 2... for its later copies."""
    cols = ", ".join(group)
    present = " AND ".join(f"{c} IS NOT NULL" for c in group)
    return (
        f"UPDATE {table} t JOIN (SELECT id, ROW_NUMBER() OVER (PARTITION BY {cols} ORDER BY id) - 1 AS n"
        f" FROM {table} WHERE {present}) d ON d.id = t.id"
        f" SET t.{schema.LEGACY_DUPLICATE} = d.n{keep}"
        f" WHERE d.n > 0 AND t.{schema.LEGACY_DUPLICATE} <> d.n"
    )


async def _find_duplicates(cur: aiomysql.Cursor, plan: Plan, found: FoundTable, key: schema.Key) -> int:
    """Report a key's legacy duplicates; returns how many of them still wait (`pendiente`)."""
    group = key.guarantee
    if any(c not in found.columns for c in group):
        return 0
    cols = ", ".join(group)
    present = " AND ".join(f"{c} IS NOT NULL" for c in group)
    has_state = "estado" in found.columns and found.name == schema.COLA_ENVIOS.name
    pending = "SUM(estado = 'pendiente')" if has_state else "0"
    await cur.execute(
        f"SELECT COUNT(*), COALESCE({pending}, 0) FROM (SELECT {'estado, ' if has_state else ''}"
        f"ROW_NUMBER() OVER (PARTITION BY {cols} ORDER BY id) AS n FROM {found.name} WHERE {present}) d"
        " WHERE n > 1"
    )
    copies, pendientes = await cur.fetchone()
    if copies:
        line = (
            f"{found.name}: {copies} legacy row(s) share a ({cols}) with an earlier row:"
            f" kept, marked {schema.LEGACY_DUPLICATE}"
        )
        if pendientes:
            line += f" ({pendientes} of them pendiente: they end in error, never sent)"
        plan.found.append(line)
    return int(pendientes or 0)


async def _plan_lost_rows(cur: aiomysql.Cursor, plan: Plan, found: FoundTable, keep: str) -> None:
    """Rows the PHP cron left in `procesando` (or stored as '') have no lease: unknown outcome."""
    leased = " AND lease_token IS NULL" if "lease_token" in found.columns else ""
    await cur.execute(f"SELECT COUNT(*) FROM cola_envios WHERE estado = 'procesando'{leased}")
    (processing,) = await cur.fetchone()
    await cur.execute("SELECT COUNT(*) FROM cola_envios WHERE estado = ''")
    (empty,) = await cur.fetchone()
    for count, where, reason, what in (
        (processing, "t.estado = 'procesando' AND t.lease_token IS NULL", schema.LEGACY_PROCESSING_REASON,
         "in procesando without a lease (a PHP cron run that died mid-send)"),
        (empty, "t.estado = ''", schema.EMPTY_STATE_REASON, "with an empty estado"),
    ):  # fmt: skip
        if count:
            plan.found.append(f"cola_envios: {count} row(s) {what}: become desconocido, never re-sent")
            plan.steps.append(
                Step(
                    f"UPDATE cola_envios t SET t.estado = 'desconocido', t.last_error = {_quote(reason)}"
                    f"{keep} WHERE {where}",
                    f"cola_envios: {count} row(s) {what} become desconocido",
                )
            )


def _plan_waiting_copies(plan: Plan, keep: str, waiting_copies: int, *, keyed: bool) -> None:
    """A waiting copy of an earlier row (same session, same phone) would be the old bug's
    second message: it ends in error, never sent. After the key step, so a copy a producer
    inserted during the migration (renumbered by the key step's retry) is caught too: planned
    whenever the key is added (`keyed`), even with no copy waiting when the plan is made."""
    if waiting_copies or keyed:
        copy_reason = _quote(schema.LEGACY_COPY_REASON)
        plan.steps.append(
            Step(
                f"UPDATE cola_envios t SET t.estado = 'error', t.last_error = {copy_reason}"
                f"{keep} WHERE t.{schema.LEGACY_DUPLICATE} > 0 AND t.estado = 'pendiente'",
                f"cola_envios: {waiting_copies} waiting legacy copies end in error"
                + ("" if waiting_copies else " (any a producer inserts while the key is built)"),
            )
        )
