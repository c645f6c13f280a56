"""Signed status webhooks at fixed offered rates, replayed by `wrk`, against `whatsapp-worker
webhook` and, in the same run, a bare aiohttp server that only checks the signature (the
ceiling of this machine: bench/webhook_bare.py).

For each body shape (`--per-request`: statuses per POST) and each offered rate (`--rates`, in
statuses per second), each server is started fresh (its own process, bound to 127.0.0.1; the
receiver on a database whose statuses and delivery times are reset first), warmed up (400
requests), and driven by `wrk` replaying pre-signed, distinct bodies: bench/webhook_load.lua
paces the requests at the offered rate over `--connections` keep-alive connections (open loop
as far as wrk allows: a request whose due time passed while every connection was busy is sent
at once and counted as late; wrk times a request from when it is written, so when sends are
late the real wait is longer by up to that lag). The table gives, per server and run:
- statuses acknowledged per second (200 answers, from the first due time to the last answer);
- wrk's p50 / p99 / max answer time (its own histogram; it corrects for coordinated omission
  only for answers slower than a connection's interval between requests);
- non-200: answers that were not 200, plus requests not sent or not answered when wrk stopped
  (5 s after the last due time); answers slower than 10 s are listed apart;
- late: sends more than 10 ms after their due time;
- the server's CPU per status, wrk's CPU per request, the server's RSS after the warm-up, at
  the end, and its peak (VmHWM);
- for the receiver: statuses stored (checked: each once, at least as many as acknowledged, each
  one's row applied) and how long after its receipt each was applied to its row
  (applied_at - received_at: p99 and max).
Then, per shape, the highest rate each server held (no failed or missing answer, at least 97%
of the offered rate acknowledged, p99 under 100 ms) and the ratio to the bare server's. With
`--runs N` each server runs N times at each rate, interleaved, then the medians. `--old TREE`
adds the receiver of another source tree (a worktree of an older commit) as `old`, for a
before/after in the same run. It prints figures and asserts nothing.

Needs Debian's `wrk` (`apt-get install -y wrk`). The load generator, the servers and MariaDB
share the machine's cores; wrk's CPU per request is printed.

    .venv/bin/python -m bench.webhook_load                 # 1,000 / 3,000 / 10,000 per s, 10 s each
    .venv/bin/python -m bench.webhook_load --long          # 60 s at up to 3,000/s
    .venv/bin/python -m bench.webhook_load --rates 1500,2000 --per-request 1 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.webhook_burst import SECRET, VERIFY, body, connect, env_for, prepare
from worker.config import DatabaseURL
from worker.webhook.parse import sign

ROOT = Path(__file__).resolve().parent.parent
LUA = Path(__file__).resolve().parent / "webhook_load.lua"
HELD_P99_MS = 100.0
WARMUP_REQUESTS, WARMUP_RATE = 400, 200.0
TAIL = 5.0  # seconds wrk keeps listening after the last due request
WRK_TIMEOUT = "10s"


@dataclass
class Result:
    server: str
    per_request: int
    offered: float
    seconds: float
    acked: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    max: float = 0.0
    ok: int = 0
    other: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0
    socket_errors: int = 0
    slow: int = 0  # answers later than WRK_TIMEOUT (wrk's timeouts)
    late: int = 0
    max_late: float = 0.0
    cpu_us: float = 0.0  # server CPU per status offered
    wrk_cpu_us: float = 0.0  # load generator CPU per request
    rss_start: float = 0.0
    rss_end: float = 0.0
    rss_peak: float = 0.0
    stored: int | None = None
    distinct: int | None = None
    applied_p99: float | None = None
    applied_max: float | None = None
    rows_applied: int | None = None
    pending: int | None = None

    @property
    def non200(self) -> int:
        return sum(self.other.values()) + self.unanswered

    @property
    def held(self) -> bool:
        return (
            self.non200 == 0
            and not self.slow
            and self.acked >= 0.97 * self.offered
            and self.p99 < HELD_P99_MS
        )


def check_wrk() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit(
            "wrk is not installed: `apt-get install -y wrk` (Debian's wrk 4.1, with LuaJIT; the bench"
            " replays pre-signed bodies through its Lua scripting)"
        )
    return found


# -- the database -------------------------------------------------------------------------------


def reset(url: DatabaseURL) -> None:
    """No status stored, no row applied: each receiver run starts from the same state."""
    conn = connect(url, url.database)
    with conn.cursor() as cur:
        cur.execute("TRUNCATE TABLE whatsapp_worker_statuses")
        cur.execute(
            "UPDATE cola_envios SET delivered_at = NULL, read_at = NULL WHERE delivered_at IS NOT NULL"
        )
    conn.close()


def max_status_id(url: DatabaseURL) -> int:
    conn = connect(url, url.database)
    with conn.cursor() as cur:
        cur.execute("SELECT COALESCE(MAX(id), 0) FROM whatsapp_worker_statuses")
        (found,) = cur.fetchone()
    conn.close()
    return int(found)


def settle_figures(url: DatabaseURL, after_id: int, rows: int, result: Result, wait: float = 60.0) -> None:
    """Wait until the run's statuses are all applied (and no more arrive), then read them."""
    conn = connect(url, url.database)
    deadline, last, stable_since = time.monotonic() + wait, -1, time.monotonic()
    with conn.cursor() as cur:
        while time.monotonic() < deadline:
            cur.execute(
                "SELECT COUNT(*), SUM(applied_at IS NULL) FROM whatsapp_worker_statuses WHERE id > %s",
                (after_id,),
            )
            count, pending = cur.fetchone()
            if count != last:
                last, stable_since = count, time.monotonic()
            if not pending and time.monotonic() - stable_since > 0.5:
                break
            time.sleep(0.1)
        cur.execute(
            "SELECT COUNT(*), COUNT(DISTINCT wamid, status), SUM(applied_at IS NULL)"
            " FROM whatsapp_worker_statuses WHERE id > %s",
            (after_id,),
        )
        stored, distinct, pending = cur.fetchone()
        cur.execute(
            "SELECT TIMESTAMPDIFF(MICROSECOND, received_at, applied_at) FROM whatsapp_worker_statuses"
            " WHERE id > %s AND applied_at IS NOT NULL",
            (after_id,),
        )
        delays = sorted(int(r[0]) / 1e6 for r in cur.fetchall())
        cur.execute("SELECT COUNT(*) FROM cola_envios WHERE id <= %s AND delivered_at IS NOT NULL", (rows,))
        (applied_rows,) = cur.fetchone()
    conn.close()
    result.stored, result.distinct, result.pending = int(stored), int(distinct), int(pending or 0)
    result.applied_p99 = percentile(delays, 99) if delays else None
    result.applied_max = delays[-1] if delays else None
    result.rows_applied = int(applied_rows)


