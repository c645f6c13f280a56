"""`status` as an operator reads it: the daemons and any pause first, then honest per-session
figures (rate over the span actually covered, ETA, cancelled rows apart, webhook counts), as text,
as JSON, and refreshed by `--watch`."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.env import WORKER_BIN, base_env, eventually, run_worker
from tests.support.fakeapi import FakeCloudAPI, Step
from tests.support.processes import WorkerProcess
from tests.support.sql import SQL
from tests.support.terminal import Terminal
from worker import __version__
from worker.config import DatabaseURL
from worker.models import CANCELLED_REASON
from worker.store.claims import OPTED_OUT_REASON, UNDELIVERABLE_REASON

REASON = "code 190: Error validating access token"


def status_json(db_url: DatabaseURL, *args: str) -> dict[str, Any]:
    result = run_worker(db_url, "status", "--json", *args)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def live_row(report: dict[str, Any], daemon: WorkerProcess) -> dict[str, Any] | None:
    """The daemon's row in `status --json`, while it is live (its worker id: host:pid:instance)."""
    me = f"{socket.gethostname()}:{daemon.pid}:"
    mine = [d for d in report["daemons"] if d["worker_id"].startswith(me) and d["live"]]
    return mine[0] if mine else None


def status_line(db_url: DatabaseURL, daemon: WorkerProcess) -> str:
    """The daemon's line in `status`."""
    text = run_worker(db_url, "status").stdout
    return next(line for line in text.splitlines() if f" {daemon.pid} " in line)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """`whatsapp-worker ARGS` in the background; killed at the end if a failed test left it."""
    started: list[WorkerProcess] = []

    def launch(env: dict[str, str], *args: str) -> WorkerProcess:
        started.append(WorkerProcess(env, *args, logs=tmp_path))
        return started[-1]

    yield launch
    for process in started:
        if process.alive():
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)


def add_daemon(sql: SQL, worker_id: str, *, beat_ago: float, **columns: Any) -> None:
    """A row as a daemon writes it; times are relative to the database's UTC clock."""
    host, pid = worker_id.split(":")
    values = {"state": "sending", "in_flight": 0, "sent_total": 0, "rate": 0.0, "rate_share": 0.0, **columns}
    names = ", ".join(values)
    sql.execute(
        "INSERT INTO whatsapp_worker_daemons (worker_id, host, pid, version, started_at, beat_at,"
        f" {names}) VALUES (%s, %s, %s, '0.3.0', UTC_TIMESTAMP(6) - INTERVAL 1 HOUR,"
        f" UTC_TIMESTAMP(6) - INTERVAL %s MICROSECOND, {', '.join(['%s'] * len(values))})",
        (worker_id, host, int(pid), int(beat_ago * 1e6), *values.values()),
    )


def mark_sent(sql: SQL, session: int, count: int, *, seconds_ago: float, spread: float) -> None:
    """`count` waiting rows of `session` sent evenly over `spread` seconds, the last
    `seconds_ago` seconds ago, each with its delivery row, as the result writer leaves them."""
    ids = [
        r["id"]
        for r in sql.rows(
            "SELECT id FROM cola_envios WHERE sesion_id = %s AND estado = 'pendiente' ORDER BY id LIMIT %s",
            (session, count),
        )
    ]
    for i, row_id in enumerate(ids):
        ago_us = int((seconds_ago + spread * (len(ids) - 1 - i) / max(1, len(ids) - 1)) * 1e6)
        sql.execute(
            "UPDATE cola_envios SET estado = 'enviado', attempts = 1, wamid = CONCAT('wamid.', id),"
            " sent_at = UTC_TIMESTAMP(6) - INTERVAL %s MICROSECOND WHERE id = %s",
            (ago_us, row_id),
        )
        sql.execute(
            "INSERT INTO envios_whatsapp (cola_id, sesion_id, cliente_id, telefono, wamid, fecha_envio)"
            " SELECT id, sesion_id, cliente_id, telefono, wamid, NOW() - INTERVAL %s MICROSECOND"
            " FROM cola_envios WHERE id = %s",
            (ago_us, row_id),
        )


