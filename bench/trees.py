"""Two source trees of whatsapp-worker, run alternately on the same queue: CPU and wall time.

`make bench` compares the daemon with a bare client, and on this 2-core machine its 5-run
medians move by 10-15% from one set to the next. To see what a change costs, run the commit
before it and the change itself in turns instead, on identical queues:

    git worktree add --detach /tmp/before HEAD~3
    .venv/bin/python -m bench.trees --old /tmp/before --new . --concurrency 32 --messages 3000

Each run drops and migrates a database, queues `--messages` rows in one session and times
`whatsapp-worker run --once` (the whole process: its CPU from the children's rusage, start-up
included) against the fake Cloud API of bench/throughput.py; with a local database server, that
server's CPU over the drain too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pymysql

from bench import throughput
from worker.config import DatabaseURL

ROOT = Path(__file__).resolve().parent.parent


def queue(url: DatabaseURL, tree: Path, env: dict[str, str], count: int) -> None:
    conn = pymysql.connect(
        host=url.host, port=url.port, user=url.user, password=url.password, autocommit=True
    )
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
    subprocess.run(
        [sys.executable, "-m", "worker", "migrate"], env=env, cwd=tree, check=True, capture_output=True
    )
    message = json.dumps(throughput.MESSAGE)
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO `{url.database}`.sesiones_envio (nombre) VALUES ('bench')")
        cur.executemany(
            f"INSERT INTO `{url.database}`.cola_envios (sesion_id, telefono, mensaje) VALUES (1, %s, %s)",
            [(phone, message) for phone in throughput.phones(count)],
        )
    conn.close()


def drain(tree: Path, env: dict[str, str], server: int | None) -> tuple[float, float, float]:
    """(CPU seconds, wall seconds, the database server's CPU seconds or NaN) of one
    `run --once` from `tree`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = throughput.process_cpu(server)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "worker", "run", "--once"], env=env, cwd=tree, stdout=subprocess.DEVNULL
    )
    wall = time.perf_counter() - started
    server_after = throughput.process_cpu(server)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    db = server_after - server_before if server_before is not None and server_after is not None else math.nan
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall, db


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="the tree before the change")
    parser.add_argument("--new", type=Path, default=ROOT, help="the tree with it (default: this one)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.05, help="fake API latency, seconds")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "mysql://root@127.0.0.1:3306/whatsapp_worker_trees"),
    )
    args = parser.parse_args()
    url = DatabaseURL.parse(args.database_url, "--database-url")
    fake, api = throughput.start_fake_api(args.latency)
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
    server = throughput.server_pid(url.port) if url.host in ("127.0.0.1", "localhost", "::1") else None
    try:
        for run in range(1, args.runs + 1):
            for name, tree in trees.items():
                env = {
                    **os.environ,
                    "WORKER_DATABASE_URL": args.database_url,
                    "WHATSAPP_API_URL": api,
                    "WHATSAPP_PHONE_NUMBER_ID": throughput.PHONE_ID,
                    "WHATSAPP_ACCESS_TOKEN": throughput.TOKEN,
                    "WORKER_RATE_LIMIT": "0",
                    "WORKER_LOG_FORMAT": "json",
                    "WORKER_CONCURRENCY": str(args.concurrency),
                    "WORKER_PIDFILE": f"/tmp/whatsapp-worker-trees-{os.getpid()}.pid",
                    "PYTHONPATH": str(tree),
                }
                queue(url, tree, env, args.messages)
                cpu, wall, db = drain(tree, env, server)
                figures[name].append((cpu, wall, db))
                print(
                    f"  run {run} {name:4} {cpu:6.2f} CPU s {wall:6.2f} s {args.messages / wall:7.0f} msg/s"
                    f"  database server {db:5.2f} CPU s",
                    flush=True,
                )
    finally:
        assert fake.stdin is not None
        fake.stdin.close()
        fake.wait()
    print(f"\n{args.messages:,} messages, concurrency {args.concurrency}, medians of {args.runs}:")
    for name, tree in trees.items():
        cpu = statistics.median(f[0] for f in figures[name])
        wall = statistics.median(f[1] for f in figures[name])
        db = statistics.median(f[2] for f in figures[name])
        per, db_per = cpu / args.messages * 1e6, db / args.messages * 1e6
        print(
            f"  {name:4} {cpu:6.2f} CPU s ({per:5.0f} µs/msg)  {args.messages / wall:7.0f} msg/s"
            f"  database server {db_per:5.0f} µs/msg  {tree}"
        )
    old, new = (statistics.median(f[0] for f in figures[n]) for n in ("old", "new"))
    print(f"  new / old CPU: x{new / old:.2f}")


if __name__ == "__main__":
    main()
