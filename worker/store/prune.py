"""`whatsapp-worker prune`: delete finished queue rows in small batches.

Each batch is its own short transaction of at most PRUNE_BATCH rows, so no lock is held for
long and the daemons keep claiming and recording meanwhile. Only `enviado` and `error` rows go;
`desconocido` rows wait for a person (or a status webhook). `envios_whatsapp`, the delivery
history the runbook reads, stays unless asked.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from worker.store.db import Database

PRUNE_BATCH = 1000
# A pause between batches leaves the server to the daemons: unpaced, a prune of a million rows
# took 21-36% of a drain's throughput on a 2-core host; with 50 ms, 11% (bench/prune.py).
PRUNE_PAUSE = 0.05
# The age is the time the row last changed (`updated_at`, set by every write).
FINISHED_OLDER = "estado IN ('enviado', 'error') AND updated_at < NOW(6) - INTERVAL %s SECOND"
DELIVERIES_OLDER = "fecha_envio < NOW() - INTERVAL %s SECOND"

# -- name: count_finished :one
COUNT_FINISHED = f"SELECT COUNT(*) FROM cola_envios WHERE {FINISHED_OLDER}"
# -- name: delete_finished :exec
DELETE_FINISHED = f"DELETE FROM cola_envios WHERE {FINISHED_OLDER} LIMIT {PRUNE_BATCH}"
# -- name: count_deliveries :one
COUNT_DELIVERIES = f"SELECT COUNT(*) FROM envios_whatsapp WHERE {DELIVERIES_OLDER}"
# -- name: delete_deliveries :exec
DELETE_DELIVERIES = f"DELETE FROM envios_whatsapp WHERE {DELIVERIES_OLDER} LIMIT {PRUNE_BATCH}"


@dataclass(frozen=True, slots=True)
class Pruned:
    rows: int
    deliveries: int


class Pruner:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def prune(self, older_than: int, *, deliveries: bool, dry_run: bool) -> Pruned:
        """Rows finished more than `older_than` seconds ago (counted only, with `dry_run`)."""
        if dry_run:
            return Pruned(
                await self._count(COUNT_FINISHED, older_than),
                await self._count(COUNT_DELIVERIES, older_than) if deliveries else 0,
            )
        rows = await self._delete(DELETE_FINISHED, older_than)
        return Pruned(rows, await self._delete(DELETE_DELIVERIES, older_than) if deliveries else 0)

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