def test_status_shows_the_daemons_and_a_sending_pause_first(sql: SQL, db_url: DatabaseURL) -> None:
    session = sql.add_session("noviembre")
    sql.add_rows(session, 3)
    quiet = run_worker(db_url, "status")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.startswith("daemons: none seen in the last 10 minutes: nothing is sending")

    add_daemon(
        sql,
        "web1:4242",
        beat_ago=0.3,
        state="paused",
        sent_total=1200,
        rate=12.5,
        rate_share=40.0,
        paused_reason=REASON,
    )
    sql.execute(
        "UPDATE whatsapp_worker_daemons SET paused_since = UTC_TIMESTAMP(6) - INTERVAL 192 SECOND,"
        " paused_until = UTC_TIMESTAMP(6) + INTERVAL 48 SECOND WHERE worker_id = 'web1:4242'"
    )
    add_daemon(sql, "web2:977", beat_ago=41, state="sending", in_flight=32, rate=80.0, rate_share=40.0)
    add_daemon(sql, "web3:12", beat_ago=242, state="stopped")
    sql.execute("UPDATE whatsapp_worker_daemons SET stopped_at = beat_at WHERE worker_id = 'web3:12'")
    add_daemon(sql, "web4:1", beat_ago=3 * 3600, state="sending")  # long gone: not shown

    text = run_worker(db_url, "status").stdout
    lines = text.splitlines()
    assert lines[0].startswith("PAUSED since ") and lines[0].endswith(f"{REASON}  [web1:4242]")
    assert "(3m1" in lines[0] and "probe in 4" in lines[0]  # 3m12s ago, probe in ~48s
    assert lines[1] == "daemons: 1 live of 3 seen, 12.5 sent/s together"
    header, *table = lines[2:6]
    assert header.split() == [
        *("host", "pid", "version", "started", "(UTC)", "beat", "state"),
        *("in", "flight", "sent/s", "share/s"),
    ]
    rows = {cells[0]: cells for cells in (line.split() for line in table)}
    assert rows["web1"][1:3] == ["4242", "0.3.0"] and rows["web1"][6:] == ["paused", "0", "12.5", "40.0"]
    assert rows["web2"][5][:2] == "4" + rows["web2"][5][1] and rows["web2"][5].endswith("s")
    assert rows["web2"][6:] == ["DEAD", "-", "-", "-"]  # silent for 41 s: its last state is not shown
    assert rows["web3"][5].startswith("4m0") and rows["web3"][6:] == ["STOPPED", "-", "-", "-"]
    assert "web4" not in text
    assert text.index("PAUSED") < text.index("daemons:") < text.index("#1 noviembre")

    report = status_json(db_url)
    conditions = {d["worker_id"]: d["condition"] for d in report["daemons"]}
    assert conditions == {"web1:4242": "live", "web2:977": "dead", "web3:12": "stopped"}
    live = next(d for d in report["daemons"] if d["live"])
    assert live["host"] == "web1" and live["pid"] == 4242 and live["version"] == "0.3.0"
    assert live["rate_share"] == 40.0 and live["sent_total"] == 1200 and live["beat_age"] < 5
    (pause,) = report["pauses"]
    assert pause["reason"] == REASON and pause["daemons"] == ["web1:4242"]
    assert 190 <= pause["since_seconds"] < 200 and 40 < pause["until_seconds"] <= 48
    assert pause["since"].startswith(str(live["paused_since"])[:19])


