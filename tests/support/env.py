"""Running the real command: its environment, one CLI runner, and polling for what a process
does (the database, a log file) with a deadline."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.support.fakeapi import FakeCloudAPI
from worker.config import DatabaseURL

ROOT = Path(__file__).resolve().parents[2]
WORKER_BIN = [sys.executable, "-m", "worker"]


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
    one CLI runner of the tests (`env` replaces the environment, `extra` adds to it). Its input
    is empty, never the terminal pytest may run in: a command that would ask refuses instead."""
    return subprocess.run(
        [*WORKER_BIN, *args],
        env=env or base_env(url, **extra),
        stdin=subprocess.DEVNULL,
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


def eventually(check: Callable[[], bool], seconds: float) -> bool:
    """Poll a condition (the database, a log file) until it holds or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def free_port() -> int:
    """A port nothing listens on now, for a process's metrics endpoint."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """A /metrics endpoint as Prometheus reads it: each sample (name and labels) -> its value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(value) for name, value in samples}
