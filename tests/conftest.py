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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.env import (
    base_env,
    fake_api_env,
    run_worker,
)
from tests.support.fakeapi import FakeCloudAPI
from tests.support.sql import SQL, connect
from worker.config import DatabaseURL, Settings

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