def test_rate_is_measured_over_the_span_covered_and_gives_an_eta(sql: SQL, db_url: DatabaseURL) -> None:
    session = sql.add_session("arranque")
    sql.add_rows(session, 1000)
    mark_sent(sql, session, 100, seconds_ago=300, spread=10)  # long ago: outside the window
    mark_sent(sql, session, 400, seconds_ago=0, spread=4)  # the run started 4 s ago

    (report,) = status_json(db_url)["sessions"]
    # 400 sends over ~4 s (plus the time this command took to start): ~100/s, never 400/60
    assert 50 < report["rate"] <= 101, report
    assert report["sent_last_minute"] == 400 and 4 <= report["rate_window"] < 8
    assert report["waiting"] == 500 and report["phase"] == "sending"
    assert abs(report["eta_seconds"] - 500 / report["rate"]) < 0.2
    assert (report["sent"], report["done"], report["total"]) == (500, 500, 1000)

    text = run_worker(db_url, "status", "--session", "arranque").stdout
    head = next(line for line in text.splitlines() if line.startswith("#"))
    assert head.startswith(f"#{session} arranque  sending  [500/1,000] 50%  ")
    assert " sent/s (last " in head and "  ETA " in head


def test_cancelled_rows_are_counted_apart_from_errors(
    sql: SQL, db_url: DatabaseURL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]]
) -> None:
    session = sql.add_session("promo")
    sql.add_rows(session, 10)
    mark_sent(sql, session, 3, seconds_ago=120, spread=1)
    sql.execute(
        "UPDATE cola_envios SET estado = 'error', last_error_code = 131026, last_error = 'undeliverable'"
        " WHERE sesion_id = %s AND estado = 'pendiente' ORDER BY id LIMIT 1",
        (session,),
    )
    cancel = run_worker(db_url, "cancel", "--session", "promo")
    assert cancel.returncode == 0, cancel.stderr
    # a producer adds rows after the cancel: the daemon's sweep closes them the same way
    sql.add_rows(session, 2, start=100)
    run = run_worker(db_url, "run", "--once", env=worker_env())
    assert run.returncode == 0, run.stderr
    assert fake_api.requests == [] and sql.states() == {"enviado": 3, "error": 9}

    (report,) = status_json(db_url, "--session", str(session))["sessions"]
    assert report["phase"] == "cancelled" and report["state"] == "cancelada"
    assert (report["cancelled"], report["failed"], report["sent"], report["total"]) == (8, 1, 3, 12)
    assert [(e["code"], e["count"]) for e in report["errors"]] == [(131026, 1)]
    assert report["eta_seconds"] is None

    text = run_worker(db_url, "status", "--session", "promo").stdout
    head = next(line for line in text.splitlines() if line.startswith("#"))
    assert head.startswith(f"#{session} promo  CANCELLED  [3 sent, 8 cancelled (not sent) of 12]")
    assert "%" not in head
    assert "enviado 3  error 1  cancelled 8  desconocido 0  pendiente 0" in text
    assert "code 131026 x1: undeliverable" in text and "cancelled by the operator" not in text


def test_a_sessions_shown_state_matches_its_rows(sql: SQL, db_url: DatabaseURL) -> None:
    waiting = sql.add_session("marked-done-but-waiting")
    sql.add_rows(waiting, 3)
    unknown = sql.add_session("shutdown-timed-out")
    sql.add_rows(unknown, 3, start=10)
    failed = sql.add_session("all-rejected")
    sql.add_rows(failed, 2, start=20)
    done = sql.add_session("done")
    sql.add_rows(done, 2, start=30)
    sql.execute("UPDATE sesiones_envio SET estado = 'completada'")
    sql.execute(
        "UPDATE cola_envios SET estado = 'desconocido', last_error = 'cancelled by the drain timeout'"
        " WHERE sesion_id = %s",
        (unknown,),
    )
    sql.execute(
        "UPDATE cola_envios SET estado = 'error', last_error_code = 131026, last_error = 'undeliverable'"
        " WHERE sesion_id = %s",
        (failed,),
    )
    mark_sent(sql, done, 2, seconds_ago=600, spread=1)

    phases = {s["name"]: s["phase"] for s in status_json(db_url, "--all")["sessions"]}
    assert phases == {
        "marked-done-but-waiting": "waiting",
        "shutdown-timed-out": "unresolved",
        "all-rejected": "failed",
        "done": "completed",
    }
    shown = run_worker(db_url, "status", "--all").stdout.splitlines()
    heads = [line for line in shown if line.startswith("#")]
    assert heads[0].startswith(f"#{waiting} marked-done-but-waiting  waiting  [0/3] 0%")
    assert heads[1].startswith(f"#{unknown} shutdown-timed-out  finished, 3 unknown outcome(s) to resolve")
    assert heads[2].startswith(f"#{failed} all-rejected  finished, nothing sent  [2/2] 100%")
    assert heads[3] == f"#{done} done  completed  [2/2] 100%"  # no rate once nothing waits
    assert not any("completed" in head for head in heads[:3])


