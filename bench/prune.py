"""`prune` under load: a daemon's drain alone and while `prune` deletes 1,000,000 finished rows,
and the claim's latency with 0 and with 1,000,000 finished rows.

1. A fresh database; the claim (`Claims.claim`, 50 rows of a 1,000-row live session, undone
   after each; the daemon's own store code, median of many) timed with no finished row.
2. 1,000,000 finished rows (`enviado`, last changed 40 days ago) added in one INSERT ... SELECT;
   the claim timed again.
3. Drains: a daemon (`run --once`, its own process) sends a fresh session of N rows to the fake
   Cloud API (tests/fakeapi.py, its own process, fixed latency); throughput from the rows'
   `sent_at` (first to last; "wall" adds the daemon's start-up). `--pairs` drains alone with the
   million rows in place, then `whatsapp-worker prune --older-than 30d` starts and up to
   `--pairs` drains run while it deletes (one counts only if the prune was still deleting when
   it ended), then drains alone after it. The medians side by side and their ratio (goal: a drop
   of less than a fifth). The claim is also timed while the prune deletes, and after it.
Figures are printed, never asserted. The database is dropped at the end.
Run: `python -m bench.prune` (`-h` for the options).
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
from typing import Any

import pymysql

from bench import table_size, throughput
from worker.config import DatabaseURL
from worker.store import Store

ROOT = Path(__file__).resolve().parent.parent

MESSAGE = json.dumps(throughput.MESSAGE)
LIVE_ROWS = 1_000


def admin(url: DatabaseURL, database: str | None = None) -> pymysql.Connection:
    return pymysql.connect(
        host=url.host, port=url.port, user=url.user, password=url.password, database=database, autocommit=True
    )


def environment(url: DatabaseURL, api: str, concurrency: int) -> dict[str, str]:
    return {
        **os.environ,
        "WORKER_DATABASE_URL": f"mysql://{url.user}:{url.password}@{url.host}:{url.port}/{url.database}",
        "WHATSAPP_API_URL": api,
        "WHATSAPP_PHONE_NUMBER_ID": throughput.PHONE_ID,
        "WHATSAPP_ACCESS_TOKEN": throughput.TOKEN,
        "WORKER_RATE_LIMIT": "0",
        "WORKER_CONCURRENCY": str(concurrency),
        "WORKER_LOG_FORMAT": "json",
        "WORKER_PIDFILE": f"/tmp/whatsapp-worker-prunebench-{os.getpid()}.pid",
        "PYTHONPATH": str(ROOT),
    }


def digits(cur: Any) -> None:
    cur.execute("CREATE TABLE IF NOT EXISTS bench_digits (n INT PRIMARY KEY)")
    cur.execute("SELECT COUNT(*) FROM bench_digits")
    if cur.fetchone()[0] == 0:
        cur.executemany("INSERT INTO bench_digits VALUES (%s)", [(i,) for i in range(1000)])


def add_rows(cur: Any, session: int, count: int, prefix: str, *, finished: bool = False) -> None:
    """`count` rows (a multiple of 1,000) in one INSERT ... SELECT: waiting, or sent 40 days ago."""
    digits(cur)
    state, extra = ("enviado", "UTC_TIMESTAMP(6) - INTERVAL 40 DAY") if finished else ("pendiente", "NULL")
    cur.execute(
        "INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje, estado, attempts, sent_at,"
        " wamid, created_at, updated_at)"
        " SELECT %s, a.n * 1000 + b.n, CONCAT(%s, LPAD(a.n * 1000 + b.n, 7, '0')), %s, %s, %s,"
        f" {extra}, IF(%s, CONCAT('wamid.', a.n * 1000 + b.n), NULL),"
        " NOW(6) - INTERVAL 40 DAY, NOW(6) - INTERVAL 40 DAY"
        " FROM bench_digits a JOIN bench_digits b WHERE a.n < %s",
        (session, prefix, MESSAGE, state, int(finished), finished, count // 1000),
    )


def new_session(cur: Any, name: str) -> int:
    cur.execute("INSERT INTO sesiones_envio (nombre) VALUES (%s)", (name,))
    return int(cur.lastrowid)


async def claim_latency(url: DatabaseURL, session: int, repeat: int) -> float:
    """Median ms of `Claims.claim(50)` on the live session (each claim undone before the next)."""
    store = await Store.connect(url, worker_id="bench-claim")
    times = []
    try:
        for _ in range(repeat + 1):
            times.append(await table_size.claim_and_undo(store))
    finally:
        await store.close()
    return statistics.median(times[1:])  # the first one warms the pool


def measure_claim(url: DatabaseURL, repeat: int, label: str) -> float:
    with admin(url, url.database) as conn, conn.cursor() as cur:
        live = new_session(cur, f"claim-{label}")
        add_rows(cur, live, LIVE_ROWS, "+519")
    try:
        return asyncio.run(claim_latency(url, live, repeat))
    finally:  # the drains must not send these
        with admin(url, url.database) as conn, conn.cursor() as cur:
            cur.execute("DELETE FROM cola_envios WHERE sesion_id = %s", (live,))


class Drains:
    def __init__(self, url: DatabaseURL, env: dict[str, str], rows: int) -> None:
        self._url, self._env, self._rows = url, env, rows
        self._runs = 0

    def drain(self) -> tuple[float, float]:
        """One `run --once` over a fresh session of N rows: (messages/s by sent_at, wall seconds)."""
        self._runs += 1
        with admin(self._url, self._url.database) as conn, conn.cursor() as cur:
            session = new_session(cur, f"drain-{self._runs}")
            add_rows(cur, session, self._rows, f"+5{self._runs % 10}{self._runs // 10 % 10}")
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "worker", "run", "--once"],
            env=self._env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"run --once exited {done.returncode}: {done.stderr[-2000:]}")
        with admin(self._url, self._url.database) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT COUNT(*), TIMESTAMPDIFF(MICROSECOND, MIN(sent_at), MAX(sent_at))"
                " FROM cola_envios WHERE sesion_id = %s AND estado = 'enviado'",
                (session,),
            )
            sent, span_us = cur.fetchone()
        assert sent == self._rows, f"only {sent} of {self._rows} rows were sent"
        return (sent - 1) / (span_us / 1e6), wall


def finished_left(url: DatabaseURL, session: int) -> int:
    with admin(url, url.database) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM cola_envios WHERE sesion_id = %s", (session,))
        return int(cur.fetchone()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "BENCH_DATABASE_URL", "mysql://root@127.0.0.1:3306/whatsapp_worker_prunebench"
        ),
    )
    parser.add_argument("--finished", type=int, default=1_000_000, help="finished rows to prune")
    parser.add_argument("--messages", type=int, default=6_000, help="rows per drain (a multiple of 1,000)")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.05, help="fake API latency, seconds")
    parser.add_argument("--pairs", type=int, default=3, help="drains alone / with prune, at most")
    parser.add_argument("--repeat", type=int, default=30, help="claims timed per measurement")
    args = parser.parse_args()
    url = DatabaseURL.parse(args.database_url, "--database-url")

    with admin(url) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
        server = conn.get_server_info()
    fake, api = throughput.start_fake_api(args.latency)
    env = environment(url, api, args.concurrency)
    try:
        subprocess.run(
            [sys.executable, "-m", "worker", "migrate"],
            env=env,
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        print(
            f"{url.redacted()} ({server}); fake API latency {args.latency * 1000:.0f} ms,"
            f" concurrency {args.concurrency}, {args.messages:,} rows per drain",
            flush=True,
        )
        claim_empty = measure_claim(url, args.repeat, "empty")
        with admin(url, url.database) as conn, conn.cursor() as cur:
            old = new_session(cur, "finished")
            cur.execute("UPDATE sesiones_envio SET estado = 'completada' WHERE id = %s", (old,))
            start = time.perf_counter()
            add_rows(cur, old, args.finished, "+518", finished=True)
            filled = time.perf_counter() - start
        print(f"{args.finished:,} finished rows inserted in {filled:.1f} s", flush=True)
        claim_full = measure_claim(url, args.repeat, "full")

        drains = Drains(url, env, args.messages)
        before: list[float] = []
        during: list[float] = []
        after: list[float] = []
        print(f"\n  {'drain':26}{'msg/s':>9}{'wall s':>9}{'finished rows left':>20}", flush=True)

        def show(label: str, figures: tuple[float, float], left: int, note: str = "") -> None:
            print(f"  {label:26}{figures[0]:9.0f}{figures[1]:9.1f}{left:>20,}{note}", flush=True)

        for _ in range(args.pairs):
            figures = drains.drain()
            before.append(figures[0])
            show("alone", figures, finished_left(url, old))
        prune_started = time.perf_counter()
        command = [sys.executable, "-m", "worker", "prune", "--older-than", "30d", "--yes"]
        prune = subprocess.Popen(
            command,
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        claim_pruning = measure_claim(url, args.repeat, "pruning")
        if prune.poll() is not None:
            claim_pruning = float("nan")  # the prune ended during the measurement: not counted
        for _ in range(args.pairs):
            figures = drains.drain()
            if prune.poll() is not None:
                show(
                    "while prune deletes",
                    figures,
                    finished_left(url, old),
                    "  (prune ended first: not counted)",
                )
                break
            during.append(figures[0])
            show("while prune deletes", figures, finished_left(url, old))
        out, err = prune.communicate()
        pruned_in = time.perf_counter() - prune_started
        if prune.returncode != 0:
            raise SystemExit(f"prune exited {prune.returncode}: {err[-2000:]}")
        for _ in range(args.pairs):
            figures = drains.drain()
            after.append(figures[0])
            show("alone, after the prune", figures, finished_left(url, old))
        claim_after = measure_claim(url, args.repeat, "after")

        print(f"\nprune: {out.strip()} in {pruned_in:.1f} s ({args.finished / pruned_in:,.0f} rows/s)")
        base = statistics.median(before)
        print(f"\n  {'drain, median msg/s':26}{'alone':>10}{'with prune':>12}{'ratio':>8}{'after prune':>13}")
        if during:
            loaded = statistics.median(during)
            print(f"  {'':26}{base:10.0f}{loaded:12.0f}{loaded / base:8.2f}{statistics.median(after):13.0f}")
            print(f"  drop while pruning: {100 * (1 - loaded / base):.1f}% (goal: less than 20%)")
        else:
            print("  the prune ended before a drain did: use more --finished rows or fewer --messages")
        heads = ("0 finished", f"{args.finished:,} finished", "while pruning", "after the prune")
        print(f"\n  {'claim of 50 rows, median ms':28}" + "".join(f"{h:>20}" for h in heads))
        figures_ms = (claim_empty, claim_full, claim_pruning, claim_after)
        print(f"  {'':28}" + "".join(f"{v:20.2f}" for v in figures_ms), flush=True)
    finally:
        with admin(url) as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
        if fake.stdin is not None:
            fake.stdin.close()
        fake.wait(10)


if __name__ == "__main__":
    main()
