"""`whatsapp-worker prune`: delete finished queue rows in small batches.

Each batch is its own short transaction of at most PRUNE_BATCH rows, so no lock is held for
long and the daemons keep claiming and recording meanwhile. Only `enviado` and `error` rows go;
`desconocido` rows wait for a person (or a status webhook). `envios_whatsapp`, the delivery
history the runbook reads, stays unless asked. What a batch deletes is added, in its own
transaction, to the sessions' totals in `whatsapp_worker_pruned`, so `status` counts a session
the same before and after.

A legacy schema may have foreign keys into `cola_envios`. A row that another table's row
references with ON DELETE RESTRICT (or NO ACTION) is kept and counted, so that every other row
still goes; a key that would change the other table (CASCADE, SET NULL) stops the prune
before it deletes anything, unless that table is `envios_whatsapp` and `--deliveries` says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiomysql

from worker.store.db import Database, placeholders, with_transient_retry
from worker.store.reports import NO_CODE, outcome_of
from worker.store.sessions import RefusedChange

PRUNE_BATCH = 1000
# A pause between batches leaves the server to the daemons: unpaced, a prune of a million rows
# took 21-36% of a drain's throughput on a 2-core host; with 50 ms, 11% (bench/prune.py).
PRUNE_PAUSE = 0.05
# The age is the time the row last changed (`updated_at`, set by every write).
FINISHED_OLDER = "estado IN ('enviado', 'error') AND updated_at < NOW(6) - INTERVAL %s SECOND"
DELIVERIES_OLDER = "fecha_envio < NOW() - INTERVAL %s SECOND"

# -- name: count_finished :one
COUNT_FINISHED = "SELECT COUNT(*) FROM cola_envios WHERE {finished}"
# -- name: describe_finished :one
# What a prune would take: how many rows, of how many sessions, finished between when and when.
DESCRIBE_FINISHED = (
    "SELECT COUNT(*), COUNT(DISTINCT sesion_id), MIN(updated_at), MAX(updated_at)"
    " FROM cola_envios WHERE {finished}"
)
# -- name: lock_finished :many
# A batch of old finished rows, locked until the DELETE commits with what it adds to the
# sessions' totals: a row is either still in the queue or counted, never both nor neither.
LOCK_FINISHED = (
    "SELECT id, sesion_id, estado, last_error_code, last_error, delivered_at IS NOT NULL,"
    " read_at IS NOT NULL, settled_at IS NOT NULL FROM cola_envios WHERE {finished}"
    f" LIMIT {PRUNE_BATCH} FOR UPDATE"
)
# -- name: delete_locked :exec
DELETE_LOCKED = "DELETE FROM cola_envios WHERE id IN ({ids})"
# -- name: add_pruned :exec
ADD_PRUNED = (
    "INSERT INTO whatsapp_worker_pruned (sesion_id, outcome, code, pruned_rows, delivered_rows,"
    " read_rows, settled_rows, last_error) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
    " ON DUPLICATE KEY UPDATE pruned_rows = pruned_rows + %s, delivered_rows = delivered_rows + %s,"
    " read_rows = read_rows + %s, settled_rows = settled_rows + %s, last_error = COALESCE(last_error, %s)"
)
# -- name: count_deliveries :one
COUNT_DELIVERIES = f"SELECT COUNT(*) FROM envios_whatsapp WHERE {DELIVERIES_OLDER}"
# -- name: delete_deliveries :exec
DELETE_DELIVERIES = f"DELETE FROM envios_whatsapp WHERE {DELIVERIES_OLDER} LIMIT {PRUNE_BATCH}"
# -- name: count_statuses :one
# Stored webhook statuses already applied (they hold phones in their raw JSON); UTC, as written.
STATUSES_OLDER = "applied_at < UTC_TIMESTAMP(6) - INTERVAL %s SECOND"
COUNT_STATUSES = f"SELECT COUNT(*) FROM whatsapp_worker_statuses WHERE {STATUSES_OLDER}"
# -- name: delete_statuses :exec
DELETE_STATUSES = f"DELETE FROM whatsapp_worker_statuses WHERE {STATUSES_OLDER} LIMIT {PRUNE_BATCH}"
# -- name: count_attempts :one
# The attempt history (`rows --id N`) ages out with the rows, by the same age; UTC, as written.
ATTEMPTS_OLDER = "attempted_at < UTC_TIMESTAMP(6) - INTERVAL %s SECOND"
COUNT_ATTEMPTS = f"SELECT COUNT(*) FROM whatsapp_worker_attempts WHERE {ATTEMPTS_OLDER}"
# -- name: delete_attempts :exec
DELETE_ATTEMPTS = f"DELETE FROM whatsapp_worker_attempts WHERE {ATTEMPTS_OLDER} LIMIT {PRUNE_BATCH}"
# -- name: foreign_keys_into_queue :many
FOREIGN_KEYS = (
    "SELECT k.TABLE_NAME AS child, k.COLUMN_NAME AS col, r.DELETE_RULE AS rule, k.CONSTRAINT_NAME AS name"
    " FROM information_schema.KEY_COLUMN_USAGE k JOIN information_schema.REFERENTIAL_CONSTRAINTS r"
    " ON r.CONSTRAINT_SCHEMA = k.CONSTRAINT_SCHEMA AND r.CONSTRAINT_NAME = k.CONSTRAINT_NAME"
    " AND r.TABLE_NAME = k.TABLE_NAME"
    " WHERE k.REFERENCED_TABLE_SCHEMA = DATABASE() AND k.REFERENCED_TABLE_NAME = 'cola_envios'"
    " ORDER BY k.TABLE_NAME, k.CONSTRAINT_NAME"
)
KEEPING_RULES = ("RESTRICT", "NO ACTION")


@dataclass(frozen=True, slots=True)
class ForeignKey:
    child: str
    column: str
    rule: str  # RESTRICT, NO ACTION, CASCADE, SET NULL, SET DEFAULT
    name: str

    def __str__(self) -> str:
        return f"{self.child}.{self.column} ({self.name}, ON DELETE {self.rule})"

    def meaning_for_prune(self) -> str:
        """What prune does about the queue rows this key's rows reference."""
        if self.rule in KEEPING_RULES:
            return "prune deletes only the finished rows nothing references, and says how many it kept"
        if self.child == "envios_whatsapp":
            return "prune refuses to delete queue rows unless --deliveries accepts losing this history"
        return "prune refuses to delete queue rows until this constraint is dropped or changed"


