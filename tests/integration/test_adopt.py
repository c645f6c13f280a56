"""Adopting the PHP application's own database: upgrade in place, lose nothing, send nothing twice.

Two PHP-era schemas of our own (tests/legacy/*.sql), each with rows in all four states and a
history holding the old bug's duplicates, go through `whatsapp-worker migrate` (the real
command, in a subprocess) and then through the daemon against the fake Cloud API.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from tests.support.env import ROOT, base_env, fake_api_env, run_worker
from tests.support.fakeapi import FakeCloudAPI
from tests.support.processes import RUNBOOK, WorkerProcess
from tests.support.sql import SQL, connect
from worker.config import DatabaseURL
from worker.store import Database, RowRefused, schema

LEGACY = ROOT / "tests" / "legacy"
# "FILE@ENGINE": that schema with every table on another engine (MyISAM: MySQL's default until
# 5.5, and what old PHP code names)
MYISAM = "php_latin1.sql@MyISAM"
SCHEMAS = ["php_latin1.sql", "php_utf8.sql", MYISAM]
TABLES = [t.name for t in schema.TABLES]
PHP_TABLES = TABLES[:3]  # the tables the PHP era has; the others are ours alone
OURS = {t.name: {c.name for c in t.columns} for t in schema.TABLES}
TEXT = '{"type":"text","text":{"body":"hola"}}'
_names = itertools.count()


class Legacy:
    """A database holding one PHP-era schema, and what the PHP application wrote into it."""

    def __init__(self, server: DatabaseURL, sql_file: str) -> None:
        self.name = f"ww_adopt_{os.getpid()}_{next(_names)}"
        self.url = server.with_database(self.name)
        self._server = server
        admin = connect(server)
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{self.name}`")
            cur.execute(f"CREATE DATABASE `{self.name}` CHARACTER SET utf8mb4")
        admin.close()
        self.conn = connect(self.url, self.name)
        with self.conn.cursor() as cur:
            # a non-strict PHP host: zero dates allowed, and for a value its ENUM does not
            # have it stores ''
            cur.execute("SET SESSION sql_mode = ''")
            file_name, _, engine = sql_file.partition("@")
            text = (LEGACY / file_name).read_text()
            for statement in _statements(
                text.replace("ENGINE=InnoDB", f"ENGINE={engine}") if engine else text
            ):
                cur.execute(statement)
            cur.execute(
                "INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje, estado)"
                " SELECT MAX(sesion_id), 999, '+10000000999', %s, 'enviando' FROM cola_envios",
                (TEXT,),
            )
        self.sql = SQL(self.url)
        self.sql.execute("SET SESSION sql_mode = ''")  # the PHP host's mode, for its zero dates
        self.php_columns = {t: self.columns(t) for t in TABLES}  # everything the PHP era has
        self.empty_estado_ids = [
            r["id"] for r in self.sql.rows("SELECT id FROM cola_envios WHERE estado = ''")
        ]
        assert len(self.empty_estado_ids) == 1

    def columns(self, table: str) -> list[str]:
        rows = self.sql.rows(
            "SELECT COLUMN_NAME AS name FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s"
            " AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
            (self.name, table),
        )
        return [r["name"] for r in rows]

    def dump(self) -> dict[str, list[dict[str, Any]]]:
        """Every row of every table, every column."""
        tables = [
            r["name"]
            for r in self.sql.rows(
                "SELECT TABLE_NAME AS name FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s"
                " ORDER BY TABLE_NAME",
                (self.name,),
            )
        ]
        return {t: self.sql.rows(f"SELECT * FROM {t} ORDER BY 1") for t in tables}

    def structure(self) -> dict[str, Any]:
        return structure(self.sql, self.name)

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return run_worker(self.url, *args, timeout=90, **env)

    def migrate(self) -> str:
        result = self.run("migrate")
        assert result.returncode == 0, result.stderr
        return result.stdout

    def close(self) -> None:
        self.sql.close()
        self.conn.close()
        admin = connect(self._server)
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{self.name}`")
        admin.close()


def _statements(text: str) -> list[str]:
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in body.split(";\n") if s.strip()]


def structure(sql: SQL, database: str) -> dict[str, Any]:
    """Columns and keys as information_schema reports them (aliased: key case differs)."""
    columns = sql.rows(
        "SELECT TABLE_NAME AS t, COLUMN_NAME AS c, COLUMN_TYPE AS type, IS_NULLABLE AS nullable,"
        " COLUMN_DEFAULT AS dflt, EXTRA AS extra, CHARACTER_SET_NAME AS cs"
        " FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s ORDER BY TABLE_NAME, ORDINAL_POSITION",
        (database,),
    )
    keys = sql.rows(
        "SELECT TABLE_NAME AS t, INDEX_NAME AS i, NON_UNIQUE AS non_unique, COLUMN_NAME AS c"
        " FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = %s ORDER BY TABLE_NAME, INDEX_NAME,"
        " SEQ_IN_INDEX",
        (database,),
    )
    out: dict[str, Any] = {"columns": {}, "keys": {}}
    for r in columns:
        out["columns"][(r["t"], r["c"])] = (r["type"], r["nullable"], r["dflt"], r["extra"].lower(), r["cs"])
    for r in keys:
        unique, cols = out["keys"].get((r["t"], r["i"]), (not int(r["non_unique"]), ()))
        out["keys"][(r["t"], r["i"])] = (unique, (*cols, r["c"]))
    return out


@pytest.fixture(params=SCHEMAS)
def legacy(request: pytest.FixtureRequest, server_url: DatabaseURL) -> Iterator[Legacy]:
    db = Legacy(server_url, request.param)
    yield db
    db.close()


@pytest.fixture
def fresh(server_url: DatabaseURL) -> Iterator[SQL]:
    """An empty database migrated by the real command."""
    name = f"ww_adopt_{os.getpid()}_{next(_names)}"
    url = server_url.with_database(name)
    result = run_worker(url, "migrate")
    assert result.returncode == 0, result.stderr
    helper = SQL(url)
    yield helper
    helper.close()
    admin = connect(server_url)
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    admin.close()


def test_dry_run_prints_the_plan_and_changes_nothing(legacy: Legacy) -> None:
    before, shape = legacy.dump(), legacy.structure()
    result = legacy.run("migrate", "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "nothing is changed" in out
    assert re.search(r"cola_envios: \d+ legacy row\(s\) share a \(sesion_id, telefono\)", out)
    assert re.search(r"envios_whatsapp: \d+ legacy row\(s\) share a \(cola_id\)", out)
    assert "in procesando without a lease" in out and "with an empty estado" in out
    assert "ALTER TABLE cola_envios ADD COLUMN" in out and "'desconocido'" in out
    assert legacy.dump() == before and legacy.structure() == shape  # not even the version table


def test_migrate_upgrades_in_place_keeping_every_row_and_php_value(legacy: Legacy, fresh: SQL) -> None:
    before = legacy.dump()
    out = legacy.migrate()
    assert f"to version {schema.LATEST}" in out
    after = legacy.dump()

    for table in PHP_TABLES:
        assert len(after[table]) == len(before[table]), table
        old_by_id = {r["id"]: r for r in before[table]}
        for row in after[table]:
            old = old_by_id[row["id"]]
            php = {
                c: row[c] for c in legacy.php_columns[table] if not (table == "cola_envios" and c == "estado")
            }
            assert php == {c: old[c] for c in php}, (table, row["id"])
    # estado: legacy rows keep theirs, except the ones whose send may have happened
    for row in after["cola_envios"]:
        old = next(r for r in before["cola_envios"] if r["id"] == row["id"])
        if old["estado"] in ("procesando", ""):
            assert row["estado"] == "desconocido" and "may have been sent" in row["last_error"]
        elif row["legacy_duplicate"] and old["estado"] == "pendiente":  # the old bug's second message
            assert row["estado"] == "error" and "copy of an earlier row" in row["last_error"]
        else:
            assert row["estado"] == old["estado"]
            assert row["next_attempt_at"] is None  # pendiente rows are due at once
    assert legacy.sql.value("SELECT COUNT(*) FROM cola_envios WHERE estado = ''") == 0
    # the old bug's history is all there, later copies marked
    marked = legacy.sql.value("SELECT COUNT(*) FROM envios_whatsapp WHERE legacy_duplicate > 0")
    assert marked >= 2

    # a second migrate changes nothing at all
    shape, rows = legacy.structure(), legacy.dump()
    assert "up to date" in legacy.migrate()
    assert legacy.structure() == shape and legacy.dump() == rows

    # the adopted tables end with the same columns and keys of ours as a fresh database
    fresh_shape = structure(fresh, fresh.url.database)
    for table in TABLES:
        added = [c for c in OURS[table] if c not in legacy.php_columns[table]]
        for column in added:
            assert shape["columns"][(table, column)][:4] == fresh_shape["columns"][(table, column)][:4]
        for key in schema.TABLES[TABLES.index(table)].keys:
            assert shape["keys"][(table, key.name)] == fresh_shape["keys"][(table, key.name)]


def test_after_adoption_every_pending_row_is_sent_once_and_no_legacy_row(
    legacy: Legacy, fake_api: FakeCloudAPI, tmp_path: Path
) -> None:
    legacy.migrate()
    legacy_rows = legacy.sql.rows("SELECT id, telefono, estado FROM cola_envios")
    pending = {r["telefono"] for r in legacy_rows if r["estado"] == "pendiente"}
    not_to_send = {r["telefono"] for r in legacy_rows if r["estado"] != "pendiente"} - pending
    history = legacy.sql.value("SELECT COUNT(*) FROM envios_whatsapp")

    # the same CSV enqueued twice is queued once
    csv = tmp_path / "clientes.csv"
    csv.write_text("phone,client_id\n+51911000001,1\n+51911000002,2\n")
    args = ["enqueue", "--session", "adopted", "--text", "hola", "--csv", str(csv)]
    first, second = legacy.run(*args), legacy.run(*args)
    assert first.returncode == 0 and "queued 2 new" in first.stdout, first.stderr
    assert second.returncode == 0 and "queued 0 new message(s), 2 already queued" in second.stdout
    assert legacy.sql.value("SELECT COUNT(*) FROM cola_envios WHERE telefono LIKE '+51911%'") == 2

    # a producer whose session is nine hours ahead of the server: four columns, due at once;
    # and one row it schedules for later, in UTC
    session = legacy.sql.value("SELECT MAX(sesion_id) FROM cola_envios WHERE estado = 'pendiente'")
    producer = connect(legacy.url, legacy.name)
    with producer.cursor() as cur:
        cur.execute("SET SESSION time_zone = '+09:00', sql_mode = ''")
        cur.execute(
            "INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje) VALUES (%s, 7, %s, %s)",
            (session, "+51922000001", TEXT),
        )
        cur.execute(
            "INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje, next_attempt_at)"
            " VALUES (%s, 8, %s, %s, UTC_TIMESTAMP() + INTERVAL 2 HOUR)",
            (session, "+51922000002", TEXT),
        )
        # the same phone twice in one session: the producer gets a duplicate-key error
        with pytest.raises(pymysql.err.IntegrityError):
            cur.execute(
                "INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje) VALUES (%s, 7, %s, %s)",
                (session, "+51922000001", TEXT),
            )
    producer.close()

    env = fake_api_env(fake_api, tmp_path)
    result = legacy.run("run", "--once", **env)
    assert result.returncode == 0, result.stderr[-2000:]

    counts = fake_api.counts()
    expected = pending | {"+51911000001", "+51911000002", "+51922000001"}
    assert set(counts) == expected and set(counts.values()) == {1}, counts
    assert not set(counts) & not_to_send
    rows = legacy.sql.rows("SELECT telefono, estado FROM cola_envios")
    assert expected <= {r["telefono"] for r in rows if r["estado"] == "enviado"}
    later = [r["estado"] for r in rows if r["telefono"] == "+51922000002"]
    assert later == ["pendiente"]  # scheduled two hours ahead: not yet
    assert legacy.sql.value("SELECT COUNT(*) FROM envios_whatsapp") == history + len(expected)
    assert legacy.sql.rows(RUNBOOK) == []

    status = legacy.run("status")
    assert status.returncode == 0, status.stderr
    assert "adopted" in status.stdout and "desconocido" in status.stdout


def test_our_sessions_are_strict_whatever_the_producers_sql_mode(legacy: Legacy) -> None:
    legacy.migrate()
    row_id = legacy.sql.value("SELECT MIN(id) FROM cola_envios WHERE estado = 'pendiente'")
    # a PHP host's session with sql_mode='' stores '' for a value the ENUM lacks...
    assert legacy.sql.value("SELECT COUNT(*) FROM cola_envios WHERE estado = ''") == 0

    async def write_bad_state() -> None:
        db = await Database.connect(legacy.url)
        try:
            await db.update("UPDATE cola_envios SET estado = %s WHERE id = %s", ("perdido", row_id))
        finally:
            db.close()

    # ...ours refuses it: the row keeps a state everyone knows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MySQL 9 notes on ERROR_FOR_DIVISION_BY_ZERO
        with pytest.raises(RowRefused):
            asyncio.run(write_bad_state())
    assert legacy.sql.value("SELECT estado FROM cola_envios WHERE id = %s", (row_id,)) == "pendiente"


@pytest.mark.parametrize("done", [1, 4, 5])
def test_a_migrate_killed_after_some_statements_completes_on_the_next_run(
    legacy: Legacy, server_url: DatabaseURL, request: pytest.FixtureRequest, done: int
) -> None:
    plan = legacy.run("migrate", "--dry-run")
    statements = re.findall(r"^-- .*\n((?:.+\n)*?.*);$", plan.stdout, flags=re.MULTILINE)
    assert len(statements) > done and statements[0].startswith("ALTER TABLE")
    with legacy.conn.cursor() as cur:  # what a migrate killed after `done` statements left
        cur.execute("SET SESSION sql_mode = 'STRICT_ALL_TABLES'")
        for statement in statements[:done]:
            cur.execute(statement)
    again = legacy.run("migrate", "--dry-run")
    assert again.stdout.count("\n-- ") < plan.stdout.count("\n-- ")  # each step checks first

    assert f"to version {schema.LATEST}" in legacy.migrate()
    assert "up to date" in legacy.migrate()

    clean = Legacy(server_url, request.node.callspec.params["legacy"])
    try:
        clean.migrate()
        assert legacy.structure() == clean.structure()
        states = "SELECT id, estado, legacy_duplicate FROM cola_envios ORDER BY id"
        assert legacy.sql.rows(states) == clean.sql.rows(states)
    finally:
        clean.close()


def test_commands_on_a_schema_missing_a_column_stop_with_one_clear_line(
    legacy: Legacy, fake_api: FakeCloudAPI, tmp_path: Path
) -> None:
    env = fake_api_env(fake_api, tmp_path)
    before = legacy.run("run", "--once", **env)  # the PHP tables as they are
    assert before.returncode == 78  # a configuration problem: systemd does not restart on it
    assert before.stderr.strip().splitlines() == [before.stderr.strip()]  # one line
    assert "cola_envios.claimed_at is missing" in before.stderr
    assert "run `whatsapp-worker migrate`" in before.stderr
    health = legacy.run("health", **env)
    assert health.returncode == 1 and "exit 78" in health.stdout and "claimed_at" in health.stdout

    legacy.migrate()
    legacy.sql.execute("ALTER TABLE cola_envios DROP COLUMN claimed_at")  # someone's hand edit
    for args in (["run", "--once"], ["status"]):
        result = legacy.run(*args, **env)
        assert result.returncode != 0, args
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, result.stderr
        assert "cola_envios.claimed_at is missing" in lines[0]
        assert "run `whatsapp-worker migrate`" in lines[0]
    assert fake_api.requests == []


def test_a_database_of_our_own_version_1_is_upgraded_too(server_url: DatabaseURL) -> None:
    v1 = Legacy(server_url, "worker_v1.sql")
    try:
        plan = v1.run("migrate", "--dry-run").stdout
        # its plain unique keys already give the guarantees: kept, nothing added beside them
        assert "MODIFY COLUMN next_attempt_at" in plan and "ADD UNIQUE" not in plan
        assert f"to version {schema.LATEST}" in v1.migrate()
        assert v1.sql.value("SELECT MAX(version) FROM whatsapp_worker_migrations") == schema.LATEST
        column = v1.sql.rows(
            "SELECT IS_NULLABLE AS nullable, COLUMN_DEFAULT AS dflt FROM information_schema.COLUMNS"
            " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'cola_envios' AND COLUMN_NAME = 'next_attempt_at'",
            (v1.name,),
        )
        assert column[0]["nullable"] == "YES" and column[0]["dflt"] in (None, "NULL")
        assert v1.run("status").returncode == 0
    finally:
        v1.close()


def test_retry_never_revives_a_legacy_copy(legacy: Legacy) -> None:
    legacy.migrate()
    copies = "SELECT id, estado FROM cola_envios WHERE legacy_duplicate > 0 ORDER BY id"
    before = legacy.sql.rows(copies)
    sessions = [r["sesion_id"] for r in legacy.sql.rows("SELECT DISTINCT sesion_id FROM cola_envios")]
    for session in sessions:
        result = legacy.run("retry", "--session", str(session), "--include-unknown", "--force", "--yes")
        assert result.returncode == 0, result.stderr
    assert legacy.sql.rows(copies) == before  # a copy sent now would be the old bug's second message
    assert (
        legacy.sql.value("SELECT COUNT(*) FROM cola_envios WHERE legacy_duplicate = 0 AND estado = 'error'")
        == 0
    )


def test_a_myisam_queue_is_converted_as_an_announced_step_and_three_daemons_send_each_phone_once(
    server_url: DatabaseURL, fake_api: FakeCloudAPI, tmp_path: Path
) -> None:
    legacy = Legacy(server_url, MYISAM)
    try:
        env = fake_api_env(fake_api, tmp_path)
        refused = legacy.run("run", "--once", **env)  # never a daemon on MyISAM
        assert refused.returncode == 78 and "cola_envios is MyISAM" in refused.stderr, refused.stderr
        plan = legacy.run("migrate", "--dry-run").stdout
        assert re.search(r"found: cola_envios: MyISAM: .*InnoDB.*copied \(\d+ row\(s\), [\d.]+ MB\)", plan)
        assert "ALTER TABLE cola_envios ENGINE=InnoDB;" in plan
        assert plan.index("ENGINE=InnoDB") < plan.index("ADD COLUMN")  # converted before anything else
        legacy.migrate()
        engines = legacy.sql.rows(
            "SELECT TABLE_NAME AS t, ENGINE AS e FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s",
            (legacy.name,),
        )
        assert {r["e"] for r in engines} == {"InnoDB"}, engines

        legacy.sql.execute("INSERT INTO sesiones_envio (nombre) VALUES ('seiscientos')")
        session = legacy.sql.value("SELECT MAX(id) FROM sesiones_envio")
        for start in range(0, 600, 100):
            values = ", ".join(
                f"({session}, {i}, '+5197{i:07d}', '{TEXT}')" for i in range(start, start + 100)
            )
            legacy.sql.execute(
                f"INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje) VALUES {values}"
            )
        fake_api.latency = 0.05  # long enough a drain for the three to overlap
        daemons = [
            WorkerProcess(
                base_env(legacy.url, **{**env, "WORKER_PIDFILE": str(tmp_path / f"host{i}.pid")}),
                "run",
                "--once",
                logs=tmp_path,
            )
            for i in range(3)
        ]
        codes = [daemon.wait(timeout=90) for daemon in daemons]
        assert codes == [0, 0, 0], [d.stderr[-2000:] for d in daemons]
        counts = fake_api.counts()
        ours = {phone: n for phone, n in counts.items() if phone.startswith("+5197")}
        assert len(ours) == 600 and set(ours.values()) == {1}, [p for p, n in ours.items() if n > 1]
    finally:
        legacy.close()


def test_a_queue_table_turned_back_to_myisam_stops_every_command_with_one_line(
    legacy: Legacy, fake_api: FakeCloudAPI, tmp_path: Path
) -> None:
    legacy.migrate()
    legacy.sql.execute("ALTER TABLE cola_envios ENGINE=MyISAM")  # someone's hand edit
    env = fake_api_env(fake_api, tmp_path)
    for args in (["run", "--once"], ["status"], ["retry", "--session", "1"]):
        result = legacy.run(*args, **env)
        assert result.returncode == 78, (args, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "cola_envios is MyISAM" in lines[0] and "InnoDB" in lines[0], lines
    assert fake_api.requests == []
    assert "ENGINE=InnoDB" in legacy.run("migrate", "--dry-run").stdout


def test_migrate_waits_for_a_busy_table_only_as_long_as_configured_names_the_holder_and_resumes(
    server_url: DatabaseURL,
) -> None:
    legacy = Legacy(server_url, "php_latin1.sql")
    php = connect(legacy.url, legacy.name)  # the PHP application, mid-transaction
    try:
        with php.cursor() as cur:
            cur.execute("SELECT CONNECTION_ID() AS id")
            php_id = cur.fetchone()["id"]
            cur.execute("BEGIN")
            cur.execute("SELECT COUNT(*) FROM cola_envios")
        before = legacy.structure()
        started = time.monotonic()
        busy = legacy.run("migrate", WORKER_DDL_LOCK_WAIT="2")
        waited = time.monotonic() - started
        assert busy.returncode == 75, busy.stderr  # try again later
        assert f"connection {php_id} " in busy.stderr and "cola_envios" in busy.stderr, busy.stderr
        assert "run the same command again" in busy.stderr
        assert waited < 15, waited  # seconds, not the server's day
        # nothing of cola_envios changed (sesiones_envio, before it, may have been upgraded)
        after = legacy.structure()
        assert {k: v for k, v in after["columns"].items() if k[0] == "cola_envios"} == {
            k: v for k, v in before["columns"].items() if k[0] == "cola_envios"
        }
        php.commit()  # the transaction ends: the same command resumes and finishes
        assert f"to version {schema.LATEST}" in legacy.migrate()
    finally:
        php.close()
        legacy.close()


def test_a_trigger_that_cannot_store_our_states_stops_migrate_naming_it_and_the_same_command_resumes(
    server_url: DatabaseURL,
) -> None:
    legacy = Legacy(server_url, "php_trigger.sql")
    try:
        plan = legacy.run("migrate", "--dry-run").stdout
        assert "cola_envios: trigger cola_envios_auditoria (AFTER UPDATE)" in plan, plan
        stopped = legacy.run("migrate")
        assert stopped.returncode == 78, stopped.stderr
        lines = [line for line in stopped.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "cola_envios_auditoria (AFTER UPDATE)" in lines[0], lines
        assert "widen the column the trigger writes to" in lines[0]
        assert legacy.sql.value("SELECT COUNT(*) FROM whatsapp_worker_migrations WHERE version = 4") == 0

        legacy.sql.execute(
            "ALTER TABLE cola_envios_log MODIFY estado"
            " ENUM('pendiente','procesando','enviado','error','desconocido') NOT NULL"
        )
        assert f"to version {schema.LATEST}" in legacy.migrate()
        assert legacy.sql.value("SELECT estado FROM cola_envios WHERE id = 3") == "desconocido"
        assert legacy.sql.value("SELECT estado FROM cola_envios_log WHERE cola_id = 3") == "desconocido"
    finally:
        legacy.close()


def test_sessions_in_the_php_applications_own_states_are_held_unless_named_and_its_default_is_kept(
    server_url: DatabaseURL, fake_api: FakeCloudAPI, tmp_path: Path
) -> None:
    legacy = Legacy(server_url, "php_states.sql")
    try:
        plan = legacy.run("migrate", "--dry-run").stdout
        assert "sessions 'activa': 1 session(s), 2 waiting row(s)" in plan, plan
        assert (
            "sessions 'borrador': 1 session(s), 2 waiting row(s) (oldest created 2024-01-02 09:00:00)" in plan
        )
        assert "held (WORKER_SEND_STATES=borrador sends them, or `resume --session ID` one session)" in plan
        assert "sessions 'detenida': 1 session(s), 2 waiting row(s)" in plan
        assert "first run: sends up to 2 waiting row(s)" in plan
        assert "session #2 'recordatorio diciembre' (activa): 2 waiting row(s)" in plan
        legacy.migrate()
        column = legacy.sql.rows(
            "SELECT COLUMN_DEFAULT AS dflt, COLUMN_TYPE AS type FROM information_schema.COLUMNS"
            " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'sesiones_envio' AND COLUMN_NAME = 'estado'",
            (legacy.name,),
        )[0]
        assert column["dflt"].strip("'") == "borrador" and "'cancelada'" in column["type"]  # kept, widened

        env = fake_api_env(fake_api, tmp_path)
        assert legacy.run("run", "--once", **env).returncode == 0
        assert sorted(fake_api.counts()) == ["+51987200001", "+51987200002"]  # activa only
        # the operator chooses: drafts are sent too; a stopped campaign never
        assert legacy.run("run", "--once", **env, WORKER_SEND_STATES="borrador").returncode == 0
        assert sorted(fake_api.counts()) == ["+51987100001", "+51987100002", "+51987200001", "+51987200002"]
        # or one session at a time: `resume` activates a stopped campaign
        resumed = legacy.run("resume", "--session", "3")
        assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed.stderr
        assert legacy.run("run", "--once", **env).returncode == 0
        assert len(fake_api.counts()) == 6 and set(fake_api.counts().values()) == {1}
        # a session our enqueue creates is active whatever the PHP default
        csv = tmp_path / "nuevos.csv"
        csv.write_text("phone\n+51911000001\n")
        assert (
            legacy.run("enqueue", "--session", "nuevo", "--text", "hola", "--csv", str(csv)).returncode == 0
        )
        assert legacy.sql.value("SELECT estado FROM sesiones_envio WHERE nombre = 'nuevo'") == "activa"
    finally:
        legacy.close()


def test_prune_keeps_rows_a_legacy_foreign_key_holds_and_refuses_to_cascade_into_the_history(
    server_url: DatabaseURL,
) -> None:
    legacy = Legacy(server_url, "php_fk.sql")
    try:
        plan = legacy.run("migrate", "--dry-run")
        assert (
            "envios_whatsapp.cola_id (fk_envios_cola, ON DELETE RESTRICT) references cola_envios:"
            " prune deletes only the finished rows nothing references" in plan.stdout
        ), plan.stdout
        legacy.migrate()
        legacy.sql.execute("UPDATE cola_envios SET updated_at = NOW(6) - INTERVAL 40 DAY WHERE id <= 5")

        dry = legacy.run("prune", "--older-than", "30d", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would delete 2 finished row(s)" in dry.stdout  # the two errors: no history
        assert "3 finished row(s) kept" in dry.stdout and "fk_envios_cola, ON DELETE RESTRICT" in dry.stdout
        done = legacy.run("prune", "--older-than", "30d", "--yes")
        assert done.returncode == 0, done.stderr
        assert "deleted 2 finished row(s)" in done.stdout and "3 finished row(s) kept" in done.stdout
        assert legacy.sql.value("SELECT COUNT(*) FROM cola_envios WHERE id <= 5") == 3
        assert legacy.sql.value("SELECT COUNT(*) FROM envios_whatsapp") == 3

        # ON DELETE CASCADE would take the history with the queue rows: nothing without consent
        legacy.sql.execute("ALTER TABLE envios_whatsapp DROP FOREIGN KEY fk_envios_cola")
        legacy.sql.execute(
            "ALTER TABLE envios_whatsapp ADD CONSTRAINT fk_envios_cola"
            " FOREIGN KEY (cola_id) REFERENCES cola_envios (id) ON DELETE CASCADE"
        )
        refused = legacy.run("prune", "--older-than", "30d", "--yes")
        assert refused.returncode == 1 and "Nothing was deleted: add --deliveries" in refused.stderr
        assert "envios_whatsapp kept" not in refused.stdout
        assert legacy.sql.value("SELECT COUNT(*) FROM envios_whatsapp") == 3
        both = legacy.run("prune", "--older-than", "30d", "--deliveries", "--yes")
        assert both.returncode == 0, both.stderr
        assert "deleted 3 finished row(s)" in both.stdout and "3 of envios_whatsapp" in both.stdout
        assert legacy.sql.value("SELECT COUNT(*) FROM cola_envios WHERE id <= 5") == 0
    finally:
        legacy.close()


def test_utf8_bytes_in_a_latin1_queue_block_migrate_with_the_conversion_and_are_then_sent_right(
    server_url: DatabaseURL, fake_api: FakeCloudAPI, tmp_path: Path
) -> None:
    legacy = Legacy(server_url, "php_latin1_utf8.sql")
    try:
        plan = legacy.run("migrate", "--dry-run").stdout
        blocked = [
            line for line in plan.splitlines() if line.startswith("blocked: cola_envios.mensaje is latin1")
        ]
        assert len(blocked) == 1 and "2 waiting row(s) hold UTF-8 bytes (e.g. row #1)" in blocked[0], plan
        stopped = legacy.run("migrate")
        assert stopped.returncode == 78 and "hold UTF-8 bytes" in stopped.stderr, stopped.stderr
        assert (
            legacy.sql.value(
                "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s"
                " AND TABLE_NAME = 'whatsapp_worker_daemons'",
                (legacy.name,),
            )
            == 0
        )

        # the conversion the message gives, as given: the bytes are kept, the column says utf8mb4
        fix = blocked[0].split("without changing a byte: ")[1]
        fix = fix.removesuffix(" (migrate changes nothing until this is fixed by hand)")
        for statement in fix.split("; "):
            legacy.sql.execute(statement)
        legacy.migrate()
        env = fake_api_env(fake_api, tmp_path)
        assert legacy.run("run", "--once", **env).returncode == 0
        bodies = {r.phone: r.body["text"]["body"] for r in fake_api.requests}
        assert bodies == {
            "+51987500001": "Hola Ñandú",
            "+51987500002": "Campaña de diciembre",
            "+51987500003": "sin acentos",
        }
    finally:
        legacy.close()


def test_an_emoji_for_a_latin1_queue_is_refused_naming_the_line_and_the_column(
    server_url: DatabaseURL, tmp_path: Path
) -> None:
    legacy = Legacy(server_url, "php_latin1.sql")
    try:
        legacy.migrate()
        csv = tmp_path / "emoji.csv"
        csv.write_text("phone\n+51911000001\n+51911000002\n")
        before = legacy.sql.value("SELECT COUNT(*) FROM cola_envios")
        refused = legacy.run("enqueue", "--session", "emoji", "--text", "hola 😀", "--csv", str(csv))
        assert refused.returncode == 65, refused.stderr  # a data error, not "try again"
        assert (
            "line 2: the message has '😀', which cola_envios.mensaje (latin1) cannot store" in refused.stderr
        )
        assert "run the same command again" not in refused.stderr
        assert legacy.sql.value("SELECT COUNT(*) FROM cola_envios") == before
        ok = legacy.run("enqueue", "--session", "eñe", "--text", "Campaña de diciembre", "--csv", str(csv))
        assert ok.returncode == 0, ok.stderr  # what latin1 holds goes in
    finally:
        legacy.close()


def test_migrate_finishes_on_a_big_table_whose_producer_keeps_inserting_copies(
    server_url: DatabaseURL,
) -> None:
    legacy = Legacy(server_url, "php_latin1.sql")
    digits = " UNION ALL ".join(f"SELECT {d} AS n" for d in range(10))
    legacy.sql.execute(
        "INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje, estado)"
        " SELECT 30, seq, CONCAT('+5196', LPAD(seq, 7, '0')), %s, 'enviado' FROM (SELECT"
        " a.n + 10 * b.n + 100 * c.n + 1000 * d.n + 10000 * e.n AS seq FROM"
        f" ({digits}) a, ({digits}) b, ({digits}) c, ({digits}) d, ({digits}) e) s",
        (TEXT,),
    )
    stop, inserted = threading.Event(), []

    def php_producer() -> None:  # the old bug, still running: the same phone again and again
        conn = connect(legacy.url, legacy.name)
        with conn.cursor() as cur:
            while not stop.is_set():
                try:
                    cur.execute(
                        "INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje)"
                        " VALUES (28, 601, '+51987000011', %s)",
                        (TEXT,),
                    )
                    inserted.append(1)
                except pymysql.err.IntegrityError:
                    pass  # the unique key is there: the copy is refused, as it should be
                stop.wait(0.002)
        conn.close()

    producer = threading.Thread(target=php_producer, daemon=True)
    producer.start()
    try:
        out = legacy.migrate()
    finally:
        stop.set()
        producer.join(timeout=30)
    try:
        assert f"to version {schema.LATEST}" in out and "note: cola_envios: keys: a producer" in out
        assert inserted  # copies did come in meanwhile
        waiting = legacy.sql.rows(
            "SELECT legacy_duplicate, estado FROM cola_envios"
            " WHERE sesion_id = 28 AND telefono = '+51987000011'"
        )
        assert [r for r in waiting if r["estado"] == "pendiente"] == [
            {"legacy_duplicate": 0, "estado": "pendiente"}
        ]
        assert len({r["legacy_duplicate"] for r in waiting}) == len(waiting)  # the key holds
    finally:
        legacy.close()
