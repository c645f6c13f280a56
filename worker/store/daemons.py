"""The daemons table (`whatsapp_worker_daemons`): each running daemon's row, beaten about once a
second, so that every command can see what the fleet is doing and every daemon can count the
live ones (the shared rate limit divides the number's limit among them).

Times are the database's UTC clock, so hosts whose clocks disagree still agree on who is live.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.store.db import UTC_NOW as NOW
from worker.store.db import Database

# -- name: register :exec
# The id is unique per process start (host:pid:instance); a clash still starts a fresh row.
REGISTER = (
    "INSERT INTO whatsapp_worker_daemons (worker_id, host, pid, version, rate_limit, fleet_beat,"
    f" started_at, beat_at, state) VALUES (%s, %s, %s, %s, %s, %s, {NOW}, {NOW}, 'starting')"
    " ON DUPLICATE KEY UPDATE host = %s, pid = %s, version = %s, rate_limit = %s, fleet_beat = %s,"
    f" started_at = {NOW}, beat_at = {NOW},"
    " state = 'starting', in_flight = 0, sent_total = 0, rate = 0, rate_share = 0,"
    " paused_reason = NULL, paused_since = NULL, paused_until = NULL, stopped_at = NULL"
)
# -- name: beat :exec
BEAT = (
    f"UPDATE whatsapp_worker_daemons SET beat_at = {NOW}, state = %s, in_flight = %s,"
    " sent_total = %s, rate = %s, rate_share = %s, paused_reason = %s,"
    " paused_since = IF(%s IS NULL, NULL, COALESCE(paused_since, UTC_TIMESTAMP(6))),"
    f" paused_until = {NOW} + INTERVAL %s MICROSECOND, stopped_at = NULL"
    " WHERE worker_id = %s"
)
# -- name: live_daemons :many
# Live: beaten within the horizon and not stopped. Each one's age tells a newcomer apart.
LIVE = (
    "SELECT worker_id, rate_limit, fleet_beat FROM whatsapp_worker_daemons"
    " FORCE INDEX (ix_whatsapp_worker_daemons_beat)"
    f" WHERE beat_at > {NOW} - INTERVAL %s MICROSECOND AND stopped_at IS NULL"
)
# -- name: stop :exec
STOP = (
    f"UPDATE whatsapp_worker_daemons SET state = 'stopped', stopped_at = {NOW}, beat_at = {NOW},"
    " in_flight = 0, rate = 0, rate_share = 0, paused_reason = NULL, paused_since = NULL,"
    " paused_until = NULL WHERE worker_id = %s"
)
# -- name: forget_old :exec
FORGET = f"DELETE FROM whatsapp_worker_daemons WHERE beat_at < {NOW} - INTERVAL 1 DAY LIMIT 100"
# -- name: list :many
LIST = (
    "SELECT worker_id, host, pid, version, started_at, beat_at, state, in_flight, sent_total, rate,"
    " rate_share, paused_reason, paused_since, paused_until, stopped_at,"
    f" TIMESTAMPDIFF(MICROSECOND, beat_at, {NOW}) / 1e6 AS beat_age"
    f" FROM whatsapp_worker_daemons WHERE beat_at > {NOW} - INTERVAL %s SECOND ORDER BY started_at, id"
)


@dataclass(frozen=True, slots=True)
class Beat:
    state: str  # sending, idle, paused, draining
    in_flight: int
    sent_total: int
    rate: float
    rate_share: float
    paused_reason: str | None = None
    paused_for: float = 0.0  # seconds until the pause's probe


@dataclass(frozen=True, slots=True)
class Live:
    """The live daemons as one beat saw them: how many, and their own settings."""

    count: int
    settings: dict[str, tuple[float | None, float | None]]  # the others: (rate limit, beat)


class Daemons:
    def __init__(self, db: Database, *, worker_id: str) -> None:
        self._db = db
        self._worker_id = worker_id[:128]

    async def register(
        self, *, host: str, pid: int, version: str, rate_limit: float, fleet_beat: float
    ) -> None:
        args = (host[:255], pid, version[:32], rate_limit, fleet_beat)
        await self._db.update(REGISTER, (self._worker_id, *args, *args))

    async def beat(self, beat: Beat, *, horizon: float) -> Live:
        """Write this daemon's row; return the live daemons (this one included)."""
        paused_us = int(beat.paused_for * 1e6) if beat.paused_reason else None
        async with self._db.transaction() as cur:
            await cur.execute(
                BEAT,
                (
                    beat.state,
                    beat.in_flight,
                    beat.sent_total,
                    round(beat.rate, 3),
                    round(beat.rate_share, 3),
                    beat.paused_reason[:1000] if beat.paused_reason else None,
                    beat.paused_reason,
                    paused_us,
                    self._worker_id,
                ),
            )
            await cur.execute(LIVE, (int(horizon * 1e6),))
            live = {row[0]: (row[1], row[2]) for row in await cur.fetchall()}
        others = {worker: settings for worker, settings in live.items() if worker != self._worker_id}
        return Live(len(others) + 1, others)

    async def stop(self) -> None:
        await self._db.update(STOP, (self._worker_id,))

    async def forget_old(self) -> int:
        return await self._db.update(FORGET)

    async def list(self, *, within: float = 600.0) -> list[dict[str, Any]]:
        """Daemons seen in the last `within` seconds, oldest first (for `status`)."""
        async with self._db.transaction() as cur:
            await cur.execute(LIST, (int(within),))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]
