"""Undeliverable phones, per sending number (`whatsapp_worker_suppressions`): a phone Meta could
not deliver to (131026: not on WhatsApp, an old app, a blocked business) is not sent to from that
number again until its entry expires, so the next campaign does not fail on it again. The claim
closes such rows with no request, like opted-out ones; `suppressed list|clear` shows and lifts
them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiomysql

from worker.store.db import UTC_NOW as NOW
from worker.store.db import Database, placeholders

# -- name: suppressed :many
# The unique key (telefono, phone_number_id) answers it; one query for a whole claim batch.
SUPPRESSED = (
    "SELECT telefono, phone_number_id, expires_at FROM whatsapp_worker_suppressions"
    f" WHERE telefono IN ({{phones}}) AND expires_at > {NOW}"
)
# -- name: suppress :exec
# A phone already suppressed keeps the later expiry.
SUPPRESS = (
    "INSERT INTO whatsapp_worker_suppressions (phone_number_id, telefono, code, reason, expires_at)"
    f" VALUES (%s, %s, %s, %s, {NOW} + INTERVAL %s SECOND)"
    " ON DUPLICATE KEY UPDATE code = %s, reason = %s,"
    f" expires_at = GREATEST(expires_at, {NOW} + INTERVAL %s SECOND)"
)
# -- name: list_suppressions :many
LIST_SUPPRESSIONS = (
    "SELECT id, phone_number_id, telefono, code, reason, expires_at FROM whatsapp_worker_suppressions"
    f" WHERE expires_at > {NOW} AND id > %s ORDER BY id LIMIT %s"
)
# -- name: clear_suppression :exec
CLEAR_SUPPRESSION = "DELETE FROM whatsapp_worker_suppressions WHERE telefono = %s{number}"


@dataclass(frozen=True, slots=True)
class Suppression:
    id: int
    phone_number_id: str
    telefono: str
    code: int | None
    reason: str | None
    expires_at: datetime  # UTC


async def suppressed(cur: aiomysql.Cursor, phones: Iterable[str]) -> dict[tuple[str, str], datetime]:
    """(phone, sending number) -> until when, for the `phones` suppressed on some number now."""
    wanted = list(dict.fromkeys(phones))
    if not wanted:
        return {}
    await cur.execute(SUPPRESSED.format(phones=placeholders(len(wanted))), wanted)
    return {(str(r[0]), str(r[1])): r[2] for r in await cur.fetchall()}


class Suppressions:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def add(self, number: str, phone: str, code: int | None, reason: str | None, seconds: int) -> None:
        text = (reason or "")[:1000] or None
        await self._db.update(SUPPRESS, (number, phone, code, text, seconds, code, text, seconds))

    async def clear(self, phone: str, number: str | None = None) -> int:
        """Lift a phone's suppression (on one number, or on every number); how many were lifted."""
        sql = CLEAR_SUPPRESSION.format(number=" AND phone_number_id = %s" if number else "")
        args: tuple[Any, ...] = (phone, number) if number else (phone,)
        return await self._db.update(sql, args)

    async def page(self, *, after_id: int = 0, limit: int = 1000) -> list[Suppression]:
        async with self._db.transaction() as cur:
            await cur.execute(LIST_SUPPRESSIONS, (after_id, limit))
            return [
                Suppression(int(r[0]), str(r[1]), str(r[2]), r[3], r[4], r[5]) for r in await cur.fetchall()
            ]
