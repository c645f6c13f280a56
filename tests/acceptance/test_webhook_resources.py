"""`whatsapp-worker webhook` under connection and memory pressure: the receiver runs as its own
process, clients are raw sockets on 127.0.0.1 that open connections, trickle bodies or say
nothing, and Meta's signed POSTs must still get through."""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.test_webhook import (
    APP_SECRET,
    VERIFY_TOKEN,
    Receiver,
    payload,
    sign,
    started_port,
    status,
)
from tests.support.env import base_env, eventually
from tests.support.processes import WorkerProcess
from tests.support.sql import SQL
from worker.config import DatabaseURL
from worker.webhook.connections import RESERVED_DESCRIPTORS

METRIC = "whatsapp_worker_webhook_"


@dataclass
class Running:
    server: Receiver
    metrics_port: int

    @property
    def port(self) -> int:
        return self.server.port

    def figures(self) -> dict[str, float]:
        """The receiver's own metrics, as Prometheus scrapes them."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {
            line.rsplit(" ", 1)[0].removeprefix(METRIC): float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(METRIC)
        }

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.server.process.events() if e.get("event") == event]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def with_open_files(soft: int, hard: int) -> list[str]:
    """A launcher that lowers RLIMIT_NOFILE, then runs the worker (as systemd's defaults would)."""
    code = (
        "import os, resource, sys;"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}));"
        "os.execv(sys.executable, [sys.executable, '-m', 'worker', *sys.argv[1:]])"
    )
    return [sys.executable, "-c", code]


