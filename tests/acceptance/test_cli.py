"""The installed command in subprocesses: real processes, signals, pidfiles and exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.env import WORKER_BIN, base_env, eventually, free_port, scrape
from tests.support.fakeapi import FakeCloudAPI, Step
from tests.support.processes import RUNBOOK, WorkerProcess
from tests.support.sql import SQL
from worker.config import DatabaseURL


def test_three_daemons_send_each_of_3000_rows_exactly_once(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    session = sql.add_session("three-hosts")
    phones = sql.add_rows(session, 3000)
    fake_api.latency = 0.01

    daemons = [
        WorkerProcess(
            worker_env(WORKER_PIDFILE=str(tmp_path / f"host{i}.pid"), WORKER_CONCURRENCY="40"),
            "run",
            "--once",
            logs=tmp_path,
        )
        for i in range(3)
    ]
    codes = [d.wait(timeout=120) for d in daemons]

    assert codes == [0, 0, 0], [d.stderr[-2000:] for d in daemons]
    counts = fake_api.counts()
    assert sorted(counts) == sorted(phones) and set(counts.values()) == {1}
    assert sql.value("SELECT COUNT(*) FROM envios_whatsapp") == 3000
    assert sql.states() == {"enviado": 3000}
    assert sql.rows(RUNBOOK) == []
    # every daemon took part: the database claim, not the pidfile, kept them apart
    senders = [sum(1 for e in d.events() if e["event"] == "message_sent") for d in daemons]
    assert sum(senders) == 3000 and all(n > 0 for n in senders), senders


def test_second_run_on_the_same_pidfile_exits_zero_and_sends_nothing(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 20)
    fake_api.latency = 0.3
    env = worker_env(WORKER_CONCURRENCY="4")

    first, second = (WorkerProcess(env, "run", "--once", logs=tmp_path) for _ in range(2))
    assert fake_api.wait_for_requests(1)
    holder = (tmp_path / "worker.pid").read_text()

    assert first.wait(timeout=60) == 0 and second.wait(timeout=60) == 0
    refused = [p.pid for p in (first, second) if "another instance is already processing" in p.stdout]
    assert len(refused) == 1
    runner = ({first.pid, second.pid} - set(refused)).pop()
    pid, stamp = holder.strip().split(" - ")
    assert int(pid) == runner and time.strptime(stamp, "%Y-%m-%d %H:%M:%S")
    assert set(fake_api.counts().values()) == {1} and len(fake_api.counts()) == 20
    assert "test-token" not in "".join(p.stdout + p.stderr for p in (first, second))


def test_sigterm_drains_in_flight_sends_and_leaves_nothing_processing(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 100)
    fake_api.latency = 1.0
    daemon = WorkerProcess(
        worker_env(WORKER_CONCURRENCY="10", WORKER_DRAIN_TIMEOUT="10"), "run", logs=tmp_path
    )
    assert fake_api.wait_until(lambda: fake_api.in_flight == 10)

    sent_at = time.monotonic()
    daemon.send_signal(signal.SIGTERM)

    assert daemon.wait(timeout=20) == 0, daemon.stderr
    assert time.monotonic() - sent_at < 10
    states = sql.states()
    assert "procesando" not in states
    received = set(fake_api.counts())
    sent = {r["telefono"] for r in sql.rows("SELECT telefono FROM cola_envios WHERE estado = 'enviado'")}
    assert sent == received and len(received) >= 10
    assert states["pendiente"] == 100 - len(received)
    events = [e["event"] for e in daemon.events()]
    assert "stop_requested" in events and events[-1] == "stopped"


def test_missing_database_url_exits_78_naming_the_variable(worker_env: Callable[..., dict[str, str]]) -> None:
    env = worker_env()
    del env["WORKER_DATABASE_URL"]
    result = subprocess.run([*WORKER_BIN, "run"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    assert result.stderr.strip().splitlines() == [
        "whatsapp-worker: configuration error: WORKER_DATABASE_URL (or WORKER_DATABASE_URL_FILE) is not set"
    ]


def test_bad_value_exits_78_without_showing_secrets(worker_env: Callable[..., dict[str, str]]) -> None:
    env = worker_env(WORKER_CONCURRENCY="lots", WHATSAPP_ACCESS_TOKEN="EAAG-secret-token-123")
    result = subprocess.run([*WORKER_BIN, "run"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    assert "WORKER_CONCURRENCY" in result.stderr and "'lots'" in result.stderr
    assert "secret-token" not in result.stderr + result.stdout


def test_enqueue_rejects_a_bad_file_whole_then_imports_a_good_one_once(
    sql: SQL, db_url: DatabaseURL, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "phone,client_id,empresa,monto\n"
        "+51987000001,1,ACME,S/ 10\n"
        "987000002,2,Sin prefijo,S/ 20\n"
        "+51987000003,3,ACME\n"
        "+51987000004,x,ACME,S/ 40\n"
    )
    args = [
        "enqueue",
        "--session",
        "noviembre",
        "--template",
        "recordatorio_pago",
        "--language",
        "es",
        "--csv",
    ]
    result = subprocess.run(
        [*WORKER_BIN, *args, str(bad)], env=base_env(db_url), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 65
    assert "line 3: phone '987000002' is not in E.164 form" in result.stderr
    assert "line 4: expected 4 columns, found 3" in result.stderr
    assert "line 5: client_id 'x' is not a whole number" in result.stderr
    assert sql.value("SELECT COUNT(*) FROM cola_envios") == 0

    good = tmp_path / "good.csv"
    good.write_text("phone,client_id,empresa,monto\n+51987000001,1,ACME,S/ 10\n+51 987 000 002,2,B,S/ 20\n")
    runs = [
        subprocess.run(
            [*WORKER_BIN, *args, str(good)], env=base_env(db_url), capture_output=True, text=True, timeout=30
        )
        for _ in range(2)
    ]
    assert "queued 2 new message(s), 0 already queued" in runs[0].stdout
    assert "queued 0 new message(s), 2 already queued" in runs[1].stdout
    row = sql.rows("SELECT telefono, cliente_id, mensaje FROM cola_envios ORDER BY id")[1]
    assert row["telefono"] == "+51987000002" and row["cliente_id"] == 2
    params = json.loads(row["mensaje"])["template"]["components"][0]["parameters"]
    assert [p["text"] for p in params] == ["B", "S/ 20"]


def test_status_reports_counts_per_session(sql: SQL, db_url: DatabaseURL) -> None:
    session = sql.add_session("estado")
    sql.add_rows(session, 3)
    sql.execute(
        "UPDATE cola_envios SET estado = 'error', last_error_code = 131026,"
        " last_error = 'undeliverable' ORDER BY id LIMIT 1"
    )
    result = subprocess.run(
        [*WORKER_BIN, "status", "--json"], env=base_env(db_url), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    (report,) = json.loads(result.stdout)["sessions"]
    assert report["name"] == "estado" and report["total"] == 3
    assert report["counts"]["pendiente"] == 2 and report["counts"]["error"] == 1
    assert report["errors"][0]["code"] == 131026
    text = subprocess.run(
        [*WORKER_BIN, "status", "--session", str(session)],
        env=base_env(db_url),
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert "[1/3]" in text and "code 131026 x1" in text


def test_health_reports_whether_the_local_daemon_is_alive(
    worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    env = worker_env()
    # An operator's shell: where the pidfile is, and no database URL or token at all.
    local = {k: v for k, v in env.items() if not k.startswith(("WORKER_", "WHATSAPP_"))}
    local["WORKER_PIDFILE"] = env["WORKER_PIDFILE"]

    def health(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*WORKER_BIN, "health"], env={**local, **extra}, capture_output=True, text=True, timeout=30
        )

    before = health()
    assert (before.returncode, before.stderr) == (1, "")
    assert before.stdout == f"unhealthy: no daemon holds {env['WORKER_PIDFILE']}\n"
    daemon = WorkerProcess(env, "run", logs=tmp_path)
    assert eventually(lambda: (tmp_path / "worker.heartbeat").exists(), 20), daemon.stderr
    during = health()
    assert during.returncode == 0 and f"healthy: daemon {daemon.pid} - " in during.stdout
    # Secrets it could not read (root's, on a systemd host) do not matter: it never opens them.
    unreadable = health(
        WORKER_DATABASE_URL_FILE="/nonexistent/url", WHATSAPP_ACCESS_TOKEN_FILE="/nonexistent/t"
    )
    assert unreadable.returncode == 0 and "healthy: daemon" in unreadable.stdout
    if os.geteuid() == 0:  # another user, who may not look into the daemon's directory (0700)
        outsider = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *WORKER_BIN, "health"],
            env=local,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert outsider.returncode == 1 and "unknown: this user may not read" in outsider.stdout
        assert "no daemon holds" not in outsider.stdout
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
    assert health().returncode == 1


def test_run_once_max_caps_a_cron_run(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]]
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 120)
    env = worker_env(WORKER_CONCURRENCY="16")
    first = subprocess.run(
        [*WORKER_BIN, "run", "--once", "--max", "50"], env=env, capture_output=True, text=True, timeout=60
    )
    assert first.returncode == 0, first.stderr
    assert len(fake_api.requests) == 50 and sql.states() == {"enviado": 50, "pendiente": 70}
    subprocess.run([*WORKER_BIN, "run", "--once", "--max", "50"], env=env, capture_output=True, timeout=60)
    subprocess.run([*WORKER_BIN, "run", "--once", "--max", "50"], env=env, capture_output=True, timeout=60)
    assert sql.states() == {"enviado": 120} and set(fake_api.counts().values()) == {1}
    refused = subprocess.run(
        [*WORKER_BIN, "run", "--max", "5"], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "--max goes with --once" in refused.stderr


def test_error_events_reach_journald_at_error_priority(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    session = sql.add_session()
    rejected, _sent = sql.add_rows(session, 2)
    fake_api.script(rejected, Step.error(131026))
    journal = tmp_path / "journal"
    with journal.open("w") as stream:  # stands in for the socket systemd gives a service
        status = os.fstat(stream.fileno())
        env = worker_env(JOURNAL_STREAM=f"{status.st_dev}:{status.st_ino}")
        done = subprocess.run([*WORKER_BIN, "run", "--once"], env=env, stdout=stream, timeout=60)
    assert done.returncode == 0
    lines = journal.read_text().splitlines()
    priority = {json.loads(line[3:])["event"]: line[:3] for line in lines}
    assert priority["message_sent"] == "<6>" and priority["message_failed"] == "<3>"


def test_health_says_when_sending_is_paused(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    session = sql.add_session()
    sql.add_rows(session, 5)
    env = worker_env(WHATSAPP_ACCESS_TOKEN="expired-token", WORKER_PAUSE_SECONDS="600")
    daemon = WorkerProcess(env, "run", logs=tmp_path)

    def health() -> subprocess.CompletedProcess[str]:
        return subprocess.run([*WORKER_BIN, "health"], env=env, capture_output=True, text=True, timeout=30)

    assert eventually(lambda: "paused" in health().stdout, 20), daemon.stderr
    during = health()
    assert during.returncode == 0  # a pause is not a crash
    assert f"healthy (paused: number {fake_api.phone_number_id}: code 190" in during.stdout
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
    assert sql.states() == {"pendiente": 5}


def test_metrics_count_what_the_database_says_was_sent(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    session = sql.add_session()
    phones = sql.add_rows(session, 60)
    fake_api.script(phones[0], Step.error(131026))
    port = free_port()
    daemon = WorkerProcess(worker_env(WORKER_METRICS_PORT=str(port)), "run", logs=tmp_path)
    assert eventually(lambda: sql.states().get("pendiente", 0) == 0 and "procesando" not in sql.states(), 30)
    assert eventually(lambda: scrape(port).get('whatsapp_worker_messages_total{outcome="sent"}') == 59, 10)
    metrics = scrape(port)
    sent = sql.value("SELECT COUNT(*) FROM cola_envios WHERE estado = 'enviado'")
    assert metrics['whatsapp_worker_messages_total{outcome="sent"}'] == sent == 59
    assert metrics['whatsapp_worker_messages_total{outcome="error"}'] == 1
    assert metrics["whatsapp_worker_send_seconds_count"] == 60
    assert metrics["whatsapp_worker_queue_due"] == 0 and metrics["whatsapp_worker_in_flight"] == 0
    assert not any("+51" in name for name in metrics)  # no phone numbers in labels
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