async def foreign_keys_into_queue(cur: aiomysql.Cursor) -> list[ForeignKey]:
    """Every foreign key from any table of the database into `cola_envios`."""
    await cur.execute(FOREIGN_KEYS)
    return [ForeignKey(*(str(v) for v in row)) for row in await cur.fetchall()]


@dataclass(frozen=True, slots=True)
class Pruned:
    rows: int
    deliveries: int
    kept: int = 0  # finished rows old enough but referenced by another table's rows (RESTRICT)
    keeping: tuple[ForeignKey, ...] = ()  # the keys that kept them
    cascading: tuple[ForeignKey, ...] = field(default=())  # envios_whatsapp keys that followed
    statuses: int = 0  # applied webhook statuses deleted (`--statuses`)
    attempts: int = 0  # attempt history rows deleted (always, by the same age)
    # with dry_run: the sessions the rows belong to, and the oldest and newest finish (server time)
    sessions: int = 0
    oldest: datetime | None = None
    newest: datetime | None = None


@dataclass(slots=True)
class Tally:
    """What one batch deletes of one session, outcome and code."""

    rows: int = 0
    delivered: int = 0
    read: int = 0
    settled: int = 0
    example: str | None = None  # one of the rows' last_error


def tally(rows: Iterable[tuple[Any, ...]]) -> dict[tuple[int, str, int], Tally]:
    """The locked batch's rows (LOCK_FINISHED) counted per session, outcome and code."""
    totals: dict[tuple[int, str, int], Tally] = {}
    for _, session, state, code, text, delivered, read, settled in rows:
        key = (int(session), outcome_of(state, code, text), NO_CODE if code is None else int(code))
        counted = totals.setdefault(key, Tally())
        counted.rows += 1
        counted.delivered += int(delivered)
        counted.read += int(read)
        counted.settled += int(settled)
        counted.example = counted.example or text
    return totals


