"""Flat costs: claim and progress at 0 vs 1,000,000 finished rows; daemon memory vs queue size.

Part 1, for each database URL: a live session of 1,000 waiting rows, then the same with
1,000,000 finished rows added, first in an older session, then in the live session itself.
Timed (median of many, in-process, the daemon's own store code): a claim of 50 rows
(`Claims.claim`, rolled back to waiting after each), the recorder's progress queries
(`Results.session_totals`, read once per session; `rows_added` + `live_rows`, every refresh) and
`status`'s counts for the live session (`Sessions.status`).
Part 2: the daemon's peak RSS (VmHWM) draining 20,000 and 200,000 rows (bench/throughput.py).
Every database this creates is dropped at the end. Run: `python -m bench.table_size -h`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pymysql

from worker.config import DatabaseURL
from worker.store import Store
from worker.store.claims import GIVE_BACK
from worker.store.db import placeholders

ROOT = Path(__file__).resolve().parent.parent

MESSAGE = '{"type":"text","text":{"body":"hola"}}'
FINISHED = 1_000_000
LIVE = 1_000


def admin(url: DatabaseURL, database: str | None = None) -> pymysql.Connection:
    return pymysql.connect(
        host=url.host, port=url.port, user=url.user, password=url.password, database=database, autocommit=True
    )


def migrate(url: DatabaseURL) -> None:
    env = {
        "WORKER_DATABASE_URL": f"mysql://{url.user}:{url.password}@{url.host}:{url.port}/{url.database}",
        "PYTHONPATH": str(ROOT),
        "PATH": "/usr/bin:/bin",
    }
    subprocess.run(
        [sys.executable, "-m", "worker", "migrate"], env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL
    )


def fill(cur: Any, session: int, count: int, state: str, prefix: str) -> None:
    """`count` rows (a multiple of 1,000) in one INSERT ... SELECT over a 1,000-row table."""
    cur.execute("CREATE TABLE IF NOT EXISTS bench_digits (n INT PRIMARY KEY)")
    cur.execute("SELECT COUNT(*) FROM bench_digits")
    if cur.fetchone()[0] == 0:
        cur.executemany("INSERT INTO bench_digits VALUES (%s)", [(i,) for i in range(1000)])
    sent = "UTC_TIMESTAMP(6)" if state == "enviado" else "NULL"
    cur.execute(
        "INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje, estado, attempts, sent_at)"
        f" SELECT %s, a.n * 1000 + b.n, CONCAT(%s, LPAD(a.n * 1000 + b.n, 7, '0')), %s, %s,"
        f" IF(%s = 'enviado', 1, 0), {sent}"
        " FROM bench_digits a JOIN bench_digits b WHERE a.n < %s",
        (session, prefix, MESSAGE, state, state, count // 1000),
    )


async def timed(action: Callable[[], Awaitable[Any]], repeat: int) -> float:
    """Median milliseconds of `repeat` calls (after one warm-up)."""
    await action()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        await action()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


async def claim_and_undo(store: Store) -> float:
    """ms of one claim of 50 rows; the rows are then given back, untouched, for the next."""
    start = time.perf_counter()
    jobs = await store.claims.claim(50, lease_seconds=60)
    elapsed = (time.perf_counter() - start) * 1000
    assert len(jobs) == 50, len(jobs)
    # the store's own give-back statement (what a daemon runs for a claim nobody sent)
    await store.db.update(GIVE_BACK.format(tokens=placeholders(1)), (jobs[0].lease_token,))
    return elapsed


async def measure(url: DatabaseURL, live: int, repeat: int) -> tuple[float, ...]:
    store = await Store.connect(url, worker_id="bench")
    try:
        claims: list[float] = []

        async def claim() -> None:
            claims.append(await claim_and_undo(store))

        await timed(claim, repeat)
        claim_ms = statistics.median(claims[1:])  # the claim alone, not its undoing
        progress_ms = await timed(lambda: store.results.session_totals([live]), repeat)
        refresh_ms = await timed(lambda: _refresh(store, live), repeat)
        status_ms = await timed(lambda: store.reports.status(live), repeat)
    finally:
        await store.close()
    return claim_ms, progress_ms, refresh_ms, status_ms


async def _refresh(store: Store, session: int) -> None:
    """What the progress task reads each second for a session it already knows."""
    await store.results.rows_added(session, 0x7FFFFFFF)  # no row was added since
    await store.results.live_rows([session])


def table_bench(url: DatabaseURL, repeat: int) -> None:
    with admin(url) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
    migrate(url)
    with admin(url, url.database) as conn, conn.cursor() as cur:
        server = conn.get_server_info()
        cur.execute("INSERT INTO sesiones_envio (nombre, estado) VALUES ('old', 'completada')")
        old = cur.lastrowid
        cur.execute("INSERT INTO sesiones_envio (nombre) VALUES ('live')")
        live = cur.lastrowid
        fill(cur, live, LIVE, "pendiente", "+519")
    print(f"\n{url.redacted()} ({server}); ms, median of {repeat}", flush=True)
    print(f"  {'finished rows':34}{'claim 50':>10}{'totals':>10}{'refresh':>10}{'status':>10}", flush=True)
    base = asyncio.run(measure(url, live, repeat))
    print(f"  {'0':34}" + "".join(f"{v:10.2f}" for v in base), flush=True)
    with admin(url, url.database) as conn, conn.cursor() as cur:
        start = time.perf_counter()
        fill(cur, old, FINISHED, "enviado", "+518")
        took = time.perf_counter() - start
    other = asyncio.run(measure(url, live, repeat))
    print(f"  {'1,000,000 in another session':34}" + "".join(f"{v:10.2f}" for v in other), flush=True)
    with admin(url, url.database) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE cola_envios SET sesion_id = %s, telefono = CONCAT('+517', SUBSTR(telefono, 5))"
            " WHERE sesion_id = %s",
            (live, old),
        )
    same = asyncio.run(measure(url, live, repeat))
    print(f"  {'1,000,000 in the live session':34}" + "".join(f"{v:10.2f}" for v in same), flush=True)
    print(f"  (1,000,000 rows inserted in {took:.1f} s)", flush=True)
    with admin(url) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")


def memory_bench(url: DatabaseURL, sizes: list[int]) -> None:
    import throughput

    fake, api = throughput.start_fake_api(0.05)
    bench = throughput.DaemonBench(api, url, {})
    print(f"\ndaemon peak RSS draining the queue, concurrency 200, {url.redacted()}", flush=True)
    try:
        for size in sizes:
            f = bench.run(size, 200)
            print(
                f"  {size:>9,} rows: peak RSS {f.rss:6.1f} MiB  ({f.rate:.0f} msg/s, {f.cpu:.0f} CPU µs/msg)",
                flush=True,
            )
    finally:
        bench.close()
        if fake.stdin is not None:
            fake.stdin.close()
        fake.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url",
        action="append",
        help="repeatable; default MariaDB on 3306 and MySQL on 3307",
    )
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--memory-sizes", default="20000,200000", help="comma-separated; empty: skip")
    parser.add_argument("--skip-tables", action="store_true")
    args = parser.parse_args()
    urls = [
        DatabaseURL.parse(u, "--database-url")
        for u in args.database_url
        or [
            "mysql://root@127.0.0.1:3306/whatsapp_worker_tablesize",
            "mysql://root@127.0.0.1:3307/whatsapp_worker_tablesize",
        ]
    ]
    if not args.skip_tables:
        for url in urls:
            table_bench(url, args.repeat)
    if args.memory_sizes:
        memory_bench(urls[0], [int(s) for s in args.memory_sizes.split(",")])


if __name__ == "__main__":
    main()
