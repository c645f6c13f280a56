"""Several daemons on one number: the rate limit is shared through the daemons table."""

from __future__ import annotations

import os
import shlex
import signal
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.env import WORKER_BIN, eventually, free_port, scrape
from tests.support.fakeapi import FakeCloudAPI, Step
from tests.support.processes import WorkerProcess
from tests.support.sql import SQL, connect
from worker.config import DatabaseURL

LIMIT = 20
# Each daemon as pid 1 of a pid namespace of its own, with a host name of its own.
NAMESPACED = ["unshare", "--pid", "--uts", "--fork", "--kill-child=SIGTERM"]


def test_three_daemons_share_one_numbers_limit_even_when_one_is_killed_and_restarted(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    session = sql.add_session("shared-number")
    sql.add_rows(session, 240)
    fake_api.latency = 0.02

    def start(i: int) -> WorkerProcess:
        env = worker_env(
            WORKER_PIDFILE=str(tmp_path / f"host{i}.pid"),
            WORKER_RATE_LIMIT=str(LIMIT),
            WORKER_CONCURRENCY="8",
            WORKER_LEASE_SECONDS="3",
            WORKER_SEND_TIMEOUT="1",
        )
        return WorkerProcess(env, "run", logs=tmp_path)

    daemons = [start(i) for i in range(3)]
    try:
        assert fake_api.wait_for_requests(60, timeout=30)
        daemons[0].send_signal(signal.SIGKILL)  # dies without a word: its row goes stale
        daemons[0].wait(timeout=10)
        assert fake_api.wait_for_requests(120, timeout=30)
        daemons[0] = start(0)  # a newcomer joins mid-run
        assert eventually(
            lambda: sql.value("SELECT COUNT(*) FROM cola_envios WHERE estado = 'pendiente'") == 0, 60
        )
        assert eventually(
            lambda: sql.value("SELECT COUNT(*) FROM cola_envios WHERE estado = 'procesando'") == 0, 30
        )
    finally:
        for daemon in daemons:
            if daemon.alive():
                daemon.send_signal(signal.SIGTERM)
        codes = [daemon.wait(timeout=30) for daemon in daemons]
    assert codes == [0, 0, 0], [d.stderr[-2000:] for d in daemons]

    # the sum of all daemons' sends never went over the number's limit in any one-second window
    assert fake_api.busiest_second() <= LIMIT
    # and no phone got a message twice, with the killed daemon's unknowns left alone
    assert max(fake_api.counts().values()) == 1
    assert sql.states().keys() <= {"enviado", "desconocido"}
    # the fleet used the limit: well over half of it on average while sending
    times = sorted(r.at for r in fake_api.requests)
    assert len(times) / (times[-1] - times[0]) > LIMIT / 2


def test_a_database_stall_does_not_let_the_fleet_burst_over_the_limit_when_it_ends(
    sql: SQL,
    db_url: DatabaseURL,
    fake_api: FakeCloudAPI,
    worker_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    """Every daemon took its token, then waited on a claim the stall held: when it ends, those
    sends go at once, and the buckets, full again, must not add a burst of their own."""
    session = sql.add_session("stalled-number")
    sql.add_rows(session, 400)
    env = worker_env(WORKER_RATE_LIMIT=str(LIMIT), WORKER_CONCURRENCY="8", WORKER_FLEET_BEAT="0.3")
    daemons = [
        WorkerProcess({**env, "WORKER_PIDFILE": str(tmp_path / f"d{i}.pid")}, "run", logs=tmp_path)
        for i in range(3)
    ]
    locker = connect(db_url, db_url.database)
    try:
        for stall in range(4):
            assert fake_api.wait_for_requests(40 + 30 * stall, timeout=30)
            with locker.cursor() as cur:  # a backup or a migration holds the queue for a moment
                cur.execute("LOCK TABLES cola_envios WRITE")
            time.sleep(0.7)  # the stall itself, not a wait for something to happen
            with locker.cursor() as cur:
                cur.execute("UNLOCK TABLES")
        assert fake_api.wait_for_requests(180, timeout=30)
    finally:
        locker.close()
        for daemon in daemons:
            daemon.send_signal(signal.SIGTERM)
        codes = [daemon.wait(timeout=30) for daemon in daemons]
    assert codes == [0, 0, 0], [d.stderr[-2000:] for d in daemons]
    assert fake_api.busiest_second() <= LIMIT
    assert max(fake_api.counts().values()) == 1


def test_status_lists_running_daemons_and_their_share(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    env = worker_env(WORKER_RATE_LIMIT="40", WORKER_FLEET_BEAT="0.2")
    daemons = [
        WorkerProcess({**env, "WORKER_PIDFILE": str(tmp_path / f"d{i}.pid")}, "run", logs=tmp_path)
        for i in range(2)
    ]
    try:
        assert eventually(
            lambda: (
                sql.value(
                    "SELECT COUNT(*) FROM whatsapp_worker_daemons WHERE stopped_at IS NULL AND rate_share > 0"
                )
                == 2
            ),
            15,
        )
        shares = [r["rate_share"] for r in sql.rows("SELECT rate_share FROM whatsapp_worker_daemons")]
        assert all(0 < share < 20 for share in shares), shares  # each takes less than half of 40
    finally:
        for daemon in daemons:
            daemon.send_signal(signal.SIGTERM)
        assert [d.wait(timeout=30) for d in daemons] == [0, 0]
    rows = sql.rows("SELECT state, stopped_at FROM whatsapp_worker_daemons")
    assert len(rows) == 2 and all(r["state"] == "stopped" and r["stopped_at"] for r in rows)


def test_an_account_error_on_one_number_leaves_another_number_sending(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    other = "2222222222"
    fake_api.other_numbers[other] = "token-of-the-other-number"
    expired = sql.add_session("number-a")  # the daemon's own number, whose token Meta refuses
    sql.add_rows(expired, 5)
    fine = sql.add_session("number-b")
    sql.add_rows(fine, 30, start=100)
    sql.execute("UPDATE sesiones_envio SET phone_number_id = %s WHERE id = %s", (other, fine))
    env = worker_env(
        WHATSAPP_ACCESS_TOKEN="expired-token",
        **{f"WHATSAPP_ACCESS_TOKEN_{other}": "token-of-the-other-number"},
        WORKER_PAUSE_SECONDS="600",
        WORKER_CONCURRENCY="4",
        WORKER_METRICS_PORT=str(port := free_port()),
    )
    daemon = WorkerProcess(env, "run", logs=tmp_path)
    try:
        assert eventually(
            lambda: (
                sql.value(
                    "SELECT COUNT(*) FROM cola_envios WHERE sesion_id = %s AND estado = 'enviado'", (fine,)
                )
                == 30
            ),
            30,
        ), daemon.stderr[-2000:]
        # the pause gauge says which number is paused, so the alert can name it
        paused = {name: value for name, value in scrape(port).items() if "sending_paused" in name}
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, daemon.stderr[-2000:]
    code = next(e["code"] for e in daemon.events() if e["event"] == "sending_paused")
    assert paused == {
        f'whatsapp_worker_sending_paused{{phone_number_id="{fake_api.phone_number_id}",reason="{code}"}}': 1.0
    }
    # number A: paused after its first refusals, its rows untouched; number B sent everything
    rows = sql.rows("SELECT estado, attempts FROM cola_envios WHERE sesion_id = %s", (expired,))
    assert {(r["estado"], r["attempts"]) for r in rows} == {("pendiente", 0)}
    by_number = {
        n: sum(1 for r in fake_api.requests if r.number == n) for n in (fake_api.phone_number_id, other)
    }
    assert by_number[other] == 30 and 1 <= by_number[fake_api.phone_number_id] <= 4, by_number
    paused = [e for e in daemon.events() if e["event"] == "sending_paused"]
    assert paused and all(e["phone_number_id"] == fake_api.phone_number_id for e in paused)


def test_meta_saying_too_many_messages_lowers_the_rate_and_every_row_still_goes(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    session = sql.add_session("throttled")
    phones = sql.add_rows(session, 40)
    for phone in phones[:10]:
        fake_api.script(phone, Step.error(130429, details="Rate limit hit."))
    env = worker_env(
        WORKER_RATE_LIMIT="40", WORKER_FLEET_BEAT="0.2", WORKER_RETRY_BASE="0.2", WORKER_RETRY_CAP="1"
    )
    run = WorkerProcess(env, "run", "--once", logs=tmp_path)
    assert run.wait(timeout=60) == 0, run.stderr[-2000:]
    assert sql.states() == {"enviado": 40}
    lowered = [e for e in run.events() if e["event"] == "rate_lowered"]
    assert lowered and lowered[0]["phone_number_id"] == fake_api.phone_number_id
    assert lowered[0]["rate"] < 40 * 0.97 / 2 + 0.01  # halved (at most) at the first 130429


def test_two_daemons_with_the_same_host_name_and_pid_still_share_one_limit(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    """Containers with a fixed `hostname:` and `init: true`, Swarm templates, cloned VMs: each
    daemon runs as pid 1 of its own pid namespace on a host called the same."""
    session = sql.add_session("twins")
    sql.add_rows(session, 200)
    fake_api.latency = 0.02

    def twin(i: int) -> WorkerProcess:
        env = worker_env(
            WORKER_PIDFILE=str(tmp_path / f"twin{i}.pid"),
            WORKER_RATE_LIMIT=str(LIMIT),
            WORKER_FLEET_BEAT="0.2",
        )
        command = f"hostname twin-host && exec {shlex.join(WORKER_BIN)} run"
        return WorkerProcess(env, *NAMESPACED, "sh", "-c", command, logs=tmp_path, program=[])

    twins = [twin(0), twin(1)]
    try:
        assert eventually(
            lambda: (
                sql.value("SELECT COUNT(*) FROM cola_envios WHERE estado IN ('pendiente', 'procesando')") == 0
            ),
            60,
        )
    finally:
        for daemon in twins:  # unshare passes no signal on: the daemon is its child
            children = Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text().split()
            os.kill(int(children[0]), signal.SIGTERM)
        codes = [daemon.wait(timeout=30) for daemon in twins]
    assert codes == [0, 0], [d.stderr[-2000:] for d in twins]
    rows = sql.rows("SELECT worker_id, host, pid FROM whatsapp_worker_daemons")
    assert {(r["host"], r["pid"]) for r in rows} == {("twin-host", 1)} and len(rows) == 2, rows
    assert fake_api.busiest_second() <= LIMIT
    assert max(fake_api.counts().values()) == 1


def test_a_daemon_configured_differently_is_named_loudly_and_the_fleet_keeps_the_smallest_limit(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    session = sql.add_session("uneven")
    sql.add_rows(session, 240)
    fake_api.latency = 0.02
    settings = [{"WORKER_RATE_LIMIT": "40"}, {"WORKER_RATE_LIMIT": "80", "WORKER_FLEET_BEAT": "0.5"}]
    daemons = [
        WorkerProcess(worker_env(WORKER_PIDFILE=str(tmp_path / f"d{i}.pid"), **extra), "run", logs=tmp_path)
        for i, extra in enumerate(settings)
    ]
    try:
        assert eventually(
            lambda: (
                sql.value("SELECT COUNT(*) FROM cola_envios WHERE estado IN ('pendiente', 'procesando')") == 0
            ),
            60,
        )
    finally:
        for daemon in daemons:
            daemon.send_signal(signal.SIGTERM)
        codes = [daemon.wait(timeout=30) for daemon in daemons]
    assert codes == [0, 0], [d.stderr[-2000:] for d in daemons]
    assert fake_api.busiest_second() <= 40
    for daemon in daemons:
        differ = [e for e in daemon.events() if e["event"] == "fleet_settings_differ"]
        assert differ and differ[0]["level"] == "error", daemon.stdout[-2000:]
    named = next(e for e in daemons[0].events() if e["event"] == "fleet_settings_differ")["others"]
    assert list(named.values()) == [{"rate_limit": 80.0, "fleet_beat": 0.5}]