def test_status_counts_what_the_status_webhooks_recorded(sql: SQL, db_url: DatabaseURL) -> None:
    session = sql.add_session("entregas")
    sql.add_rows(session, 6)
    mark_sent(sql, session, 5, seconds_ago=120, spread=1)
    sql.execute(
        "UPDATE cola_envios SET delivered_at = UTC_TIMESTAMP(6) WHERE sesion_id = %s AND estado = 'enviado'"
        " ORDER BY id LIMIT 4",
        (session,),
    )
    sql.execute("UPDATE cola_envios SET read_at = UTC_TIMESTAMP(6) WHERE delivered_at IS NOT NULL LIMIT 2")
    # an unknown outcome a webhook settled: delivered after all
    sql.execute(
        "UPDATE cola_envios SET settled_at = UTC_TIMESTAMP(6)"
        " WHERE estado = 'enviado' ORDER BY id DESC LIMIT 1"
    )

    (report,) = status_json(db_url, "--session", "entregas")["sessions"]
    assert (report["delivered"], report["read"], report["settled"]) == (4, 2, 1)
    text = run_worker(db_url, "status", "--session", "entregas").stdout
    assert "    delivered 4 (80%)  read 2 (40%)  settled by webhooks 1" in text
    # the overview of every session leaves out what would read each sent row
    (overview,) = status_json(db_url)["sessions"]
    assert overview["delivered"] is None and overview["sent"] == 5
    assert "delivered" not in run_worker(db_url, "status").stdout


def test_watch_prints_a_new_block_each_interval_until_ctrl_c(
    sql: SQL, db_url: DatabaseURL, start: Callable[..., WorkerProcess]
) -> None:
    session = sql.add_session("vigilada")
    sql.add_rows(session, 3)
    watcher = start(base_env(db_url), "status", "--watch", "0.2")
    assert eventually(lambda: watcher.stdout.count("--- whatsapp-worker status") >= 2, 20), watcher.stderr
    sql.add_rows(session, 2, start=10)  # the next block shows it
    assert eventually(lambda: "[0/5] 0%" in watcher.stdout, 20), watcher.stdout[-2000:]
    assert "[0/3] 0%" in watcher.stdout and "\x1b[" not in watcher.stdout  # not a terminal: no redraw
    watcher.send_signal(signal.SIGINT)
    assert watcher.wait(timeout=20) == 0, watcher.stderr
    assert "Traceback" not in watcher.stderr


def test_watch_redraws_in_place_on_a_terminal(sql: SQL, db_url: DatabaseURL, tmp_path: Path) -> None:
    session = sql.add_session("en-pantalla")
    sql.add_rows(session, 3)
    leader, follower = pty.openpty()
    errors = tmp_path / "watch.err"
    with errors.open("w") as err:
        watcher = subprocess.Popen(
            [*WORKER_BIN, "status", "--watch", "0.2"],
            env=base_env(db_url),
            stdin=follower,
            stdout=follower,
            stderr=err,
        )
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 20
    try:
        while seen.count(b"\x1b[H\x1b[2J") < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                seen += os.read(leader, 65536)
        frames = seen.split(b"\x1b[H\x1b[2J")[1:]
        assert len(frames) >= 3, seen[-2000:]
        assert all(b"#1 en-pantalla  waiting  [0/3] 0%" in frame for frame in frames[:2])
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=20) == 0
        assert "Traceback" not in errors.read_text()
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        os.close(leader)