@pytest.fixture
def start(db_url: DatabaseURL, tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Start `whatsapp-worker webhook` with its metrics port; stopped (SIGTERM, exit 0) after."""
    processes: list[WorkerProcess] = []

    def launch(program: list[str] | None = None, **extra: str) -> Running:
        metrics_port = free_port()
        settings = {
            "WHATSAPP_APP_SECRET": APP_SECRET,
            "WHATSAPP_VERIFY_TOKEN": VERIFY_TOKEN,
            "WORKER_WEBHOOK_PORT": "0",
            "WORKER_WEBHOOK_METRICS_PORT": str(metrics_port),
            "WORKER_LOG_FORMAT": "json",
        }
        env = base_env(db_url, **{**settings, **extra})
        process = WorkerProcess(env, "webhook", logs=tmp_path, program=program)
        processes.append(process)
        assert eventually(lambda: started_port(process) is not None or not process.alive(), 30)
        port = started_port(process)
        assert port is not None, f"the receiver did not start:\n{process.stderr}"
        return Running(Receiver(process, port), metrics_port)

    yield launch
    for process in processes:
        if process.alive():
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, process.stderr
        process.wait(timeout=0)  # one that exited on its own: its log files are closed


class Clients:
    """Raw client connections, every one closed after the test."""

    def __init__(self) -> None:
        self._opened: list[socket.socket] = []

    def connect(self, port: int) -> socket.socket:
        """A connection that sends nothing (reads wait at most 30 s: a failure, never a pause)."""
        self._opened.append(socket.create_connection(("127.0.0.1", port), timeout=30))
        return self._opened[-1]

    def slow_post(self, port: int, body: bytes, *, sent: int, signed: bool = True) -> socket.socket:
        """A POST whose headers arrive with only the first `sent` bytes of its body."""
        sock = self.connect(port)
        sock.sendall(post_head(body, signed=signed) + body[:sent])
        return sock

    def close(self) -> None:
        for sock in self._opened:
            sock.close()


@pytest.fixture
def clients() -> Iterator[Clients]:
    opened = Clients()
    yield opened
    opened.close()


def post_head(body: bytes, *, signed: bool = True, chunked: bool = False) -> bytes:
    lines = ["POST /webhook HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}")
    if signed:
        lines.append(f"X-Hub-Signature-256: {sign(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunked_body(body: bytes, *, last: bool = True) -> bytes:
    """`body` as one chunk, then the last (empty) chunk unless `last` is False."""
    return b"%x\r\n%s\r\n" % (len(body), body) + (b"0\r\n\r\n" if last else b"")


def answer(sock: socket.socket) -> int:
    """The status of the receiver's answer on this connection (a blocking read)."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    return response.status


def closed_by_receiver(sock: socket.socket) -> bool:
    """A blocking read finds the end of the stream (or a reset): the receiver closed it."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def closed_already(sock: socket.socket) -> bool:
    """Whether the end of the stream is there now, without waiting."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def sized(wamid: str, size: int) -> bytes:
    """A real status body (no row of ours: kept for audit) of exactly `size` bytes."""
    bare = payload(statuses=[status(None, "delivered", wamid, note="")])
    padded = payload(statuses=[status(None, "delivered", wamid, note="x" * (size - len(bare)))])
    assert len(padded) == size
    return padded


def stored(sql: SQL) -> int:
    return int(sql.value("SELECT COUNT(*) FROM whatsapp_worker_statuses"))


# -- connections ------------------------------------------------------------------------------------


def test_past_the_cap_the_oldest_idle_connections_make_room_for_metas_post(
    sql: SQL, start: Callable[..., Running], clients: Clients
) -> None:
    receiver = start(WORKER_WEBHOOK_MAX_CONNECTIONS="20", WORKER_WEBHOOK_IDLE_TIMEOUT="3600")
    idle = [clients.connect(receiver.port) for _ in range(30)]

    assert receiver.server.post(payload(statuses=[status(None, "delivered", "wamid.CAP")])) == 200
    assert stored(sql) == 1
    # ten closed for the idle ones beyond 20, one more for the POST: the oldest first
    assert all(closed_by_receiver(sock) for sock in idle[:11])
    assert not any(closed_already(sock) for sock in idle[11:])
    figures = receiver.figures()
    assert figures['connections_closed_total{reason="idle_evicted"}'] == 11
    assert figures['connections_closed_total{reason="refused_full"}'] == 0
    assert figures["connections"] <= 20
    closings = receiver.logged("webhook_idle_connection_closed")
    assert 1 <= len(closings) < 11 and closings[0]["max_connections"] == 20  # sampled, not one a connection


def test_when_every_connection_is_busy_a_new_one_is_closed_at_once_and_the_busy_ones_finish(
    sql: SQL, start: Callable[..., Running], clients: Clients
) -> None:
    receiver = start(WORKER_WEBHOOK_MAX_CONNECTIONS="3")
    bodies = [sized(f"wamid.BUSY{i}", 600) for i in range(3)]
    busy = [clients.slow_post(receiver.port, body, sent=300) for body in bodies]
    # all three are being read: the bytes they announced are reserved
    assert eventually(lambda: receiver.figures()["unverified_bytes"] == 1800, 10)

    newcomer = clients.connect(receiver.port)
    assert closed_by_receiver(newcomer)
    assert receiver.figures()['connections_closed_total{reason="refused_full"}'] == 1
    assert receiver.logged("webhook_connections_full")

    for sock, body in zip(busy, bodies, strict=True):  # never cut: answered once the body is in
        sock.sendall(body[300:])
        assert answer(sock) == 200
    assert stored(sql) == 3
    assert receiver.figures()['connections_closed_total{reason="idle_evicted"}'] == 0


def test_an_idle_connection_is_closed_after_the_idle_timeout(
    start: Callable[..., Running], clients: Clients
) -> None:
    receiver = start(WORKER_WEBHOOK_IDLE_TIMEOUT="1")
    silent = clients.connect(receiver.port)  # never sends a request
    kept = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=30)
    kept.request("GET", f"/webhook?hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}&hub.challenge=7")
    response = kept.getresponse()
    assert (response.status, response.read()) == (200, b"7")
    assert response.getheader("Connection", "keep-alive").lower() == "keep-alive"
    assert kept.sock is not None

    assert closed_by_receiver(silent)
    assert closed_by_receiver(kept.sock)  # idle after its answer
    assert receiver.logged("webhook_started")[0]["idle_timeout"] == 1.0
    kept.close()


