"""`make demo`: migrate, enqueue the sample session, drain it with the sandbox sender, show status.

Runs the real command line (`python -m worker ...`) against WORKER_DATABASE_URL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SESSION = "recordatorio-demo"


def worker(*args: str, env: dict[str, str]) -> None:
    print(f"\n$ whatsapp-worker {' '.join(args)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "worker", *args], env=env, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"demo: `whatsapp-worker {args[0]}` exited {result.returncode}")


def main() -> None:
    runtime = Path(tempfile.mkdtemp(prefix="whatsapp-worker-demo-"))
    env = {
        **os.environ,
        "WORKER_SENDER": "sandbox",
        "WORKER_PIDFILE": str(runtime / "whatsapp-worker.pid"),
        "WORKER_LOG_FORMAT": os.environ.get("WORKER_LOG_FORMAT", "console"),
    }
    env.setdefault("WORKER_DATABASE_URL", "mysql://root@127.0.0.1:3306/whatsapp_worker_demo")
    worker("migrate", env=env)
    worker(
        "enqueue",
        "--session",
        SESSION,
        "--template",
        "recordatorio_pago",
        "--language",
        "es",
        "--csv",
        str(ROOT / "examples" / "recordatorios.csv"),
        env=env,
    )
    worker("run", "--once", env=env)
    worker("status", env=env)
    print("\nRun it again: the same file queues nothing new and nothing is sent twice.")


if __name__ == "__main__":
    main()
