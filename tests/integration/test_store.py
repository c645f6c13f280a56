"""The claim and the fenced writes against the real database."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pymysql
import pytest

from tests.integration.helpers import decided, sent, unsent
from tests.support.env import eventually
from tests.support.sql import SQL, connect
from worker.cli.operate import _story_lines
from worker.config import DatabaseURL
from worker.daemon.progress import Progress
from worker.log import get_logger
from worker.models import Job, Outcome, SendResult
from worker.store import RowRefused, Store
from worker.store import claims as claims_module
from worker.store.claims import CLAIM_SESSION_DUE, NEXT_SESSION_WAITING


def test_fair_claim_queries_are_index_range_scans_without_filesort(sql: SQL) -> None:
    for name in ("big", "small", "done"):
        sql.add_rows(sql.add_session(name), 3000 if name != "small" else 50)
    sql.execute("UPDATE cola_envios SET estado = 'enviado' WHERE id % 100 <> 0 OR sesion_id = 3")
    sql.execute("ANALYZE TABLE cola_envios")
    with contextlib.suppress(pymysql.err.OperationalError):  # MariaDB has no such variable
        sql.execute("SET SESSION explain_format = 'TRADITIONAL'")  # MySQL 9 defaults to TREE
    plan = sql.rows("EXPLAIN " + CLAIM_SESSION_DUE, (65536, 65536, 1, 10))
    (row,) = [{k.lower(): v for k, v in r.items()} for r in plan]
    assert row["key"] == "ix_cola_envios_session_due"
    assert row["type"] == "range"
    assert "filesort" not in (row["extra"] or "").lower()
    # the sessions with waiting rows: one index step per session, never a walk over the rows
    plan = sql.rows("EXPLAIN " + NEXT_SESSION_WAITING, (0,))
    (row,) = [{k.lower(): v for k, v in r.items()} for r in plan]
    assert row["key"] == "ix_cola_envios_session_due" and row["type"] == "range"
    assert "filesort" not in (row["extra"] or "").lower()  # the first entry: one descent


async def test_rows_of_a_session_missing_from_the_sessions_table_are_still_sent(
    sql: SQL, store: Store
) -> None:
    sql.add_rows(999, 2)  # a producer without a foreign key: no sesiones_envio row 999
    held = sql.add_session("held")
    sql.add_rows(held, 2, start=100)
    sql.execute("UPDATE sesiones_envio SET estado = 'pausada' WHERE id = %s", (held,))
    jobs = await store.claims.claim(10, lease_seconds=30)
    assert sorted(job.sesion_id for job in jobs) == [999, 999]


async def test_rows_due_count_only_the_sessions_that_may_send_now(sql: SQL, store: Store) -> None:
    day, night = sql.add_session("day"), sql.add_session("night")
    sql.add_rows(day, 3)
    sql.add_rows(night, 5, start=100)
    assert (await store.claims.queue_due())[0] == 8
    assert (await store.claims.queue_due([night]))[0] == 3  # the night session's window is closed
    assert await store.claims.queue_due([day, night]) == (0, 0.0)
    sql.execute("UPDATE sesiones_envio SET estado = 'pausada' WHERE id = %s", (day,))
    assert (await store.claims.queue_due())[0] == 5  # a paused session's rows are not late


async def test_concurrent_claims_take_disjoint_rows_and_never_more_than_asked(sql: SQL, store: Store) -> None:
    session = sql.add_session()
    sql.add_rows(session, 100)
    claims = await asyncio.gather(*(store.claims.claim(15, lease_seconds=30) for _ in range(6)))
    ids = [job.id for claim in claims for job in claim]
    assert all(len(claim) <= 15 for claim in claims)
    # SKIP LOCKED may hand a claim fewer rows while others hold locks (MySQL more often than
    # MariaDB); what matters is that no row is claimed twice and none is lost.
    assert len(ids) == len(set(ids)) and 15 <= len(ids) <= 90
    assert sql.states() == {"procesando": len(ids), "pendiente": 100 - len(ids)}
    expiry = sql.value(
        "SELECT MIN(TIMESTAMPDIFF(SECOND, NOW(6), lease_expires_at)) FROM cola_envios"
        " WHERE estado = 'procesando'"
    )
    assert 25 <= expiry <= 30


async def test_a_retried_row_is_claimed_with_its_new_budget_whatever_its_counters_say(
    sql: SQL, store: Store
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 2)
    # a retried row that tried 3 times before, once since; and one whose counter was set by hand
    # below the mark (an unsigned subtraction would make the server refuse the whole claim)
    sql.execute("UPDATE cola_envios SET attempts = 4, attempts_before_retry = 3 ORDER BY id LIMIT 1")
    sql.execute("UPDATE cola_envios SET attempts = 0, attempts_before_retry = 2 WHERE attempts = 0")
    jobs = await store.claims.claim(2, lease_seconds=30)
    assert sorted(job.attempts for job in jobs) == [0, 1]


async def test_paused_and_cancelled_sessions_are_not_claimed(sql: SQL, store: Store) -> None:
    active, paused, cancelled = (sql.add_session(name) for name in ("a", "p", "c"))
    for n, session in enumerate((active, paused, cancelled)):
        sql.add_rows(session, 5, start=n * 10)
    sql.execute("UPDATE sesiones_envio SET estado = 'pausada' WHERE id = %s", (paused,))
    sql.execute("UPDATE sesiones_envio SET estado = 'cancelada' WHERE id = %s", (cancelled,))
    jobs = await store.claims.claim(50, lease_seconds=30)
    assert {job.sesion_id for job in jobs} == {active} and len(jobs) == 5


async def test_a_worker_that_lost_its_lease_writes_nothing(sql: SQL, store: Store) -> None:
    session = sql.add_session()
    sql.add_rows(session, 2)
    stale, kept = await store.claims.claim(2, lease_seconds=30)
    # another worker recovered and re-claimed the first row: it carries a new token now
    sql.execute("UPDATE cola_envios SET lease_token = REPEAT('f', 32) WHERE id = %s", (stale.id,))
    recorded = await store.results.record([sent(stale, "wamid.X"), sent(kept, "wamid.Y")])
    assert (recorded.written, [f.job.id for f in recorded.fenced_out]) == (1, [stale.id])
    rows = {r["id"]: r for r in sql.rows("SELECT id, estado, wamid FROM cola_envios")}
    assert rows[stale.id]["estado"] == "procesando" and rows[stale.id]["wamid"] is None
    assert rows[kept.id]["estado"] == "enviado"
    assert sql.value("SELECT GROUP_CONCAT(cola_id) FROM envios_whatsapp") == str(kept.id)


async def test_expired_leases_become_unknown(sql: SQL, store: Store) -> None:
    session = sql.add_session()
    sql.add_rows(session, 3)
    await store.claims.claim(2, lease_seconds=30)
    sql.execute(
        "UPDATE cola_envios SET lease_expires_at = NOW(6) - INTERVAL 1 SECOND WHERE estado = 'procesando'"
    )
    assert (await store.claims.recover_expired()).rows == 2
    assert sql.states() == {"desconocido": 2, "pendiente": 1}


async def test_a_row_recovered_from_a_dead_worker_tells_it_in_its_history_once(
    sql: SQL, store: Store, db_url: DatabaseURL
) -> None:
    """`rows --id` shows the attempt whose outcome nobody knows; two daemons sweeping at once
    write its line once."""
    session = sql.add_session()
    sql.add_rows(session, 3)
    claimed = await store.claims.claim(3, lease_seconds=30)
    sql.execute(
        "UPDATE cola_envios SET lease_owner = 'host-a:41',"
        " lease_expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND"
    )
    busy = claimed[0].id  # another daemon's sweep holds this one: this sweep goes past it
    holder = connect(db_url, db_url.database)
    try:
        holder.begin()
        with holder.cursor() as cur:
            cur.execute("SELECT id FROM cola_envios WHERE id = %s FOR UPDATE", (busy,))
        assert (await store.claims.recover_expired()).rows == 2
        assert sql.value("SELECT estado FROM cola_envios WHERE id = %s", (busy,)) == "procesando"
    finally:
        holder.rollback()
        holder.close()
    first, second = await asyncio.gather(store.claims.recover_expired(), store.claims.recover_expired())
    assert first.rows + second.rows == 1
    assert (await store.claims.recover_expired()).rows == 0
    for job in claimed:
        story = await store.sessions.story(job.id)
        assert story is not None and story.row["estado"] == "desconocido"
        assert [(a["outcome"], a["code"], a["detail"]) for a in story.attempts] == [
            ("unknown", None, "lease of host-a:41 expired while the message may have been in flight")
        ]


async def test_a_cut_off_workers_late_result_reads_as_the_same_attempt_in_the_story(
    sql: SQL, store: Store
) -> None:
    """The sweep guessed `unknown`; the worker's own answer then landed: `rows --id` says the
    guess was resolved, so one send does not read as two attempts. An answer that is itself
    unknown resolves nothing; a late result the database refuses spends no second attempt."""
    session = sql.add_session()
    sql.add_rows(session, 5)
    delivered, refused, silent, unclear, unstorable = await store.claims.claim(5, lease_seconds=30)
    sql.execute("UPDATE cola_envios SET lease_expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND")
    assert (await store.claims.recover_expired()).rows == 5
    timed_out = SendResult(Outcome.UNKNOWN, error_text="outcome unknown: TimeoutError")
    late = [sent(delivered, "wamid.LATE"), unsent(refused), decided(unclear, timed_out)]
    assert (await store.results.record(late)).written == 3
    assert await store.results.record_refused(sent(unstorable, "wamid.TOO-LONG"), "Data too long")

    async def sweep_line(job: Job) -> str:
        """The sweep's line in `rows --id` (not the row's `last error`)."""
        story = await store.sessions.story(job.id)
        assert story is not None
        lines = _story_lines(story)
        history = lines[next(i for i, line in enumerate(lines) if line.startswith("history")) :]
        (line,) = [h for h in history if "lease of" in h]
        return line

    assert (await sweep_line(delivered)).endswith("(resolved later: enviado, above)")
    assert (await sweep_line(refused)).endswith("(resolved by the next line)")
    for still_unknown in (silent, unclear, unstorable):  # nobody knows more than the sweep did
        assert (await sweep_line(still_unknown)).endswith("may have been in flight")
    attempts = {r["id"]: r["attempts"] for r in sql.rows("SELECT id, attempts FROM cola_envios")}
    assert set(attempts.values()) == {1}


async def test_a_trigger_refusing_one_rows_recovery_leaves_the_others_recovered_with_their_lines(
    sql: SQL, store: Store
) -> None:
    """A legacy trigger refuses `desconocido` for one row: the sweep goes row by row, the others
    become unknown with their history line, the refused one stays in flight with none."""
    session = sql.add_session()
    sql.add_rows(session, 3)
    refused, *others = await store.claims.claim(3, lease_seconds=30)
    sql.execute(
        "CREATE TRIGGER cola_envios_php_states BEFORE UPDATE ON cola_envios FOR EACH ROW"
        f" IF NEW.estado = 'desconocido' AND NEW.id = {int(refused.id)} THEN"
        " SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'the PHP application knows no desconocido';"
        " END IF"
    )
    sql.execute("UPDATE cola_envios SET lease_expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND")
    recovered = await store.claims.recover_expired()
    assert recovered.rows == 2 and [row for row, _ in recovered.kept_in_flight] == [refused.id]
    assert sql.rows("SELECT cola_id, outcome FROM whatsapp_worker_attempts ORDER BY cola_id") == [
        {"cola_id": job.id, "outcome": "unknown"} for job in sorted(others, key=lambda j: j.id)
    ]
    states = {r["id"]: r["estado"] for r in sql.rows("SELECT id, estado FROM cola_envios")}
    assert states == {refused.id: "procesando", **{job.id: "desconocido" for job in others}}


async def test_one_sweep_recovers_every_expired_row_batch_after_batch(
    sql: SQL, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(claims_module, "EXPIRED_BATCH", 2)
    session = sql.add_session()
    sql.add_rows(session, 5)
    await store.claims.claim(5, lease_seconds=30)
    sql.execute("UPDATE cola_envios SET lease_expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND")
    assert (await store.claims.recover_expired()).rows == 5
    assert sql.states() == {"desconocido": 5}
    assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_attempts WHERE outcome = 'unknown'") == 5


async def test_migrate_is_idempotent(store: Store) -> None:
    from worker.store import schema

    applied = await store.migrations.migrate()
    assert (applied.steps, applied.versions) == ([], [])
    assert await store.migrations.schema_version() == schema.LATEST
    assert await store.migrations.check() == []


async def test_a_deadlocked_result_write_is_retried_and_lands(
    sql: SQL, store: Store, db_url: DatabaseURL
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 3)
    first, second = await store.claims.claim(2, lease_seconds=30)
    other = connect(db_url, db_url.database)
    try:
        await _deadlock_with(other, store, first, second, sql)
    finally:
        other.close()  # never leave its locks behind: dropping the database would wait on them
    assert sql.states() == {"enviado": 2, "pendiente": 1}


async def _deadlock_with(other: Any, store: Store, first: Job, second: Job, sql: SQL) -> None:
    other.autocommit(False)
    with other.cursor() as cur:  # another transaction holds row 2 and has written more than us,
        cur.execute(  # so InnoDB picks our write as the deadlock victim
            "UPDATE cola_envios SET updated_at = NOW(6) WHERE id IN (%s, %s)",
            (second.id, second.id + 1),
        )
    write = asyncio.create_task(
        store.results.record(
            [
                sent(first, "wamid.1"),
                sent(second, "wamid.2"),
            ]
        )
    )
    # our write is stuck on row 2 (it already holds row 1) once its query has run a second
    waiting = (
        "SELECT COUNT(*) AS n FROM information_schema.processlist"
        " WHERE info LIKE 'UPDATE cola_envios FORCE INDEX (PRIMARY) SET attempts%%' AND time >= 1"
    )
    assert await asyncio.to_thread(eventually, lambda: sql.value(waiting) == 1, 10)

    def close_the_cycle() -> None:
        with other.cursor() as cur:  # wants row 1, which our write holds: a deadlock
            cur.execute("SELECT id FROM cola_envios WHERE id = %s FOR UPDATE", (first.id,))
        other.commit()

    await asyncio.to_thread(close_the_cycle)  # raises if InnoDB chose the other side instead
    assert (await write).written == 2


async def test_progress_follows_rows_added_to_a_running_session(sql: SQL, store: Store) -> None:
    session = sql.add_session()
    sql.add_rows(session, 3)
    jobs = await store.claims.claim(3, lease_seconds=30)
    await store.results.record([sent(job, f"wamid.{job.id}") for job in jobs])
    progress = Progress(results=store.results, log=get_logger())
    progress.note([sent(job, "") for job in jobs])
    await progress.report()
    state = "SELECT estado FROM sesiones_envio WHERE id = %s"
    assert sql.value(state, (session,)) == "completada"

    # A producer adds two rows (enqueue re-activates the session); they are counted, and the
    # session completes again only once they are sent.
    sql.add_rows(session, 2, start=10)
    sql.execute("UPDATE sesiones_envio SET estado = 'activa' WHERE id = %s", (session,))
    more = await store.claims.claim(2, lease_seconds=30)
    await store.results.record([sent(more[0], "wamid.more")])
    progress.note([sent(more[0], "")])
    await progress.report()
    assert sql.value(state, (session,)) == "activa"
    await store.results.record([sent(more[1], "wamid.last")])
    progress.note([sent(more[1], "")])
    await progress.report()
    assert sql.value(state, (session,)) == "completada"


async def test_the_sessions_are_read_in_laps_that_always_end(sql: SQL, store: Store) -> None:
    # exactly MAX_SESSIONS sessions whose rows all wait for tomorrow: the first read is cut at
    # the cap, the second reaches the end of the lap; nothing is due, and the reads stop there
    digits = " UNION ALL ".join(f"SELECT {d} AS n" for d in range(10))
    sql.execute(
        "INSERT INTO sesiones_envio (nombre) SELECT CONCAT('later-', a.n * 100 + b.n * 10 + c.n)"
        f" FROM ({digits}) a, ({digits}) b, ({digits}) c"
    )
    sql.execute(
        "INSERT INTO cola_envios (sesion_id, telefono, mensaje, next_attempt_at)"
        " SELECT id, CONCAT('+5197', LPAD(id, 7, '0')), '{}', UTC_TIMESTAMP() + INTERVAL 1 DAY"
        " FROM sesiones_envio"
    )
    assert await store.claims.sessions_due() == [] and store.claims.capped
    assert await store.claims.sessions_due() == [] and not store.claims.capped  # the lap ended
    assert await store.claims.sessions_due() == [] and store.claims.capped  # a new lap


async def test_a_locking_read_after_a_one_round_trip_commit_still_ends_its_transaction(
    sql: SQL, db_url: DatabaseURL
) -> None:
    # The claim and the result write end with their COMMIT in the same round trip; the next
    # transaction on that same connection must still commit, or its row locks would stay and
    # every other writer would wait on them.
    sql.add_rows(sql.add_session(), 2)
    store = await Store.connect(db_url, size=1, worker_id="test-host:1")  # one connection
    try:
        (job,) = await store.claims.claim(1, lease_seconds=30)  # ends with commit_with
        async with store.db.transaction() as cur:  # a transaction that ends on a locking read
            await cur.execute("SELECT id FROM cola_envios WHERE id = %s FOR UPDATE", (job.id,))
        other = connect(db_url, db_url.database)
        try:
            with other.cursor() as cur:  # no wait: the lock was released by the commit
                cur.execute("SET SESSION innodb_lock_wait_timeout = 1")
                cur.execute("SELECT id FROM cola_envios WHERE id = %s FOR UPDATE", (job.id,))
            other.rollback()
        finally:
            other.close()
    finally:
        await store.close()


async def test_a_refused_value_releases_the_transactions_locks_before_the_error_is_raised(
    sql: SQL, store: Store, db_url: DatabaseURL
) -> None:
    # The settler retries a refused batch with SKIP LOCKED: if the dropped connection still held
    # its rows, the retry would skip the very rows it retries.
    sql.add_rows(sql.add_session(), 2)
    first, second = (int(r["id"]) for r in sql.rows("SELECT id FROM cola_envios ORDER BY id"))
    with pytest.raises(RowRefused):
        async with store.db.transaction() as cur:
            await cur.execute("SELECT id FROM cola_envios WHERE id = %s FOR UPDATE", (first,))
            await cur.execute("UPDATE cola_envios SET id = %s WHERE id = %s", (second, first))  # 1062
    other = connect(db_url, db_url.database)
    try:
        with other.cursor() as cur:  # at once: no lock is left behind
            cur.execute("SELECT id FROM cola_envios WHERE id = %s FOR UPDATE NOWAIT", (first,))
        other.rollback()
    finally:
        other.close()


async def test_every_character_the_store_escapes_reaches_the_database_as_it_was_given(store: Store) -> None:
    text = "a\\b\0c\nd\re\x1af'g\"h %s é😀 \\' \\\\"
    async with store.db.transaction() as cur:
        await cur.execute("SELECT %s, %s", (text, text * 50))
        assert await cur.fetchone() == (text, text * 50)


async def test_every_held_number_is_read_however_many_the_operator_holds(sql: SQL, store: Store) -> None:
    # MySQL cuts GROUP_CONCAT at 1,024 bytes by default: the 65th 15-digit number is cut (strict: an error).
    numbers = [f"{10**14 + n}" for n in range(300)]
    for number in numbers:
        assert await store.holds.hold(number, "decommissioned")
    await store.claims.sessions_due()
    assert store.claims.held == frozenset(numbers)
