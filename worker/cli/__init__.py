"""Command line: parse arguments, load settings, set up logging, run.

One module per group of commands; each `register`s its parsers and sets `handler` (an async
command on the database) or `local` (a command that reads this host's files only, before
logging: it gets `LocalFiles`, so it needs neither the database URL nor any secret).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import Any

from worker import __version__
from worker.cli import enqueue, migrate, observe, operate, run, webhook
from worker.config import ConfigError, LocalFiles, Settings
from worker.exits import EX_CONFIG, EX_UNAVAILABLE
from worker.log import configure
from worker.store import DatabaseError, RefusedChange
from worker.store.migrations import SchemaMismatch

COMMAND_MODULES = (migrate, enqueue, run, operate, observe, webhook)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whatsapp-worker",
        description="Drain the cola_envios queue through the WhatsApp Cloud API, each message once.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "max", None) is not None and not args.once:
        parser.error("--max goes with --once")
    try:
        if getattr(args, "local", None):
            return int(args.local(LocalFiles.from_env()))
        settings = Settings.from_env(need_sender=getattr(args, "needs_sender", False))
    except ConfigError as exc:
        print(f"whatsapp-worker: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    configure(
        secrets=settings.secrets(),
        stream=sys.stderr if args.command not in ("run", "webhook") else None,  # services: stdout
        fmt=settings.log_format,
        level=settings.log_level,
    )
    try:
        return _run_loop(args.handler(settings, args))
    except ConfigError as exc:  # found after start-up (e.g. the metrics port is taken)
        print(f"whatsapp-worker: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except SchemaMismatch as exc:
        print(f"whatsapp-worker: {exc}", file=sys.stderr)
        return EX_CONFIG  # systemd does not restart on it: a restart cannot fix the schema
    except DatabaseError as exc:
        print(f"whatsapp-worker: database error: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except RefusedChange as exc:
        print(f"whatsapp-worker: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run_loop(coro: Coroutine[Any, Any, int]) -> int:
    if os.environ.get("WORKER_EVENT_LOOP", "uvloop") == "asyncio":
        return asyncio.run(coro)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)
