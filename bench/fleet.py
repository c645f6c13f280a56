"""The fleet: three daemons on one sending number, sharing its rate limit and its load.

1. Shared limit: three daemons (`whatsapp-worker run`, each its own process) drain one session
   on one number with a small `WORKER_RATE_LIMIT`, against the fake Cloud API (tests/fakeapi.py,
   in this process, fixed latency), which records when every request arrived. Printed: the
   limit, the busiest sliding one-second window of requests, the average rate (requests over
   first to last request). Twice: the three daemons alone, and with one SIGKILLed mid-run
   (its claimed rows stay `procesando` until their short lease expires, then `desconocido`)
   and restarted later.
2. Scaling: a generous limit and a slow API (200 ms): the same rows drained by one daemon,
   then by three with the same WORKER_CONCURRENCY each; throughput from the requests' arrival
   times (and from the rows' `sent_at`) side by side, and the ratio (goal: close to 3).
Figures are printed, never asserted. Each run gets a fresh database (dropped at the end);
daemon output goes to files in a temporary directory (kept when something went wrong).
Run: `python -m bench.fleet` (`-h` for the options).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pymysql

from bench import throughput
from tests.support.fakeapi import FakeCloudAPI
from worker.config import DatabaseURL

ROOT = Path(__file__).resolve().parent.parent

MESSAGE = json.dumps(throughput.MESSAGE)
STOP_TIMEOUT = 30.0  # seconds a daemon gets to drain after SIGTERM before it is SIGKILLed


Choreography = Callable[[FakeCloudAPI, list["Daemon"], Callable[[str], "Daemon"]], list[str]]


class BenchFailed(Exception):
    """A run could not finish (a daemon died, rows never drained): no figures for it."""


def stop_all(daemons: list[Daemon]) -> None:
    """SIGTERM every daemon (each drains), then SIGKILL any still there after STOP_TIMEOUT.
    One signal only: a second one would tell a daemon to stop waiting for its sends."""
    for daemon in daemons:
        daemon.signal(signal.SIGTERM)
    for daemon in daemons:
        if daemon.wait(STOP_TIMEOUT) is None:
            daemon.signal(signal.SIGKILL)
            daemon.wait(10)


def admin(url: DatabaseURL, database: str | None = None) -> pymysql.Connection:
    return pymysql.connect(
        host=url.host, port=url.port, user=url.user, password=url.password, database=database, autocommit=True
    )


def cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of the whole machine, from /proc/stat (None elsewhere)."""
    try:
        with open("/proc/stat") as stat:
            fields = [float(v) for v in stat.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_share(start: tuple[float, float] | None, end: tuple[float, float] | None) -> float:
    if start is None or end is None or end[1] <= start[1]:
        return float("nan")
    return (end[0] - start[0]) / (end[1] - start[1])


@dataclass
class Daemon:
    """`python -m worker run` with its output in files; reaped with os.wait4 for its CPU time."""

    name: str
    process: subprocess.Popen[bytes]
    files: list[IO[bytes]]
    err_path: Path
    code: int | None = None
    cpu: float = 0.0  # user + system seconds, once reaped

    def poll(self) -> int | None:
        if self.code is None:
            pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
            if pid != 0:
                self._reaped(status, usage)
        return self.code

    def alive(self) -> bool:
        return self.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.process.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.code

    def _reaped(self, status: int, usage: Any) -> None:
        self.code = os.waitstatus_to_exitcode(status)
        self.process.returncode = self.code  # Popen must not wait for it again
        self.cpu = usage.ru_utime + usage.ru_stime
        for handle in self.files:
            handle.close()

    def stderr_tail(self) -> str:
        try:
            return self.err_path.read_text(errors="replace")[-1500:]
        except OSError:
            return ""


@dataclass
class Result:
    requests: int
    busiest: int  # most requests in a sliding one-second window
    api_rate: float  # requests per second, first to last request
    seconds: float  # first to last request
    db_rate: float  # rows per second by sent_at, first to last
    states: dict[str, int]
    duplicates: int  # phones that got more than one request
    daemon_cpu: float  # seconds, all daemons together (start-up included)
    machine_busy: float  # share of the machine's CPU busy while the daemons ran
    codes: list[tuple[str, int | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class FleetBench:
    def __init__(self, url: DatabaseURL, logs: Path, beat: float) -> None:
        self.url = url
        self.logs = logs
        self.beat = beat
        self._started = 0

    def database_url(self) -> str:
        url = self.url
        return f"mysql://{url.user}:{url.password}@{url.host}:{url.port}/{url.database}"

    def environment(self, api: FakeCloudAPI, extra: dict[str, str]) -> dict[str, str]:
        return {
            **os.environ,
            "WORKER_DATABASE_URL": self.database_url(),
            "WHATSAPP_API_URL": api.base_url,
            "WHATSAPP_PHONE_NUMBER_ID": throughput.PHONE_ID,
            "WHATSAPP_ACCESS_TOKEN": throughput.TOKEN,
            "WORKER_LOG_FORMAT": "json",
            "WORKER_FLEET_BEAT": str(self.beat),
            "PYTHONPATH": str(ROOT),
            **extra,
        }

    def fresh_database(self, rows: int) -> None:
        """Drop, migrate, and fill one session with `rows` rows for one number."""
        with admin(self.url) as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{self.url.database}`")
        env = {
            **os.environ,
            "WORKER_DATABASE_URL": self.database_url(),
            "PYTHONPATH": str(ROOT),
        }
        with open(self.logs / "migrate.log", "ab") as log:
            subprocess.run(
                [sys.executable, "-m", "worker", "migrate"],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=log,
                check=True,
                timeout=120,
            )
        with admin(self.url, self.url.database) as conn, conn.cursor() as cur:
            cur.execute("INSERT INTO sesiones_envio (nombre) VALUES ('fleet-bench')")
            session = cur.lastrowid
            cur.executemany(
                "INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje) VALUES (%s, %s, %s, %s)",
                [(session, i, p, MESSAGE) for i, p in enumerate(throughput.phones(rows), 1)],
            )

    def start(self, env: dict[str, str], name: str) -> Daemon:
        self._started += 1
        stem = self.logs / f"{self._started:02d}-{name}"
        files: list[IO[bytes]] = [stem.with_suffix(".out").open("wb"), stem.with_suffix(".err").open("wb")]
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env={**env, "WORKER_PIDFILE": str(stem.with_suffix(".pid"))},
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=files[0],
            stderr=files[1],
        )
        return Daemon(name, process, files, stem.with_suffix(".err"))

    def left(self) -> int:
        """Rows not finished yet: waiting, or claimed and not answered."""
        with admin(self.url, self.url.database) as conn, conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM cola_envios WHERE estado IN ('pendiente', 'procesando')")
            return int(cur.fetchone()[0])

    def run(
        self,
        *,
        daemons: int,
        rows: int,
        latency: float,
        extra: dict[str, str],
        timeout: float,
        choreography: Choreography | None = None,
    ) -> Result:
        """Drain `rows` rows with `daemons` daemons; `choreography` may kill and start daemons
        while they send (it gets the fake API, the daemons, and a function starting one more)."""
        self.fresh_database(rows)
        api = FakeCloudAPI(token=throughput.TOKEN, latency=latency, phone_number_id=throughput.PHONE_ID)
        api.start()
        fleet: list[Daemon] = []
        try:
            env = self.environment(api, extra)

            def start(name: str) -> Daemon:
                daemon = self.start(env, name)
                fleet.append(daemon)
                return daemon

            cpu_start = cpu_times()
            running = [start(f"daemon{i}") for i in range(daemons)]
            deadline = time.monotonic() + timeout
            notes = choreography(api, running, start) if choreography else []
            while (left := self.left()) > 0:
                if not any(d.alive() for d in running):
                    raise BenchFailed(f"every daemon exited with {left} row(s) left")
                if time.monotonic() > deadline:
                    raise BenchFailed(f"{left} row(s) still not finished after {timeout:.0f} s")
                time.sleep(0.2)
            cpu_end = cpu_times()
        except BaseException:
            stop_all(fleet)
            api.close()
            for daemon in fleet:
                if daemon.code not in (0, -signal.SIGKILL):
                    print(f"  {daemon.name} exited {daemon.code}: {daemon.stderr_tail()}", file=sys.stderr)
            raise
        stop_all(fleet)
        api.close()

        times = sorted(r.at for r in api.requests)
        span = times[-1] - times[0] if len(times) > 1 else float("nan")
        with admin(self.url, self.url.database) as conn, conn.cursor() as cur:
            cur.execute("SELECT estado, COUNT(*) FROM cola_envios GROUP BY estado")
            states = {str(state): int(count) for state, count in cur.fetchall()}
            cur.execute(
                "SELECT COUNT(*), TIMESTAMPDIFF(MICROSECOND, MIN(sent_at), MAX(sent_at))"
                " FROM cola_envios WHERE estado = 'enviado'"
            )
            sent, span_us = cur.fetchone()
        return Result(
            requests=len(times),
            busiest=api.busiest_second(),
            api_rate=(len(times) - 1) / span if len(times) > 1 else float("nan"),
            seconds=span,
            db_rate=(sent - 1) / (span_us / 1e6) if sent > 1 and span_us else float("nan"),
            states=states,
            duplicates=sum(1 for count in api.counts().values() if count > 1),
            daemon_cpu=sum(d.cpu for d in fleet),
            machine_busy=busy_share(cpu_start, cpu_end),
            codes=[(d.name, d.code) for d in fleet],
            notes=notes,
        )

    def drop(self) -> None:
        with admin(self.url) as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{self.url.database}`")


def wait_for_requests(api: FakeCloudAPI, count: int, daemons: list[Daemon], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not api.wait_for_requests(count, timeout=0.5):
        if not any(d.alive() for d in daemons):
            raise BenchFailed(f"every daemon exited before request {count}")
        if time.monotonic() > deadline:
            raise BenchFailed(f"request {count} did not come within {timeout:.0f} s")


def kill_and_restart(kill_at: int, restart_at: int, timeout: float) -> Choreography:
    """SIGKILL the first daemon once `kill_at` requests arrived; start a new one at `restart_at`."""

    def choreography(api: FakeCloudAPI, daemons: list[Daemon], start: Callable[[str], Daemon]) -> list[str]:
        wait_for_requests(api, kill_at, daemons, timeout)
        victim = daemons[0]
        victim.signal(signal.SIGKILL)  # dies without a word: its row goes stale, its claims stay
        victim.wait(10)
        killed_at, killed = len(api.requests), time.monotonic()
        wait_for_requests(api, restart_at, daemons, timeout)
        daemons[0] = start("daemon0-restarted")
        restarted_at, gap = len(api.requests), time.monotonic() - killed
        return [f"daemon0 killed at request {killed_at}, restarted {gap:.1f} s later at {restarted_at}"]

    return choreography


def states_text(states: dict[str, int]) -> str:
    return ", ".join(f"{count} {state}" for state, count in sorted(states.items()))


def problems(result: Result, rows: int, killed: bool = False) -> list[str]:
    """What would make the figures misleading (printed, never asserted)."""
    found = []
    expected = {("daemon0", -signal.SIGKILL)} if killed else set()
    for name, code in result.codes:
        if code != 0 and (name, code) not in expected:
            found.append(f"{name} exited {code}")
    if result.duplicates:
        found.append(f"{result.duplicates} phone(s) got more than one request")
    if sum(result.states.values()) != rows:
        found.append(f"{sum(result.states.values())} rows in the table, {rows} enqueued")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "BENCH_DATABASE_URL", "mysql://root@127.0.0.1:3306/whatsapp_worker_fleetbench"
        ),
    )
    parser.add_argument("--daemons", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32, help="WORKER_CONCURRENCY of each daemon")
    parser.add_argument("--beat", type=float, default=1.0, help="WORKER_FLEET_BEAT, seconds")
    parser.add_argument("--limit", type=float, default=50, help="part 1: WORKER_RATE_LIMIT")
    parser.add_argument("--limit-rows", type=int, default=1500, help="part 1: rows per run")
    parser.add_argument("--limit-latency", type=float, default=0.02, help="part 1: API latency, s")
    parser.add_argument(
        "--scaling-limit", type=float, default=5000, help="part 2: WORKER_RATE_LIMIT (0: none)"
    )
    parser.add_argument("--scaling-rows", type=int, default=4800, help="part 2: rows per run")
    parser.add_argument("--scaling-latency", type=float, default=0.2, help="part 2: API latency, s")
    parser.add_argument("--keep-logs", action="store_true", help="keep the daemons' output")
    args = parser.parse_args()
    url = DatabaseURL.parse(args.database_url, "--database-url")
    logs = Path(tempfile.mkdtemp(prefix="whatsapp-worker-fleetbench-"))
    bench = FleetBench(url, logs, args.beat)
    with admin(url) as conn:
        server = conn.get_server_info()
    print(
        f"{url.redacted()} ({server}); {os.cpu_count()} CPU(s); WORKER_FLEET_BEAT={args.beat:g};"
        f" daemon output in {logs}",
        flush=True,
    )
    n = args.daemons
    failed = True
    try:
        # -- 1. the shared limit -----------------------------------------------------------
        rows = args.limit_rows
        limited = {
            "WORKER_RATE_LIMIT": f"{args.limit:g}",
            "WORKER_CONCURRENCY": str(args.concurrency),
            "WORKER_LEASE_SECONDS": "3",  # a killed daemon's claims come back in seconds...
            "WORKER_SEND_TIMEOUT": "1",  # ...and the lease must be more than twice this
        }
        timeout = 3 * rows / max(args.limit, 1) + 60
        print(
            f"\n1. Shared limit: WORKER_RATE_LIMIT={args.limit:g} for one number, {rows:,} rows per run,"
            f" fake API latency {args.limit_latency * 1000:.0f} ms, WORKER_CONCURRENCY={args.concurrency},"
            " WORKER_LEASE_SECONDS=3, WORKER_SEND_TIMEOUT=1",
            flush=True,
        )
        print(
            f"  {'':38}{'limit':>7}{'busiest 1-s window':>20}{'average msg/s':>15}{'requests':>10}"
            f"{'seconds':>9}",
            flush=True,
        )
        plain = bench.run(daemons=n, rows=rows, latency=args.limit_latency, extra=limited, timeout=timeout)
        labels = (f"{n} daemons", f"{n} daemons, one killed and restarted")
        shown = [(labels[0], plain, False)]
        print(
            f"  {labels[0]:38}{args.limit:7g}{plain.busiest:20}{plain.api_rate:15.1f}{plain.requests:10}"
            f"{plain.seconds:9.1f}",
            flush=True,
        )
        killed = bench.run(
            daemons=n,
            rows=rows,
            latency=args.limit_latency,
            extra=limited,
            timeout=timeout,
            choreography=kill_and_restart(rows // 3, rows // 2, timeout),
        )
        shown.append((labels[1], killed, True))
        print(
            f"  {labels[1]:38}{args.limit:7g}{killed.busiest:20}{killed.api_rate:15.1f}{killed.requests:10}"
            f"{killed.seconds:9.1f}",
            flush=True,
        )
        for label, result, was_killed in shown:
            line = f"  {label}: rows {states_text(result.states)}"
            print("; ".join([line, *result.notes, *problems(result, rows, was_killed)]), flush=True)

        # -- 2. scaling --------------------------------------------------------------------
        rows = args.scaling_rows
        generous = {
            "WORKER_RATE_LIMIT": f"{args.scaling_limit:g}",
            "WORKER_CONCURRENCY": str(args.concurrency),
        }
        timeout = 3 * rows * args.scaling_latency / args.concurrency + 60
        print(
            f"\n2. Scaling: WORKER_RATE_LIMIT={args.scaling_limit:g}, {rows:,} rows per run,"
            f" fake API latency {args.scaling_latency * 1000:.0f} ms,"
            f" WORKER_CONCURRENCY={args.concurrency} per daemon"
            f" (at most {args.concurrency / args.scaling_latency:.0f} msg/s per daemon)",
            flush=True,
        )
        print(
            f"  {'':12}{'msg/s (API)':>13}{'msg/s (sent_at)':>17}{'seconds':>9}{'busiest 1-s':>13}"
            f"{'daemon CPU s':>14}{'machine CPU busy':>18}",
            flush=True,
        )
        scaled: list[Result] = []
        for count in (1, n):
            result = bench.run(
                daemons=count, rows=rows, latency=args.scaling_latency, extra=generous, timeout=timeout
            )
            scaled.append(result)
            label = "1 daemon" if count == 1 else f"{count} daemons"
            print(
                f"  {label:12}{result.api_rate:13.1f}{result.db_rate:17.1f}{result.seconds:9.1f}"
                f"{result.busiest:13}{result.daemon_cpu:14.1f}{result.machine_busy:17.0%}",
                flush=True,
            )
            for problem in problems(result, rows):
                print(f"    {problem}", flush=True)
        one, many = scaled
        print(
            f"  {n} daemons / 1 daemon: x{many.api_rate / one.api_rate:.2f} by the API's request times,"
            f" x{many.db_rate / one.db_rate:.2f} by sent_at (goal: close to x{n})",
            flush=True,
        )
        failed = False
    except BenchFailed as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        bench.drop()
        if failed or args.keep_logs:
            print(f"daemon output kept in {logs}", file=sys.stderr)
        else:
            shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    main()