def test_a_running_daemon_is_shown_live_then_stopped(
    sql: SQL,
    db_url: DatabaseURL,
    fake_api: FakeCloudAPI,
    worker_env: Callable[..., dict[str, str]],
    start: Callable[..., WorkerProcess],
) -> None:
    session = sql.add_session("en-vivo")
    sql.add_rows(session, 300)
    fake_api.latency = 0.5
    env = worker_env(WORKER_CONCURRENCY="4", WORKER_RATE_LIMIT="40")
    daemon = start(env, "run")
    me = f"{socket.gethostname()}:{daemon.pid}:"  # and an instance id: unique per process start

    def sending() -> dict[str, Any] | None:
        report = status_json(db_url)
        (progress,) = report["sessions"]
        mine = live_row(report, daemon)
        if mine and mine["state"] == "sending" and mine["in_flight"] and progress["rate"] > 0:
            return report
        return None

    assert eventually(lambda: sending() is not None, 40), daemon.stderr[-2000:]
    report = sending()
    assert report is not None
    (row,) = [d for d in report["daemons"] if d["worker_id"].startswith(me)]
    assert row["host"] == socket.gethostname() and row["version"] == __version__
    assert 0 < row["in_flight"] <= 4 and 0 < row["rate_share"] <= 40 and row["beat_age"] < 5
    assert report["pauses"] == []
    (progress,) = report["sessions"]
    assert progress["phase"] == "sending" and progress["eta_seconds"] > 0

    text = run_worker(db_url, "status").stdout
    line = next(line for line in text.splitlines() if f" {daemon.pid} " in line)
    assert line.split()[0] == socket.gethostname() and " sending " in line
    assert text.startswith("daemons: 1 live of 1 seen")

    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0, daemon.stderr[-2000:]
    (row,) = status_json(db_url)["daemons"]
    assert row["condition"] == "stopped" and not row["live"]
    after = run_worker(db_url, "status").stdout
    assert after.startswith("daemons: 0 live of 1 seen") and " STOPPED " in after


def test_a_real_sending_pause_comes_first(
    sql: SQL,
    db_url: DatabaseURL,
    fake_api: FakeCloudAPI,
    worker_env: Callable[..., dict[str, str]],
    start: Callable[..., WorkerProcess],
) -> None:
    session = sql.add_session("sin-token")
    sql.add_rows(session, 5)
    env = worker_env(WHATSAPP_ACCESS_TOKEN="expired-token", WORKER_PAUSE_SECONDS="600")
    daemon = start(env, "run")
    me = f"{socket.gethostname()}:{daemon.pid}:"  # and an instance id

    assert eventually(lambda: run_worker(db_url, "status").stdout.startswith("PAUSED since "), 40), (
        daemon.stderr[-2000:]
    )
    first = run_worker(db_url, "status").stdout.splitlines()[0]
    assert ": code 190" in first and f"[{me}" in first and first.endswith("]") and "probe in " in first
    report = status_json(db_url)
    (pause,) = report["pauses"]
    assert "code 190" in pause["reason"] and len(pause["daemons"]) == 1 and pause["daemons"][0].startswith(me)
    assert 500 < pause["until_seconds"] <= 600 and pause["since_seconds"] >= 0
    (row,) = report["daemons"]
    assert row["live"] and row["state"] == "paused"

    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
    assert status_json(db_url)["pauses"] == []  # a stopped daemon's pause is over
    assert sql.states() == {"pendiente": 5}


def session_figures(report: dict[str, Any]) -> dict[str, Any]:
    """What an operator reads of a session, less what moves with the clock or says what was pruned."""
    moving = {"rate", "rate_window", "sent_last_minute", "eta_seconds", "pruned"}
    return {key: value for key, value in report.items() if key not in moving}


