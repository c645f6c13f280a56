"""`status` and `status --watch`: each refresh's time with a session of a million rows.

A fresh database (dropped at the end) holds what an operator's day two looks like: one campaign of
1,000,000 rows (700,000 finished: 2.1% of them Meta's 131026 errors, opted-out or suppressed
phones, the rest sent, 90% delivered and half read; 300,000 waiting; 80 sends/s for a minute),
49 more campaigns of 1,000 rows half sent, and 200 finished ones of 100 rows. Timed in-process
with the command's own code (median of `--repeat` after one warm-up; the database's own time
and the round trips, not Python's start-up):

- `status`: the daemons and every active session (the 50 campaigns), as printed;
- `status --all`: the 200 finished campaigns too;
- `status --session`: the largest campaign alone, with its webhook counts (delivered, read), and
  under `--watch` (without them);
- `status --watch` on a terminal of 24 rows and of 200 rows (every session fits).
First with the 49 campaigns of 1,000 rows only, then with the million-row one added.

`--before COMMIT` times the same views with that commit's `worker/store/reports.py` (read with
`git show`) beside them: before this change `status` read every session ever made and one pass
over each one's finished rows. Run: `python -m bench.status` (`-h` for the options).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.table_size import admin, migrate
from worker.cli import observe
from worker.config import DatabaseURL
from worker.store import Store
from worker.store.claims import OPTED_OUT_REASON as OPTED_OUT
from worker.store.claims import UNDELIVERABLE_REASON as SUPPRESSED

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = '{"type":"text","text":{"body":"hola"}}'
BEFORE = "c41032a"  # the last commit whose `status` read every finished row
BIG = 1_000_000
BIG_SENT = 700_000
OTHERS, OTHER_ROWS = 49, 1_000
FINISHED, FINISHED_ROWS = 200, 100
RATE = 80  # sends per second of the big campaign over the last minute


def digits(cur: Any) -> None:
    cur.execute("CREATE TABLE IF NOT EXISTS bench_digits (n INT PRIMARY KEY)")
    cur.execute("SELECT COUNT(*) FROM bench_digits")
    if cur.fetchone()[0] == 0:
        cur.executemany("INSERT INTO bench_digits VALUES (%s)", [(i,) for i in range(1000)])


def add_session(cur: Any, name: str) -> int:
    cur.execute("INSERT INTO sesiones_envio (nombre) VALUES (%s)", (name,))
    return int(cur.lastrowid)


def add_rows(cur: Any, session: int, rows: int, sent: int, prefix: str) -> None:
    """`rows` rows (a multiple of 1,000, or fewer than 1,000), the first `sent` of them finished:
    every 100th a Meta 131026 error, every 100th from the 50th an opted-out phone, every 1,000th
    from the 25th a suppressed one, the rest sent (nine in ten delivered, one in two read)."""
    cur.execute(
        "INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje, estado, attempts, sent_at,"
        " delivered_at, read_at, last_error_code, last_error)"
        " SELECT %s, k, CONCAT(%s, LPAD(k, 7, '0')), %s,"
        " CASE WHEN k >= %s THEN 'pendiente' WHEN MOD(k, 100) IN (0, 50) OR MOD(k, 1000) = 25 THEN 'error'"
        " ELSE 'enviado' END,"
        " k < %s, IF(k < %s, UTC_TIMESTAMP(6) - INTERVAL 1 DAY, NULL),"
        " IF(k < %s AND MOD(k, 10) <> 1, UTC_TIMESTAMP(6), NULL),"
        " IF(k < %s AND MOD(k, 2) = 1, UTC_TIMESTAMP(6), NULL),"
        " IF(k < %s AND (MOD(k, 100) = 0 OR MOD(k, 1000) = 25), 131026, NULL),"
        " IF(k < %s, CASE WHEN MOD(k, 100) = 0 THEN 'Message undeliverable'"
        " WHEN MOD(k, 100) = 50 THEN %s WHEN MOD(k, 1000) = 25 THEN %s END, NULL)"
        " FROM (SELECT a.n * 1000 + b.n AS k FROM bench_digits a JOIN bench_digits b WHERE a.n < %s) d"
        " WHERE k < %s",
        (session, prefix, MESSAGE, sent, *[sent] * 6, OPTED_OUT, SUPPRESSED, max(1, rows // 1000), rows),
    )


def sent_lately(cur: Any, session: int, count: int, per_second: float) -> None:
    """The session's last `count` sent rows went out over the last `count / per_second` seconds,
    each with its delivery row, as the result writer leaves them."""
    cur.execute(
        "UPDATE cola_envios c JOIN (SELECT id, ROW_NUMBER() OVER (ORDER BY id DESC) AS k FROM cola_envios"
        " WHERE sesion_id = %s AND estado = 'enviado' ORDER BY id DESC LIMIT %s) last ON last.id = c.id"
        " SET c.sent_at = UTC_TIMESTAMP(6) - INTERVAL ROUND(last.k * 1e6 / %s) MICROSECOND",
        (session, count, per_second),
    )
    cur.execute(
        "INSERT INTO envios_whatsapp (cola_id, sesion_id, cliente_id, telefono, wamid, fecha_envio)"
        " SELECT id, sesion_id, cliente_id, telefono, CONCAT('wamid.', id),"
        " NOW() - INTERVAL TIMESTAMPDIFF(MICROSECOND, sent_at, UTC_TIMESTAMP(6)) MICROSECOND"
        " FROM cola_envios WHERE sesion_id = %s AND sent_at > UTC_TIMESTAMP(6) - INTERVAL 70 SECOND",
        (session,),
    )


def fill(url: DatabaseURL) -> int:
    """The campaigns of 1,000 rows and the finished ones; returns the (empty) big campaign's id,
    made first so that it comes first on the screen once filled."""
    with admin(url, url.database) as conn, conn.cursor() as cur:
        digits(cur)
        big = add_session(cur, "million")
        for i in range(OTHERS):
            other = add_session(cur, f"campaign-{i:02d}")
            add_rows(cur, other, OTHER_ROWS, OTHER_ROWS // 2, f"+52{i:02d}")
            sent_lately(cur, other, 10, 1.0)
        for i in range(FINISHED):
            done = add_session(cur, f"finished-{i:03d}")
            add_rows(cur, done, FINISHED_ROWS, FINISHED_ROWS, f"+53{i:03d}")
            cur.execute("UPDATE sesiones_envio SET estado = 'completada' WHERE id = %s", (done,))
        cur.execute(
            "INSERT INTO whatsapp_worker_daemons (worker_id, host, pid, version, started_at, beat_at, state,"
            " in_flight, rate, rate_share) VALUES ('web1:4242:a', 'web1', 4242, 'bench',"
            " UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), 'sending', 32, 80, 77.6)"
        )
    return big


def fill_big(url: DatabaseURL, big: int) -> None:
    with admin(url, url.database) as conn, conn.cursor() as cur:
        start = time.perf_counter()
        add_rows(cur, big, BIG, BIG_SENT, "+517")
        sent_lately(cur, big, RATE * 60, RATE)
        cur.execute("ANALYZE TABLE cola_envios")
        print(f"  ({BIG:,} rows added in {time.perf_counter() - start:.0f} s)", flush=True)


def reports_before(commit: str) -> ModuleType | None:
    """That commit's `worker/store/reports.py`, as a module (None without git or that commit)."""
    shown = subprocess.run(
        ["git", "show", f"{commit}:worker/store/reports.py"], cwd=ROOT, capture_output=True, text=True
    )
    if shown.returncode != 0:
        print(f"  (no `before`: git show {commit} failed: {shown.stderr.strip()})", flush=True)
        return None
    spec = importlib.util.spec_from_loader("reports_before", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    exec(compile(shown.stdout, f"{commit}:worker/store/reports.py", "exec"), module.__dict__)
    return module


async def timed(action: Callable[[], Awaitable[Any]], repeat: int) -> float:
    """Median milliseconds of `repeat` calls, after one warm-up."""
    await action()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        await action()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


async def measure(
    url: DatabaseURL, big: int, repeat: int, before: ModuleType | None
) -> list[tuple[str, ...]]:
    """Each view's median ms, after and (with `before`) before: one row of cells per view."""
    store = await Store.connect(url)
    live = observe.LIVE_WITHIN
    active, everything = observe.View(None, False, live), observe.View(None, True, live)
    largest = big if await _has_rows(store, big) else big + 1

    async def status(view: observe.View) -> None:
        observe._render(await observe._report(store, view), as_json=False)

    async def watch(rows: int) -> None:
        os.environ["LINES"], os.environ["COLUMNS"] = str(rows), "120"
        await observe._screen(store, active, "header")

    async def watch_one(view: observe.View) -> None:
        observe._render(await observe._report(store, view, watching=True), as_json=False)

    async def old(session_id: int | None) -> None:
        assert before is not None
        await store.daemons.list(within=observe.SEEN_WITHIN)
        await before.Reports(store.db).status(session_id)

    views: list[tuple[Callable[[], Awaitable[Any]], Callable[[], Awaitable[Any]]]] = [
        (lambda: status(active), lambda: old(None)),
        (lambda: status(everything), lambda: old(None)),
        (lambda: status(observe.View(largest, False, live)), lambda: old(largest)),
        (lambda: watch_one(observe.View(largest, False, live)), lambda: old(largest)),
        (lambda: watch(24), lambda: old(None)),
        (lambda: watch(200), lambda: old(None)),
    ]
    cells = []
    try:
        for after, earlier in views:
            now = await timed(after, repeat)
            then = await timed(earlier, max(3, repeat // 4)) if before is not None else None
            cells.append(("-" if then is None else f"{then:.1f}", f"{now:.1f}"))
    finally:
        await store.close()
    return cells


async def _has_rows(store: Store, session: int) -> bool:
    async with store.db.transaction() as cur:
        await cur.execute("SELECT EXISTS (SELECT 1 FROM cola_envios WHERE sesion_id = %s)", (session,))
        (found,) = await cur.fetchone()
    return bool(found)


VIEWS = (
    "status (the active sessions)",
    "status --all (and 200 finished)",
    "status --session (the largest)",
    "status --watch --session (the largest)",
    "status --watch, 24-row terminal",
    "status --watch, 200-row terminal (all fit)",
)


def print_table(
    without: list[tuple[str, ...]], with_big: list[tuple[str, ...]], repeat: int, before: str
) -> None:
    print(f"  ms per refresh, median of {repeat}; before: {before or '-'} (read every finished row)")
    print(f"  {'':44}{f'{OTHERS} sessions of 1,000 rows':>22}{f'+ one of {BIG:,} rows':>26}")
    print(f"  {'':44}{'before':>11}{'after':>11}{'before':>13}{'after':>13}")
    for label, (b1, a1), (b2, a2) in zip(VIEWS, without, with_big, strict=True):
        print(f"  {label:44}{b1:>11}{a1:>11}{b2:>13}{a2:>13}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "BENCH_DATABASE_URL", "mysql://root@127.0.0.1:3306/whatsapp_worker_statusbench"
        ),
    )
    parser.add_argument("--repeat", type=int, default=20, help="refreshes timed per view")
    parser.add_argument("--before", default=BEFORE, help="commit to compare with ('' to skip)")
    args = parser.parse_args()
    url = DatabaseURL.parse(args.database_url, "--database-url")
    with admin(url) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
        server = conn.get_server_info()
    migrate(url)
    try:
        print(f"{url.redacted()} ({server})", flush=True)
        big = fill(url)
        before = reports_before(args.before) if args.before else None
        without = asyncio.run(measure(url, big, args.repeat, before))
        fill_big(url, big)
        with_big = asyncio.run(measure(url, big, args.repeat, before))
        print_table(without, with_big, args.repeat, args.before)
    finally:
        with admin(url) as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")


if __name__ == "__main__":
    sys.exit(main())
