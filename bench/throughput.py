"""Throughput, CPU and memory per message: whatsapp-worker against a bare aiohttp client.

Both send the same requests at the same concurrency to the same local fake Cloud API (a
separate process, fixed latency). The bare client has no database; the daemon claims, sends
and records every row in MySQL/MariaDB. Each run times the bare client before and after the
daemon (their mean is the run's reference), at every concurrency asked for; every run is
printed, then the medians. Run: `make bench` (or `python -m bench.throughput -h`).

Both sides run as their own processes: CPU is the process's own user + system time (the
daemon's less its start-up, measured by a `run --once` on an empty queue), peak RSS is the
process's own `VmHWM` read from /proc while it runs (a forked child's `ru_maxrss` would count
the parent's pages too). When the database server is on this machine, its CPU (user + system of
the process listening on the URL's port, from /proc) over each daemon run is printed per message
too: the user pays for it, and it shares the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pymysql

from worker.config import DatabaseURL
from worker.messages import request_body

ROOT = Path(__file__).resolve().parent.parent

TOKEN, PHONE_ID = "bench-token", "1234567890"
MESSAGE = {
    "type": "template",
    "template": {
        "name": "recordatorio_pago",
        "language": {"code": "es"},
        "components": [{"type": "body", "parameters": [{"type": "text", "text": "EMPRESA XYZ"}]}],
    },
}
FAKE_API = (
    "import sys\nfrom tests.support.fakeapi import FakeCloudAPI\n"
    "api = FakeCloudAPI(token=sys.argv[1], latency=float(sys.argv[2]), phone_number_id=sys.argv[3])\n"
    "api.start()\nprint(api.base_url, flush=True)\nsys.stdin.read()\napi.close()\n"
)


@dataclass
class Figures:
    rate: float  # messages/s
    cpu: float  # CPU µs per message
    rss: float  # peak RSS, MiB
    db_cpu: float | None = None  # the database server's CPU µs per message, when it is local


def server_pid(port: int) -> int | None:
    """The local process listening on `port` (the database server), or None: read from /proc,
    as `ss -ltnp` does, so a server elsewhere (or in a container we cannot see) is just None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                        inodes.add(f"socket:[{fields[9]}]")
        except OSError:
            continue
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:
            continue
    return None


