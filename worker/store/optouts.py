"""Opt-outs: phones that asked not to be messaged again (`whatsapp_worker_optouts`).

A phone is stored in the queue's own form (E.164 with its `+`, as `cola_envios.telefono`), so
the claim can match rows against it with one indexed `IN`. Sources: `keyword` (the customer
replied BAJA, STOP...), `131050` (Meta said the user stopped marketing messages), `operator`
(`whatsapp-worker optout add`).

`optout remove` leaves a mark in `whatsapp_worker_optout_removals`: a stop the customer said at
or before it (Meta retries a POST for days; a captured signed body can be sent again) is not
recorded again. A stop said after it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiomysql

from worker.messages import phone_variants
from worker.models import OptOut
from worker.store.db import UTC_NOW as NOW
from worker.store.db import Database, placeholders, with_transient_retry

DETAIL_MAX = 1000

# -- name: opted_out :many
# The unique key on telefono answers it; one query for a whole claim batch.
OPTED_OUT = "SELECT telefono FROM whatsapp_worker_optouts WHERE telefono IN ({phones})"
# -- name: add_optouts :exec
# A phone already opted out keeps its first source and date (no error, no change).
ADD_OPTOUTS = (
    "INSERT INTO whatsapp_worker_optouts (telefono, source, detail, created_at) VALUES {rows}"
    " ON DUPLICATE KEY UPDATE id = id"
)
# -- name: remove_optout :exec
REMOVE_OPTOUT = "DELETE FROM whatsapp_worker_optouts WHERE telefono IN ({phones})"
# -- name: record_removal :exec
RECORD_REMOVAL = (
    f"INSERT INTO whatsapp_worker_optout_removals (telefono, removed_at) VALUES (%s, {NOW})"
    f" ON DUPLICATE KEY UPDATE removed_at = {NOW}"
)
# -- name: removals :many
# The unique key on telefono answers it.
REMOVALS = "SELECT telefono, removed_at FROM whatsapp_worker_optout_removals WHERE telefono IN ({phones})"
# -- name: list_optouts :many
LIST_OPTOUTS = (
    "SELECT id, telefono, source, detail, created_at FROM whatsapp_worker_optouts"
    " WHERE id > %s ORDER BY id LIMIT %s"
)


@dataclass(frozen=True, slots=True)
class OptOutRow:
    id: int
    telefono: str
    source: str
    detail: str | None
    created_at: datetime  # UTC


async def opted_out(cur: aiomysql.Cursor, phones: Iterable[str]) -> set[str]:
    """The subset of `phones` that opted out under any form of the number (`phone_variants`:
    Meta's +52 1 / +54 9 / Brazilian forms), in one query on the caller's transaction."""
    forms = {phone: phone_variants(phone) for phone in dict.fromkeys(phones)}
    wanted = sorted(set().union(*forms.values())) if forms else []
    if not wanted:
        return set()
    await cur.execute(OPTED_OUT.format(phones=placeholders(len(wanted))), wanted)
    found = {str(row[0]) for row in await cur.fetchall()}
    return {phone for phone, variants in forms.items() if variants & found}


@dataclass(frozen=True, slots=True)
class Recorded:
    new: int  # phones newly opted out
    said_before_removal: int  # stops said at or before their phone's last `optout remove`: ignored


async def add_optouts(cur: aiomysql.Cursor, optouts: Sequence[OptOut]) -> Recorded:
    """Record opt-outs on the caller's transaction, but not a stop said before its phone's last
    removal."""
    stale = await _said_before_removal(cur, optouts)
    unique = list({o.telefono: o for i, o in enumerate(optouts) if i not in stale}.values())
    if not unique:
        return Recorded(0, len(stale))
    params: list[Any] = []
    for optout in unique:
        params += [optout.telefono, optout.source, _detail(optout.detail)]
    rows = ",".join([f"(%s, %s, %s, {NOW})"] * len(unique))
    await cur.execute(ADD_OPTOUTS.format(rows=rows), params)
    return Recorded(int(cur.rowcount), len(stale))


async def _said_before_removal(cur: aiomysql.Cursor, optouts: Sequence[OptOut]) -> set[int]:
    """The positions of the opt-outs said at or before their phone's last `optout remove`, under
    any form of the number. Those without a time (an operator's, a send's 131050) always count."""
    forms = {o.telefono: phone_variants(o.telefono) for o in optouts if o.said_at is not None}
    if not forms:
        return set()
    wanted = sorted(set().union(*forms.values()))
    await cur.execute(REMOVALS.format(phones=placeholders(len(wanted))), wanted)
    removed: dict[str, datetime] = {str(r[0]): r[1] for r in await cur.fetchall()}
    last = {
        phone: max((removed[f] for f in variants if f in removed), default=None)
        for phone, variants in forms.items()
    }
    return {
        i
        for i, o in enumerate(optouts)
        if o.said_at is not None and (at := last[o.telefono]) is not None and o.said_at <= at
    }


def _detail(text: str | None) -> str | None:
    if text is None:
        return None
    # Lone surrogates (from JSON escapes) cannot be stored as utf8mb4.
    return text.encode("utf-8", "replace").decode("utf-8")[:DETAIL_MAX]


class Optouts:
    """`whatsapp-worker optout add|remove|list`, and Meta's 131050 answer."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def add(self, phone: str, source: str, detail: str | None = None) -> bool:
        """Record one opt-out; False when the phone had already opted out (nothing changes)."""

        async def attempt() -> int:
            async with self._db.transaction() as cur:
                return (await add_optouts(cur, [OptOut(phone, source, detail)])).new

        return await with_transient_retry(attempt) > 0

    async def remove(self, phone: str) -> bool:
        """The phone may be messaged again, under every form of the number, and a stop said
        before now no longer opts it out; False when it was not opted out."""
        forms = sorted(phone_variants(phone))

        async def attempt() -> bool:
            async with self._db.transaction() as cur:
                await cur.execute(REMOVE_OPTOUT.format(phones=placeholders(len(forms))), forms)
                if not cur.rowcount:
                    return False
                await cur.execute(RECORD_REMOVAL, (phone,))
                return True

        return await with_transient_retry(attempt)

    async def opted_out(self, phones: Iterable[str]) -> set[str]:
        async with self._db.transaction() as cur:
            return await opted_out(cur, phones)

    async def page(self, *, after_id: int = 0, limit: int = 1000) -> list[OptOutRow]:
        """Opt-outs in the order they were recorded, a page at a time (keyset on id)."""
        async with self._db.transaction() as cur:
            await cur.execute(LIST_OPTOUTS, (after_id, limit))
            return [OptOutRow(int(r[0]), str(r[1]), str(r[2]), r[3], r[4]) for r in await cur.fetchall()]
