"""Throughput and CPU per message: whatsapp-worker against a bare aiohttp client, one run.

Both send the same requests at the same concurrency to the same local fake Cloud API (a
separate process, fixed latency). The bare client has no database; the daemon claims, sends
and records every row in MySQL/MariaDB. Run: `make bench` (or `python bench/throughput.py -h`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pymysql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.config import DatabaseURL  # noqa: E402
from worker.messages import request_body  # noqa: E402

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
    "import sys\nfrom tests.fakeapi import FakeCloudAPI\n"
    "api = FakeCloudAPI(token=sys.argv[1], latency=float(sys.argv[2]), phone_number_id=sys.argv[3])\n"
    "api.start()\nprint(api.base_url, flush=True)\nsys.stdin.read()\napi.close()\n"
)


def phones(count: int) -> list[str]:
    return [f"+51990{i:07d}" for i in range(count)]


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


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def worker(env: dict[str, str], *args: str) -> float:
    """Run the command to completion; the CPU seconds it used."""
    before = children_cpu()
    subprocess.run(
        [sys.executable, "-m", "worker", *args], env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL
    )
    return children_cpu() - before


def daemon(url: str, db: DatabaseURL, count: int, concurrency: int) -> tuple[float, float, float]:
    """`run --once` over `count` fresh rows; (messages/s, CPU µs per message, peak RSS MiB)."""
    admin = pymysql.connect(host=db.host, port=db.port, user=db.user, password=db.password, autocommit=True)
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{db.database}`")
    env = {
        **os.environ,
        "WORKER_DATABASE_URL": f"mysql://{db.user}:{db.password}@{db.host}:{db.port}/{db.database}",
        "WHATSAPP_API_URL": url,
        "WHATSAPP_PHONE_NUMBER_ID": PHONE_ID,
        "WHATSAPP_ACCESS_TOKEN": TOKEN,
        "WORKER_CONCURRENCY": str(concurrency),
        "WORKER_RATE_LIMIT": "0",
        "WORKER_LOG_FORMAT": "json",
        "WORKER_PIDFILE": f"/tmp/whatsapp-worker-bench-{os.getpid()}.pid",
        "PYTHONPATH": str(ROOT),
    }
    worker(env, "migrate")
    startup = worker(env, "run", "--once")  # empty queue: the fixed cost of starting up
    with admin.cursor() as cur:
        cur.execute(f"USE `{db.database}`")
        cur.execute("INSERT INTO sesiones_envio (nombre) VALUES ('bench')")
        message = json.dumps(MESSAGE)
        cur.executemany(
            "INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje) VALUES (1, %s, %s, %s)",
            [(i, p, message) for i, p in enumerate(phones(count), 1)],
        )
    cpu = worker(env, "run", "--once") - startup
    with admin.cursor() as cur:
        cur.execute(
            "SELECT COUNT(*), TIMESTAMPDIFF(MICROSECOND, MIN(sent_at), MAX(sent_at))"
            " FROM cola_envios WHERE estado = 'enviado'"
        )
        sent, span_us = cur.fetchone()
        cur.execute(f"DROP DATABASE `{db.database}`")
    admin.close()
    assert sent == count, f"only {sent} of {count} rows were sent"
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return (count - 1) / (span_us / 1e6), cpu / count * 1e6, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.05, help="fake API latency, seconds")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "mysql://root@127.0.0.1:3306/whatsapp_worker_bench"),
    )
    args = parser.parse_args()
    db = DatabaseURL.parse(args.database_url, "--database-url")

    fake = subprocess.Popen(
        [sys.executable, "-c", FAKE_API, TOKEN, str(args.latency), PHONE_ID],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stdout is not None
        url = fake.stdout.readline().strip()
        bare_rate, bare_cpu = asyncio.run(bare_client(url, args.messages, args.concurrency))
        rate, cpu, rss = daemon(url, db, args.messages, args.concurrency)
    finally:
        if fake.stdin is not None:
            fake.stdin.close()
        fake.wait(10)

    print(
        f"{args.messages} messages, concurrency {args.concurrency}, "
        f"fake API latency {args.latency * 1000:.0f} ms, database {db.redacted()}"
    )
    print(f"{'':24}{'messages/s':>12}{'CPU µs/msg':>12}")
    print(f"{'bare aiohttp client':24}{bare_rate:12.0f}{bare_cpu:12.0f}")
    print(
        f"{'whatsapp-worker':24}{rate:12.0f}{cpu:12.0f}"
        f"   ({rate / bare_rate:.0%} of the throughput, {cpu / bare_cpu:.0%} of the CPU;"
        f" peak RSS {rss:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
