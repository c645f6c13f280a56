"""Meta's status webhooks in the database: keep every status, then apply it to its row.

Two steps, two transactions:
- `store`: the receiver's batch. Every status goes into `whatsapp_worker_statuses` (unique on
  `(wamid, status)`, so Meta's retries and duplicates change nothing), with the opt-outs of the
  same requests. The receiver answers 200 only after this commit.
- `apply_pending`: statuses not yet applied, in id order, a bounded batch at a time. A row in
  `desconocido` is settled (`sent`/`delivered`/`read`: `enviado` with the status's wamid and its
  one `envios_whatsapp` row; `failed`: `error` with Meta's code and text), an `enviado` row gains
  its delivery and read times. A status whose row is still `pendiente` or `procesando` (the
  webhook beat the daemon's own result) stays pending and is tried again by the next sweep.

Fencing: the daemon writes its own result only while the row is `procesando` (or, for one more
lease length, `desconocido`) and still carries its lease token (results.py). Settling locks the
row, changes only a `desconocido` row, and clears the lease with the state: a late result of the
daemon then finds the row settled and is fenced out, exactly as if another worker had written it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import aiomysql

from worker.messages import phone_from_wa_id, phone_variants
from worker.models import OPTED_OUT_CODE, SOURCE_META, OptOut, RowState, StatusUpdate
from worker.store.db import UTC_NOW as NOW
from worker.store.db import Database, RowRefused, case, placeholders, with_transient_retry
from worker.store.optouts import add_optouts
from worker.store.results import CLEAR_LEASE, ERROR_TEXT_MAX, INSERT_DELIVERY

STATUS_KINDS = ("sent", "delivered", "read", "failed")
RANK = {"sent": 1, "delivered": 2, "read": 3}  # what a status proves about delivery
APPLY_BATCH = 500

# -- name: insert_statuses :exec
# A `(wamid, status)` seen before keeps its first copy: Meta retries for days.
INSERT_STATUSES = (
    "INSERT INTO whatsapp_worker_statuses (wamid, status, cola_id, status_at, recipient_id,"
    " error_code, error_title, raw, phone_number_id, received_at) VALUES {rows}"
    " ON DUPLICATE KEY UPDATE id = id"
)
INSERT_STATUS_ROW = f"(%s, %s, %s, %s, %s, %s, %s, %s, %s, {NOW})"
# -- name: pending_statuses :many
# The index (applied_at, id): a range over the pending statuses after a cursor. SKIP LOCKED: a
# second receiver's sweep takes other statuses instead of waiting.
# The index is named: with few pending statuses among many applied ones MySQL's sampled
# statistics sometimes pick the primary key, which walks every applied status.
PENDING_STATUSES = (
    "SELECT id, wamid, status, cola_id, COALESCE(status_at, received_at), recipient_id,"
    " error_code, error_title, phone_number_id"
    " FROM whatsapp_worker_statuses FORCE INDEX (ix_whatsapp_worker_statuses_pending)"
    " WHERE applied_at IS NULL AND id > %s ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
)
# -- name: lock_rows :many
LOCK_ROWS = (
    "SELECT id, estado, wamid, telefono, delivered_at, read_at, sesion_id FROM cola_envios"
    " WHERE id IN ({ids}) FOR UPDATE"
)
# -- name: session_numbers :many
# The sending number of each row's session (NULL: the daemon's WHATSAPP_PHONE_NUMBER_ID).
SESSION_NUMBERS = "SELECT id, phone_number_id FROM sesiones_envio WHERE id IN ({ids})"
# -- name: rows_by_wamid :many
# A status without our `cola:<id>` (a send of the PHP era, or another program's on our number):
# its row is the one that holds its wamid, on the index of that name.
ROWS_BY_WAMID = "SELECT wamid, MIN(id), COUNT(*) FROM cola_envios WHERE wamid IN ({wamids}) GROUP BY wamid"
# -- name: settle_sent :exec
SETTLE_SENT = (
    "UPDATE cola_envios SET estado = 'enviado', wamid = {wamids}, sent_at = COALESCE(sent_at, {sent}),"
    f" delivered_at = {{delivered}}, read_at = {{read}}, settled_at = {NOW},"
    f" last_error_code = NULL, last_error = NULL, {CLEAR_LEASE}"
    " WHERE id IN ({ids}) AND estado = 'desconocido'"
)
# -- name: settle_failed :exec
SETTLE_FAILED = (
    "UPDATE cola_envios SET estado = 'error', last_error_code = {codes}, last_error = {texts},"
    f" settled_at = {NOW}, {CLEAR_LEASE} WHERE id IN ({{ids}}) AND estado = 'desconocido'"
)
# -- name: delivery_times :exec
DELIVERY_TIMES = (
    "UPDATE cola_envios SET delivered_at = {delivered}, read_at = {read}"
    " WHERE id IN ({ids}) AND estado = 'enviado'"
)
# -- name: failed_after_accepted :exec
# Meta accepted the message, then could not deliver it: the row stays `enviado` (it has its
# delivery row, and it must not be re-sent blindly); the failure is its last error.
FAILED_AFTER_ACCEPTED = (
    "UPDATE cola_envios SET last_error_code = {codes}, last_error = {texts}"
    " WHERE id IN ({ids}) AND estado = 'enviado'"
)
# -- name: mark_applied :exec
MARK_APPLIED = f"UPDATE whatsapp_worker_statuses SET applied_at = {NOW} WHERE id IN ({{ids}})"
# -- name: refuse_status :exec
# A status the database refused to apply: kept, with why, and out of the way of the others.
REFUSE_STATUS = f"UPDATE whatsapp_worker_statuses SET applied_at = {NOW}, apply_error = %s WHERE id = %s"
# -- name: pending_count :one
PENDING_COUNT = "SELECT COUNT(*) FROM whatsapp_worker_statuses WHERE applied_at IS NULL"


@dataclass(frozen=True, slots=True)
class Stored:
    statuses: int  # new statuses (a duplicate counts 0)
    optouts: int  # new opt-outs
    said_before_removal: int = 0  # stops said before their phone's last `optout remove`: ignored


@dataclass(frozen=True, slots=True)
class Pending:
    """A stored status not applied yet."""

    id: int
    wamid: str
    status: str
    cola_id: int | None
    at: datetime  # Meta's time, or when it was received
    recipient_id: str | None = None
    error_code: int | None = None
    error_title: str | None = None
    phone_number_id: str | None = None


@dataclass(frozen=True, slots=True)
class RowView:
    """What applying needs to know of a `cola_envios` row."""

    id: int
    estado: str
    wamid: str | None
    telefono: str
    delivered_at: datetime | None = None
    read_at: datetime | None = None
    number: str | None = None  # the sending number of its session (None: the default one)


class Action(StrEnum):
    SETTLE_SENT = "settle_sent"  # desconocido -> enviado
    SETTLE_FAILED = "settle_failed"  # desconocido -> error
    TIMES = "times"  # enviado: delivered_at / read_at
    FAILED_AFTER_ACCEPTED = "failed_after_accepted"  # enviado: Meta could not deliver it
    NOTHING = "nothing"  # applied, nothing to change (duplicate, older news, final row, no row)
    WAIT = "wait"  # the row is pendiente / procesando: keep the statuses pending


@dataclass(frozen=True, slots=True)
class Plan:
    action: Action
    wamid: str | None = None
    sent_at: datetime | None = None
    delivered_at: datetime | None = None
    read_at: datetime | None = None
    error_code: int | None = None
    error_text: str | None = None


@dataclass(slots=True)
class Applied:
    """What one `apply_pending` batch did."""

    seen: int = 0  # pending statuses read
    applied: int = 0  # marked applied
    waiting: int = 0  # left pending: their row is still pendiente / procesando
    last_id: int = 0  # the cursor for the next batch
    settled: dict[str, int] = field(default_factory=lambda: {"sent": 0, "failed": 0})
    settled_ids: list[int] = field(default_factory=list)  # cola_envios ids settled
    optouts: int = 0  # new opt-outs from 131050 failures
    refused: list[Refused] = field(default_factory=list)  # statuses the database refused
    mismatched: list[Refused] = field(default_factory=list)  # statuses of another installation
    earlier: list[tuple[int, str]] = field(default_factory=list)  # (row, wamid) of an earlier send

    def merge(self, later: Applied) -> Applied:
        """This batch followed by `later` (the halves of a split batch)."""
        return Applied(
            seen=self.seen + later.seen,
            applied=self.applied + later.applied,
            waiting=self.waiting + later.waiting,
            last_id=max(self.last_id, later.last_id),
            settled={k: self.settled[k] + later.settled[k] for k in self.settled},
            settled_ids=self.settled_ids + later.settled_ids,
            optouts=self.optouts + later.optouts,
            refused=self.refused + later.refused,
            mismatched=self.mismatched + later.mismatched,
            earlier=self.earlier + later.earlier,
        )


@dataclass(frozen=True, slots=True)
class Refused:
    status_id: int
    wamid: str
    cola_id: int | None
    reason: str


def plan(row: RowView | None, statuses: Sequence[Pending]) -> Plan:
    """Pure: what the statuses of one row (in arrival order) make of it.

    Never backwards: `read` implies delivered; a `delivered` after `read`, or a status seen
    twice, changes nothing; a delivery time is set once.
    """
    if row is None:  # pruned, or a message this queue did not send
        return Plan(Action.NOTHING)
    if row.estado in (RowState.PENDING, RowState.PROCESSING):
        return Plan(Action.WAIT)
    positive = [s for s in statuses if s.status in RANK]
    failed = [s for s in statuses if s.status == "failed"]
    if row.estado == RowState.UNKNOWN:
        if positive:
            best = max(positive, key=lambda s: (RANK[s.status], -s.id))
            same = [s for s in positive if s.wamid == best.wamid]
            delivered, read = _times(None, None, same)
            return Plan(
                Action.SETTLE_SENT,
                wamid=best.wamid,
                sent_at=min(s.at for s in same),
                delivered_at=delivered,
                read_at=read,
            )
        if failed:
            return Plan(
                Action.SETTLE_FAILED, error_code=failed[0].error_code, error_text=failure_text(failed[0])
            )
        return Plan(Action.NOTHING)
    if row.estado == RowState.SENT:
        # Statuses of another send of this row (re-queued by hand) are kept for audit only.
        mine = [s for s in statuses if row.wamid is None or s.wamid == row.wamid]
        delivered, read = _times(row.delivered_at, row.read_at, mine)
        if (delivered, read) != (row.delivered_at, row.read_at):
            return Plan(Action.TIMES, delivered_at=delivered, read_at=read)
        mine_failed = [s for s in mine if s.status == "failed"]
        if mine_failed and row.delivered_at is None:
            first = mine_failed[0]
            return Plan(
                Action.FAILED_AFTER_ACCEPTED, error_code=first.error_code, error_text=failure_text(first)
            )
    return Plan(Action.NOTHING)  # error rows are final


def _times(
    delivered: datetime | None, read: datetime | None, statuses: Sequence[Pending]
) -> tuple[datetime | None, datetime | None]:
    for status in statuses:
        if status.status == "read":
            read = read or status.at
            delivered = delivered or status.at  # read implies delivered
        elif status.status == "delivered":
            delivered = delivered or status.at
    return delivered, read


def failure_text(status: Pending) -> str:
    title = status.error_title or "no reason given"
    return f"failed (status webhook): {title}"[:ERROR_TEXT_MAX]


class Statuses:
    def __init__(self, db: Database, *, default_number: str | None = None) -> None:
        self._db = db
        self._default_number = default_number or None  # WHATSAPP_PHONE_NUMBER_ID, if the receiver knows it

    async def store(self, statuses: Sequence[StatusUpdate], optouts: Sequence[OptOut] = ()) -> Stored:
        """One transaction for a batch of requests' statuses and opt-outs."""
        if not statuses and not optouts:
            return Stored(0, 0)

        async def attempt() -> Stored:
            async with self._db.transaction() as cur:
                new = await _insert_statuses(cur, statuses)
                added = await add_optouts(cur, optouts)
            return Stored(new, added.new, added.said_before_removal)

        return await with_transient_retry(attempt)

    async def apply_pending(self, *, after_id: int = 0, limit: int = APPLY_BATCH) -> Applied:
        """Apply up to `limit` pending statuses with an id above `after_id`, in one transaction.

        A batch the database refuses (a value too long for an adopted column, a trigger) is
        split like the daemon's result batches until the refused status is alone; that one is
        marked applied with the reason, and every other status is applied."""
        try:
            return await with_transient_retry(lambda: self._apply(after_id, limit))
        except RowRefused as exc:
            if limit == 1:
                return await self._refuse_next(after_id, str(exc))
            half = limit // 2
            first = await self.apply_pending(after_id=after_id, limit=half)
            if first.seen < half:
                return first
            return first.merge(await self.apply_pending(after_id=first.last_id, limit=limit - half))

    async def _refuse_next(self, after_id: int, reason: str) -> Applied:
        async with self._db.transaction() as cur:
            await cur.execute(PENDING_STATUSES, (after_id, 1))
            found = await cur.fetchone()
            if found is None:
                return Applied(last_id=after_id)
            status_id, wamid, cola_id = int(found[0]), str(found[1]), found[3]
            await cur.execute(REFUSE_STATUS, (reason[:ERROR_TEXT_MAX], status_id))
        refused = Refused(status_id, wamid, None if cola_id is None else int(cola_id), reason)
        return Applied(seen=1, applied=1, last_id=status_id, refused=[refused])

    async def pending_count(self) -> int:
        async with self._db.transaction() as cur:
            await cur.execute(PENDING_COUNT)
            (count,) = await cur.fetchone()
        return int(count)

    async def _apply(self, after_id: int, limit: int) -> Applied:
        report = Applied(last_id=after_id)
        async with self._db.transaction() as cur:
            await cur.execute(PENDING_STATUSES, (after_id, limit))
            pending = [
                Pending(int(r[0]), str(r[1]), str(r[2]), None if r[3] is None else int(r[3]), r[4], *r[5:])
                for r in await cur.fetchall()
            ]
            if not pending:
                return report
            report.seen, report.last_id = len(pending), pending[-1].id
            pending = await _match_by_wamid(cur, pending)
            by_row: dict[int, list[Pending]] = {}
            for status in pending:
                if status.cola_id is not None:
                    by_row.setdefault(status.cola_id, []).append(status)
            rows = await _lock_rows(cur, sorted(by_row))
            foreign = self._foreign(by_row, rows, report)
            plans = {row_id: plan(rows.get(row_id), statuses) for row_id, statuses in by_row.items()}
            await _write_plans(cur, plans)
            report.earlier = _earlier_sends(by_row, rows)
            optouts = _meta_optouts([s for s in pending if s.id not in foreign], rows)
            report.optouts = (await add_optouts(cur, optouts)).new
            done = [
                s.id
                for s in pending
                if s.id not in foreign
                and (s.cola_id not in plans or plans[s.cola_id].action is not Action.WAIT)
            ]
            if done:
                await cur.execute(MARK_APPLIED.format(ids=placeholders(len(done))), done)
            for refused in report.mismatched:
                await cur.execute(REFUSE_STATUS, (refused.reason[:ERROR_TEXT_MAX], refused.status_id))
            report.applied, report.waiting = len(done) + len(foreign), len(pending) - len(done) - len(foreign)
            for action, key in ((Action.SETTLE_SENT, "sent"), (Action.SETTLE_FAILED, "failed")):
                ids = [row_id for row_id, p in plans.items() if p.action is action]
                report.settled[key] = len(ids)
                report.settled_ids += ids
        return report

    def _foreign(
        self, by_row: dict[int, list[Pending]], rows: dict[int, RowView], report: Applied
    ) -> set[int]:
        """Take out of `by_row` the statuses that are not about the row they name: another
        recipient, or another sending number (a second installation behind the same Meta app,
        staging and production). They are kept with the reason, never applied."""
        foreign: set[int] = set()
        for row_id, statuses in list(by_row.items()):
            row = rows.get(row_id)
            if row is None:
                continue
            kept = []
            for status in statuses:
                reason = mismatch(row, status, self._default_number)
                if reason is None:
                    kept.append(status)
                else:
                    foreign.add(status.id)
                    report.mismatched.append(Refused(status.id, status.wamid, row_id, reason))
            if kept:
                by_row[row_id] = kept
            else:
                del by_row[row_id]
        return foreign


