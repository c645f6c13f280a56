"""Daemon subprocesses for acceptance tests.

Output goes to files, never to pipes nobody reads: a daemon whose stdout pipe fills up
blocks on its next log line, which looks exactly like a hung daemon.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import IO, Any

from tests.support.env import WORKER_BIN

RUNBOOK = """SELECT cliente_id, COUNT(*) as envios FROM envios_whatsapp
WHERE fecha_envio >= DATE_SUB(NOW(), INTERVAL 10 MINUTE)
GROUP BY cliente_id HAVING COUNT(*) > 1"""


class WorkerProcess:
    """`whatsapp-worker ARGS` in a subprocess, stdout and stderr captured in files."""

    def __init__(self, env: dict[str, str], *args: str, logs: Path, program: list[str] | None = None) -> None:
        """`program`: what runs ARGS (default: the worker; `[]`: ARGS is the whole command)."""
        logs.mkdir(parents=True, exist_ok=True)
        stem = logs / f"{args[0]}-{time.monotonic_ns()}"
        self._out_path, self._err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        self._files: list[IO[str]] = [self._out_path.open("w"), self._err_path.open("w")]
        command = [*(WORKER_BIN if program is None else program), *args]
        self.process = subprocess.Popen(
            command, env=env, text=True, stdout=self._files[0], stderr=self._files[1]
        )
        self.pid = self.process.pid

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.returncode is not None:
                for handle in self._files:
                    handle.close()

    def send_signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def stdout(self) -> str:
        return self._out_path.read_text()

    @property
    def stderr(self) -> str:
        return self._err_path.read_text()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]
