"""`whatsapp-worker enqueue` of big CSV files: wall time, rows/s and peak RSS, side by side.

For each size (default 100,000 and 1,000,000 rows) it writes a CSV (phone, client_id and two
template parameters), creates a fresh database, runs `migrate`, then runs the command as a
subprocess twice: the import, and the same import again (which must queue nothing). Peak RSS is
the child's own `ru_maxrss` from `wait4`. A one-row import gives the command's baseline RSS.
Every database this creates is dropped at the end. Run: `python -m bench.enqueue -h`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pymysql

from worker.config import DatabaseURL

ROOT = Path(__file__).resolve().parent.parent

ARGS = ["--session", "bench", "--template", "recordatorio_pago", "--language", "es"]


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_rss_mib: float
    stdout: str


def write_csv(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write("phone,client_id,empresa,monto\n")
        for start in range(0, rows, 10_000):
            handle.writelines(
                f"+5198{i:07d},{i + 1},Empresa {i % 977} S.A.C.,S/ {i % 500}.50\n"
                for i in range(start, min(rows, start + 10_000))
            )


def run(url: DatabaseURL, csv: Path) -> Run:
    """One `enqueue` in a child process; its own peak RSS from wait4."""
    auth = f"{url.user}:{url.password}" if url.password else url.user
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "WHATSAPP_"))},
        "WORKER_DATABASE_URL": f"mysql://{auth}@{url.host}:{url.port}/{url.database}",
        "PYTHONPATH": str(ROOT),
    }
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-m", "worker", "enqueue", *ARGS, "--csv", str(csv)],
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
                (os.POSIX_SPAWN_DUP2, err.fileno(), 2),
            ],
        )
        _, status, usage = os.wait4(pid, 0)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"enqueue failed: {err.read()[-2000:]}")
        return Run(seconds, usage.ru_maxrss / 1024, out.read().strip())


def fresh_database(server: DatabaseURL, name: str) -> DatabaseURL:
    conn = pymysql.connect(host=server.host, port=server.port, user=server.user, password=server.password)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()
    url = server.with_database(name)
    auth = f"{url.user}:{url.password}" if url.password else url.user
    subprocess.run(
        [sys.executable, "-m", "worker", "migrate"],
        env={**os.environ, "WORKER_DATABASE_URL": f"mysql://{auth}@{url.host}:{url.port}/{name}"},
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return url


def drop_database(server: DatabaseURL, name: str) -> None:
    conn = pymysql.connect(host=server.host, port=server.port, user=server.user, password=server.password)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url", default="mysql://root@127.0.0.1:3306/", help="server (a database is created)"
    )
    parser.add_argument("--rows", default="100000,1000000", help="comma-separated file sizes")
    args = parser.parse_args()
    raw = args.url.rstrip("/")
    server = DatabaseURL.parse(raw + ("/bench" if raw.count("/") <= 2 else ""), "--url")
    sizes = [int(n) for n in args.rows.split(",")]
    name = f"ww_bench_enqueue_{os.getpid()}"
    results = []
    with tempfile.TemporaryDirectory(prefix="enqueue-bench-") as tmp:
        try:
            for rows in [1, *sizes]:
                csv = Path(tmp) / f"{rows}.csv"
                write_csv(csv, rows)
                url = fresh_database(server, name)
                first = run(url, csv)
                again = run(url, csv)
                print(f"{rows:>9,} rows: {first.stdout} | again: {again.stdout}", file=sys.stderr)
                results.append((rows, csv.stat().st_size / 2**20, first, again))
                csv.unlink()
        finally:
            drop_database(server, name)
    base = results[0][2].peak_rss_mib
    print(
        f"\nenqueue on {server.host}:{server.port} (command baseline, a 1-row file: {base:.1f} MiB peak RSS)"
    )
    print("| rows | file | import: wall, rows/s, peak RSS | same file again (0 new): wall, peak RSS |")
    print("|---|---|---|---|")
    for rows, mib, first, again in results[1:]:
        print(
            f"| {rows:,} | {mib:.0f} MiB | {first.seconds:.1f} s, {rows / first.seconds:,.0f}/s,"
            f" {first.peak_rss_mib:.1f} MiB | {again.seconds:.1f} s, {again.peak_rss_mib:.1f} MiB |"
        )


if __name__ == "__main__":
    main()