def mismatch(row: RowView, status: Pending, default_number: str | None) -> str | None:
    """Why `status` is not about `row` (pure), or None when it is: its recipient must be the
    row's phone under any form of the number, and its sending number the row's session's."""
    if status.recipient_id:
        recipient = phone_from_wa_id(status.recipient_id)
        phone = phone_from_wa_id(row.telefono) or row.telefono  # a PHP row may hold `51987...`
        if recipient is None or not phone_variants(recipient) & phone_variants(phone):
            return f"status_reference_mismatch: recipient {status.recipient_id} is not the row's phone"
    expected = row.number or default_number
    if status.phone_number_id and expected and status.phone_number_id != expected:
        number = status.phone_number_id
        return f"status_reference_mismatch: sending number {number} is not the row's ({expected})"
    return None


def _earlier_sends(by_row: dict[int, list[Pending]], rows: dict[int, RowView]) -> list[tuple[int, str]]:
    """Statuses of another send of an `enviado` row: the row was sent again (`retry
    --include-unknown`) after a first send Meta had taken: evidence of a double send."""
    found: list[tuple[int, str]] = []
    for row_id, statuses in by_row.items():
        row = rows.get(row_id)
        if row is not None and row.estado == RowState.SENT and row.wamid:
            found += [(row_id, s.wamid) for s in statuses if s.wamid != row.wamid]
    return list(dict.fromkeys(found))


