"""`migrate`: create or upgrade the schema in place; `--dry-run` changes nothing."""

from __future__ import annotations

import argparse
import sys

from worker.cli.common import open_store
from worker.config import Settings
from worker.exits import EX_OK, EX_TEMPFAIL
from worker.store import DatabaseError, schema
from worker.store.migrations import TableBusy


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = commands.add_parser("migrate", help="create or upgrade the schema (in place)")
    migrate.add_argument(
        "--dry-run", action="store_true", help="print what is found and every statement; change nothing"
    )
    migrate.set_defaults(handler=cmd_migrate)


async def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    """Upgrade in place; `--dry-run` prints what it found and would run, and changes nothing."""
    where = settings.database.redacted()
    if args.dry_run:
        return await _migrate_dry_run(settings)
    store = await open_store(settings, create=True)
    try:
        applied = await store.migrations.migrate(lock_wait=settings.ddl_lock_wait)
    except TableBusy as exc:
        print(f"whatsapp-worker: migrate stopped: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    finally:
        await store.close()
    if applied.steps:
        for line in applied.found:
            print(f"found: {line}")
        for step in applied.steps:
            print(f"done: {step.why}")
        for note in applied.notes:
            print(f"note: {note}")
    if applied.steps or applied.versions:
        print(f"migrated {where} to version {schema.LATEST} ({len(applied.steps)} statement(s) run)")
    else:
        print(f"schema of {where} is up to date (version {schema.LATEST})")
    return EX_OK


async def _migrate_dry_run(settings: Settings) -> int:
    where = settings.database.redacted()
    try:
        store = await open_store(settings)
    except DatabaseError as exc:
        if exc.code != 1049:  # ER_BAD_DB_ERROR: the database does not exist yet
            raise
        print(f"dry run of migrate on {where}: the database does not exist; migrate would create it and:")
        for table in schema.TABLES:
            print(f"{table.create()};")
        return EX_OK
    try:
        plan = await store.migrations.plan()
    finally:
        await store.close()
    print(f"dry run of migrate on {where}: nothing is changed")
    for line in plan.found:
        print(f"found: {line}")
    for line in plan.blockers:
        print(f"blocked: {line} (migrate changes nothing until this is fixed by hand)")
    if not plan.steps:
        print("would run nothing: the tables have everything this worker needs")
    for step in plan.steps:
        print(f"-- {step.why}\n{step.sql};")
    print(f"then record schema version {schema.LATEST} in whatsapp_worker_migrations")
    return EX_OK
