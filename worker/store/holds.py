"""Operator holds (`whatsapp_worker_holds`): `pause --all` stops every claim of the fleet, and
`pause --number ID` every claim of one sending number, in one command and without touching the
sessions, so that `resume --all` gives back exactly what was sending (a session an operator
paused on its own stays paused). Every daemon reads the holds with the sessions it may send,
once a loop: in-flight sends finish, nothing new is claimed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import aiomysql

from worker.store.db import UTC_NOW as NOW
from worker.store.db import Database, with_transient_retry

ALL = "*"  # the scope that holds every number

# -- name: holds :many
HOLDS = "SELECT scope, reason, created_at FROM whatsapp_worker_holds ORDER BY id"
# -- name: hold :exec
# A scope already held keeps its first reason and time.
HOLD = (
    f"INSERT INTO whatsapp_worker_holds (scope, reason, created_at) VALUES (%s, %s, {NOW})"
    " ON DUPLICATE KEY UPDATE id = id"
)
# -- name: release :exec
RELEASE = "DELETE FROM whatsapp_worker_holds WHERE scope = %s"


@dataclass(frozen=True, slots=True)
class Hold:
    scope: str  # ALL, or a phone_number_id
    reason: str | None
    since: datetime  # UTC

    @property
    def everything(self) -> bool:
        return self.scope == ALL


async def holds(cur: aiomysql.Cursor) -> list[Hold]:
    """Every hold in force, on the caller's transaction."""
    await cur.execute(HOLDS)
    return [Hold(str(r[0]), r[1], r[2]) for r in await cur.fetchall()]


class Holds:
    """`whatsapp-worker pause|resume --all|--number ID`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def hold(self, scope: str, reason: str | None) -> bool:
        """Hold a scope; False when it was held already (nothing changes)."""
        return await with_transient_retry(lambda: self._db.update(HOLD, (scope, reason))) > 0

    async def release(self, scope: str) -> bool:
        """Lift a scope's hold; False when it was not held."""
        return await self._db.update(RELEASE, (scope,)) > 0

    async def list(self) -> list[Hold]:
        async with self._db.transaction() as cur:
            return await holds(cur)
