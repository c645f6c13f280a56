"""Several campaigns at once: fair shares, schedules and quiet hours, through the daemon."""

from __future__ import annotations

import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.support.env import eventually
from tests.support.fakeapi import FakeCloudAPI
from tests.support.processes import WorkerProcess
from tests.support.sql import SQL


def test_a_small_session_enqueued_after_a_big_one_is_not_starved(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    big = sql.add_session("big")
    sql.add_rows(big, 20_000)
    small = sql.add_session("small")
    sql.add_rows(small, 50, start=100_000)
    fake_api.latency = 0.005

    def sent(session: int) -> int:
        return int(
            sql.value(
                "SELECT COUNT(*) FROM cola_envios WHERE sesion_id = %s AND estado = 'enviado'", (session,)
            )
        )

    daemon = WorkerProcess(worker_env(WORKER_CONCURRENCY="16"), "run", logs=tmp_path)
    try:
        assert eventually(lambda: sent(small) == 50, 60), daemon.stderr[-2000:]
        big_done_then = sent(big)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, daemon.stderr[-2000:]
    # the small session's last row went before the big one was 10% done
    assert big_done_then < 2_000, big_done_then


def _window_around(now: datetime, *, open_now: bool) -> str:
    """A UTC window that contains `now` (or one that opens two hours later)."""
    start = now - timedelta(hours=1) if open_now else now + timedelta(hours=2)
    end = start + timedelta(hours=2)
    return f"{start:%H:%M}-{end:%H:%M}"


def test_rows_outside_their_window_wait_without_spending_attempts_then_go(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    night = sql.add_session("night")
    sql.add_rows(night, 10)
    day = sql.add_session("day")
    sql.add_rows(day, 10, start=1000)
    now = datetime.now(UTC)
    sql.execute(
        "UPDATE sesiones_envio SET send_window = %s, time_zone = 'UTC' WHERE id = %s",
        (_window_around(now, open_now=False), night),
    )
    sql.execute(
        "UPDATE sesiones_envio SET send_window = %s, time_zone = 'UTC' WHERE id = %s",
        (_window_around(now, open_now=True), day),
    )
    env = worker_env()

    first = WorkerProcess(env, "run", "--once", logs=tmp_path)
    assert first.wait(timeout=60) == 0, first.stderr[-2000:]
    rows = sql.rows("SELECT sesion_id, estado, attempts FROM cola_envios")
    assert {(r["estado"], r["attempts"]) for r in rows if r["sesion_id"] == night} == {("pendiente", 0)}
    assert {r["estado"] for r in rows if r["sesion_id"] == day} == {"enviado"}
    assert len(fake_api.requests) == 10

    # the daemon's own window applies to every session on top of theirs
    sql.execute(
        "UPDATE sesiones_envio SET send_window = %s WHERE id = %s",
        (_window_around(now, open_now=True), night),
    )
    closed = WorkerProcess(
        worker_env(WORKER_SEND_WINDOW=_window_around(now, open_now=False)), "run", "--once", logs=tmp_path
    )
    assert closed.wait(timeout=60) == 0 and len(fake_api.requests) == 10

    opened = WorkerProcess(env, "run", "--once", logs=tmp_path)
    assert opened.wait(timeout=60) == 0, opened.stderr[-2000:]
    assert sql.states() == {"enviado": 20} and len(fake_api.requests) == 20


def test_scheduled_rows_are_not_sent_before_their_time(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    session = sql.add_session("tomorrow")
    sql.add_rows(session, 5)
    sql.execute("UPDATE cola_envios SET next_attempt_at = UTC_TIMESTAMP(6) + INTERVAL 1 DAY")
    run = WorkerProcess(worker_env(), "run", "--once", logs=tmp_path)
    assert run.wait(timeout=60) == 0
    assert fake_api.requests == [] and sql.states() == {"pendiente": 5}
    sql.execute("UPDATE cola_envios SET next_attempt_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND")
    run = WorkerProcess(worker_env(), "run", "--once", logs=tmp_path)
    assert run.wait(timeout=60) == 0
    assert sql.states() == {"enviado": 5}


def test_sessions_whose_rows_all_wait_for_later_do_not_hold_a_due_session_back(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    # Five sessions whose rows are all scheduled for tomorrow, created before the one due now;
    # with a rate limit, each claim has only a few tokens to share among the sessions it asks.
    for i in range(5):
        later = sql.add_session(f"tomorrow-{i}")
        sql.add_rows(later, 3, start=1000 * (i + 1))
        sql.execute(
            "UPDATE cola_envios SET next_attempt_at = UTC_TIMESTAMP(6) + INTERVAL 1 DAY WHERE sesion_id = %s",
            (later,),
        )
    now = sql.add_session("now")
    sql.add_rows(now, 60)
    run = WorkerProcess(
        worker_env(WORKER_RATE_LIMIT="80", WORKER_FLEET_BEAT="0.2"), "run", "--once", logs=tmp_path
    )
    assert run.wait(timeout=60) == 0, run.stderr[-2000:]
    assert len(fake_api.requests) == 60
    assert sql.value("SELECT COUNT(*) FROM cola_envios WHERE estado = 'pendiente'") == 15


def test_a_thousand_sessions_of_rows_not_yet_due_never_hide_a_due_one(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    # scheduled reminders: 1,000 sessions, one row each, due tomorrow; then one row due now
    sql.execute(
        "INSERT INTO sesiones_envio (nombre) SELECT CONCAT('tomorrow-', seq) FROM"
        " (SELECT a.n * 100 + b.n * 10 + c.n AS seq FROM"
        " (SELECT 0 n UNION SELECT 1 UNION SELECT 2 UNION SELECT 3 UNION SELECT 4 UNION SELECT 5"
        " UNION SELECT 6 UNION SELECT 7 UNION SELECT 8 UNION SELECT 9) a,"
        " (SELECT 0 n UNION SELECT 1 UNION SELECT 2 UNION SELECT 3 UNION SELECT 4 UNION SELECT 5"
        " UNION SELECT 6 UNION SELECT 7 UNION SELECT 8 UNION SELECT 9) b,"
        " (SELECT 0 n UNION SELECT 1 UNION SELECT 2 UNION SELECT 3 UNION SELECT 4 UNION SELECT 5"
        " UNION SELECT 6 UNION SELECT 7 UNION SELECT 8 UNION SELECT 9) c) seqs"
    )
    sql.execute(
        "INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje, next_attempt_at)"
        " SELECT id, id, CONCAT('+5197', LPAD(id, 7, '0')), %s, UTC_TIMESTAMP() + INTERVAL 1 DAY"
        " FROM sesiones_envio",
        ('{"type":"text","text":{"body":"mañana"}}',),
    )
    now = sql.add_session("now")
    (phone,) = sql.add_rows(now, 1, start=5_000_000)
    assert sql.value("SELECT COUNT(*) FROM sesiones_envio") == 1001

    run = WorkerProcess(worker_env(), "run", "--once", logs=tmp_path)
    assert run.wait(timeout=60) == 0, run.stderr[-2000:]
    assert fake_api.counts() == {phone: 1}
    assert sql.value("SELECT estado FROM cola_envios WHERE sesion_id = %s", (now,)) == "enviado"
    assert any(e["event"] == "sessions_scan_capped" for e in run.events())
