"""The fetch path: claim due rows, give back rows never sent, recover rows of dead workers.

Queue times (`next_attempt_at`, leases) are UTC from the database clock (`UTC_TIMESTAMP(6)`),
so neither the hosts' clocks nor a producer's session `time_zone` moves them. A row whose
`next_attempt_at` is NULL (a producer's four-column INSERT) is due at once.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomysql

from worker.messages import MESSAGE_MAX_BYTES
from worker.models import CANCELLED_REASON, SENDABLE_STATES, Job
from worker.store.db import UTC_NOW as NOW
from worker.store.db import (
    Database,
    DatabaseError,
    RowRefused,
    commit_with,
    id_list,
    placeholders,
    with_transient_retry,
)
from worker.store.holds import ALL
from worker.store.optouts import opted_out
from worker.store.results import keep_in_flight
from worker.store.suppressions import suppressed

OPTED_OUT_REASON = "the phone opted out (whatsapp_worker_optouts): not sent"
UNDELIVERABLE_REASON = (
    "this number could not deliver to the phone before (131026; whatsapp_worker_suppressions): not sent"
)

# -- name: next_session_waiting :one
# The sessions with waiting rows, found one index step at a time (a skip scan: the cost grows
# with the sessions, never with their rows, whatever the optimizer's statistics say). Each
# step also reads the session's earliest row, so a session whose rows all wait for a later
# time (a retry's backoff, a schedule, a paused session's parked rows) is left out.
NEXT_SESSION_WAITING = (
    f"SELECT sesion_id, next_attempt_at IS NULL OR next_attempt_at <= {NOW}"
    " FROM cola_envios FORCE INDEX (ix_cola_envios_session_due)"
    " WHERE estado = 'pendiente' AND sesion_id > %s ORDER BY sesion_id, next_attempt_at LIMIT 1"
)
# Sessions with waiting rows read per turn. The reads go round the sessions in laps: a read that
# reaches the cap ends where it stopped (`capped`), the next one goes on from there, and the read
# that reaches the last session ends the lap. However many sessions hold rows that are not due
# (schedules, backoffs, paused sessions, drafts), every session with a due row is reached within
# one lap, and a lap always ends.
MAX_SESSIONS = 1000
# -- name: claim_flags :one
# Read with the sessions, in one round trip: whether any phone opted out or is held as
# undeliverable (most accounts have none for a long time, and each look-up costs a round trip
# per claim), and the operator's holds (`pause --all` / `--number`).
CLAIM_FLAGS = (
    "SELECT EXISTS (SELECT 1 FROM whatsapp_worker_optouts),"
    f" EXISTS (SELECT 1 FROM whatsapp_worker_suppressions WHERE expires_at > {NOW}),"
    " (SELECT GROUP_CONCAT(scope SEPARATOR ' ') FROM whatsapp_worker_holds)"
)
# -- name: sessions_may_send :many
# A row whose session is missing from sesiones_envio (a producer without a foreign key) is
# sent like a row of an active session with no window, as before sessions had settings.
# Only the states known to be sendable send: a PHP application's draft is held (NULL too).
SESSIONS_MAY_SEND = (
    "SELECT id, phone_number_id, send_window, time_zone, COALESCE(estado IN ({sendable}), FALSE)"
    " FROM sesiones_envio WHERE id IN ({ids})"
)
# -- name: claim_session_due :many
# One session's due rows in order: an index range scan on (estado, sesion_id, next_attempt_at,
# id), no filesort; NULL sorts first. The index is named: with `IS NULL OR <=` MySQL's sampled
# statistics sometimes pick another plan, which would walk finished rows.
# A `mensaje` over the API's limit is not loaded: the row ends in error from its length alone.
# Only what the send needs is read (each column costs the driver's Python per row).
CLAIM_SESSION_DUE = (
    "SELECT id, sesion_id, telefono,"
    " IF(LENGTH(mensaje) > %s, NULL, mensaje), IF(LENGTH(mensaje) > %s, LENGTH(mensaje), NULL),"
    " GREATEST(CAST(attempts AS SIGNED) - CAST(attempts_before_retry AS SIGNED), 0)"  # since `retry`
    " FROM cola_envios FORCE INDEX (ix_cola_envios_session_due)"
    " WHERE estado = 'pendiente' AND sesion_id = %s"
    f" AND (next_attempt_at IS NULL OR next_attempt_at <= {NOW})"
    " ORDER BY next_attempt_at, id LIMIT %s FOR UPDATE SKIP LOCKED"
)
TOO_LONG = (MESSAGE_MAX_BYTES, MESSAGE_MAX_BYTES)  # CLAIM_SESSION_DUE's first two parameters
PHONE = 2  # the column of CLAIM_SESSION_DUE's rows that holds telefono
# -- name: close_opted_out :exec
CLOSE_OPTED_OUT = (
    "UPDATE cola_envios SET estado = 'error', last_error_code = NULL, last_error = %s"
    " WHERE id IN ({ids}) AND estado = 'pendiente'"
)
# -- name: close_undeliverable :exec
CLOSE_UNDELIVERABLE = (
    "UPDATE cola_envios SET estado = 'error', last_error_code = 131026, last_error = %s"
    " WHERE id IN ({ids}) AND estado = 'pendiente'"
)
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
# How the sweep's history line (`record_recovered`) begins: `rows --id` and `forget_recovered`
# know it by that.
RECOVERED_DETAIL = "lease of "
# -- name: forget_recovered :exec
# The sweep's history line about a given-back row (`record_recovered`, written after this lease
# was taken) goes with the guess it recorded: nobody sent the row.
FORGET_RECOVERED = (
    "DELETE a FROM whatsapp_worker_attempts a JOIN cola_envios c ON c.id = a.cola_id"
    " WHERE c.estado = 'desconocido' AND c.lease_token IN ({tokens}) AND a.outcome = 'unknown'"
    f" AND a.code IS NULL AND a.detail LIKE '{RECOVERED_DETAIL}%%' AND a.attempted_at >= c.claimed_at"
)
# -- name: lock_expired :many
# Rows whose worker died (ix_cola_envios_claim: the `procesando` range, its lease checked per
# row). Locked for the sweep, so their history line and their new state go together; another
# daemon's sweep skips them.
EXPIRED_BATCH = 1000
EXPIRED_ROWS = (
    "SELECT id, lease_token FROM cola_envios FORCE INDEX (ix_cola_envios_claim)"
    f" WHERE estado = 'procesando' AND lease_expires_at < {NOW} LIMIT %s"
)
LOCK_EXPIRED = EXPIRED_ROWS + " FOR UPDATE SKIP LOCKED"
# -- name: recover_expired :exec
# The token and the lease times stay: the worker that was only cut off may still write the
# true result for one more lease length (see results.py), and `retry` waits for that.
RECOVER_EXPIRED = (
    "UPDATE cola_envios SET estado = 'desconocido', attempts = attempts + 1,"
    " last_error_code = NULL,"
    f" last_error = CONCAT('{RECOVERED_DETAIL}', COALESCE(lease_owner, '?'),"
    " ' expired while the message may have been in flight')"
    f" WHERE id IN ({{ids}}) AND estado = 'procesando' AND lease_expires_at < {NOW}"
)
# -- name: record_recovered :exec
# The attempt in the row's history (`rows --id`): a send whose outcome nobody knows.
RECORD_RECOVERED = (
    "INSERT INTO whatsapp_worker_attempts (cola_id, attempted_at, outcome, code, detail)"
    f" SELECT id, {NOW}, 'unknown', NULL, last_error FROM cola_envios"
    " WHERE id IN ({ids}) AND estado = 'desconocido'"
)
# -- name: queue_due :one
# For the metrics: rows due now and how long the oldest has waited (a NULL `next_attempt_at`
# is due since the row was created, in the server's time zone).
# Only the sessions that may send now: rows held by quiet hours are not late.
# Every session's due rows, less those of paused or cancelled sessions and of the sessions
# named as held by quiet hours: never capped by the number of sessions.
QUEUE_DUE = (
    f"SELECT COUNT(*), TIMESTAMPDIFF(MICROSECOND, MIN(COALESCE(next_attempt_at,"
    f" CONVERT_TZ(created_at, @@session.time_zone, '+00:00'))), {NOW})"
    " FROM cola_envios FORCE INDEX (ix_cola_envios_session_due)"
    f" WHERE estado = 'pendiente' AND (next_attempt_at IS NULL OR next_attempt_at <= {NOW})"
    " AND sesion_id NOT IN (SELECT id FROM sesiones_envio WHERE NOT COALESCE(estado IN ({sendable}), FALSE))"
    " AND sesion_id NOT IN ({held})"
)
# -- name: close_cancelled :exec
# Rows a producer inserted into a cancelled session after the cancel (or that waited for a
# retry then) would wait forever: they end like the session's other waiting rows.
CLOSE_CANCELLED = (
    "UPDATE cola_envios c JOIN sesiones_envio s ON s.id = c.sesion_id"
    " SET c.estado = 'error', c.last_error_code = NULL,"
    f" c.last_error = '{CANCELLED_REASON}'"
    " WHERE s.estado = 'cancelada' AND c.estado = 'pendiente'"
)
# A held session's waiting rows are moved this far ahead (`pause`), out of the claim's range.
# Parking is idempotent (a parked row is not moved again) and unparking takes back every
# century a row was moved (a row parked twice by an older version, or by hand, comes back too).
PARKED = "INTERVAL 100 YEAR"
# Parked: 80 to 1,000 years ahead (a pause adds 100; a date written by hand, 2099 or 9999, is not).
IS_PARKED = f"next_attempt_at BETWEEN {NOW} + INTERVAL 80 YEAR AND {NOW} + INTERVAL 1000 YEAR"


def _unpark(column: str) -> str:
    """The assignment that takes back every century a row was parked."""
    return f"{column} = {column} - INTERVAL (100 * ROUND(TIMESTAMPDIFF(YEAR, {NOW}, {column}) / 100)) YEAR"


UNPARK = _unpark("next_attempt_at")
# -- name: unpark_active :exec
# The daemon's sweep: a session that is not paused has no parked rows, however it was
# re-activated (`resume`, the PHP admin's own toggle, an UPDATE). The claim index's range over
# parked rows only.
UNPARK_ACTIVE = (
    "UPDATE cola_envios c FORCE INDEX (ix_cola_envios_claim) LEFT JOIN sesiones_envio s ON s.id = c.sesion_id"
    f" SET {_unpark('c.next_attempt_at')}"
    f" WHERE c.estado = 'pendiente' AND c.{IS_PARKED} AND (s.id IS NULL OR s.estado <> 'pausada')"
)
# -- name: defer_template :exec
DEFER_TEMPLATE = (
    f"UPDATE cola_envios SET next_attempt_at = {NOW} + INTERVAL %s MICROSECOND"
    f" WHERE estado = 'pendiente' AND (next_attempt_at IS NULL"
    f" OR next_attempt_at < {NOW} + INTERVAL %s MICROSECOND)"
    " AND JSON_VALID(mensaje) AND JSON_UNQUOTE(JSON_EXTRACT(mensaje, '$.template.name')) = %s"
)


@dataclass(frozen=True, slots=True)
class DueSession:
    """A session with waiting rows, as the claim needs it (the number and the window)."""

    id: int
    phone_number_id: str | None
    send_window: str | None
    time_zone: str | None


@dataclass(slots=True)
class Recovered:
    rows: int  # became desconocido
    kept_in_flight: list[tuple[int, str]] = field(default_factory=list)  # refused: (id, why)


class Claimed(list[Job]):
    """The claimed rows; `opted_out`, `undeliverable`: rows closed as error without a request."""

    opted_out: int = 0
    undeliverable: int = 0


class Claims:
    def __init__(
        self,
        db: Database,
        *,
        worker_id: str,
        sendable: Sequence[str] = SENDABLE_STATES,
        default_number: str | None = None,
    ) -> None:
        self._db = db
        self._default_number = default_number or ""  # WHATSAPP_PHONE_NUMBER_ID: a session without its own
        self._sendable = tuple(sendable)
        self._worker_id = worker_id[:128]
        self._uncertain: list[str] = []  # tokens of claims whose commit outcome is unknown
        self._numbers: dict[int, str | None] = {}  # session: its sending number (sessions_due)
        self.held: frozenset[str] = frozenset()  # scopes the operator holds, read with the sessions
        # Whether any phone opted out, or is held as undeliverable (CLAIM_FLAGS).
        self._optouts_exist = self._suppressions_exist = True
        self._scan_from = 0  # where the next read of the sessions starts (see MAX_SESSIONS)
        self.capped = False  # the last read stopped at MAX_SESSIONS: more sessions to read now

    async def sessions_due(self) -> list[DueSession]:
        """Sessions with waiting rows that are neither paused nor cancelled (up to MAX_SESSIONS
        read, from where the last read stopped)."""
        async with self._db.transaction() as cur:
            await cur.execute(CLAIM_FLAGS)
            self._optouts_exist, self._suppressions_exist, scopes = await cur.fetchone()
            self.held = frozenset(str(scopes or "").split())
            if ALL in self.held:  # `pause --all`: nothing is claimed
                return []
            waiting = await self._scan_sessions(cur)
            if not waiting:
                return []
            await cur.execute(
                SESSIONS_MAY_SEND.format(
                    sendable=placeholders(len(self._sendable)), ids=placeholders(len(waiting))
                ),
                (*self._sendable, *waiting),
            )
            known = {int(r[0]): r for r in await cur.fetchall()}
        due = [
            DueSession(sid, None, None, None)
            if (r := known.get(sid)) is None
            else DueSession(sid, r[1] or None, r[2] or None, r[3] or None)
            for sid in waiting
            if sid not in known or known[sid][4]
        ]
        due = [s for s in due if (s.phone_number_id or self._default_number) not in self.held]
        self._numbers = {session.id: session.phone_number_id for session in due}
        return due

    async def _scan_sessions(self, cur: aiomysql.Cursor) -> list[int]:
        """The ids of the sessions with a row due now, one index step per session."""
        waiting: list[int] = []
        after, seen = self._scan_from, 0
        while True:
            await cur.execute(NEXT_SESSION_WAITING, (after,))
            found = await cur.fetchone()
            if found is None:  # the end of this lap: the next read starts a new one
                self.capped, self._scan_from = False, 0
                return waiting
            after, seen = int(found[0]), seen + 1
            if found[1]:
                waiting.append(after)
            if seen >= MAX_SESSIONS:  # more of this lap to read: the next read goes on from here
                self.capped, self._scan_from = True, after
                return waiting

    async def claim(
        self, limit: int, *, lease_seconds: float, sessions: Sequence[int] | None = None
    ) -> Claimed:
        """Take up to `limit` due rows of `sessions` (default: every session that may send),
        shared in the order given (a session with fewer due rows leaves its share to the
        next), under a fresh lease token."""
        await self.give_back_uncertain()
        if sessions is None:
            sessions = [s.id for s in await self.sessions_due()]
        if limit <= 0 or not sessions:
            return Claimed()
        token = secrets.token_hex(16)
        try:
            return await with_transient_retry(lambda: self._claim(token, limit, lease_seconds, sessions))
        except DatabaseError:
            # The COMMIT may have landed with its answer lost: those rows would sit claimed
            # until their lease expired and then look like unknown outcomes. The token finds them.
            self._uncertain.append(token)
            raise

    async def _claim(self, token: str, limit: int, lease_seconds: float, sessions: Sequence[int]) -> Claimed:
        async with self._db.transaction() as cur:
            rows: list[Any] = []
            for index, session_id in enumerate(sessions):
                left = limit - len(rows)
                if left <= 0:
                    break
                # what is left, split evenly over the sessions still to ask (at least one row
                # each): a session with fewer due rows, or none any more, leaves its share on
                share = max(1, -(-left // (len(sessions) - index)))
                await cur.execute(CLAIM_SESSION_DUE, (*TOO_LONG, session_id, share))
                rows += await cur.fetchall()
            if not rows:
                return Claimed()
            blocked = await opted_out(cur, {r[PHONE] for r in rows}) if self._optouts_exist else set()
            closed = [r[0] for r in rows if r[PHONE] in blocked]
            if closed:
                await cur.execute(
                    CLOSE_OPTED_OUT.format(ids=placeholders(len(closed))), (OPTED_OUT_REASON, *closed)
                )
                rows = [r for r in rows if r[PHONE] not in blocked]
            held = await self._close_undeliverable(cur, rows) if rows and self._suppressions_exist else []
            rows = [r for r in rows if r[0] not in held]
            if rows:
                ids = [row[0] for row in rows]
                await commit_with(
                    cur,
                    TAKE_LEASE.format(ids=id_list(ids)),
                    (self._worker_id, token, int(lease_seconds * 1_000_000)),
                )
        claimed = Claimed(
            Job(
                r[0],
                r[1],
                r[2],
                _text(r[3]),
                int(r[5]),
                token,
                mensaje_bytes=int(r[4] or 0),
                phone_number_id=self._numbers.get(r[1]),
            )
            for r in rows
        )
        claimed.opted_out = len(closed)
        claimed.undeliverable = len(held)
        return claimed

    async def _close_undeliverable(self, cur: aiomysql.Cursor, rows: list[Any]) -> list[int]:
        """Rows whose phone their sending number could not deliver to before: closed unsent."""
        held = await suppressed(cur, {r[PHONE] for r in rows})
        ids = [r[0] for r in rows if (r[PHONE], self._numbers.get(r[1]) or self._default_number) in held]
        if ids:
            await cur.execute(
                CLOSE_UNDELIVERABLE.format(ids=placeholders(len(ids))), (UNDELIVERABLE_REASON, *ids)
            )
        return ids

    async def give_back_uncertain(self) -> None:
        """Give back the rows of claims whose commit outcome was unknown (one statement)."""
        if self._uncertain:
            tokens = list(self._uncertain)
            await with_transient_retry(functools.partial(self._give_back, tokens))
            del self._uncertain[: len(tokens)]

    async def _give_back(self, tokens: list[str]) -> None:
        async with self._db.transaction() as cur:
            await cur.execute(FORGET_RECOVERED.format(tokens=placeholders(len(tokens))), tokens)
            await cur.execute(GIVE_BACK.format(tokens=placeholders(len(tokens))), tokens)

    async def recover_expired(self) -> Recovered:
        """Rows whose worker died: their request may have left, so they become unknown, each
        with its line in the row's history."""
        recovered = Recovered(0)
        while True:
            try:
                rows, more = await with_transient_retry(self._recover_expired_batch)
            except RowRefused:  # a legacy trigger: row by row, the refusing rows kept in flight
                row_by_row = await self._recover_row_by_row()
                row_by_row.rows += recovered.rows
                return row_by_row
            recovered.rows += rows
            if not more:
                return recovered

    async def _recover_expired_batch(self) -> tuple[int, bool]:
        """(rows recovered, whether a full batch was found: more may wait)."""
        async with self._db.transaction() as cur:
            await cur.execute(LOCK_EXPIRED, (EXPIRED_BATCH,))
            ids = [int(row[0]) for row in await cur.fetchall()]
            rows = await _recover(cur, ids) if ids else 0
        # on only while every locked row became unknown: a trigger that silently keeps a row
        # in flight must not make one sweep recover it for ever
        return rows, rows == len(ids) == EXPIRED_BATCH

    async def _recover_row_by_row(self) -> Recovered:
        async with self._db.transaction() as cur:
            await cur.execute(EXPIRED_ROWS, (EXPIRED_BATCH,))
            expired = list(await cur.fetchall())
        recovered = Recovered(0)  # none left: another daemon recovered them meanwhile
        for row_id, token in expired:
            try:
                recover = functools.partial(self._recover_one, int(row_id))
                recovered.rows += await with_transient_retry(recover)
            except RowRefused as exc:
                reason = (
                    f"its lease expired while the message may have been in flight; desconocido refused: {exc}"
                )
                problem = str(exc)
                try:
                    await keep_in_flight(self._db, row_id, token, reason)
                except RowRefused as kept:  # even that: the row stays as it is; said at each sweep
                    problem = f"{exc}; and keeping it in flight: {kept}"
                recovered.kept_in_flight.append((int(row_id), problem))
        return recovered

    async def _recover_one(self, row_id: int) -> int:
        async with self._db.transaction() as cur:
            return await _recover(cur, [row_id])

    async def unpark_active(self) -> int:
        """Rows parked by a pause whose session is no longer paused: back to their schedule."""
        return await self._db.update(UNPARK_ACTIVE)

    async def close_cancelled(self) -> int:
        """Waiting rows of cancelled sessions end in error (the daemon's periodic sweep)."""
        return await self._db.update(CLOSE_CANCELLED)

    async def queue_due(self, held: Sequence[int] = ()) -> tuple[int, float]:
        """(rows due now, seconds the oldest of them has waited) in every session that may send,
        less the `held` ones (quiet hours)."""
        held = list(held) or [0]  # no session has id 0: `NOT IN (0)` leaves none out
        async with self._db.transaction() as cur:
            await cur.execute(
                QUEUE_DUE.format(sendable=placeholders(len(self._sendable)), held=placeholders(len(held))),
                (*self._sendable, *held),
            )
            count, age_us = await cur.fetchone()
        return int(count), max(0.0, float(age_us or 0) / 1e6)

    async def defer_template(self, name: str, seconds: float) -> int:
        """Hold back the waiting rows of one template (paused or disabled by Meta)."""
        delay = int(seconds * 1_000_000)
        return await self._db.update(DEFER_TEMPLATE, (delay, delay, name))


def _text(value: str | bytes | None) -> str | None:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


async def _recover(cur: aiomysql.Cursor, ids: list[int]) -> int:
    """Expired rows among `ids` become unknown, with their history line, in the caller's
    transaction; the rows that did (a trigger may keep one as it was without a word)."""
    await cur.execute(RECOVER_EXPIRED.format(ids=id_list(ids)))
    if not cur.rowcount:
        return 0
    await cur.execute(RECORD_RECOVERED.format(ids=id_list(ids)))
    return int(cur.rowcount)
