"""Send outcomes end to end: real database, real HTTP to the local fake Cloud API."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

from tests.integration.helpers import drain
from tests.support.env import run_worker
from tests.support.fakeapi import FakeCloudAPI, Step
from tests.support.sql import SQL
from worker.config import DatabaseURL, Settings

TEXT = '{"type":"text","text":{"body":"hola"}}'


async def test_every_row_is_sent_once_and_recorded(
    sql: SQL, fake_api: FakeCloudAPI, settings: Callable[..., Settings]
) -> None:
    session = sql.add_session()
    phones = sql.add_rows(session, 50)

    report = await drain(settings(concurrency=10))

    assert report.outcomes["sent"] == 50
    assert sorted(fake_api.counts()) == sorted(phones)
    assert set(fake_api.counts().values()) == {1}
    rows = sql.rows(
        "SELECT c.id, c.estado, c.wamid, e.wamid AS recorded, c.attempts, c.lease_token"
        " FROM cola_envios c LEFT JOIN envios_whatsapp e ON e.cola_id = c.id"
    )
    assert {r["estado"] for r in rows} == {"enviado"}
    assert all(r["wamid"] == r["recorded"] and r["wamid"].startswith("wamid.") for r in rows)
    assert {r["attempts"] for r in rows} == {1} and {r["lease_token"] for r in rows} == {None}
    # the row id rides along for webhook reconciliation, and the token is the fake's
    by_phone = {r.phone: r for r in fake_api.requests}
    row = sql.rows("SELECT id, telefono FROM cola_envios ORDER BY id LIMIT 1")[0]
    assert by_phone[row["telefono"]].callback_data == f"cola:{row['id']}"
    assert by_phone[row["telefono"]].body["messaging_product"] == "whatsapp"
    assert sql.value("SELECT estado FROM sesiones_envio WHERE id = %s", (session,)) == "completada"


async def test_dropped_and_late_requests_end_unknown_and_are_never_resent(
    sql: SQL, fake_api: FakeCloudAPI, settings: Callable[..., Settings]
) -> None:
    session = sql.add_session()
    dropped, late, fine = sql.add_rows(session, 3)
    fake_api.script(dropped, Step.drop())
    fake_api.script(late, Step.late(1.5))

    await drain(settings(send_timeout=0.5, lease_seconds=5))
    await drain(settings(send_timeout=0.5, lease_seconds=5))  # a second pass sends nothing again

    states = {r["telefono"]: r for r in sql.rows("SELECT telefono, estado, last_error FROM cola_envios")}
    assert states[dropped]["estado"] == "desconocido"
    assert "ServerDisconnected" in states[dropped]["last_error"]
    assert states[late]["estado"] == "desconocido"
    assert states[fine]["estado"] == "enviado"
    assert fake_api.counts() == {dropped: 1, late: 1, fine: 1}
    assert sql.value("SELECT COUNT(*) FROM envios_whatsapp") == 1


async def test_rate_limit_answer_is_retried_later_and_succeeds(
    sql: SQL, fake_api: FakeCloudAPI, settings: Callable[..., Settings]
) -> None:
    session = sql.add_session()
    (phone,) = sql.add_rows(session, 1)
    fake_api.script(phone, Step.error(130429, http_status=429), Step.ok())

    await drain(
        settings(), once=False, until=lambda: sql.value("SELECT estado FROM cola_envios") == "enviado"
    )

    row = sql.rows("SELECT estado, attempts, wamid, last_error_code FROM cola_envios")[0]
    assert row["estado"] == "enviado" and row["attempts"] == 2 and row["last_error_code"] is None
    assert [r.outcome for r in fake_api.requests] == ["error:130429", "ok"]
    assert fake_api.accepted[phone] == [row["wamid"]]


async def test_permanent_error_ends_in_error_with_its_code(
    sql: SQL, fake_api: FakeCloudAPI, settings: Callable[..., Settings]
) -> None:
    session = sql.add_session()
    undeliverable, fine = sql.add_rows(session, 2)
    fake_api.script(undeliverable, Step.error(131026, details="Message undeliverable"))

    await drain(settings())

    rows = {
        r["telefono"]: r
        for r in sql.rows("SELECT telefono, estado, last_error_code, last_error FROM cola_envios")
    }
    assert rows[undeliverable]["estado"] == "error"
    assert rows[undeliverable]["last_error_code"] == 131026
    assert "undeliverable" in rows[undeliverable]["last_error"]
    assert rows[fine]["estado"] == "enviado"
    assert fake_api.counts()[undeliverable] == 1


async def test_a_phone_a_number_could_not_deliver_to_is_not_sent_to_from_it_again(
    sql: SQL, fake_api: FakeCloudAPI, settings: Callable[..., Settings], db_url: DatabaseURL
) -> None:
    first = sql.add_session("noviembre")
    undeliverable, fine = sql.add_rows(first, 2)
    fake_api.script(undeliverable, Step.error(131026, details="Message undeliverable"))
    await drain(settings())
    # the next campaign, from the same number and from another one
    again, other = sql.add_session("diciembre"), sql.add_session("otra-linea")
    sql.execute(
        "INSERT INTO cola_envios (sesion_id, telefono, mensaje) VALUES (%s, %s, %s), (%s, %s, %s)",
        (again, undeliverable, TEXT, other, undeliverable, TEXT),
    )
    other_number = "2222222222"
    fake_api.other_numbers[other_number] = fake_api.token
    sql.execute("UPDATE sesiones_envio SET phone_number_id = %s WHERE id = %s", (other_number, other))
    report = await drain(settings())

    rows = {
        r["sesion_id"]: r
        for r in sql.rows(
            "SELECT sesion_id, estado, last_error FROM cola_envios WHERE telefono = %s", (undeliverable,)
        )
    }
    assert rows[again]["estado"] == "error" and "could not deliver" in rows[again]["last_error"]
    assert rows[other]["estado"] == "enviado"  # another number may reach it: it is tried there
    assert fake_api.counts()[undeliverable] == 2  # once per number, never twice from one number
    assert report.outcomes["sent"] == 1 and fake_api.counts()[fine] == 1

    listed = run_worker(db_url, "suppressed", "list", "--csv")
    assert listed.returncode == 0 and undeliverable in listed.stdout and "1234567890" in listed.stdout
    cleared = run_worker(db_url, "suppressed", "clear", undeliverable, "--number", fake_api.phone_number_id)
    assert cleared.returncode == 0, cleared.stderr
    cleared_again = run_worker(
        db_url, "suppressed", "clear", undeliverable, "--number", fake_api.phone_number_id
    )
    assert cleared_again.returncode == 1  # nothing held any more


async def test_retry_gives_up_after_max_attempts(
    sql: SQL, fake_api: FakeCloudAPI, settings: Callable[..., Settings]
) -> None:
    session = sql.add_session()
    (phone,) = sql.add_rows(session, 1)
    fake_api.default = Step.error(131056)

    await drain(
        settings(max_attempts=3),
        once=False,
        until=lambda: sql.value("SELECT estado FROM cola_envios") == "error",
    )

    row = sql.rows("SELECT attempts, last_error_code, last_error FROM cola_envios")[0]
    assert row["attempts"] == 3 and row["last_error_code"] == 131056
    assert row["last_error"].startswith("gave up after 3 attempts")
    assert fake_api.counts()[phone] == 3


async def test_malformed_rows_fail_alone_and_the_rest_is_sent(
    sql: SQL, fake_api: FakeCloudAPI, settings: Callable[..., Settings]
) -> None:
    session = sql.add_session()
    good = sql.add_rows(session, 3)
    bad = {
        "+51911111111": "{not json",
        "+51922222222": json.dumps({"type": "text", "text": {"body": "x" * 5000}}),
        "+51933333333": json.dumps({"type": "text", "text": {"body": "hi"}, "to": "+1555"}),
        "51944444444": json.dumps({"type": "text", "text": {"body": "no plus"}}),
    }
    for phone, message in bad.items():
        sql.execute(
            "INSERT INTO cola_envios (sesion_id, telefono, mensaje) VALUES (%s, %s, %s)",
            (session, phone, message),
        )

    report = await drain(settings())

    rows = {r["telefono"]: r for r in sql.rows("SELECT telefono, estado, last_error FROM cola_envios")}
    assert report.outcomes == {"sent": 3, "error": 4}
    assert all(rows[p]["estado"] == "enviado" for p in good)
    assert "not valid JSON" in rows["+51911111111"]["last_error"]
    assert "5000 characters" in rows["+51922222222"]["last_error"]
    assert "'to'" in rows["+51933333333"]["last_error"]
    assert "E.164" in rows["51944444444"]["last_error"]
    assert sorted(fake_api.counts()) == sorted(good)  # nothing invalid reached the API


async def test_expired_token_pauses_without_failing_rows(
    sql: SQL, fake_api: FakeCloudAPI, settings: Callable[..., Settings]
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 5)
    fake_api.fail_all(Step.error(190, http_status=401))

    await drain(
        settings(concurrency=1, pause_seconds=60),
        once=False,
        until=lambda: len(fake_api.requests) >= 1 and sql.states().get("procesando", 0) == 0,
    )

    assert sql.states() == {"pendiente": 5}
    assert sql.value("SELECT MAX(attempts) FROM cola_envios") == 0
    assert len(fake_api.requests) == 1  # paused after the first 190, not burning the queue


async def test_an_integrity_block_pauses_sending_and_no_row_of_the_queue_ends_in_error(
    sql: SQL, fake_api: FakeCloudAPI, settings: Callable[..., Settings]
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 300)
    blocked = "Your account is temporarily blocked for policy violations"
    fake_api.fail_all(Step.error(368, http_status=403, details=blocked))

    await drain(
        settings(concurrency=8, pause_seconds=0.2),  # probes every 0.2 s while the block lasts
        once=False,
        until=lambda: len(fake_api.requests) >= 20,
    )

    assert sql.states() == {"pendiente": 300}
    assert sql.value("SELECT MAX(attempts) FROM cola_envios") == 0
    assert len(fake_api.requests) <= 20 + 8  # probes, not the queue


async def test_a_country_the_account_may_not_message_fails_that_row_only_and_says_why(
    sql: SQL, fake_api: FakeCloudAPI, settings: Callable[..., Settings]
) -> None:
    session = sql.add_session()
    blocked = sql.add_rows(session, 4)[0]
    fake_api.script(blocked, Step.error(130497, details="Business account is restricted from messaging"))

    await drain(settings())

    assert sql.states() == {"enviado": 3, "error": 1}
    row = sql.rows("SELECT last_error_code, last_error FROM cola_envios WHERE estado = 'error'")[0]
    assert row["last_error_code"] == 130497
    assert "may not message users in the recipient's country" in row["last_error"]


async def test_sending_resumes_by_itself_when_the_token_works_again(
    sql: SQL, fake_api: FakeCloudAPI, settings: Callable[..., Settings]
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 20)
    fake_api.fail_all(Step.error(190, http_status=401))
    # the token is renewed after six refusals: the first wave of 4 sends, then two probes
    renew = threading.Thread(
        target=lambda: fake_api.wait_for_requests(6) and fake_api.fail_all(None), daemon=True
    )
    renew.start()

    await drain(
        settings(concurrency=4, pause_seconds=0.2), once=False, until=lambda: sql.states() == {"enviado": 20}
    )

    renew.join(5)
    refused = [r for r in fake_api.requests if r.outcome == "error:190"]
    assert len(refused) == 6  # after the first wave, one probe per pause: the queue is not burnt
    assert sql.value("SELECT MAX(attempts) FROM cola_envios") == 1  # refusals spent no attempt
    assert sql.value("SELECT COUNT(*) FROM cola_envios WHERE last_error_code IS NOT NULL") == 0
