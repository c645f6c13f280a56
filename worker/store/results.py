"""The result writer: one transaction per batch, fenced on each row's lease token.

A sent row becomes `enviado` and gains its `envios_whatsapp` row in the same commit. A result
is written whenever its row still carries the claim's token, however late: a row recovered as
`desconocido` while its worker was cut off (a failover, a long outage) keeps the token, and the
true result that worker held replaces the guess. Only `retry` takes the token away, and it
waits for the late-result window (the lease plus one more lease length) before it does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import aiomysql

from worker.models import Finished, RowState
from worker.store.db import UTC_NOW as NOW
from worker.store.db import (
    Database,
    RowRefused,
    case,
    commit_with,
    id_list,
    placeholders,
    with_transient_retry,
)

ERROR_TEXT_MAX = 1000
# Until then `retry` leaves an unknown row alone: its worker may still write the true result.
LATE_RESULT_WINDOW = (
    "lease_expires_at + INTERVAL TIMESTAMPDIFF(MICROSECOND, claimed_at, lease_expires_at) MICROSECOND"
)
CLEAR_LEASE = "lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, claimed_at = NULL"

# -- name: lock_claimed :many
LOCK_CLAIMED = (
    "SELECT id, lease_token FROM cola_envios WHERE id IN ({ids})"
    " AND estado IN ('procesando', 'desconocido') FOR UPDATE"
)
# -- name: already_sent :many
# A batch retried after its COMMIT's answer was lost (the connection cut during the commit)
# finds its sent rows already written by itself: their wamid tells them apart from rows that
# another worker took over.
ALREADY_SENT = "SELECT id, wamid FROM cola_envios WHERE id IN ({ids}) AND estado = 'enviado'"
# -- name: mark_sent :exec
# A row recovered as unknown counted its attempt then (attempts first: MySQL assigns left to
# right, so it still sees the old estado).
SPEND_ATTEMPT = "attempts = attempts + IF(estado = 'desconocido', 0, {spent})"
MARK_SENT = (
    "UPDATE cola_envios SET " + SPEND_ATTEMPT.format(spent=1) + ", estado = 'enviado', wamid = {wamids},"
    f" sent_at = {NOW}, last_error_code = NULL, last_error = NULL, {CLEAR_LEASE}"
    " WHERE id IN ({ids})"
)
# -- name: insert_delivery :exec
# `fecha_envio` is the server's local time, as the PHP application and the runbook read it.
# A row re-queued by hand and sent again updates its one delivery row: never a second one.
INSERT_DELIVERY = (
    "INSERT INTO envios_whatsapp (cola_id, sesion_id, cliente_id, telefono, wamid, fecha_envio)"
    " SELECT c.id, c.sesion_id, c.cliente_id, c.telefono, c.wamid, NOW() FROM cola_envios c"
    " WHERE c.id IN ({ids})"
    " ON DUPLICATE KEY UPDATE wamid = c.wamid, fecha_envio = NOW()"
)
# -- name: record_sent :exec
# The common batch, every row sent, in one round trip (two statements and the COMMIT): each row
# whose lease token this worker still holds becomes `enviado` and gains its delivery row.
# Fenced by the token in the UPDATE rather than read and locked first; the delivery row follows
# the wamid, so a row taken over by another worker gains none of ours, and a row this worker
# wrote already (a commit whose answer was lost) keeps its delivery time.
# The primary key is named: with `estado IN (...)` in the WHERE, the optimizer sometimes walks
# the lease index over every row in flight instead of the batch's ids.
RECORD_SENT = (
    "UPDATE cola_envios FORCE INDEX (PRIMARY) SET " + SPEND_ATTEMPT.format(spent=1) + ","
    " estado = 'enviado', wamid = {wamids},"
    f" sent_at = {NOW}, last_error_code = NULL, last_error = NULL, {CLEAR_LEASE}"
    " WHERE id IN ({ids}) AND estado IN ('procesando', 'desconocido') AND ({fence});"
    " INSERT INTO envios_whatsapp (cola_id, sesion_id, cliente_id, telefono, wamid, fecha_envio)"
    " SELECT c.id, c.sesion_id, c.cliente_id, c.telefono, c.wamid, NOW()"
    " FROM cola_envios c FORCE INDEX (PRIMARY)"
    " WHERE c.id IN ({ids}) AND c.estado = 'enviado' AND c.wamid = {wamids}"
    " ON DUPLICATE KEY UPDATE"
    " fecha_envio = IF(envios_whatsapp.wamid <=> c.wamid, envios_whatsapp.fecha_envio, NOW()),"
    " wamid = c.wamid"
)
# -- name: mark_unsent :exec
# Retry, error, unknown, pause: per-row state, attempt, delay and error in one UPDATE.
MARK_UNSENT = (
    "UPDATE cola_envios SET " + SPEND_ATTEMPT + ", estado = {states},"
    f" next_attempt_at = IF(estado = 'pendiente', {NOW} + INTERVAL {{delays}} MICROSECOND, next_attempt_at),"
    " last_error_code = {codes}, last_error = {texts}, " + CLEAR_LEASE + " WHERE id IN ({ids})"
)
# -- name: record_attempts :exec
# Each attempt that did not send, as it was decided: the row's story outlives its next attempt.
RECORD_ATTEMPTS = (
    "INSERT INTO whatsapp_worker_attempts (cola_id, attempted_at, outcome, code, detail) VALUES {rows}"
)
# -- name: session_totals :many
SESSION_TOTALS = (
    "SELECT sesion_id, SUM(estado IN ('enviado', 'error', 'desconocido')), COUNT(*), MAX(id)"
    " FROM cola_envios WHERE sesion_id IN ({ids}) GROUP BY sesion_id"
)
# -- name: rows_added :one
ROWS_ADDED = "SELECT COUNT(*), MAX(id) FROM cola_envios WHERE id > %s AND sesion_id = %s"
# -- name: live_rows :many
# The claim index's live range only (named: the session's unique key would walk every row).
LIVE_ROWS = (
    "SELECT sesion_id, COUNT(*) FROM cola_envios FORCE INDEX (ix_cola_envios_claim)"
    " WHERE estado IN ('pendiente', 'procesando') AND sesion_id IN ({ids}) GROUP BY sesion_id"
)
# -- name: mark_refused :exec
# The database refused this row's result as written: keep what is safe and say why.
MARK_REFUSED = (  # attempts first: MySQL assigns left to right, the IF must see the old estado
    "UPDATE cola_envios SET " + SPEND_ATTEMPT.format(spent=1) + ", estado = %s, last_error_code = NULL,"
    f" last_error = %s, {CLEAR_LEASE} WHERE id = %s AND lease_token = %s"
)
# -- name: keep_in_flight :exec
# Even that state change was refused (a legacy trigger that cannot store it): the row stays
# `procesando`, never re-sent, with the reason, and its lease is moved out of the recovery's
# reach, so that one row never stops the sweep of every other.
KEEP_IN_FLIGHT = (
    "UPDATE cola_envios SET last_error = %s, lease_expires_at = GREATEST(lease_expires_at,"
    f" {NOW}) + INTERVAL 100 YEAR WHERE id = %s AND lease_token = %s AND estado = 'procesando'"
)


@dataclass(frozen=True, slots=True)
class SessionTotals:
    done: int
    total: int
    highest_id: int


@dataclass(frozen=True, slots=True)
class Recorded:
    written: int  # rows whose result is stored (now, or already: same row, same wamid)
    fenced_out: tuple[Finished, ...] = ()  # taken over by another worker, or too late: not written


class Results:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def record(self, finished: Sequence[Finished]) -> Recorded:
        """Write a batch in one transaction; raises RowRefused if the server refuses a value."""
        if not finished:
            return Recorded(0)
        return await with_transient_retry(lambda: self._record(finished))

    async def _record(self, finished: Sequence[Finished]) -> Recorded:
        if all(f.decision.state is RowState.SENT and f.decision.wamid for f in finished):
            return await self._record_sent(finished)
        async with self._db.transaction() as cur:
            ids = [f.job.id for f in finished]
            await cur.execute(LOCK_CLAIMED.format(ids=placeholders(len(ids))), ids)
            tokens = dict(await cur.fetchall())
            mine = [f for f in finished if tokens.get(f.job.id) == f.job.lease_token]
            sent = {f.job.id: f.decision.wamid for f in mine if f.decision.state is RowState.SENT}
            if sent:
                await _write_sent(cur, sent)
            others = [f for f in mine if f.decision.state is not RowState.SENT]
            if others:
                await _write_unsent(cur, others)
            fenced = [f for f in finished if tokens.get(f.job.id) != f.job.lease_token]
            landed = await _landed_earlier(cur, fenced)
        return Recorded(len(mine) + len(landed), tuple(f for f in fenced if f not in landed))

    async def _record_sent(self, finished: Sequence[Finished]) -> Recorded:
        """Every row sent: one round trip; a second read only when some token did not hold."""
        wamids = {f.job.id: f.decision.wamid for f in finished}
        wamid_sql, wamid_params = case("wamid", wamids)
        fence_sql, fence_params = _fence(finished)
        ids = id_list(wamids)
        sql = RECORD_SENT.format(wamids=wamid_sql, ids=ids, fence=fence_sql)
        async with self._db.connection() as conn, conn.cursor() as cur:
            changed = await commit_with(cur, sql, (*wamid_params, *fence_params, *wamid_params))
            if changed == len(finished):
                return Recorded(changed)
            landed = await _landed_earlier(cur, finished)  # written now, or by a lost commit
            await conn.commit()
        return Recorded(len(landed), tuple(f for f in finished if f not in landed))

    async def record_refused(self, finished: Finished, reason: str) -> bool:
        """The last resort for one row whose result the database refused.

        A message Meta accepted becomes `desconocido` (never re-sent automatically) with its
        wamid in the reason; any other outcome becomes `error`.
        """
        decision = finished.decision
        if decision.state in (RowState.SENT, RowState.UNKNOWN):
            state = RowState.UNKNOWN
            wamid = f" (Meta accepted it as {decision.wamid})" if decision.wamid else ""
            text = f"result refused by the database: {reason}{wamid}"
        else:
            state = RowState.ERROR
            text = f"result refused by the database: {reason}; was: {decision.error_text or decision.state}"
        text = text.encode("utf-8", "replace").decode("utf-8")[:ERROR_TEXT_MAX]  # lone surrogates
        job = finished.job
        try:
            changed = await self._db.update(MARK_REFUSED, (state, text, job.id, job.lease_token))
        except RowRefused as exc:
            return await keep_in_flight(self._db, job.id, job.lease_token, f"{text}; {state} refused: {exc}")
        return changed == 1

    async def session_totals(self, session_ids: Iterable[int]) -> dict[int, SessionTotals]:
        """Finished and all rows of each session, and its highest row id. Reads every row of
        the sessions: the progress task does it once per session, then follows the changes
        with `live_rows` and `rows_added`, whose cost does not grow with finished rows."""
        ids = list(session_ids)
        if not ids:
            return {}
        async with self._db.transaction() as cur:
            await cur.execute(SESSION_TOTALS.format(ids=placeholders(len(ids))), ids)
            return {int(r[0]): SessionTotals(int(r[1]), int(r[2]), int(r[3])) for r in await cur.fetchall()}

    async def rows_added(self, session_id: int, after_id: int) -> tuple[int, int]:
        """(rows a producer added to the session since `after_id`, the highest id now): a
        primary-key range over new rows only."""
        async with self._db.transaction() as cur:
            await cur.execute(ROWS_ADDED, (after_id, session_id))
            count, highest = await cur.fetchone()
        return int(count), int(highest or after_id)

    async def live_rows(self, session_ids: Iterable[int]) -> dict[int, int]:
        """sesion_id -> rows waiting or in flight: the claim index's live range only."""
        ids = list(session_ids)
        if not ids:
            return {}
        async with self._db.transaction() as cur:
            await cur.execute(LIVE_ROWS.format(ids=placeholders(len(ids))), ids)
            live = {int(row[0]): int(row[1]) for row in await cur.fetchall()}
        return {sid: live.get(sid, 0) for sid in ids}

    async def complete_session(self, session_id: int) -> bool:
        """Mark an active session with nothing left to send as completed."""
        changed = await self._db.update(
            "UPDATE sesiones_envio SET estado = 'completada' WHERE id = %s"
            " AND estado = 'activa' AND NOT EXISTS (SELECT 1 FROM cola_envios"
            " WHERE sesion_id = %s AND estado IN ('pendiente', 'procesando'))",
            (session_id, session_id),
        )
        return changed == 1


