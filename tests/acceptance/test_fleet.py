"""Several daemons on one number: the rate limit is shared through the daemons table."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from tests.acceptance.processes import WorkerProcess
from tests.conftest import SQL, eventually
from tests.fakeapi import FakeCloudAPI

LIMIT = 20


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
