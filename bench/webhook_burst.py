"""A burst of signed status webhooks at `whatsapp-worker webhook`, beside the database's raw
INSERT rate measured in the same run.

The receiver runs as its own process against a fresh database whose `enviado` rows the
statuses refer to (so applying them, delivered times, runs during the burst as in production).
This process fires signed POSTs at a fixed rate (open loop: a slow answer does not slow the
sender down; latency counts from the moment each request was due, so queueing shows), each
carrying `--per-request` statuses, and prints:
- statuses acknowledged per second (200 answers, each after its batch committed) and the
  latency of the answers (p50, p99, max), and how many were not 200;
- how long after the last answer every status had been applied to its row;
- the same database's raw INSERT rate into the statuses table: one row per transaction (what a
  receiver without batching would do) and 100 rows per transaction.
It prints figures and asserts nothing about timing. Run: `python -m bench.webhook_burst -h`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pymysql

from worker.config import DatabaseURL
from worker.webhook.parse import sign

ROOT = Path(__file__).resolve().parent.parent

SECRET, VERIFY = "bench-app-secret", "bench-verify-token"
DATABASE = "whatsapp_worker_bench_webhook"
TS = 1772366400


def connect(url: DatabaseURL, database: str | None = None) -> pymysql.connections.Connection:  # type: ignore[type-arg]
    return pymysql.connect(
        host=url.host, port=url.port, user=url.user, password=url.password, database=database, autocommit=True
    )


def env_for(url: DatabaseURL, **extra: str) -> dict[str, str]:
    auth = f"{url.user}:{url.password}" if url.password else url.user
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "WHATSAPP_"))}
    env.update(
        WORKER_DATABASE_URL=f"mysql://{auth}@{url.host}:{url.port}/{url.database}",
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


def prepare(server: DatabaseURL, rows: int, database: str = DATABASE) -> DatabaseURL:
    """A fresh database, migrated by the CLI, with `rows` rows already `enviado` (wamid.B<id>)."""
    admin = connect(server)
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
    admin.close()
    url = server.with_database(database)
    subprocess.run(
        [sys.executable, "-m", "worker", "migrate"],
        env=env_for(url),
        check=True,
        capture_output=True,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    conn = connect(url, database)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO sesiones_envio (nombre) VALUES ('bench')")
        session = cur.lastrowid
        for start in range(0, rows, 5000):
            batch = range(start, min(rows, start + 5000))
            cur.executemany(
                "INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje, estado, wamid)"
                " VALUES (%s, %s, %s, '{}', 'enviado', %s)",
                [(session, i + 1, f"+51990{i:07d}", f"wamid.B{i + 1}") for i in batch],
            )
    conn.close()
    return url


def raw_insert_rate(url: DatabaseURL, rows: int, per_transaction: int) -> float:
    """Rows/s inserting into whatsapp_worker_statuses, `per_transaction` rows per commit."""
    conn = connect(url, DATABASE)
    conn.autocommit(False)
    raw = json.dumps({"id": "wamid.RAW", "status": "delivered", "timestamp": str(TS)})
    sql = (
        "INSERT INTO whatsapp_worker_statuses (wamid, status, cola_id, status_at, recipient_id, raw,"
        " received_at) VALUES {rows}"
    )
    one = "(%s, 'delivered', NULL, UTC_TIMESTAMP(6), '51990000000', %s, UTC_TIMESTAMP(6))"
    started = time.perf_counter()
    with conn.cursor() as cur:
        for start in range(0, rows, per_transaction):
            count = min(per_transaction, rows - start)
            params: list[str] = []
            for i in range(start, start + count):
                params += [f"wamid.RAW{per_transaction}.{i}", raw]
            cur.execute(sql.format(rows=",".join([one] * count)), params)
            conn.commit()
    elapsed = time.perf_counter() - started
    with conn.cursor() as cur:
        cur.execute("DELETE FROM whatsapp_worker_statuses WHERE wamid LIKE 'wamid.RAW%%'")
    conn.commit()
    conn.close()
    return rows / elapsed


def start_receiver(url: DatabaseURL, logs: Path) -> tuple[subprocess.Popen[bytes], int]:
    env = env_for(
        url,
        WHATSAPP_APP_SECRET=SECRET,
        WHATSAPP_VERIFY_TOKEN=VERIFY,
        WORKER_WEBHOOK_PORT="0",
        WORKER_LOG_FORMAT="json",
    )
    out = logs.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "webhook"], env=env, stdout=out, stderr=out, cwd=ROOT
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in logs.read_text(errors="replace").splitlines():
            if '"webhook_started"' in line:
                return proc, int(json.loads(line)["port"])
        if proc.poll() is not None:
            raise SystemExit(f"the receiver exited {proc.returncode}:\n{logs.read_text()}")
        time.sleep(0.05)
    raise SystemExit("the receiver did not start in 30 s")


def body(first: int, count: int) -> bytes:
    statuses = [
        {
            "id": f"wamid.B{i}",
            "status": "delivered",
            "timestamp": str(TS + i),
            "recipient_id": f"51990{i - 1:07d}",
            "biz_opaque_callback_data": f"cola:{i}",
            "conversation": {"id": "CONVERSATION_ID", "origin": {"type": "utility"}},
            "pricing": {"billable": True, "pricing_model": "CBP", "category": "utility"},
        }
        for i in range(first, first + count)
    ]
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"phone_number_id": "1234567890"},
        "statuses": statuses,
    }
    return json.dumps(
        {"object": "whatsapp_business_account", "entry": [{"id": "WABA", "changes": [{"value": value}]}]}
    ).encode()


async def burst(port: int, rate: float, seconds: float, per_request: int) -> tuple[list[float], int, float]:
    """(latencies of the 200 answers, requests not answered 200, seconds from first due to last answer)."""
    requests = int(rate * seconds / per_request)
    interval = per_request / rate
    url = f"http://127.0.0.1:{port}/webhook"
    bodies = [body(1 + n * per_request, per_request) for n in range(requests)]
    signed = [
        (b, {"X-Hub-Signature-256": sign(SECRET, b), "Content-Type": "application/json"}) for b in bodies
    ]
    latencies: list[float] = []
    failures = 0
    connector = aiohttp.TCPConnector(limit=1000)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        last = started

        async def one(n: int) -> None:
            nonlocal failures, last
            due = started + n * interval
            try:
                async with session.post(url, data=signed[n][0], headers=signed[n][1]) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            now = time.perf_counter()
            last = max(last, now)
            if ok:
                latencies.append(now - due)
            else:
                failures += 1

        tasks = []
        for n in range(requests):
            delay = started + n * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(n)))
        await asyncio.gather(*tasks)
    return latencies, failures, last - started


def all_applied(url: DatabaseURL, expected: int, timeout: float = 120.0) -> float:
    conn = connect(url, DATABASE)
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < timeout:
            with conn.cursor() as cur:
                cur.execute("SELECT COUNT(*) FROM cola_envios WHERE delivered_at IS NOT NULL")
                (done,) = cur.fetchone()
            if done >= expected:
                return time.perf_counter() - started
            time.sleep(0.05)
        return float("nan")
    finally:
        conn.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database", default=os.environ.get("BENCH_DATABASE_URL", "mysql://root@127.0.0.1:3306/")
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="statuses per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each burst")
    parser.add_argument("--per-request", type=int, default=1, help="statuses in each POST (Meta: often 1)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    raw = args.database.rstrip("/")
    server = DatabaseURL.parse(raw if raw.count("/") > 2 else raw + "/mysql", "--database")
    total = int(args.rate * args.seconds / args.per_request) * args.per_request
    logs = Path("/tmp/webhook_burst.log")
    print(
        f"burst of {total} statuses at {args.rate:g}/s, {args.per_request} per POST, "
        f"{args.runs} run(s); receiver log: {logs}",
        flush=True,
    )
    print(f"{'':8}{'acked/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'non-200':>9}{'applied +s':>12}")
    acked_rates, p50s, p99s = [], [], []
    for run in range(1, args.runs + 1):
        url = prepare(server, total)
        proc, port = start_receiver(url, logs)
        try:
            latencies, failures, elapsed = asyncio.run(burst(port, args.rate, args.seconds, args.per_request))
            applied = all_applied(url, total)
        finally:
            proc.terminate()
            proc.wait(30)
        acked = len(latencies) * args.per_request / elapsed
        p50, p99 = percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000
        acked_rates.append(acked)
        p50s.append(p50)
        p99s.append(p99)
        print(
            f"run {run:<4}{acked:>10,.0f}{p50:>9.1f}{p99:>9.1f}{max(latencies, default=0) * 1000:>9.1f}"
            f"{failures:>9}{applied:>12.2f}",
            flush=True,
        )
    print(
        f"median  {statistics.median(acked_rates):>10,.0f}{statistics.median(p50s):>9.1f}"
        f"{statistics.median(p99s):>9.1f}",
        flush=True,
    )
    url = server.with_database(DATABASE)
    single = raw_insert_rate(url, 2000, 1)
    hundred = raw_insert_rate(url, 20000, 100)
    print(
        f"raw INSERT into whatsapp_worker_statuses, same database: {single:,.0f} rows/s"
        " one row per transaction,"
    )
    print(f"  {hundred:,.0f} rows/s 100 rows per transaction")
    admin = connect(server)
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{DATABASE}`")
    admin.close()


if __name__ == "__main__":
    main()