class Pruner:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def prune(
        self, older_than: int, *, deliveries: bool, dry_run: bool, statuses: bool = False
    ) -> Pruned:
        """Rows finished more than `older_than` seconds ago (counted only, with `dry_run`), and
        the attempt history that old; with `statuses`, the webhook statuses applied that long ago."""
        pruned = await self._prune_queue(older_than, deliveries=deliveries, dry_run=dry_run)
        pruned = dataclasses.replace(
            pruned, attempts=await self._count_or_delete(COUNT_ATTEMPTS, DELETE_ATTEMPTS, older_than, dry_run)
        )
        if not statuses:
            return pruned
        done = await self._count_or_delete(COUNT_STATUSES, DELETE_STATUSES, older_than, dry_run)
        return dataclasses.replace(pruned, statuses=done)

    async def _count_or_delete(self, count: str, delete: str, older_than: int, dry_run: bool) -> int:
        return await (self._count(count, older_than) if dry_run else self._delete(delete, older_than))

    async def _prune_queue(self, older_than: int, *, deliveries: bool, dry_run: bool) -> Pruned:
        """Rows finished more than `older_than` seconds ago (counted only, with `dry_run`)."""
        keys = await self._foreign_keys()
        keeping = tuple(k for k in keys if k.rule in KEEPING_RULES)
        cascading = tuple(k for k in keys if k.rule not in KEEPING_RULES)
        refused = [k for k in cascading if not (deliveries and k.child == "envios_whatsapp")]
        if refused:
            raise RefusedChange(
                f"{'; '.join(map(str, refused))} references cola_envios: deleting queue rows would change"
                " that table too. Nothing was deleted"
                + (
                    ": add --deliveries to delete that history as well"
                    if refused[0].child == "envios_whatsapp"
                    else ": drop or change that constraint first"
                )
            )
        finished = FINISHED_OLDER + "".join(
            f" AND NOT EXISTS (SELECT 1 FROM {k.child} x WHERE x.{k.column} = cola_envios.id)"
            for k in keeping
        )
        all_old = await self._count(COUNT_FINISHED.format(finished=FINISHED_OLDER), older_than)
        if dry_run:
            rows, sessions, oldest, newest = await self._describe(finished, older_than)
            history = await self._count(COUNT_DELIVERIES, older_than) if deliveries else 0
            return Pruned(
                rows,
                history,
                all_old - rows,
                keeping,
                cascading,
                sessions=sessions,
                oldest=oldest,
                newest=newest,
            )
        # the history first: rows it referenced (RESTRICT) can go in the same run
        history = await self._delete(DELETE_DELIVERIES, older_than) if deliveries else 0
        rows = await self._delete_counted(finished, older_than)
        return Pruned(rows, history, max(0, all_old - rows), keeping, cascading)

    async def _foreign_keys(self) -> list[ForeignKey]:
        async with self._db.transaction() as cur:
            return await foreign_keys_into_queue(cur)

    async def _describe(
        self, finished: str, older_than: int
    ) -> tuple[int, int, datetime | None, datetime | None]:
        async with self._db.transaction() as cur:
            await cur.execute(DESCRIBE_FINISHED.format(finished=finished), (older_than,))
            rows, sessions, oldest, newest = await cur.fetchone()
        return int(rows), int(sessions), oldest, newest

    async def _count(self, sql: str, older_than: int) -> int:
        async with self._db.transaction() as cur:
            await cur.execute(sql, (older_than,))
            (count,) = await cur.fetchone()
        return int(count)

    async def _delete(self, sql: str, older_than: int) -> int:
        total = 0
        while (deleted := await self._db.update(sql, (older_than,))) > 0:
            total += deleted
            if deleted == PRUNE_BATCH:
                await asyncio.sleep(PRUNE_PAUSE)
        return total

    async def _delete_counted(self, finished: str, older_than: int) -> int:
        """Finished rows, batch by batch, each added to its session's totals as it goes."""
        total = 0
        while (deleted := await with_transient_retry(lambda: self._delete_batch(finished, older_than))) > 0:
            total += deleted
            if deleted == PRUNE_BATCH:
                await asyncio.sleep(PRUNE_PAUSE)
        return total

    async def _delete_batch(self, finished: str, older_than: int) -> int:
        async with self._db.transaction() as cur:
            await cur.execute(LOCK_FINISHED.format(finished=finished), (older_than,))
            rows = await cur.fetchall()
            if not rows:
                return 0
            await cur.execute(DELETE_LOCKED.format(ids=placeholders(len(rows))), [row[0] for row in rows])
            for (session, outcome, code), counted in tally(rows).items():
                added = (counted.rows, counted.delivered, counted.read, counted.settled)
                await cur.execute(
                    ADD_PRUNED, (session, outcome, code, *added, counted.example, *added, counted.example)
                )
        return len(rows)