async def _match_by_wamid(cur: aiomysql.Cursor, pending: list[Pending]) -> list[Pending]:
    """A status without our reference takes the row that holds its wamid (one row only)."""
    wamids = sorted({s.wamid for s in pending if s.cola_id is None})
    if not wamids:
        return pending
    await cur.execute(ROWS_BY_WAMID.format(wamids=placeholders(len(wamids))), wamids)
    rows = {str(r[0]): int(r[1]) for r in await cur.fetchall() if int(r[2]) == 1}
    return [
        dataclasses.replace(s, cola_id=rows[s.wamid]) if s.cola_id is None and s.wamid in rows else s
        for s in pending
    ]


async def _insert_statuses(cur: aiomysql.Cursor, statuses: Sequence[StatusUpdate]) -> int:
    if not statuses:
        return 0
    params: list[Any] = []
    for s in statuses:
        params += [
            s.wamid,
            s.status,
            s.cola_id,
            s.status_at,
            s.recipient_id,
            s.error_code,
            s.error_title,
            s.raw,
            s.phone_number_id,
        ]
    await cur.execute(INSERT_STATUSES.format(rows=",".join([INSERT_STATUS_ROW] * len(statuses))), params)
    return int(cur.rowcount)


async def _lock_rows(cur: aiomysql.Cursor, ids: list[int]) -> dict[int, RowView]:
    if not ids:
        return {}
    await cur.execute(LOCK_ROWS.format(ids=placeholders(len(ids))), ids)
    found = list(await cur.fetchall())
    sessions = sorted({int(r[6]) for r in found if r[6] is not None})
    numbers: dict[int, str | None] = {}
    if sessions:
        await cur.execute(SESSION_NUMBERS.format(ids=placeholders(len(sessions))), sessions)
        numbers = {int(r[0]): (str(r[1]) if r[1] else None) for r in await cur.fetchall()}
    return {
        int(r[0]): RowView(
            int(r[0]),
            str(r[1]),
            r[2],
            str(r[3]),
            r[4],
            r[5],
            None if r[6] is None else numbers.get(int(r[6])),
        )
        for r in found
    }