def test_a_sessions_totals_are_the_same_before_and_after_prune(sql: SQL, db_url: DatabaseURL) -> None:
    session = sql.add_session("campana-40")
    sql.add_rows(session, 40)
    mark_sent(sql, session, 30, seconds_ago=120, spread=1)
    old = "updated_at = NOW(6) - INTERVAL 40 DAY"
    sql.execute(f"UPDATE cola_envios SET delivered_at = UTC_TIMESTAMP(6), {old} WHERE estado = 'enviado'")
    sql.execute(
        "UPDATE cola_envios SET read_at = delivered_at, updated_at = updated_at WHERE estado = 'enviado'"
        " ORDER BY id LIMIT 12"
    )
    closing = [
        ("error", 131026, "Message undeliverable", 3),
        ("error", None, OPTED_OUT_REASON, 2),
        ("error", 131026, UNDELIVERABLE_REASON, 1),
        ("error", None, CANCELLED_REASON, 1),
        ("desconocido", None, "timeout after the request was sent", 1),
    ]
    for state, code, reason, count in closing:
        sql.execute(
            f"UPDATE cola_envios SET estado = %s, last_error_code = %s, last_error = %s, {old}"
            " WHERE sesion_id = %s AND estado = 'pendiente' ORDER BY id LIMIT %s",
            (state, code, reason, session, count),
        )

    def figures() -> tuple[dict[str, Any], list[str]]:
        (report,) = status_json(db_url, "--session", "campana-40")["sessions"]
        text = run_worker(db_url, "status", "--session", "campana-40").stdout
        return report, [
            line for line in text.splitlines() if line.startswith(("#", "    delivered", "    error"))
        ]

    before, lines_before = figures()
    assert (before["total"], before["done"], before["sent"], before["failed"]) == (40, 38, 30, 3)
    assert (before["opted_out"], before["suppressed"], before["cancelled"]) == (2, 1, 1)
    assert (before["delivered"], before["read"]) == (30, 12) and before["pruned"] == 0
    pruned = run_worker(db_url, "prune", "--older-than", "30d", "--yes")
    assert "deleted 37 finished row(s)" in pruned.stdout, pruned.stdout + pruned.stderr
    assert sql.value("SELECT COUNT(*) FROM cola_envios") == 3  # the unknown one and two waiting

    after, lines_after = figures()
    assert after["pruned"] == 37
    assert session_figures(after) == session_figures(before)
    assert lines_after == lines_before
    assert lines_after[0].startswith(f"#{session} campana-40  waiting  [38/40] 95%")
    assert "    error code 131026 x3: Message undeliverable" in lines_after
    # the overview of every session tells the same story
    (overview,) = status_json(db_url)["sessions"]
    assert (overview["total"], overview["sent"], overview["failed"], overview["opted_out"]) == (40, 30, 3, 2)