def process_cpu(pid: int | None) -> float | None:
    """Seconds of user + system CPU the process has used (its threads included)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def start_fake_api(latency: float) -> tuple[subprocess.Popen[str], str]:
    """The fake Cloud API in its own process; (the process, its base URL). Closing its stdin
    stops it."""
    fake = subprocess.Popen(
        [sys.executable, "-c", FAKE_API, TOKEN, str(latency), PHONE_ID],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert fake.stdout is not None
    return fake, fake.stdout.readline().strip()


def phones(count: int) -> list[str]:
    return [f"+51990{i:07d}" for i in range(count)]


# -- the bare client (a child process of its own) -------------------------------------------


async def bare_client(url: str, count: int, concurrency: int) -> tuple[float, float]:
    """Send `count` requests with aiohttp alone; (messages/s, CPU µs per message)."""
    endpoint = f"{url}/{PHONE_ID}/messages"
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one(row_id: int, phone: str) -> None:
            async with limit, session.post(endpoint, data=request_body(row_id, phone, MESSAGE)) as r:
                payload = await r.read()
                assert r.status == 200, payload

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(phones(count), 1)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return count / wall, cpu / count * 1e6


# -- child processes --------------------------------------------------------------------------


def run_child(
    argv: list[str], env: dict[str, str] | None = None, *, capture: bool = False
) -> tuple[float, float, str]:
    """Run to completion; (CPU seconds, peak RSS MiB, stdout if captured) of that process alone."""
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, text=True)
    peak = [0]
    done = threading.Event()

    def watch() -> None:  # VmHWM only grows: the last reading before exit is the peak
        path = f"/proc/{proc.pid}/status"
        while not done.is_set():
            try:
                with open(path) as status:
                    for line in status:
                        if line.startswith("VmHWM:"):
                            peak[0] = max(peak[0], int(line.split()[1]))
                            break
            except OSError:
                return
            done.wait(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    text = proc.stdout.read() if proc.stdout is not None else ""
    _, status, usage = os.wait4(proc.pid, 0)  # this process's own rusage
    done.set()
    watcher.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[2:]} exited {proc.returncode}")
    return usage.ru_utime + usage.ru_stime, peak[0] / 1024, text


def bare(url: str, count: int, concurrency: int) -> Figures:
    _, rss, out = run_child(
        [sys.executable, __file__, "--bare-child", url, str(count), str(concurrency)], capture=True
    )
    rate, cpu = json.loads(out)
    return Figures(rate, cpu, rss)


class DaemonBench:
    """One database for the whole bench; each run refills it and drains it with `run --once`."""

    def __init__(self, url: str, db: DatabaseURL, extra_env: dict[str, str]) -> None:
        self._db = db
        self._server = server_pid(db.port) if db.host in ("127.0.0.1", "localhost", "::1") else None
        self._admin = pymysql.connect(
            host=db.host, port=db.port, user=db.user, password=db.password, autocommit=True
        )
        with self._admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{db.database}`")
        self._env = {
            **os.environ,
            "WORKER_DATABASE_URL": f"mysql://{db.user}:{db.password}@{db.host}:{db.port}/{db.database}",
            "WHATSAPP_API_URL": url,
            "WHATSAPP_PHONE_NUMBER_ID": PHONE_ID,
            "WHATSAPP_ACCESS_TOKEN": TOKEN,
            "WORKER_RATE_LIMIT": "0",
            "WORKER_LOG_FORMAT": "json",
            "WORKER_PIDFILE": f"/tmp/whatsapp-worker-bench-{os.getpid()}.pid",
            "PYTHONPATH": str(ROOT),
            **extra_env,
        }
        self._worker("migrate")

    def _worker(self, *args: str, concurrency: int = 32) -> tuple[float, float]:
        env = {**self._env, "WORKER_CONCURRENCY": str(concurrency)}
        cpu, rss, _ = run_child([sys.executable, "-m", "worker", *args], env)
        return cpu, rss

    def run(self, count: int, concurrency: int) -> Figures:
        with self._admin.cursor() as cur:
            cur.execute(f"USE `{self._db.database}`")
            for table in ("envios_whatsapp", "cola_envios", "sesiones_envio"):
                cur.execute(f"DELETE FROM {table}")
        startup, _ = self._worker("run", "--once", concurrency=concurrency)  # the fixed cost
        with self._admin.cursor() as cur:
            cur.execute("INSERT INTO sesiones_envio (nombre) VALUES ('bench')")
            session = cur.lastrowid
            message = json.dumps(MESSAGE)
            cur.executemany(
                "INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje) VALUES (%s, %s, %s, %s)",
                [(session, i, p, message) for i, p in enumerate(phones(count), 1)],
            )
        server_before = process_cpu(self._server)
        cpu, rss = self._worker("run", "--once", concurrency=concurrency)
        server_after = process_cpu(self._server)
        with self._admin.cursor() as cur:
            cur.execute(
                "SELECT COUNT(*), TIMESTAMPDIFF(MICROSECOND, MIN(sent_at), MAX(sent_at))"
                " FROM cola_envios WHERE estado = 'enviado'"
            )
            sent, span_us = cur.fetchone()
        assert sent == count, f"only {sent} of {count} rows were sent"
        db_cpu = None
        if server_before is not None and server_after is not None:
            db_cpu = (server_after - server_before) / count * 1e6
        return Figures((count - 1) / (span_us / 1e6), (cpu - startup) / count * 1e6, rss, db_cpu)

    def close(self) -> None:
        with self._admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{self._db.database}`")
        self._admin.close()


def median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def row(name: str, f: Figures, ref: Figures | None = None) -> str:
    db = "" if f.db_cpu is None else f"{f.db_cpu:.0f}"
    line = f"  {name:22}{f.rate:10.0f}{f.cpu:10.0f}{f.rss:9.1f}{db:>10}"
    if ref is not None:
        line += f"   x{f.rate / ref.rate:5.2f} throughput  x{f.cpu / ref.cpu:5.2f} CPU"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--messages", type=int, default=0, help="per run; default max(3000, 50 x concurrency)"
    )
    parser.add_argument("--concurrency", default="200,32", help="comma-separated")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.05, help="fake API latency, seconds")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="extra daemon setting"
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "mysql://root@127.0.0.1:3306/whatsapp_worker_bench"),
    )
    args = parser.parse_args()
    db = DatabaseURL.parse(args.database_url, "--database-url")
    extra = dict(item.split("=", 1) for item in args.env)
    levels = [int(c) for c in args.concurrency.split(",")]

    fake, url = start_fake_api(args.latency)
    bench = DaemonBench(url, db, extra)
    print(
        f"fake API latency {args.latency * 1000:.0f} ms, database {db.redacted()}, {args.runs} run(s)",
        flush=True,
    )
    summary = []
    try:
        for concurrency in levels:
            count = args.messages or max(3000, 50 * concurrency)
            print(f"\nconcurrency {concurrency}, {count} messages per run", flush=True)
            print(f"  {'':22}{'msg/s':>10}{'CPU µs':>10}{'RSS MiB':>9}{'DB CPU µs':>10}", flush=True)
            bares, daemons, rates, cpus = [], [], [], []
            for n in range(1, args.runs + 1):
                before = bare(url, count, concurrency)
                mine = bench.run(count, concurrency)
                after = bare(url, count, concurrency)
                ref = Figures(
                    (before.rate + after.rate) / 2, (before.cpu + after.cpu) / 2, (before.rss + after.rss) / 2
                )
                bares.append(ref)
                daemons.append(mine)
                rates.append(mine.rate / ref.rate)
                cpus.append(mine.cpu / ref.cpu)
                print(row(f"run {n} bare (mean)", ref), flush=True)
                print(row(f"run {n} whatsapp-worker", mine, ref), flush=True)
            med_bare = Figures(
                *(statistics.median(getattr(f, k) for f in bares) for k in ("rate", "cpu", "rss"))
            )
            med = Figures(
                *(statistics.median(getattr(f, k) for f in daemons) for k in ("rate", "cpu", "rss")),
                median_or_none([f.db_cpu for f in daemons]),
            )
            print(row("median bare", med_bare), flush=True)
            print(row("median whatsapp-worker", med), flush=True)
            line = (
                f"  median of the per-run ratios: x{statistics.median(rates):.2f} throughput"
                f" (runs {min(rates):.2f}-{max(rates):.2f}), x{statistics.median(cpus):.2f} CPU"
                f" (runs {min(cpus):.2f}-{max(cpus):.2f}); target >= 0.85 and <= 1.10"
            )
            if med.db_cpu is not None:
                line += f"; database server {med.db_cpu:.0f} µs/msg"
            print(line, flush=True)
            summary.append(f"c={concurrency}:{line.strip()}")
    finally:
        bench.close()
        if fake.stdin is not None:
            fake.stdin.close()
        fake.wait(10)
    print()
    print("\n".join(summary))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--bare-child":
        result = asyncio.run(bare_client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        print(json.dumps(result))
    else:
        main()
