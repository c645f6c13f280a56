"""Guarantees that must hold when the surroundings misbehave (issue: outside the clean room).

Real database, real HTTP to the local fake Cloud API, a real TCP proxy for lost answers.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

import pytest

from tests.integration.helpers import drain, sent, unsent
from tests.support.env import run_worker
from tests.support.fakeapi import FakeCloudAPI, Step
from tests.support.sql import SQL
from tests.support.tcpproxy import TcpProxy
from worker.config import DatabaseURL, Settings
from worker.store import DatabaseUnavailable, Store


async def test_a_result_the_database_refuses_is_isolated_and_every_other_row_is_recorded(
    sql: SQL, fake_api: FakeCloudAPI, settings: Callable[..., Settings]
) -> None:
    session = sql.add_session()
    phones = sql.add_rows(session, 20)
    too_long = "wamid." + "x" * 300  # wamid is VARCHAR(128): refused (1406) under strict mode
    fake_api.script(phones[3], Step.ok(wamid=too_long))
    fake_api.script(phones[4], Step.ok(wamid="wamid.\ud800"))  # valid JSON, not encodable text
    # A row sent before, then set back to pendiente by hand for a deliberate re-send: its
    # envios_whatsapp row exists already.
    again = sql.value("SELECT id FROM cola_envios WHERE telefono = %s", (phones[5],))
    sql.execute(
        "INSERT INTO envios_whatsapp (cola_id, sesion_id, telefono, wamid) VALUES (%s, %s, %s, 'wamid.OLD')",
        (again, session, phones[5]),
    )

    report = await drain(settings(concurrency=8))

    assert report.drained and report.lost == 0
    assert set(fake_api.counts().values()) == {1} and len(fake_api.counts()) == 20
    rows = {r["telefono"]: r for r in sql.rows("SELECT telefono, estado, last_error FROM cola_envios")}
    for refused in (phones[3], phones[4]):
        assert rows[refused]["estado"] == "desconocido"
        assert "refused by the database" in rows[refused]["last_error"]
    assert too_long[:60] in rows[phones[3]]["last_error"]
    assert sorted(p for p, r in rows.items() if r["estado"] != "enviado") == [phones[3], phones[4]]
    deliveries = sql.rows("SELECT cola_id, wamid FROM envios_whatsapp ORDER BY cola_id")
    assert len(deliveries) == 18 and len({d["cola_id"] for d in deliveries}) == 18
    assert next(d["wamid"] for d in deliveries if d["cola_id"] == again) != "wamid.OLD"


async def test_a_claim_whose_commit_answer_was_lost_gives_its_rows_back(
    sql: SQL, db_url: DatabaseURL
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 5)
    with TcpProxy(db_url.host, db_url.port) as proxy:
        store = await Store.connect(
            DatabaseURL("127.0.0.1", proxy.port, db_url.user, db_url.password, db_url.database), size=1
        )
        try:
            proxy.break_on(b"COMMIT")
            with pytest.raises(DatabaseUnavailable):
                await store.claims.claim(5, lease_seconds=60, sessions=[session])
            assert sql.states() == {"procesando": 5}  # the commit landed; its OK did not
            # The outage outlasts the lease: another daemon recovers two rows as unknown.
            sql.execute(
                "UPDATE cola_envios SET lease_expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND"
                " ORDER BY id LIMIT 2"
            )
            assert (await store.claims.recover_expired()).rows == 2
            assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_attempts WHERE outcome = 'unknown'") == 2
            assert await store.claims.claim(0, lease_seconds=60) == []
        finally:
            await store.close()
    # Nobody sent those rows: they go back, instead of turning unknown when the lease expires,
    # and their story no longer tells of an attempt that may have been in flight.
    assert sql.states() == {"pendiente": 5}
    assert sql.value("SELECT COUNT(*) FROM cola_envios WHERE lease_token IS NOT NULL OR attempts > 0") == 0
    assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_attempts") == 0


def _retry_unknown(db_url: DatabaseURL, session: int) -> str:
    done = run_worker(db_url, "retry", "--session", str(session), "--include-unknown", "--yes")
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_retry_of_unknown_rows_waits_while_their_true_result_may_still_arrive(
    sql: SQL, store: Store, db_url: DatabaseURL
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 2)
    first, second = await store.claims.claim(2, lease_seconds=30)
    # The daemon holding both results was cut off; its leases expired; another recovered them.
    sql.execute(
        "UPDATE cola_envios SET claimed_at = UTC_TIMESTAMP(6) - INTERVAL 31 SECOND,"
        " lease_expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND"
    )
    assert (await store.claims.recover_expired()).rows == 2

    out = _retry_unknown(db_url, session)
    assert "will queue 0 row(s) again" in out
    assert "2 unknown row(s) left alone" in out
    assert sql.states() == {"desconocido": 2}

    # The cut-off daemon comes back with the true result of the first row: it lands.
    assert (await store.results.record([sent(first, "wamid.TRUE")])).written == 1
    assert sql.value("SELECT wamid FROM cola_envios WHERE id = %s", (first.id,)) == "wamid.TRUE"

    # Once the window (one more lease length) has passed, the second row can be retried,
    # and a result arriving after that changes nothing.
    sql.execute(
        "UPDATE cola_envios SET claimed_at = UTC_TIMESTAMP(6) - INTERVAL 62 SECOND,"
        " lease_expires_at = UTC_TIMESTAMP(6) - INTERVAL 31 SECOND WHERE id = %s",
        (second.id,),
    )
    assert "1 row(s) queued again" in _retry_unknown(db_url, session)
    assert (await store.results.record([sent(second, "wamid.LATE")])).written == 0
    assert sql.value("SELECT estado FROM cola_envios WHERE id = %s", (second.id,)) == "pendiente"


async def test_a_held_result_lands_however_late_while_nobody_retried_its_row(sql: SQL, store: Store) -> None:
    session = sql.add_session()
    sql.add_rows(session, 2)
    sent_row, failed_row = await store.claims.claim(2, lease_seconds=30)
    # The daemon holding both results was cut off for an hour: the leases expired long ago,
    # another daemon recovered the rows as unknown, and the late-result window has passed.
    sql.execute(
        "UPDATE cola_envios SET claimed_at = UTC_TIMESTAMP(6) - INTERVAL 1 HOUR,"
        " lease_expires_at = UTC_TIMESTAMP(6) - INTERVAL 3570 SECOND"
    )
    assert (await store.claims.recover_expired()).rows == 2
    # Nobody re-sent them: the true results replace the guess, one attempt each.
    recorded = await store.results.record([sent(sent_row, "wamid.TRUE"), unsent(failed_row)])
    assert (recorded.written, recorded.fenced_out) == (2, ())
    rows = sql.rows("SELECT id, estado, wamid, attempts, lease_token FROM cola_envios ORDER BY id")
    assert [(r["estado"], r["wamid"], r["attempts"], r["lease_token"]) for r in rows] == [
        ("enviado", "wamid.TRUE", 1, None),
        ("error", None, 1, None),
    ]
    assert sql.value("SELECT wamid FROM envios_whatsapp") == "wamid.TRUE"


async def test_an_unreachable_api_pauses_sending_and_spends_no_attempt(
    sql: SQL, fake_api: FakeCloudAPI, settings: Callable[..., Settings]
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 30)
    api = urlsplit(fake_api.base_url)
    assert api.hostname and api.port
    with TcpProxy(api.hostname, api.port) as proxy:
        proxy.cut()  # connection refused, for longer than the whole retry schedule
        api_url = f"http://127.0.0.1:{proxy.port}{api.path}"
        rounds = []

        def retry_schedule_spent() -> bool:
            rounds.append(1)
            return len(rounds) > 40  # ~0.8 s: retry_cap 0.2 s x max_attempts 5 = 1 s would burn

        config = settings(api_url=api_url, pause_seconds=0.1, concurrency=4)
        report = await drain(config, once=False, until=retry_schedule_spent, seconds=30)
        assert report.outcomes["sent"] == 0 and report.outcomes["error"] == 0
        assert sql.states() == {"pendiente": 30}
        assert sql.value("SELECT MAX(attempts) FROM cola_envios") == 0

        proxy.restore()
        report = await drain(config)
    assert report.outcomes["sent"] == 30
    assert sql.states() == {"enviado": 30}


async def test_a_batch_retried_after_its_commit_answer_was_lost_is_not_called_lost(
    sql: SQL, store: Store
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 3)
    mine, taken, also = await store.claims.claim(3, lease_seconds=30)
    batch = [sent(mine, "wamid.MINE"), sent(taken, "wamid.TAKEN"), sent(also, "wamid.ALSO")]
    # The first write of [mine, also] landed; its answer never came back, so it is written again.
    assert (await store.results.record([batch[0], batch[2]])).written == 2
    # Meanwhile `taken` expired and another daemon claimed it (a new token): that one is fenced.
    sql.execute("UPDATE cola_envios SET lease_token = REPEAT('b', 32) WHERE id = %s", (taken.id,))
    again = await store.results.record(batch)
    assert again.written == 2
    assert [f.job.id for f in again.fenced_out] == [taken.id]
    assert sql.value("SELECT COUNT(*) FROM envios_whatsapp") == 2
