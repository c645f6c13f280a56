"""Status webhooks and opt-outs in the store: the pure plan as a table, then the real database."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from datetime import datetime, timedelta

import pymysql
import pytest

from tests.integration.helpers import sent
from tests.support.env import run_worker
from tests.support.sql import SQL
from worker.config import DatabaseURL
from worker.messages import phone_from_wa_id
from worker.models import StatusUpdate
from worker.store import Store
from worker.store.optouts import opted_out
from worker.store.statuses import Action, Pending, RowView, mismatch, plan

T0 = datetime(2026, 3, 1, 12, 0, 0)


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def pending(n: int, status: str, *, wamid: str = "wamid.A", code: int | None = None) -> Pending:
    title = f"(#{code}) Message undeliverable" if code else None
    return Pending(n, wamid, status, 7, at(n), "51987654321", code, title)


def row(
    estado: str, *, wamid: str | None = None, delivered: int | None = None, read: int | None = None
) -> RowView:
    return RowView(
        7,
        estado,
        wamid,
        "+51987654321",
        None if delivered is None else at(delivered),
        None if read is None else at(read),
    )


# -- the plan, pure ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "statuses", "expected"),
    [
        # unknown outcomes are settled: any proof of acceptance wins over a failure
        (row("desconocido"), [pending(1, "sent")], (Action.SETTLE_SENT, "wamid.A", None, None)),
        (row("desconocido"), [pending(1, "read")], (Action.SETTLE_SENT, "wamid.A", at(1), at(1))),
        (
            row("desconocido"),
            [pending(1, "delivered"), pending(2, "read")],
            (Action.SETTLE_SENT, "wamid.A", at(1), at(2)),
        ),
        (row("desconocido"), [pending(1, "failed", code=131026)], (Action.SETTLE_FAILED, None, None, None)),
        # enviado rows gain their times, never backwards
        (row("enviado", wamid="wamid.A"), [pending(1, "delivered")], (Action.TIMES, None, at(1), None)),
        (row("enviado", wamid="wamid.A"), [pending(2, "read")], (Action.TIMES, None, at(2), at(2))),
        (
            row("enviado", wamid="wamid.A"),
            [pending(2, "read"), pending(3, "delivered")],
            (Action.TIMES, None, at(2), at(2)),
        ),
        (
            row("enviado", wamid="wamid.A", delivered=2, read=2),
            [pending(3, "delivered")],
            (Action.NOTHING,) * 4,
        ),
        (row("enviado", wamid="wamid.A", delivered=1), [pending(3, "delivered")], (Action.NOTHING,) * 4),
        (row("enviado", wamid="wamid.A"), [pending(1, "sent")], (Action.NOTHING,) * 4),
        # a status of another send of this row (re-queued by hand) changes nothing
        (row("enviado", wamid="wamid.B"), [pending(1, "read")], (Action.NOTHING,) * 4),
        (
            row("enviado", wamid="wamid.A"),
            [pending(1, "failed", code=131026)],
            (Action.FAILED_AFTER_ACCEPTED, None, None, None),
        ),
        # the daemon has not written its own result yet: wait
        (row("procesando"), [pending(1, "read")], (Action.WAIT,) * 4),
        (row("pendiente"), [pending(1, "sent")], (Action.WAIT,) * 4),
        # final rows and unknown rows (pruned, another sender's message) are left alone
        (row("error"), [pending(1, "delivered")], (Action.NOTHING,) * 4),
        (None, [pending(1, "delivered")], (Action.NOTHING,) * 4),
    ],
)
def test_plan(current: RowView | None, statuses: list[Pending], expected: tuple[object, ...]) -> None:
    result = plan(current, statuses)
    action, wamid, delivered, read = expected
    assert result.action is action
    if action in (Action.NOTHING, Action.WAIT):
        return
    assert (result.wamid, result.delivered_at, result.read_at) == (wamid, delivered, read)
    if action in (Action.SETTLE_FAILED, Action.FAILED_AFTER_ACCEPTED):
        assert result.error_code == 131026 and "131026" in (result.error_text or "")


def test_phones_from_meta_and_operators_take_the_queue_form() -> None:
    assert phone_from_wa_id("51987654321") == "+51987654321"
    assert phone_from_wa_id("+51 987-654-321") == "+51987654321"
    assert phone_from_wa_id("abc") is None and phone_from_wa_id("") is None
    assert phone_from_wa_id("0123") is None


# -- the database ------------------------------------------------------------------------------


def status(
    cola_id: int | None,
    kind: str,
    *,
    wamid: str = "wamid.A",
    ts: int = 0,
    code: int | None = None,
    to: str | None = None,
    number: str | None = None,
) -> StatusUpdate:
    """A stored status; `to` its recipient as Meta writes it, `number` the sending number it
    reports on (both checked against the row when given)."""
    body: dict[str, object] = {"id": wamid, "status": kind, "timestamp": str(1772366400 + ts)}
    return StatusUpdate(
        wamid=wamid,
        status=kind,
        cola_id=cola_id,
        status_at=at(ts),
        recipient_id=to,
        error_code=code,
        error_title=f"(#{code}) Message undeliverable" if code else None,
        raw=json.dumps(body),
        phone_number_id=number,
    )


def one_row(sql: SQL, estado: str) -> int:
    session = sql.add_session()
    sql.add_rows(session, 1)
    row_id = int(sql.value("SELECT id FROM cola_envios"))
    sql.execute("UPDATE cola_envios SET estado = %s, attempts = 1 WHERE id = %s", (estado, row_id))
    return row_id


def cola(sql: SQL, row_id: int) -> dict[str, object]:
    return sql.rows(
        "SELECT estado, wamid, delivered_at, read_at, settled_at, last_error_code, last_error,"
        " lease_token FROM cola_envios WHERE id = %s",
        (row_id,),
    )[0]


async def test_a_sent_status_settles_an_unknown_row_with_its_delivery_row(sql: SQL, store: Store) -> None:
    row_id = one_row(sql, "desconocido")
    stored = await store.statuses.store([status(row_id, "sent", ts=5)])
    assert stored.statuses == 1
    applied = await store.statuses.apply_pending()
    assert applied.settled == {"sent": 1, "failed": 0} and applied.settled_ids == [row_id]
    after = cola(sql, row_id)
    assert after["estado"] == "enviado" and after["wamid"] == "wamid.A" and after["settled_at"] is not None
    assert after["delivered_at"] is None and after["lease_token"] is None
    assert sql.rows("SELECT cola_id, wamid FROM envios_whatsapp") == [{"cola_id": row_id, "wamid": "wamid.A"}]
    assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_statuses WHERE applied_at IS NULL") == 0

    # Meta retries: the same status again is stored once and changes nothing
    again = await store.statuses.store([status(row_id, "sent", ts=5)])
    assert again.statuses == 0
    assert (await store.statuses.apply_pending()).seen == 0
    assert cola(sql, row_id) == after
    assert sql.value("SELECT COUNT(*) FROM envios_whatsapp") == 1


async def test_a_failed_status_ends_an_unknown_row_in_error_with_metas_reason(sql: SQL, store: Store) -> None:
    row_id = one_row(sql, "desconocido")
    await store.statuses.store([status(row_id, "failed", code=131026)])
    applied = await store.statuses.apply_pending()
    assert applied.settled == {"sent": 0, "failed": 1}
    after = cola(sql, row_id)
    assert after["estado"] == "error" and after["last_error_code"] == 131026
    assert "Message undeliverable" in str(after["last_error"]) and after["settled_at"] is not None
    assert sql.value("SELECT COUNT(*) FROM envios_whatsapp") == 0


async def test_out_of_order_and_duplicated_statuses_never_move_a_row_backwards(
    sql: SQL, store: Store
) -> None:
    row_id = one_row(sql, "enviado")
    sql.execute("UPDATE cola_envios SET wamid = 'wamid.A' WHERE id = %s", (row_id,))
    await store.statuses.store([status(row_id, "read", ts=20)])
    await store.statuses.apply_pending()
    first = cola(sql, row_id)
    assert first["read_at"] == at(20) and first["delivered_at"] == at(20)  # read implies delivered
    # delivered after read, twice, in two batches; then read again
    for batch in ([status(row_id, "delivered", ts=10)], [status(row_id, "delivered", ts=10)]):
        await store.statuses.store(batch)
        await store.statuses.apply_pending()
    await store.statuses.store([status(row_id, "read", ts=99), status(row_id, "sent", ts=1)])
    await store.statuses.apply_pending()
    assert cola(sql, row_id) == first
    assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_statuses") == 3  # read, delivered, sent
    assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_statuses WHERE applied_at IS NULL") == 0
    assert cola(sql, row_id)["settled_at"] is None  # nothing was unknown


async def test_a_status_before_the_daemons_own_result_waits_and_the_fenced_write_still_lands(
    sql: SQL, store: Store
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 1)
    (job,) = await store.claims.claim(1, lease_seconds=30)
    await store.statuses.store([status(job.id, "delivered", ts=3), status(job.id, "read", ts=4)])
    applied = await store.statuses.apply_pending()
    assert applied.waiting == 2 and applied.applied == 0
    assert cola(sql, job.id)["estado"] == "procesando"

    # the daemon's own result, fenced on its lease token, is untouched by the waiting statuses
    recorded = await store.results.record([sent(job, "wamid.A")])
    assert recorded.written == 1 and recorded.fenced_out == ()
    swept = await store.statuses.apply_pending()  # the periodic sweep starts from the first id
    assert swept.applied == 2 and swept.settled == {"sent": 0, "failed": 0}
    after = cola(sql, job.id)
    assert after["estado"] == "enviado" and after["delivered_at"] == at(3) and after["read_at"] == at(4)
    assert after["settled_at"] is None
    assert sql.value("SELECT COUNT(*) FROM envios_whatsapp") == 1


async def test_a_late_daemon_result_after_settling_changes_nothing(sql: SQL, store: Store) -> None:
    session = sql.add_session()
    sql.add_rows(session, 1)
    (job,) = await store.claims.claim(1, lease_seconds=30)
    # the lease expired while the send was in flight: another daemon recovered it as unknown
    sql.execute("UPDATE cola_envios SET lease_expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND")
    assert (await store.claims.recover_expired()).rows == 1
    await store.statuses.store([status(job.id, "sent", wamid="wamid.META")])
    assert (await store.statuses.apply_pending()).settled["sent"] == 1
    # the cut-off daemon's true result arrives inside the late-result window: the row already
    # says just that (same wamid), so nothing is written twice and nothing counts as lost
    recorded = await store.results.record([sent(job, "wamid.META")])
    assert recorded.fenced_out == ()
    after = cola(sql, job.id)
    assert after["estado"] == "enviado" and after["wamid"] == "wamid.META"
    assert sql.value("SELECT COUNT(*) FROM envios_whatsapp") == 1


async def test_statuses_without_a_row_are_kept_for_audit_and_not_retried(sql: SQL, store: Store) -> None:
    await store.statuses.store(
        [status(None, "delivered", wamid="wamid.X"), status(999999, "read", wamid="wamid.Y")]
    )
    applied = await store.statuses.apply_pending()
    assert applied.applied == 2 and applied.waiting == 0
    assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_statuses WHERE applied_at IS NOT NULL") == 2


async def test_a_131050_failure_records_an_opt_out(sql: SQL, store: Store) -> None:
    row_id = one_row(sql, "enviado")
    sql.execute("UPDATE cola_envios SET wamid = 'wamid.A' WHERE id = %s", (row_id,))
    await store.statuses.store([status(row_id, "failed", code=131050)])
    applied = await store.statuses.apply_pending()
    assert applied.optouts == 1
    phone = sql.value("SELECT telefono FROM cola_envios WHERE id = %s", (row_id,))
    assert sql.rows("SELECT telefono, source FROM whatsapp_worker_optouts") == [
        {"telefono": phone, "source": "131050"}  # the row's phone, as the queue stores it
    ]
    after = cola(sql, row_id)
    assert after["estado"] == "enviado" and after["last_error_code"] == 131050


async def test_opt_outs_add_remove_and_one_query_for_a_claim_batch(sql: SQL, store: Store) -> None:
    assert await store.optouts.add("+51987654321", "operator", "asked by phone")
    assert not await store.optouts.add("+51987654321", "keyword", "BAJA")  # first source kept
    await store.optouts.add("+51911111111", "keyword")
    phones = ["+51987654321", "+51900000000", "+51911111111"]
    async with store.db.transaction() as cur:
        assert await opted_out(cur, phones) == {"+51987654321", "+51911111111"}
        assert await opted_out(cur, []) == set()
    assert [(r.telefono, r.source) for r in await store.optouts.page()] == [
        ("+51987654321", "operator"),
        ("+51911111111", "keyword"),
    ]
    assert await store.optouts.remove("+51987654321")
    assert not await store.optouts.remove("+51987654321")
    assert await store.optouts.opted_out(phones) == {"+51911111111"}


async def test_pending_statuses_are_read_on_their_index(sql: SQL, store: Store) -> None:
    from worker.store.statuses import PENDING_STATUSES

    await store.statuses.store([status(None, "sent", wamid=f"wamid.{i}") for i in range(200)])
    await store.statuses.apply_pending()
    await store.statuses.store([status(None, "read", wamid="wamid.last")])
    sql.execute("ANALYZE TABLE whatsapp_worker_statuses")
    with contextlib.suppress(pymysql.err.OperationalError):  # MariaDB has no such variable
        sql.execute("SET SESSION explain_format = 'TRADITIONAL'")  # MySQL 9 defaults to TREE
    plan_rows = sql.rows("EXPLAIN " + PENDING_STATUSES.replace(" FOR UPDATE SKIP LOCKED", ""), (0, 10))
    (first,) = [{k.lower(): v for k, v in r.items()} for r in plan_rows]
    assert first["key"] == "ix_whatsapp_worker_statuses_pending", first


async def test_a_status_the_database_refuses_is_kept_with_its_reason_and_every_other_one_applies(
    sql: SQL, store: Store
) -> None:
    # an adopted envios_whatsapp with the PHP era's VARCHAR(100) wamid
    sql.execute("ALTER TABLE envios_whatsapp MODIFY wamid VARCHAR(100) NULL")
    session = sql.add_session()
    sql.add_rows(session, 4)
    ids = [int(r["id"]) for r in sql.rows("SELECT id FROM cola_envios ORDER BY id")]
    sql.execute("UPDATE cola_envios SET estado = 'desconocido', attempts = 1")
    too_long = "wamid." + "x" * 104  # 110 characters: cola_envios holds it, envios_whatsapp does not
    wamids = ["wamid.A", too_long, "wamid.C", "wamid.D"]
    await store.statuses.store([status(i, "sent", wamid=w) for i, w in zip(ids, wamids, strict=True)])

    applied = await store.statuses.apply_pending()

    assert applied.settled["sent"] == 3 and sorted(applied.settled_ids) == [ids[0], ids[2], ids[3]]
    assert [(r.cola_id, r.wamid) for r in applied.refused] == [(ids[1], too_long)]
    states = {r["id"]: r["estado"] for r in sql.rows("SELECT id, estado FROM cola_envios")}
    assert states == {ids[0]: "enviado", ids[1]: "desconocido", ids[2]: "enviado", ids[3]: "enviado"}
    kept = sql.rows(
        "SELECT wamid, applied_at, apply_error FROM whatsapp_worker_statuses WHERE apply_error IS NOT NULL"
    )
    assert len(kept) == 1 and kept[0]["wamid"] == too_long and kept[0]["applied_at"] is not None
    assert "'wamid'" in kept[0]["apply_error"]  # data too long (1406; MySQL says 1265 here)
    assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_statuses WHERE applied_at IS NULL") == 0


async def test_a_mexican_stop_in_metas_form_stops_the_row_queued_in_e164(sql: SQL, store: Store) -> None:
    # the customer replied BAJA: Meta's wa_id of a Mexican mobile keeps the old 1 after 52
    assert await store.optouts.add("+5215512345678", "keyword", "replied 'BAJA'")
    session = sql.add_session("next-campaign")
    sql.execute(
        "INSERT INTO cola_envios (sesion_id, telefono, mensaje) VALUES (%s, '+525512345678', %s),"
        " (%s, '+525512340000', %s)",
        (
            session,
            '{"type":"text","text":{"body":"hola"}}',
            session,
            '{"type":"text","text":{"body":"hola"}}',
        ),
    )
    claimed = await store.claims.claim(10, lease_seconds=30)
    assert claimed.opted_out == 1 and [job.telefono for job in claimed] == ["+525512340000"]
    assert sql.value("SELECT estado FROM cola_envios WHERE telefono = '+525512345678'") == "error"
    # and `optout remove` of the E.164 form clears Meta's form too
    assert await store.optouts.remove("+525512345678")
    assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_optouts") == 0


@pytest.mark.parametrize(
    ("recipient", "number", "session_number", "belongs"),
    [
        ("51987654321", "111", None, True),  # our recipient, our default number
        ("5215512345678", None, None, False),  # another recipient
        (None, "111", None, True),  # no recipient (a BSUID send): the number decides
        ("51987654321", "999", None, False),  # another installation's number
        ("51987654321", "222", "222", True),  # the session's own number
        ("51987654321", "111", "222", False),  # the default number, but the session sends from 222
    ],
)
@pytest.mark.parametrize("stored", ["+51987654321", "51987654321", "+51 987 654 321"])  # as PHP wrote it
def test_a_status_belongs_to_a_row_only_with_its_recipient_and_its_sending_number(
    recipient: str | None, number: str | None, session_number: str | None, belongs: bool, stored: str
) -> None:
    view = RowView(7, "desconocido", None, stored, number=session_number)
    status_ = dataclasses.replace(pending(1, "sent"), recipient_id=recipient, phone_number_id=number)
    reason = mismatch(view, status_, default_number="111")
    assert (reason is None) == belongs, reason


async def test_a_status_of_another_installation_changes_nothing_and_is_kept_with_the_reason(
    sql: SQL, store: Store
) -> None:
    row_id = one_row(sql, "desconocido")
    phone = str(sql.value("SELECT telefono FROM cola_envios WHERE id = %s", (row_id,)))
    foreign_store = Store(store.db, phone_number_id="1234567890")  # the receiver knows our number
    await foreign_store.statuses.store(
        [
            status(row_id, "sent", wamid="wamid.STAGING", to="5215512345678"),  # staging's customer
            status(row_id, "failed", wamid="wamid.OTHER", code=131050, to=phone[1:], number="999"),
        ]
    )
    applied = await foreign_store.statuses.apply_pending()
    assert sorted(r.wamid for r in applied.mismatched) == ["wamid.OTHER", "wamid.STAGING"]
    assert applied.settled == {"sent": 0, "failed": 0} and applied.optouts == 0
    assert cola(sql, row_id)["estado"] == "desconocido"  # never settled with a foreign wamid
    assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_optouts") == 0  # nobody opted out
    reasons = sql.rows("SELECT wamid, apply_error FROM whatsapp_worker_statuses ORDER BY wamid")
    assert all("status_reference_mismatch" in r["apply_error"] for r in reasons), reasons
    # our own status, with our recipient and number, still settles it
    await foreign_store.statuses.store(
        [status(row_id, "sent", wamid="wamid.OURS", to=phone[1:], number="1234567890")]
    )
    assert (await foreign_store.statuses.apply_pending()).settled["sent"] == 1
    assert cola(sql, row_id)["wamid"] == "wamid.OURS"


async def test_a_status_without_our_reference_is_matched_by_its_wamid(sql: SQL, store: Store) -> None:
    row_id = one_row(sql, "enviado")
    sql.execute("UPDATE cola_envios SET wamid = 'wamid.PHP' WHERE id = %s", (row_id,))  # sent by PHP
    await store.statuses.store([status(None, "delivered", wamid="wamid.PHP", ts=12)])
    applied = await store.statuses.apply_pending()
    assert applied.applied == 1
    assert cola(sql, row_id)["delivered_at"] == at(12)


async def test_statuses_of_an_earlier_send_of_a_resent_row_are_reported(sql: SQL, store: Store) -> None:
    row_id = one_row(sql, "enviado")
    sql.execute("UPDATE cola_envios SET wamid = 'wamid.SECOND' WHERE id = %s", (row_id,))
    await store.statuses.store([status(row_id, "delivered", wamid="wamid.FIRST", ts=3)])
    applied = await store.statuses.apply_pending()
    assert applied.earlier == [(row_id, "wamid.FIRST")]  # Meta had taken the first send too
    assert cola(sql, row_id)["delivered_at"] is None  # the row's own send is not delivered yet


async def test_prune_statuses_deletes_applied_statuses_older_than_asked(
    sql: SQL, store: Store, db_url: DatabaseURL
) -> None:
    await store.statuses.store([status(None, "read", wamid=f"wamid.{i}") for i in range(3)])
    await store.statuses.apply_pending()
    await store.statuses.store([status(None, "read", wamid="wamid.pending-row")])  # not applied yet
    sql.execute(
        "UPDATE whatsapp_worker_statuses SET applied_at = applied_at - INTERVAL 40 DAY"
        " WHERE wamid <> 'wamid.0'"
    )
    dry = run_worker(db_url, "prune", "--older-than", "30d", "--statuses", "--dry-run")
    assert dry.returncode == 0 and "would delete 2 applied webhook status(es)" in dry.stdout, dry.stdout
    done = run_worker(db_url, "prune", "--older-than", "30d", "--statuses", "--yes")
    assert "deleted 2 applied webhook status(es)" in done.stdout, done.stdout
    left = sorted(r["wamid"] for r in sql.rows("SELECT wamid FROM whatsapp_worker_statuses"))
    assert left == ["wamid.0", "wamid.pending-row"]
