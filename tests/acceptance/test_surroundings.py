"""The daemon's promises when its surroundings misbehave: a closed log pipe, a long database
outage, a rejected token under cron, SIGHUP, huge rows, bad settings. Real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.env import WORKER_BIN, database_url_text, eventually
from tests.support.fakeapi import FakeCloudAPI, Step
from tests.support.processes import WorkerProcess
from tests.support.sql import SQL
from tests.support.tcpproxy import TcpProxy
from worker.config import DatabaseURL


def sample_health(env: dict[str, str], *, seconds: float) -> list[tuple[int, str]]:
    """`whatsapp-worker health` about once a second for `seconds`: (exit code, line) each."""
    verdicts = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        health = subprocess.run([*WORKER_BIN, "health"], env=env, capture_output=True, text=True)
        verdicts.append((health.returncode, health.stdout.strip()))
        time.sleep(1)  # sampling rate of the probe, not synchronisation
    return verdicts


def test_a_log_reader_that_goes_away_costs_no_result(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 1500)
    fake_api.latency = 0.01
    with (tmp_path / "stderr").open("w") as stderr:
        daemon = subprocess.Popen(
            [*WORKER_BIN, "run"],
            env=worker_env(WORKER_CONCURRENCY="32"),
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        assert daemon.stdout is not None
        daemon.stdout.readline(), daemon.stdout.readline()  # `run | head -2`
        daemon.stdout.close()
        code = daemon.wait(timeout=60)
    assert code == 74, (tmp_path / "stderr").read_text()
    assert "the log output was closed" in (tmp_path / "stderr").read_text()
    accepted = {phone: wamids[0] for phone, wamids in fake_api.accepted.items()}
    rows = sql.rows("SELECT telefono, estado, wamid FROM cola_envios")
    assert {r["telefono"]: r["wamid"] for r in rows if r["estado"] == "enviado"} == accepted
    # every send the API accepted is recorded; nothing left claimed; it stopped claiming
    assert {r["estado"] for r in rows} <= {"enviado", "pendiente"}
    assert 0 < len(accepted) < 1500


def test_the_heartbeat_beats_through_a_database_outage_longer_than_the_health_tolerance(
    sql: SQL,
    db_url: DatabaseURL,
    fake_api: FakeCloudAPI,
    worker_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 300)
    fake_api.latency = 0.02
    with TcpProxy(db_url.host, db_url.port) as proxy:
        env = worker_env(
            WORKER_DATABASE_URL=proxy.database_url(db_url),
            WORKER_CONCURRENCY="4",
            WORKER_RATE_LIMIT="200",
            WORKER_DB_TIMEOUT="1",  # health tolerance shrinks with it: 3 x 1 + 2 x 5 = 13 s
        )
        daemon = WorkerProcess(env, "run", logs=tmp_path)
        assert fake_api.wait_for_requests(40, timeout=30)
        proxy.cut()
        verdicts = sample_health(env, seconds=18)  # longer than the tolerance
        assert daemon.alive()
        proxy.restore()
        assert eventually(lambda: sql.states() == {"enviado": 300}, 60), sql.states()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, daemon.stderr
    assert [v for v in verdicts if v[0] != 0] == []
    assert set(fake_api.counts().values()) == {1}


def test_run_once_gives_up_at_a_sending_pause_with_exit_75(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 20)
    env = worker_env(WHATSAPP_ACCESS_TOKEN="expired-token", WORKER_PAUSE_SECONDS="600")
    started = time.monotonic()
    done = subprocess.run([*WORKER_BIN, "run", "--once"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 75, done.stderr
    assert time.monotonic() - started < 30
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "sending paused" in lines[0] and "190" in lines[0]
    assert sql.states() == {"pendiente": 20}
    assert sql.value("SELECT MAX(attempts) FROM cola_envios") == 0
    # the pidfile is free for the next cron run
    again = subprocess.run(
        [*WORKER_BIN, "run", "--once"], env=env, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 75 and "another instance" not in again.stdout


def test_sighup_drains_like_sigterm(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 50)
    fake_api.latency = 1.0
    daemon = WorkerProcess(worker_env(WORKER_CONCURRENCY="5"), "run", logs=tmp_path)
    assert fake_api.wait_until(lambda: fake_api.in_flight == 5)
    daemon.send_signal(signal.SIGHUP)
    assert daemon.wait(timeout=20) == 0, daemon.stderr
    states = sql.states()
    assert "procesando" not in states and states["enviado"] == len(fake_api.counts()) >= 5


def test_huge_rows_end_in_error_without_being_loaded(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    session = sql.add_session()
    huge = json.dumps({"type": "text", "text": {"body": "x" * (12 * 1024 * 1024)}})
    for start in range(6):
        sql.add_rows(session, 1, start=start, message=huge)
    sql.add_rows(session, 2, start=100)
    daemon = WorkerProcess(worker_env(), "run", logs=tmp_path)
    assert eventually(lambda: sql.states() == {"error": 6, "enviado": 2}, 30), sql.states()
    # VmHWM: the daemon's peak resident memory since it started (after exec)
    status = Path(f"/proc/{daemon.pid}/status").read_text()
    peak_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0, daemon.stderr
    errors = sql.rows("SELECT last_error FROM cola_envios WHERE estado = 'error'")
    assert all("more than 65536" in e["last_error"] for e in errors)
    assert len(fake_api.requests) == 2
    assert peak_kib < 100 * 1024, peak_kib  # the 72 MB of rows never entered the process


def test_a_token_that_cannot_be_a_header_stops_start_up_with_78(
    worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("EAAG-first-line\nsecond-line\n")
    env = worker_env(WHATSAPP_ACCESS_TOKEN_FILE=str(token))
    del env["WHATSAPP_ACCESS_TOKEN"]
    done = subprocess.run([*WORKER_BIN, "run", "--once"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 78
    assert "WHATSAPP_ACCESS_TOKEN" in done.stderr and "first-line" not in done.stderr


def test_a_non_ascii_database_password_logs_in(
    sql: SQL, db_url: DatabaseURL, worker_env: Callable[..., dict[str, str]]
) -> None:
    user, password = f"ww_utf8_{os.getpid()}", "contraseña€"
    sql.execute(f"CREATE USER '{user}'@'%%' IDENTIFIED BY %s", (password,))
    try:
        sql.execute(f"GRANT ALL ON `{db_url.database}`.* TO '{user}'@'%'")
        url = DatabaseURL(db_url.host, db_url.port, user, password, db_url.database)
        done = subprocess.run(
            [*WORKER_BIN, "status"],
            env=worker_env(
                WORKER_DATABASE_URL=database_url_text(url).replace(password, "contrase%C3%B1a%E2%82%AC")
            ),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
    finally:
        sql.execute(f"DROP USER '{user}'@'%'")


def test_run_once_gives_the_pidfile_back_when_the_database_goes_away(
    sql: SQL,
    db_url: DatabaseURL,
    fake_api: FakeCloudAPI,
    worker_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 400)
    fake_api.latency = 0.05
    with TcpProxy(db_url.host, db_url.port) as proxy:
        env = worker_env(
            WORKER_DATABASE_URL=proxy.database_url(db_url), WORKER_CONCURRENCY="4", WORKER_DRAIN_TIMEOUT="2"
        )
        daemon = WorkerProcess(env, "run", "--once", logs=tmp_path)
        assert fake_api.wait_for_requests(20, timeout=30)
        proxy.cut()  # for good: cron must get its pidfile back
        assert daemon.wait(timeout=30) == 75, daemon.stderr
    assert "database unavailable" in daemon.stderr


@contextmanager
def ordinary_user(sql: SQL, db_url: DatabaseURL) -> Iterator[DatabaseURL]:
    """A database user without SUPER (an application's account): read-only applies to it."""
    user, password = f"ww_app_{os.getpid()}", "app-password"
    sql.execute(f"DROP USER IF EXISTS '{user}'@'%%'")
    sql.execute(f"CREATE USER '{user}'@'%%' IDENTIFIED BY %s", (password,))
    try:
        sql.execute(f"GRANT ALL ON `{db_url.database}`.* TO '{user}'@'%'")
        yield DatabaseURL(db_url.host, db_url.port, user, password, db_url.database)
    finally:
        sql.execute(f"DROP USER '{user}'@'%'")


@contextmanager
def read_only(sql: SQL) -> Iterator[None]:
    """What a failover, a managed server's maintenance or a demoted primary does."""
    sql.execute("SET GLOBAL read_only = 1")
    try:
        yield
    finally:
        sql.execute("SET GLOBAL read_only = 0")


def test_a_read_only_database_for_longer_than_the_lease_is_an_outage_and_every_result_lands(
    sql: SQL,
    db_url: DatabaseURL,
    fake_api: FakeCloudAPI,
    worker_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 150)
    fake_api.latency = 0.3  # sends are in flight when the primary turns read-only
    with ordinary_user(sql, db_url) as app_url:
        env = worker_env(
            WORKER_DATABASE_URL=database_url_text(app_url),
            WORKER_CONCURRENCY="8",
            WORKER_RATE_LIMIT="40",
            WORKER_LEASE_SECONDS="3",
            WORKER_SEND_TIMEOUT="1",
            WORKER_DB_TIMEOUT="1",
        )
        daemon = WorkerProcess(env, "run", logs=tmp_path)
        assert fake_api.wait_for_requests(30, timeout=30)
        with read_only(sql):
            in_flight_then = fake_api.in_flight
            verdicts = sample_health(env, seconds=8)  # more than twice the lease
            assert daemon.alive(), daemon.stderr
        assert eventually(lambda: sql.states() == {"enviado": 150}, 60), sql.states()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, daemon.stderr
    assert in_flight_then > 0
    assert [v for v in verdicts if v[0] != 0] == []
    counts = fake_api.counts()
    assert len(counts) == 150 and set(counts.values()) == {1}
    rows = sql.rows("SELECT telefono, wamid FROM cola_envios")
    assert {r["telefono"]: r["wamid"] for r in rows} == {p: w[0] for p, w in fake_api.accepted.items()}
    assert sql.value("SELECT COUNT(*) FROM envios_whatsapp") == 150
    assert "database_unavailable" in daemon.stdout and "1290" in daemon.stdout


def test_results_held_through_a_cut_longer_than_twice_the_lease_are_all_written(
    sql: SQL,
    db_url: DatabaseURL,
    fake_api: FakeCloudAPI,
    worker_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 5)
    fake_api.latency = 1.0
    with TcpProxy(db_url.host, db_url.port) as proxy:
        env = worker_env(
            WORKER_DATABASE_URL=proxy.database_url(db_url),
            WORKER_CONCURRENCY="5",
            WORKER_LEASE_SECONDS="3",
            WORKER_SEND_TIMEOUT="1.4",
            WORKER_DB_TIMEOUT="1",
        )
        daemon = WorkerProcess(env, "run", logs=tmp_path)
        assert fake_api.wait_until(lambda: fake_api.in_flight == 5)  # every slot sending
        proxy.cut()
        assert fake_api.wait_until(lambda: len(fake_api.accepted) == 5 and fake_api.in_flight == 0)
        cut_until = time.monotonic() + 7  # the lease is 3 s: more than twice it
        while time.monotonic() < cut_until:
            assert daemon.alive(), daemon.stderr
            time.sleep(0.5)  # how long the cut lasts, not synchronisation
        proxy.restore()
        assert eventually(lambda: sql.states() == {"enviado": 5}, 30), sql.states()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, daemon.stderr
    rows = sql.rows("SELECT telefono, wamid, attempts FROM cola_envios")
    assert {r["telefono"]: r["wamid"] for r in rows} == {p: w[0] for p, w in fake_api.accepted.items()}
    assert {r["attempts"] for r in rows} == {1}
    assert set(fake_api.counts().values()) == {1}


def test_a_state_a_trigger_refuses_is_a_row_level_problem_and_never_stops_the_daemon(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    # an audit trigger added by the PHP team after the migration, knowing the PHP states only
    sql.execute(
        "CREATE TABLE cola_envios_log (cola_id BIGINT NOT NULL,"
        " estado ENUM('pendiente','procesando','enviado','error') NOT NULL)"
    )
    sql.execute("SET SESSION sql_mode = 'STRICT_ALL_TABLES'")  # MySQL 8's default: stored with it
    sql.execute(
        "CREATE TRIGGER cola_envios_auditoria AFTER UPDATE ON cola_envios FOR EACH ROW"
        " INSERT INTO cola_envios_log (cola_id, estado) VALUES (NEW.id, NEW.estado)"
    )
    session = sql.add_session()
    dropped, *fine = sql.add_rows(session, 6)
    fake_api.script(dropped, Step.drop())  # the outcome is unknown: desconocido, which it refuses
    # two rows a dead daemon left claimed, their leases long expired
    sql.execute(
        "UPDATE cola_envios SET estado = 'procesando', lease_token = REPEAT('d', 32),"
        " claimed_at = UTC_TIMESTAMP(6) - INTERVAL 1 HOUR,"
        " lease_expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 HOUR"
        " WHERE telefono IN (%s, %s)",
        (fine[3], fine[4]),
    )
    run = WorkerProcess(worker_env(), "run", "--once", logs=tmp_path)
    assert run.wait(timeout=60) == 0, run.stderr[-2000:]
    rows = {r["telefono"]: r for r in sql.rows("SELECT telefono, estado, last_error FROM cola_envios")}
    assert {p: rows[p]["estado"] for p in fine[:3]} == dict.fromkeys(fine[:3], "enviado")
    for phone in (dropped, fine[3], fine[4]):  # kept as they were, with the reason, never re-sent
        assert rows[phone]["estado"] == "procesando", rows[phone]
        assert "kept procesando, never re-sent" in rows[phone]["last_error"]
        assert (
            "desconocido refused" in rows[phone]["last_error"] or "desconocido" in rows[phone]["last_error"]
        )
    refused = [e for e in run.events() if e["event"] in ("row_state_refused", "result_refused")]
    assert {e["job_id"] for e in refused} >= set(
        sql.value("SELECT id FROM cola_envios WHERE telefono = %s", (p,)) for p in (fine[3], fine[4])
    )
    again = WorkerProcess(worker_env(), "run", "--once", logs=tmp_path)
    assert again.wait(timeout=60) == 0, again.stderr[-2000:]
    assert fake_api.counts() == dict.fromkeys([dropped, *fine[:3]], 1)