def test_status_shows_the_active_sessions_and_all_of_them_with_all(sql: SQL, db_url: DatabaseURL) -> None:
    sending = sql.add_session("en-curso")
    sql.add_rows(sending, 3)
    done = sql.add_session("terminada")
    sql.add_rows(done, 2, start=10)
    mark_sent(sql, done, 2, seconds_ago=600, spread=1)
    cancelled = sql.add_session("anulada")
    sql.add_rows(cancelled, 2, start=20)
    assert run_worker(db_url, "cancel", "--session", "anulada").returncode == 0
    doubtful = sql.add_session("dudosa")
    sql.add_rows(doubtful, 2, start=30)
    mark_sent(sql, doubtful, 1, seconds_ago=600, spread=1)
    sql.execute(
        "UPDATE cola_envios SET estado = 'desconocido', last_error = 'timeout' WHERE sesion_id = %s"
        " AND estado = 'pendiente'",
        (doubtful,),
    )
    sql.execute("UPDATE sesiones_envio SET estado = 'completada' WHERE id IN %s", ((done, doubtful),))

    text = run_worker(db_url, "status").stdout
    heads = [line.split("  ")[0] for line in text.splitlines() if line.startswith("#")]
    assert heads == [f"#{sending} en-curso", f"#{doubtful} dudosa"]  # unknown outcomes need a person
    assert text.rstrip().endswith("2 finished session(s) not shown (status --all shows them)")
    assert [s["name"] for s in status_json(db_url)["sessions"]] == ["en-curso", "dudosa"]

    everything = run_worker(db_url, "status", "--all").stdout
    heads = [line.split("  ")[0] for line in everything.splitlines() if line.startswith("#")]
    assert heads == [
        f"#{sending} en-curso",
        f"#{done} terminada",
        f"#{cancelled} anulada",
        f"#{doubtful} dudosa",
    ]
    assert "not shown" not in everything
    one = run_worker(db_url, "status", "--session", "terminada").stdout
    assert f"#{done} terminada  completed  [2/2] 100%" in one


def test_a_scheduled_session_says_when_it_starts(sql: SQL, db_url: DatabaseURL, tmp_path: Path) -> None:
    csv = tmp_path / "navidad.csv"
    csv.write_text("phone\n+51987000001\n+51987000002\n")
    queued = run_worker(
        db_url, "enqueue", "--session", "navidad", "--text", "feliz navidad", "--csv", str(csv),
        "--at", "2031-12-24 09:00", "--timezone", "UTC",
    )  # fmt: skip
    assert queued.returncode == 0, queued.stderr
    backoff = sql.add_session("reintentos")
    sql.add_rows(backoff, 2, start=10)
    mark_sent(sql, backoff, 1, seconds_ago=300, spread=1)
    sql.execute(
        "UPDATE cola_envios SET next_attempt_at = '2031-01-02 03:04:05', attempts = 1 WHERE sesion_id = %s"
        " AND estado = 'pendiente'",
        (backoff,),
    )

    heads = [line for line in run_worker(db_url, "status").stdout.splitlines() if line.startswith("#")]
    assert heads[0].endswith("navidad  scheduled, starts 2031-12-24 09:00 UTC  [0/2] 0%")  # no rate
    assert heads[1].endswith("reintentos  waiting, next row due 2031-01-02 03:04 UTC  [1/2] 50%")
    scheduled = {s["name"]: s for s in status_json(db_url)["sessions"]}
    assert scheduled["navidad"]["phase"] == "scheduled"
    assert scheduled["navidad"]["next_due"].startswith("2031-12-24T09:00:00")
    assert scheduled["reintentos"]["phase"] == "waiting"


def test_opted_out_and_suppressed_rows_are_counted_apart_from_errors(
    sql: SQL, db_url: DatabaseURL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]]
) -> None:
    first = sql.add_session("marzo")
    phones = sql.add_rows(first, 3)
    fake_api.script(phones[0], Step.error(131050, details="User stopped marketing messages."))
    fake_api.script(phones[1], Step.error(131026, details="Message undeliverable."))
    assert run_worker(db_url, "run", "--once", env=worker_env()).returncode == 0
    second = sql.add_session("abril")
    sql.add_rows(second, 3)  # the same phones: one opted out, one undeliverable from this number
    assert run_worker(db_url, "run", "--once", env=worker_env()).returncode == 0
    assert sql.states() == {"enviado": 2, "error": 4}

    sessions = {s["name"]: s for s in status_json(db_url, "--all")["sessions"]}
    figures = {
        name: (s["sent"], s["failed"], s["opted_out"], s["suppressed"]) for name, s in sessions.items()
    }
    assert figures == {"marzo": (1, 1, 1, 0), "abril": (1, 0, 1, 1)}
    assert [(e["code"], e["count"]) for e in sessions["marzo"]["errors"]] == [(131026, 1)]
    assert sessions["abril"]["errors"] == [] and sessions["abril"]["phase"] == "completed"
    text = run_worker(db_url, "status", "--all").stdout
    assert (
        "    enviado 1  error 0  opted out 1  suppressed 1  desconocido 0  pendiente 0  procesando 0" in text
    )
    assert "    enviado 1  error 1  opted out 1  desconocido 0" in text