def test_the_open_files_limit_is_raised_and_the_cap_fits_below_it(
    db_url: DatabaseURL, start: Callable[..., Running]
) -> None:
    receiver = start(program=with_open_files(256, 1024))  # systemd's default, scaled down
    (started,) = receiver.logged("webhook_started")
    assert started["open_files_limit"] == 1024
    assert started["max_connections"] == 1024 - RESERVED_DESCRIPTORS
    assert started["max_connections_wanted"] == 1000  # the default did not fit: said so
    (lowered,) = receiver.logged("webhook_max_connections_lowered")
    assert lowered["level"] == "warning" and "LimitNOFILE" in lowered["fix"]
    assert receiver.server.post(payload(statuses=[])) == 200

    roomy = start(program=with_open_files(1024, 4096), WORKER_WEBHOOK_MAX_CONNECTIONS="50")
    (started,) = roomy.logged("webhook_started")
    assert (started["open_files_limit"], started["max_connections"]) == (4096, 50)
    assert started["max_connections_wanted"] is None and not roomy.logged("webhook_max_connections_lowered")

    env = base_env(db_url, WHATSAPP_APP_SECRET=APP_SECRET, WHATSAPP_VERIFY_TOKEN=VERIFY_TOKEN)
    env["WORKER_WEBHOOK_PORT"] = "0"
    cramped = subprocess.run(
        [*with_open_files(48, 48), "webhook"], env=env, capture_output=True, text=True, timeout=60
    )
    assert cramped.returncode == 78  # no room for a single connection: not restarted by systemd
    assert "WORKER_WEBHOOK_MAX_CONNECTIONS" in cramped.stderr and "LimitNOFILE" in cramped.stderr


# -- bodies whose signature is not checked yet ---------------------------------------------------------


def test_an_unsigned_post_is_refused_before_its_body_is_read(
    start: Callable[..., Running], clients: Clients
) -> None:
    receiver = start()
    # a million bytes announced, ten sent: reading it would wait for the rest (408 after 10 s)
    sock = clients.slow_post(receiver.port, b"{" * 1_000_000, sent=10, signed=False)
    assert answer(sock) == 401
    assert closed_by_receiver(sock)
    figures = receiver.figures()
    assert figures['requests_total{result="unsigned"}'] == 1
    assert figures["unverified_bytes"] == 0
    (missing,) = receiver.logged("webhook_signature_missing")
    assert missing["bytes"] == 1_000_000


def test_bodies_beyond_the_unverified_bytes_budget_get_503_at_once_and_are_accepted_later(
    sql: SQL, start: Callable[..., Running], clients: Clients
) -> None:
    receiver = start(WORKER_WEBHOOK_MAX_BODY="1024", WORKER_WEBHOOK_UNVERIFIED_BYTES="2048")
    slow_bodies = [sized(f"wamid.SLOW{i}", 1000) for i in range(2)]
    slow = [clients.slow_post(receiver.port, body, sent=500) for body in slow_bodies]
    assert eventually(lambda: receiver.figures()["unverified_bytes"] == 2000, 10)

    # beyond the budget: one announcing its length, one chunked (reserved as it is read)
    announced = clients.slow_post(receiver.port, sized("wamid.LATE", 1000), sent=500)
    chunk = sized("wamid.CHUNK", 400)
    chunked = clients.connect(receiver.port)
    chunked.sendall(post_head(chunk, chunked=True) + chunked_body(chunk, last=False))
    for refused in (announced, chunked):
        assert answer(refused) == 503  # at once, not when the body would have arrived
        assert closed_by_receiver(refused)
    assert receiver.figures()['requests_total{result="busy"}'] == 2
    assert receiver.logged("webhook_busy")

    for sock, body in zip(slow, slow_bodies, strict=True):  # the slow ones were never cut
        sock.sendall(body[500:])
        assert answer(sock) == 200
    assert receiver.figures()["unverified_bytes"] == 0
    assert receiver.server.post(sized("wamid.LATE", 1000)) == 200  # Meta's retry
    retried = clients.connect(receiver.port)
    retried.sendall(post_head(chunk, chunked=True) + chunked_body(chunk))
    assert answer(retried) == 200
    assert sql.rows("SELECT wamid FROM whatsapp_worker_statuses ORDER BY wamid") == [
        {"wamid": "wamid.CHUNK"},
        {"wamid": "wamid.LATE"},
        {"wamid": "wamid.SLOW0"},
        {"wamid": "wamid.SLOW1"},
    ]
