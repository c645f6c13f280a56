"""Shared fixtures: a fresh, migrated database per test on a real MySQL/MariaDB server.

The server is the one named by WORKER_TEST_DATABASE_URL (CI and the development machines:
the local MariaDB, and Oracle MySQL in CI's second leg); without it, a testcontainers MySQL
8.4 when a Docker engine answers. With neither, database tests fail loudly: never skipped.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from tests.fakeapi import FakeCloudAPI
from worker.config import DatabaseURL, Settings

ROOT = Path(__file__).resolve().parent.parent
WORKER_BIN = [sys.executable, "-m", "worker"]
_names = itertools.count()


@pytest.fixture(scope="session")
def server_url() -> Iterator[DatabaseURL]:
    raw = os.environ.get("WORKER_TEST_DATABASE_URL")
    if raw:
        if not raw.rstrip("/").count("/") > 2:
            raw = raw.rstrip("/") + "/test"
        yield DatabaseURL.parse(raw, "WORKER_TEST_DATABASE_URL")
        return
    yield from _testcontainers_mysql()


def _testcontainers_mysql() -> Iterator[DatabaseURL]:
    docker = shutil.which("docker")
    engine = docker and subprocess.run([docker, "info"], capture_output=True).returncode == 0
    if not engine:
        pytest.fail(
            "no database for the tests: set WORKER_TEST_DATABASE_URL=mysql://root@127.0.0.1:3306/ "
            "or start a Docker engine for testcontainers",
            pytrace=False,
        )
    from testcontainers.mysql import MySqlContainer

    with MySqlContainer("mysql:8.4", username="root", password="test", dbname="test") as mysql:
        yield DatabaseURL(
            mysql.get_container_host_ip(), int(mysql.get_exposed_port(3306)), "root", "test", "test"
        )


def connect(url: DatabaseURL, database: str | None = None) -> pymysql.connections.Connection[Any]:
    return pymysql.connect(
        host=url.host,
        port=url.port,
        user=url.user,
        password=url.password,
        database=database,
        autocommit=True,
        cursorclass=pymysql.cursors.DictCursor,
    )


class SQL:
    """Synchronous helper for arranging rows and asserting on them."""

    def __init__(self, url: DatabaseURL) -> None:
        self.url = url
        self._conn = connect(url, url.database)

    def rows(self, query: str, args: Any = None) -> list[dict[str, Any]]:
        with self._conn.cursor() as cur:
            cur.execute(query, args)
            return list(cur.fetchall())

    def value(self, query: str, args: Any = None) -> Any:
        rows = self.rows(query, args)
        return next(iter(rows[0].values())) if rows else None

    def execute(self, query: str, args: Any = None) -> int:
        with self._conn.cursor() as cur:
            return int(cur.execute(query, args))

    def states(self) -> dict[str, int]:
        return {
            r["estado"]: int(r["n"])
            for r in self.rows("SELECT estado, COUNT(*) AS n FROM cola_envios GROUP BY estado")
        }

    def add_session(self, name: str = "test-session") -> int:
        self.execute("INSERT INTO sesiones_envio (nombre) VALUES (%s)", (name,))
        return int(self.value("SELECT id FROM sesiones_envio WHERE nombre = %s", (name,)))

    def add_rows(
        self,
        session_id: int,
        count: int,
        *,
        start: int = 0,
        message: str = '{"type":"text","text":{"body":"hola"}}',
    ) -> list[str]:
        phones = [f"+5198{start + i:07d}" for i in range(count)]
        with self._conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje) VALUES (%s, %s, %s, %s)",
                [(session_id, start + i + 1, phone, message) for i, phone in enumerate(phones)],
            )
        return phones

    def close(self) -> None:
        self._conn.close()


@pytest.fixture
def db_url(server_url: DatabaseURL) -> Iterator[DatabaseURL]:
    """A fresh database with the schema applied by the real `migrate` command."""
    name = f"ww_test_{os.getpid()}_{next(_names)}"
    admin = connect(server_url)
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    url = server_url.with_database(name)
    result = run_worker(url, "migrate")
    assert result.returncode == 0, result.stderr
    try:
        yield url
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


@pytest.fixture
def sql(db_url: DatabaseURL) -> Iterator[SQL]:
    helper = SQL(db_url)
    yield helper
    helper.close()


@pytest.fixture
def fake_api() -> Iterator[FakeCloudAPI]:
    with FakeCloudAPI(token="test-token") as api:
        yield api


def database_url_text(url: DatabaseURL) -> str:
    auth = f"{url.user}:{url.password}" if url.password else url.user
    return f"mysql://{auth}@{url.host}:{url.port}/{url.database}"


def base_env(url: DatabaseURL, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "WHATSAPP_"))}
    env.update(WORKER_DATABASE_URL=database_url_text(url), PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def run_worker(
    url: DatabaseURL, *args: str, env: dict[str, str] | None = None, timeout: float = 60, **extra: str
) -> subprocess.CompletedProcess[str]:
    """`whatsapp-worker ARGS` on the database at `url`, run to its end, its output captured: the
    one CLI runner of the tests (`env` replaces the environment, `extra` adds to it)."""
    return subprocess.run(
        [*WORKER_BIN, *args],
        env=env or base_env(url, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fake_api_env(fake_api: FakeCloudAPI, tmp_path: Path) -> dict[str, str]:
    """The variables that point a daemon at the fake API, with a pidfile of its own."""
    return {
        "WHATSAPP_API_URL": fake_api.base_url,
        "WHATSAPP_PHONE_NUMBER_ID": fake_api.phone_number_id,
        "WHATSAPP_ACCESS_TOKEN": fake_api.token,
        "WORKER_PIDFILE": str(tmp_path / "worker.pid"),
        "WORKER_POLL_INTERVAL": "0.05",
        "WORKER_RATE_LIMIT": "0",
    }


@pytest.fixture
def worker_env(db_url: DatabaseURL, fake_api: FakeCloudAPI, tmp_path: Path) -> Callable[..., dict[str, str]]:
    """Environment for a daemon subprocess that sends to the fake API."""

    def make(**extra: str) -> dict[str, str]:
        values = {**fake_api_env(fake_api, tmp_path), "WORKER_LOG_FORMAT": "json"}
        values.update(extra)
        return base_env(db_url, **values)

    return make


@pytest.fixture
def settings(db_url: DatabaseURL, fake_api: FakeCloudAPI, tmp_path: Path) -> Callable[..., Settings]:
    """Settings for an in-process daemon that sends to the fake API."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = dict(
            database=db_url,
            api_url=fake_api.base_url,
            phone_number_id=fake_api.phone_number_id,
            access_token=fake_api.token,
            sender="cloud",
            concurrency=8,
            rate_limit=0.0,
            poll_interval=0.05,
            send_timeout=2.0,
            lease_seconds=30.0,
            drain_timeout=5.0,
            retry_base=0.05,
            retry_cap=0.2,
            pidfile=tmp_path / "worker.pid",
        )
        values.update(overrides)
        return Settings(**values)

    return make


def eventually(check: Callable[[], bool], seconds: float) -> bool:
    """Poll a condition (the database, a log file) until it holds or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()