async def _write_plans(cur: aiomysql.Cursor, plans: dict[int, Plan]) -> None:
    groups: dict[Action, dict[int, Plan]] = {}
    for row_id, row_plan in plans.items():
        groups.setdefault(row_plan.action, {})[row_id] = row_plan
    if sent := groups.get(Action.SETTLE_SENT):
        wamids, wamid_params = case("wamid", {i: p.wamid for i, p in sent.items()})
        sent_at, sent_params = case("sent_at", {i: p.sent_at for i, p in sent.items()})
        delivered, delivered_params = case("delivered_at", {i: p.delivered_at for i, p in sent.items()})
        read, read_params = case("read_at", {i: p.read_at for i, p in sent.items()})
        ids = placeholders(len(sent))
        await cur.execute(
            SETTLE_SENT.format(wamids=wamids, sent=sent_at, delivered=delivered, read=read, ids=ids),
            (*wamid_params, *sent_params, *delivered_params, *read_params, *sent),
        )
        # The same statement as the daemon's own result: one envios_whatsapp row per cola_id.
        await cur.execute(INSERT_DELIVERY.format(ids=ids), list(sent))
    for action, statement in (
        (Action.SETTLE_FAILED, SETTLE_FAILED),
        (Action.FAILED_AFTER_ACCEPTED, FAILED_AFTER_ACCEPTED),
    ):
        if failed := groups.get(action):
            codes, code_params = case("last_error_code", {i: p.error_code for i, p in failed.items()})
            texts, text_params = case("last_error", {i: p.error_text for i, p in failed.items()})
            await cur.execute(
                statement.format(codes=codes, texts=texts, ids=placeholders(len(failed))),
                (*code_params, *text_params, *failed),
            )
    if times := groups.get(Action.TIMES):
        delivered, delivered_params = case("delivered_at", {i: p.delivered_at for i, p in times.items()})
        read, read_params = case("read_at", {i: p.read_at for i, p in times.items()})
        await cur.execute(
            DELIVERY_TIMES.format(delivered=delivered, read=read, ids=placeholders(len(times))),
            (*delivered_params, *read_params, *times),
        )


def _meta_optouts(pending: Sequence[Pending], rows: dict[int, RowView]) -> list[OptOut]:
    """A `failed` status with 131050: the user stopped marketing messages."""
    found: list[OptOut] = []
    for status in pending:
        if status.status != "failed" or status.error_code != OPTED_OUT_CODE:
            continue
        row = rows.get(status.cola_id) if status.cola_id is not None else None
        phone: str | None = phone_from_wa_id(status.recipient_id or "")
        if row is not None:  # a PHP row may hold `51987...`; keep an odd one as written
            phone = phone_from_wa_id(row.telefono) or row.telefono
        if phone:
            found.append(OptOut(phone, SOURCE_META, f"status webhook: {status.wamid}", said_at=status.at))
    return found