async def keep_in_flight(db: Database, row_id: int, token: str | None, reason: str) -> bool:
    """The last resort when the table refuses every state we could give a row."""
    text = f"kept procesando, never re-sent: {reason}"[:ERROR_TEXT_MAX]
    return await db.update(KEEP_IN_FLIGHT, (text, row_id, token)) == 1


def _fence(finished: Sequence[Finished]) -> tuple[str, list[object]]:
    """`(lease_token = %s AND id IN (...)) OR ...`: one term per claim in the batch."""
    by_token: dict[str, list[int]] = {}
    for f in finished:
        by_token.setdefault(f.job.lease_token, []).append(int(f.job.id))
    terms = [f"(lease_token = %s AND id IN ({id_list(ids)}))" for ids in by_token.values()]
    return " OR ".join(terms), list(by_token)


async def _landed_earlier(cur: aiomysql.Cursor, fenced: Sequence[Finished]) -> list[Finished]:
    """The fenced sent results this worker had written already (same row, same wamid)."""
    sent = [f for f in fenced if f.decision.state is RowState.SENT]
    if not sent:
        return []
    await cur.execute(ALREADY_SENT.format(ids=placeholders(len(sent))), [f.job.id for f in sent])
    wamids = dict(await cur.fetchall())
    return [f for f in sent if wamids.get(f.job.id) == f.decision.wamid]


