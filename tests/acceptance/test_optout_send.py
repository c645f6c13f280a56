"""Opt-outs in the send path: Meta's 131050 records one, and an opted-out phone gets nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.support.fakeapi import FakeCloudAPI, Step
from tests.support.processes import WorkerProcess
from tests.support.sql import SQL


def test_a_131050_answer_records_an_opt_out_and_later_sessions_skip_the_phone(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    first = sql.add_session("march")
    phones = sql.add_rows(first, 3)
    fake_api.script(phones[0], Step.error(131050, details="User stopped marketing messages."))
    run = WorkerProcess(worker_env(), "run", "--once", logs=tmp_path)
    assert run.wait(timeout=60) == 0, run.stderr[-2000:]
    optouts = sql.rows("SELECT telefono, source FROM whatsapp_worker_optouts")
    assert optouts == [{"telefono": phones[0], "source": "131050"}]

    second = sql.add_session("april")
    sql.add_rows(second, 3)  # the same three phones
    run = WorkerProcess(worker_env(), "run", "--once", logs=tmp_path)
    assert run.wait(timeout=60) == 0, run.stderr[-2000:]
    assert fake_api.counts()[phones[0]] == 1  # only the first, refused, request
    row = sql.rows(
        "SELECT estado, last_error FROM cola_envios WHERE sesion_id = %s AND telefono = %s",
        (second, phones[0]),
    )[0]
    assert row["estado"] == "error" and "opted out" in row["last_error"]
    assert any(e["event"] == "opted_out_rows_closed" for e in run.events())
