"""`migrate` against a PHP application that keeps a transaction open on `cola_envios`.

A PHP-era table (tests/legacy/php_latin1.sql plus `--rows` waiting rows) in a fresh database.
One connection opens a transaction and reads `cola_envios` (a PHP request that has not committed
yet) and holds it; a second connection inserts a row every 20 ms the way the PHP producer does
and records how long each INSERT waited. `whatsapp-worker migrate` runs meanwhile with
`WORKER_DDL_LOCK_WAIT` set to each `--waits` value: its ALTER waits for the table's metadata
lock, and the producer's INSERTs queue behind the waiting ALTER for as long as it waits. Printed
side by side per setting: migrate's exit code and time, the longest INSERT wait, and whether
migrate named the holding connection. Then the transaction ends and migrate runs once more.
Figures are printed, never asserted. The database is dropped at the end.
Run: `python -m bench.migrate_lock` (`-h` for the options).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import threading
import time
from pathlib import Path

import pymysql

ROOT = Path(__file__).resolve().parent.parent
LEGACY = ROOT / "tests" / "legacy" / "php_latin1.sql"
MESSAGE = '{"type":"text","text":{"body":"hola"}}'


def connect(port: int, database: str | None = None, *, autocommit: bool = True) -> pymysql.Connection:
    return pymysql.connect(host="127.0.0.1", port=port, user="root", database=database, autocommit=autocommit)


def load_legacy(port: int, name: str, rows: int) -> None:
    conn = connect(port)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        cur.execute(f"CREATE DATABASE `{name}`")
        cur.execute(f"USE `{name}`")
        cur.execute("SET SESSION sql_mode = ''")
        for statement in LEGACY.read_text().split(";\n"):
            body = "\n".join(line for line in statement.splitlines() if not line.lstrip().startswith("--"))
            if body.strip():
                cur.execute(body)
        cur.execute("INSERT INTO sesiones_envio (id, nombre) VALUES (90, 'bench')")
        for start in range(0, rows, 10_000):
            values = ",".join(
                f"(90, {i}, '+5196{i:07d}', '{MESSAGE}')" for i in range(start, min(rows, start + 10_000))
            )
            cur.execute(f"INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje) VALUES {values}")
    conn.close()


class Producer(threading.Thread):
    """The PHP producer: one INSERT every 20 ms; the longest wait is what its users feel."""

    def __init__(self, port: int, name: str) -> None:
        super().__init__(daemon=True)
        self._conn = connect(port, name)
        self._halt = threading.Event()
        self.longest = 0.0
        self.inserted = 0

    def run(self) -> None:
        phone = 0
        with self._conn.cursor() as cur:
            while not self._halt.is_set():
                phone += 1
                started = time.monotonic()
                cur.execute(
                    "INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje)"
                    " VALUES (91, %s, %s, %s)",
                    (phone, f"+5195{time.monotonic_ns() % 10**7:07d}", MESSAGE),
                )
                self.longest = max(self.longest, time.monotonic() - started)
                self.inserted += 1
                self._halt.wait(0.02)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=600)
        self._conn.close()


def migrate(port: int, name: str, wait: int) -> tuple[int, float, str]:
    env = {
        **os.environ,
        "WORKER_DATABASE_URL": f"mysql://root@127.0.0.1:{port}/{name}",
        "WORKER_DDL_LOCK_WAIT": str(wait),
    }
    started = time.monotonic()
    done = subprocess.run(
        ["python", "-m", "worker", "migrate"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=3600
    )
    return done.returncode, time.monotonic() - started, done.stderr.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3306, help="the local server (3307: MySQL 9.7)")
    parser.add_argument("--rows", type=int, default=100_000, help="waiting rows in cola_envios")
    parser.add_argument("--waits", default="2,5,10", help="WORKER_DDL_LOCK_WAIT values, in seconds")
    args = parser.parse_args()
    name = f"ww_bench_lock_{os.getpid()}"
    load_legacy(args.port, name, args.rows)
    try:
        php = connect(args.port, name, autocommit=False)
        with php.cursor() as cur:
            cur.execute("SELECT CONNECTION_ID()")
            (php_id,) = cur.fetchone()
            cur.execute("SELECT COUNT(*) FROM cola_envios")  # the open transaction now holds the table
        print(f"cola_envios: {args.rows} waiting rows; connection {php_id} holds a transaction open on it")
        header = f"{'WORKER_DDL_LOCK_WAIT':>20} {'exit':>5} {'migrate s':>10} {'longest INSERT wait s':>22}"
        print(f"{header}  holder named")
        for wait in (int(w) for w in args.waits.split(",")):
            producer = Producer(args.port, name)
            producer.start()
            code, took, message = migrate(args.port, name, wait)
            producer.stop()
            named = f"connection {php_id} " in message
            print(f"{wait:>20} {code:>5} {took:>10.2f} {producer.longest:>22.3f}  {named}")
        php.rollback()
        php.close()
        producer = Producer(args.port, name)
        producer.start()
        code, took, message = migrate(args.port, name, 10)
        producer.stop()
        print(
            f"transaction ended: migrate exit {code} in {took:.2f}s, longest INSERT wait"
            f" {producer.longest:.3f}s over {producer.inserted} inserts (the online DDL)"
        )
    finally:
        conn = connect(args.port)
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


if __name__ == "__main__":
    main()