def test_a_daemon_the_rate_limit_holds_back_shows_throttled(
    sql: SQL,
    db_url: DatabaseURL,
    fake_api: FakeCloudAPI,
    worker_env: Callable[..., dict[str, str]],
    start: Callable[..., WorkerProcess],
) -> None:
    session = sql.add_session("despacio")
    sql.add_rows(session, 26)
    daemon = start(worker_env(WORKER_RATE_LIMIT="1"), "run")

    def held_back() -> bool:
        mine = live_row(status_json(db_url), daemon)
        return mine is not None and mine["state"] == "throttled" and mine["sent_total"] >= 1

    assert eventually(held_back, 40), daemon.stderr[-2000:]
    assert " throttled " in status_line(db_url, daemon)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0, daemon.stderr[-2000:]


def test_a_daemon_under_pause_all_shows_held_and_says_so_in_its_log(
    sql: SQL,
    db_url: DatabaseURL,
    fake_api: FakeCloudAPI,
    worker_env: Callable[..., dict[str, str]],
    start: Callable[..., WorkerProcess],
) -> None:
    session = sql.add_session("en-espera")
    sql.add_rows(session, 3)
    assert run_worker(db_url, "pause", "--all", "--reason", "audit").returncode == 0
    daemon = start(worker_env(), "run")

    def state() -> str | None:
        mine = live_row(status_json(db_url), daemon)
        return mine["state"] if mine else None

    assert eventually(lambda: state() == "held", 30), daemon.stderr[-2000:]
    assert " held " in status_line(db_url, daemon) and fake_api.requests == []
    assert run_worker(db_url, "resume", "--all").returncode == 0
    assert fake_api.wait_for_requests(3, timeout=30)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0, daemon.stderr[-2000:]
    events = [e["event"] for e in daemon.events()]
    assert events.index("sending_held") < events.index("sending_released") < events.index("message_sent")


CLEAR = "\x1b[H\x1b[2J"


def test_watch_keeps_the_pauses_and_daemons_on_a_small_terminal_and_cuts_the_sessions(
    sql: SQL, db_url: DatabaseURL
) -> None:
    for n in range(30):
        sql.add_rows(sql.add_session(f"campana-{n:02d}"), 3, start=10 * n)
    add_daemon(sql, "web1:4242", beat_ago=0.3, state="paused", paused_reason=REASON)
    add_daemon(sql, "web2:977", beat_ago=0.5, state="throttled", rate=0.5, rate_share=0.5)

    with Terminal([*WORKER_BIN, "status", "--watch", "0.2"], base_env(db_url), rows=24, columns=80) as screen:
        for _ in range(3):  # each frame starts by clearing the screen: two whole frames at least
            screen.read_until(CLEAR.encode())
        frames = screen.screen.decode().split(CLEAR)[1:-1]
    for frame in frames:
        lines = frame.split("\r\n")
        assert sum(max(1, -(-len(line) // 80)) for line in lines) <= 24, frame  # nothing scrolls away
        assert lines[0].startswith("whatsapp-worker status  ") and lines[1] == ""
        assert lines[2].startswith("PAUSED") and lines[2].endswith(f"{REASON}  [web1:4242]")
        assert lines[3] == "daemons: 2 live of 2 seen, 0.5 sent/s together"
        assert " throttled " in lines[6] or " throttled " in lines[5]
        shown = [line for line in lines if line.startswith("#")]
        assert shown and shown[0].startswith("#1 campana-00  waiting  [0/3] 0%")
        assert lines[-1] == f"+{30 - len(shown)} more session(s)"
