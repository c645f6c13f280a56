"""The fetch path: claim due rows, give back rows never sent, recover rows of dead workers.

Queue times (`next_attempt_at`, leases) are UTC from the database clock (`UTC_TIMESTAMP(6)`),
so neither the hosts' clocks nor a producer's session `time_zone` moves them. A row whose
`next_attempt_at` is NULL (a producer's four-column INSERT) is due at once.
"""

from __future__ import annotations

import secrets

from worker.messages import MESSAGE_MAX_BYTES
from worker.models import Job, SessionState
from worker.store.db import UTC_NOW as NOW
from worker.store.db import Database, DatabaseError, placeholders, with_transient_retry

# -- name: claim_due :many
# An index range scan on (estado, next_attempt_at, id), no filesort; NULL sorts first. The
# index is named: with `IS NULL OR <=` MySQL's sampled statistics sometimes pick a full index
# scan instead, which would walk every finished row.
# A `mensaje` over the API's limit is not loaded: the row ends in error from its length alone.
CLAIM_DUE = (
    "SELECT id, sesion_id, cliente_id, telefono,"
    " IF(LENGTH(mensaje) > %s, NULL, mensaje), LENGTH(mensaje), attempts"
    " FROM cola_envios FORCE INDEX (ix_cola_envios_claim)"
    f" WHERE estado = 'pendiente' AND (next_attempt_at IS NULL OR next_attempt_at <= {NOW}){{held}}"
    " ORDER BY next_attempt_at, id LIMIT %s FOR UPDATE SKIP LOCKED"
)
# -- name: held_sessions :many
HELD_SESSIONS = "SELECT id FROM sesiones_envio WHERE estado IN (%s, %s)"
# -- name: take_lease :exec
TAKE_LEASE = (
    "UPDATE cola_envios SET estado = 'procesando', lease_owner = %s, lease_token = %s,"
    f" claimed_at = {NOW}, lease_expires_at = {NOW} + INTERVAL %s MICROSECOND"
    " WHERE id IN ({ids})"
)
# -- name: give_back :exec
# Rows of claims whose commit may or may not have landed: nobody sent them. If their lease
# expired meanwhile and another daemon recovered them as unknown, that guess is undone too
# (attempts first: MySQL assigns left to right, so it still sees the old estado).
GIVE_BACK = (
    "UPDATE cola_envios SET attempts = attempts - IF(estado = 'desconocido', 1, 0),"
    " last_error = IF(estado = 'desconocido', NULL, last_error), estado = 'pendiente',"
    " lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, claimed_at = NULL"
    " WHERE estado IN ('procesando', 'desconocido') AND lease_token IN ({tokens})"
)
# -- name: recover_expired :exec
# The token and the lease times stay: the worker that was only cut off may still write the
# true result for one more lease length (see results.py), and `retry` waits for that.
RECOVER_EXPIRED = (
    "UPDATE cola_envios SET estado = 'desconocido', attempts = attempts + 1,"
    " last_error_code = NULL,"
    " last_error = CONCAT('lease of ', COALESCE(lease_owner, '?'),"
    " ' expired while the message may have been in flight')"
    f" WHERE estado = 'procesando' AND lease_expires_at < {NOW}"
)
# -- name: queue_due :one
# For the metrics: rows due now and how long the oldest has waited (a NULL `next_attempt_at`
# is due since the row was created, in the server's time zone).
QUEUE_DUE = (
    f"SELECT COUNT(*), TIMESTAMPDIFF(MICROSECOND, MIN(COALESCE(next_attempt_at,"
    f" CONVERT_TZ(created_at, @@session.time_zone, '+00:00'))), {NOW})"
    " FROM cola_envios FORCE INDEX (ix_cola_envios_claim)"
    f" WHERE estado = 'pendiente' AND (next_attempt_at IS NULL OR next_attempt_at <= {NOW})"
)
# -- name: close_cancelled :exec
# Rows a producer inserted into a cancelled session after the cancel (or that waited for a
# retry then) would wait forever: they end like the session's other waiting rows.
CLOSE_CANCELLED = (
    "UPDATE cola_envios c JOIN sesiones_envio s ON s.id = c.sesion_id"
    " SET c.estado = 'error', c.last_error_code = NULL,"
    " c.last_error = 'session cancelled by the operator: not sent'"
    " WHERE s.estado = 'cancelada' AND c.estado = 'pendiente'"
)
# -- name: defer_template :exec
DEFER_TEMPLATE = (
    f"UPDATE cola_envios SET next_attempt_at = {NOW} + INTERVAL %s MICROSECOND"
    f" WHERE estado = 'pendiente' AND (next_attempt_at IS NULL"
    f" OR next_attempt_at < {NOW} + INTERVAL %s MICROSECOND)"
    " AND JSON_VALID(mensaje) AND JSON_UNQUOTE(JSON_EXTRACT(mensaje, '$.template.name')) = %s"
)