async def _write_sent(cur: aiomysql.Cursor, wamids: dict[int, str | None]) -> None:
    """The common case, kept lean: `enviado` plus the `envios_whatsapp` row."""
    wamid_sql, wamid_params = case("wamid", wamids)
    in_ids = placeholders(len(wamids))
    await cur.execute(MARK_SENT.format(wamids=wamid_sql, ids=in_ids), (*wamid_params, *wamids))
    await cur.execute(INSERT_DELIVERY.format(ids=in_ids), list(wamids))


async def _write_unsent(cur: aiomysql.Cursor, rows: list[Finished]) -> None:
    ids = [f.job.id for f in rows]
    decisions = {f.job.id: f.decision for f in rows}
    states, state_params = case("estado", {i: d.state.value for i, d in decisions.items()})
    spent, spent_params = case("0", {i: int(d.spend_attempt) for i, d in decisions.items()})
    delays, delay_params = case("0", {i: int(d.delay * 1_000_000) for i, d in decisions.items()})
    attempted = {i: d for i, d in decisions.items() if d.spend_attempt}
    codes, code_params = case("last_error_code", {i: d.error_code for i, d in attempted.items()})
    texts, text_params = case(
        "last_error", {i: (d.error_text or "")[:ERROR_TEXT_MAX] or None for i, d in attempted.items()}
    )
    await cur.execute(
        MARK_UNSENT.format(
            states=states, spent=spent, delays=delays, codes=codes, texts=texts, ids=placeholders(len(ids))
        ),
        (*spent_params, *state_params, *delay_params, *code_params, *text_params, *ids),
    )
    await _record_attempts(cur, rows)


async def _record_attempts(cur: aiomysql.Cursor, rows: list[Finished]) -> None:
    params: list[object] = []
    for f in rows:
        detail = (f.decision.error_text or "")[:ERROR_TEXT_MAX] or None
        params += [f.job.id, f.decision.metric, f.decision.error_code, detail]
    values = ",".join([f"(%s, {NOW}, %s, %s, %s)"] * len(rows))
    await cur.execute(RECORD_ATTEMPTS.format(rows=values), params)