# -- bodies ---------------------------------------------------------------------------------------


def write_bodies(path: Path, first: int, requests: int, per_request: int) -> None:
    """One pre-signed request a line: `signature<TAB>body`; statuses first .. first+n-1."""
    with path.open("wb") as out:
        for n in range(requests):
            raw = body(first + n * per_request, per_request)
            assert b"\n" not in raw and b"\t" not in raw
            out.write(sign(SECRET, raw).encode() + b"\t" + raw + b"\n")


# -- processes ------------------------------------------------------------------------------------


class Server:
    """A server process (the bare one or the receiver), its port, its CPU and memory."""

    def __init__(
        self, kind: str, url: DatabaseURL, logs: Path, tree: Path = ROOT, extra: dict[str, str] | None = None
    ) -> None:
        self.kind = "bare" if kind == "bare" else "receiver"
        self.log_path = logs / f"{kind}.log"
        out = self.log_path.open("wb")
        if kind == "bare":
            command = [sys.executable, "-m", "bench.webhook_bare", "--secret", SECRET, "--port", "0"]
            env = env_for(url)
        else:
            command = [sys.executable, "-m", "worker", "webhook"]
            env = env_for(
                url,
                WHATSAPP_APP_SECRET=SECRET,
                WHATSAPP_VERIFY_TOKEN=VERIFY,
                WORKER_WEBHOOK_HOST="127.0.0.1",
                WORKER_WEBHOOK_PORT="0",
                WORKER_LOG_FORMAT="json",
                **(extra or {}),
            )
            env["PYTHONPATH"] = str(tree)  # `--old`: another source tree's receiver
        self.proc = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=out,
            cwd=tree if kind != "bare" else ROOT,
            stdin=subprocess.DEVNULL,
        )
        out.close()
        self.port = self._wait_for_port()
        self._rss_peak_seen = 0.0
        self._sampling = False
        self._sampler: threading.Thread | None = None

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if self.kind == "bare" and line.startswith("listening "):
                    return int(line.split()[1])
                if self.kind == "receiver" and '"webhook_started"' in line:
                    return int(json.loads(line)["port"])
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"the {self.kind} server exited {self.proc.returncode}:\n{self.log_path.read_text()}"
                )
            time.sleep(0.05)
        self.stop()
        raise SystemExit(f"the {self.kind} server did not start in 30 s")

    def _status(self, field_name: str) -> float:
        """A /proc/<pid>/status figure in MiB (VmRSS, VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    def rss(self) -> float:
        return self._status("VmRSS")

    def peak(self) -> float:
        return self._status("VmHWM")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def run_wrk(
    wrk: str,
    port: int,
    bodies: Path,
    requests: int,
    rate: float,
    seconds: float,
    connections: int,
    threads: int,
    logs: Path,
    tail: float = TAIL,
) -> tuple[dict[str, Any], float]:
    """wrk replaying the first `requests` lines of `bodies` at `rate` requests/s: its JSON summary
    and its own CPU seconds."""
    summary = logs / "wrk-summary.json"
    summary.unlink(missing_ok=True)
    command = [
        wrk,
        f"-t{threads}",
        f"-c{max(connections, threads)}",
        f"-d{seconds + tail:.0f}s",
        "--timeout",
        WRK_TIMEOUT,
        "-s",
        str(LUA),
        f"http://127.0.0.1:{port}/webhook",
        "--",
        f"bodies={bodies}",
        f"limit={requests}",
        f"rate={rate}",
        f"threads={threads}",
    ]
    env = {**os.environ, "WEBHOOK_LOAD_OUT": str(summary)}
    with (logs / "wrk.out").open("ab") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not summary.exists():
        raise SystemExit(f"wrk failed ({proc.returncode}): see {logs / 'wrk.out'}")
    return json.loads(summary.read_text()), usage.ru_utime + usage.ru_stime


# -- one run --------------------------------------------------------------------------------------


def one_run(
    kind: str,
    args: argparse.Namespace,
    url: DatabaseURL,
    shape: int,
    rate: float,
    seconds: float,
    files: dict[int, Path],
    warmup: Path,
    logs: Path,
) -> Result:
    wrk = args.wrk
    tree = args.old if kind == "old" else ROOT
    if kind != "bare":
        reset(url)
    server = Server(kind, url, logs, tree, dict(item.split("=", 1) for item in args.env))
    result = Result(kind, shape, rate, seconds)
    try:
        run_wrk(
            wrk,
            server.port,
            warmup,
            WARMUP_REQUESTS,
            WARMUP_RATE,
            WARMUP_REQUESTS / WARMUP_RATE,
            16,
            1,
            logs,
            tail=1.0,
        )
        after_id = 0
        if kind != "bare":  # the warm-up's statuses applied before the run starts
            settle_figures(url, 0, 0, Result(kind, 1, 0, 0), wait=15)
            after_id = max_status_id(url)
        result.rss_start = server.rss()
        cpu_before = server.cpu_seconds()
        samples: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.25):
                samples.append(server.rss())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        requests = int(rate * seconds / shape)
        summary, wrk_cpu = run_wrk(
            wrk,
            server.port,
            files[shape],
            requests,
            rate / shape,
            seconds,
            args.connections,
            args.threads,
            logs,
        )
        done.set()
        sampler.join()
        result.cpu_us = (server.cpu_seconds() - cpu_before) / (requests * shape) * 1e6
        result.rss_end = server.rss()
        result.rss_peak = server.peak()
        threads = summary["threads"]
        ok = sum(t["ok"] for t in threads)
        other: dict[str, int] = {}
        for t in threads:
            for code, n in t["statuses"].items():
                other[code] = other.get(code, 0) + n
        written = sum(min(t["written"], t["count"]) for t in threads)
        t0 = min(t["t0"] for t in threads)
        last = max(t["last_answer"] for t in threads)
        result.ok, result.other = ok, other
        result.unanswered = max(0, requests - ok - sum(other.values()))
        result.acked = ok * shape / (last - t0) if last > t0 else 0.0
        result.p50, result.p99 = summary["lat_p50_us"] / 1000, summary["lat_p99_us"] / 1000
        result.max = summary["lat_max_us"] / 1000
        result.socket_errors = sum(summary[k] for k in ("errors_connect", "errors_read", "errors_write"))
        result.slow = summary["errors_timeout"]
        result.late = sum(t["late_10ms"] for t in threads)
        result.max_late = max(t["max_late"] for t in threads) * 1000
        result.wrk_cpu_us = wrk_cpu / max(1, written) * 1e6
        if kind != "bare":
            settle_figures(url, after_id, requests * shape, result)
    finally:
        server.stop()
    return result


# -- output ---------------------------------------------------------------------------------------

HEADER = (
    f"{'server':11}{'offered/s':>10}{'acked/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'non-200':>9}"
    f"{'late':>8}{'CPU us/st':>10}{'wrk us/rq':>10}{'RSS MiB start/end/peak':>24}"
    f"{'stored':>9}{'applied p99/max s':>19}"
)


def median_of(runs: list[Result]) -> Result:
    """One line for several runs of the same server and rate."""
    first = runs[0]
    mid = statistics.median
    other: dict[str, int] = {}
    for r in runs:
        for code, n in r.other.items():
            other[code] = other.get(code, 0) + n
    applied = [r for r in runs if r.applied_max is not None]
    return Result(
        first.server,
        first.per_request,
        first.offered,
        first.seconds,
        acked=mid(r.acked for r in runs),
        p50=mid(r.p50 for r in runs),
        p99=mid(r.p99 for r in runs),
        max=mid(r.max for r in runs),
        ok=sum(r.ok for r in runs),
        other=other,
        unanswered=sum(r.unanswered for r in runs),
        socket_errors=sum(r.socket_errors for r in runs),
        slow=sum(r.slow for r in runs),
        late=sum(r.late for r in runs),
        max_late=max(r.max_late for r in runs),
        cpu_us=mid(r.cpu_us for r in runs),
        wrk_cpu_us=mid(r.wrk_cpu_us for r in runs),
        rss_start=mid(r.rss_start for r in runs),
        rss_end=mid(r.rss_end for r in runs),
        rss_peak=max(r.rss_peak for r in runs),
        applied_p99=max((r.applied_p99 or 0.0) for r in applied) if applied else None,
        applied_max=max((r.applied_max or 0.0) for r in applied) if applied else None,
    )


def line(r: Result, run: int | None = None) -> str:
    label = r.server if run is None else f"{r.server} {run}"
    codes = ",".join(f"{n}x{c}" for c, n in sorted(r.other.items()))
    non = f"{r.non200}"
    stored = "" if r.stored is None else f"{r.stored:,}"
    applied = "" if r.applied_max is None else f"{r.applied_p99:.2f} / {r.applied_max:.2f}"
    text = (
        f"{label:11}{r.offered:>10,.0f}{r.acked:>9,.0f}{r.p50:>8.1f}{r.p99:>8.1f}{r.max:>8.0f}{non:>9}"
        f"{r.late:>8}{r.cpu_us:>10.0f}{r.wrk_cpu_us:>10.0f}"
        f"{f'{r.rss_start:.0f} / {r.rss_end:.0f} / {r.rss_peak:.0f}':>24}{stored:>9}{applied:>19}"
    )
    notes = []
    if codes:
        notes.append(f"answers {codes}")
    if r.unanswered:
        notes.append(f"{r.unanswered} not sent or not answered by the end")
    if r.socket_errors:
        notes.append(f"{r.socket_errors} socket errors")
    if r.slow:
        notes.append(f"{r.slow} answered after {WRK_TIMEOUT}")
    if r.late:
        notes.append(f"{r.late} sends >10 ms late (max {r.max_late:.0f} ms): every connection busy")
    if r.stored is not None:
        sent = int(r.offered * r.seconds)
        if r.distinct != r.stored:
            notes.append(f"DUPLICATES: {r.stored - (r.distinct or 0)}")
        if r.stored < r.ok * r.per_request:
            notes.append(f"STORED {r.stored} < ACKNOWLEDGED {r.ok * r.per_request}")
        if r.pending:
            notes.append(f"{r.pending} never applied")
        if r.rows_applied != r.stored:
            notes.append(f"rows applied {r.rows_applied} of {r.stored} stored")
        if r.stored != sent:
            notes.append(f"stored {r.stored:,} of {sent:,} sent")
    return text + (f"\n{'':11}({'; '.join(notes)})" if notes else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database", default=os.environ.get("BENCH_DATABASE_URL", "mysql://root@127.0.0.1:3306/")
    )
    parser.add_argument("--rates", default="1000,3000,10000", help="offered statuses per second")
    parser.add_argument("--per-request", default="1,10", help="statuses per POST, one table each")
    parser.add_argument("--seconds", type=float, default=10.0, help="each run at up to 3,000/s")
    parser.add_argument("--overload-seconds", type=float, default=10.0, help="each run above 3,000/s")
    parser.add_argument("--long", action="store_true", help="runs at up to 3,000/s last 60 s")
    parser.add_argument("--servers", default="bare,receiver")
    parser.add_argument("--runs", type=int, default=1, help="runs of each server at each rate, then medians")
    parser.add_argument(
        "--old",
        type=Path,
        default=None,
        help="another source tree (an older commit's worktree): its receiver runs as `old`",
    )
    parser.add_argument("--connections", type=int, default=500, help="wrk connections (Meta: many)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--logs", type=Path, default=None, help="keep logs and bodies here")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="a setting of the receiver's"
    )
    args = parser.parse_args()
    args.wrk = check_wrk()
    if args.long:
        args.seconds = 60.0
    rates = [float(r) for r in args.rates.split(",")]
    shapes = [int(s) for s in args.per_request.split(",")]
    servers = args.servers.split(",")
    if args.old is not None:
        servers.insert(servers.index("receiver") if "receiver" in servers else len(servers), "old")

    def seconds_for(rate: float) -> float:
        return args.seconds if rate <= 3000 else args.overload_seconds

    raw = args.database.rstrip("/")
    admin_url = DatabaseURL.parse(raw if raw.count("/") > 2 else raw + "/mysql", "--database")
    database = f"bench_receiver_{os.getpid()}"
    most = max(int(r * seconds_for(r)) for r in rates)
    rows = most + WARMUP_REQUESTS
    logs = args.logs or Path(tempfile.mkdtemp(prefix="webhook_load_"))
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(
        f"wrk {args.threads} thread(s), {args.connections} connections, timeout {WRK_TIMEOUT};"
        f" {os.cpu_count()} cores shared by wrk, the server and MariaDB; logs in {logs}",
        flush=True,
    )
    url = prepare(admin_url, rows, database)
    try:
        files: dict[int, Path] = {}
        for shape in shapes:
            files[shape] = logs / f"bodies-{shape}-per-request.txt"
            write_bodies(files[shape], 1, most // shape, shape)
        warmup = logs / "bodies-warmup.txt"
        write_bodies(warmup, most + 1, WARMUP_REQUESTS, 1)
        results: list[Result] = []
        for shape in shapes:
            print(f"\n{shape} status(es) per POST", flush=True)
            print(HEADER, flush=True)
            for rate in rates:
                for run in range(args.runs):
                    for kind in servers:  # interleaved: the servers share whatever else the machine does
                        result = one_run(kind, args, url, shape, rate, seconds_for(rate), files, warmup, logs)
                        results.append(result)
                        print(line(result, run + 1 if args.runs > 1 else None), flush=True)
            mine = [r for r in results if r.per_request == shape]
            if args.runs > 1:
                print(
                    f"medians of {args.runs} runs (non-200, late: all runs; RSS peak, applied: the highest)"
                )
                print(HEADER, flush=True)
                mine = [
                    median_of([r for r in mine if r.server == k and r.offered == o])
                    for o in rates
                    for k in servers
                ]
                for result in mine:
                    print(line(result), flush=True)
            summarise(mine, servers)
    finally:
        admin = connect(admin_url)
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
        admin.close()
        if args.logs is None:
            shutil.rmtree(logs, ignore_errors=True)
    print(f"\n({time.monotonic() - started:.0f} s)")


def summarise(results: list[Result], servers: list[str]) -> None:
    best: dict[str, Result | None] = {}
    for kind in servers:
        held = [r for r in results if r.server == kind and r.held]
        best[kind] = max(held, key=lambda r: r.offered) if held else None
        shown = f"{best[kind].offered:,.0f}/s" if best[kind] else "none of these rates"
        print(f"  highest rate held by {kind} (all acknowledged, none refused, p99 < 100 ms): {shown}")
    bare = best.get("bare")
    for kind in servers:
        mine = best.get(kind)
        if kind != "bare" and bare and mine:
            print(f"  {kind} / bare: {mine.offered / bare.offered:.2f} (goal: at least 0.7)")


def percentile(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else float("nan")


if __name__ == "__main__":
    main()