class Claims:
    def __init__(self, db: Database, *, worker_id: str) -> None:
        self._db = db
        self._worker_id = worker_id[:128]
        self._uncertain: list[str] = []  # tokens of claims whose commit outcome is unknown

    async def claim(self, limit: int, *, lease_seconds: float) -> list[Job]:
        """Take up to `limit` due rows of sessions that may send, under a fresh lease token."""
        await self.give_back_uncertain()
        if limit <= 0:
            return []
        token = secrets.token_hex(16)
        try:
            return await with_transient_retry(lambda: self._claim(token, limit, lease_seconds))
        except DatabaseError:
            # The COMMIT may have landed with its answer lost: those rows would sit claimed
            # until their lease expired and then look like unknown outcomes. The token finds them.
            self._uncertain.append(token)
            raise

    async def _claim(self, token: str, limit: int, lease_seconds: float) -> list[Job]:
        async with self._db.transaction() as cur:
            await cur.execute(HELD_SESSIONS, (SessionState.PAUSED, SessionState.CANCELLED))
            held = [row[0] for row in await cur.fetchall()]
            held_sql = f" AND sesion_id NOT IN ({placeholders(len(held))})" if held else ""
            await cur.execute(CLAIM_DUE.format(held=held_sql), (MESSAGE_MAX_BYTES, *held, limit))
            rows = await cur.fetchall()
            if not rows:
                return []
            ids = [row[0] for row in rows]
            await cur.execute(
                TAKE_LEASE.format(ids=placeholders(len(ids))),
                (self._worker_id, token, int(lease_seconds * 1_000_000), *ids),
            )
        return [
            Job(r[0], r[1], r[2], r[3], _text(r[4]), int(r[6]), token, mensaje_bytes=int(r[5] or 0))
            for r in rows
        ]

    async def give_back_uncertain(self) -> None:
        """Give back the rows of claims whose commit outcome was unknown (one statement)."""
        if self._uncertain:
            tokens = list(self._uncertain)
            await self._db.update(GIVE_BACK.format(tokens=placeholders(len(tokens))), tokens)
            del self._uncertain[: len(tokens)]

    async def recover_expired(self) -> int:
        """Rows whose worker died: their request may have left, so they become unknown."""
        return await self._db.update(RECOVER_EXPIRED)

    async def close_cancelled(self) -> int:
        """Waiting rows of cancelled sessions end in error (the daemon's periodic sweep)."""
        return await self._db.update(CLOSE_CANCELLED)

    async def queue_due(self) -> tuple[int, float]:
        """(rows due now, seconds the oldest of them has waited)."""
        async with self._db.transaction() as cur:
            await cur.execute(QUEUE_DUE)
            count, age_us = await cur.fetchone()
        return int(count), max(0.0, float(age_us or 0) / 1e6)

    async def defer_template(self, name: str, seconds: float) -> int:
        """Hold back the waiting rows of one template (paused or disabled by Meta)."""
        delay = int(seconds * 1_000_000)
        return await self._db.update(DEFER_TEMPLATE, (delay, delay, name))


def _text(value: str | bytes | None) -> str | None:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
