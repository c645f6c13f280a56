"""What every command module shares: opening the store, the schema check, argument types."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple

from worker.config import Settings
from worker.messages import InvalidMessage, parse_phone
from worker.models import SENDABLE_STATES
from worker.store import RefusedChange, Store

Handler = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]


async def open_store(settings: Settings, *, size: int = 2, create: bool = False) -> Store:
    return await Store.connect(
        settings.database,
        size=size,
        worker_id=settings.worker_id,
        db_timeout=settings.db_timeout,
        create_database=create,
        sendable=(*SENDABLE_STATES, *settings.send_states),
        phone_number_id=settings.phone_number_id or None,
    )


async def open_checked_store(settings: Settings, *, size: int = 2) -> Store:
    """A store whose schema has every table, column, key and state the code needs.

    Raises SchemaMismatch (a DatabaseError): one line naming what is missing.
    """
    store = await open_store(settings, size=size)
    try:
        await store.migrations.require()
    except BaseException:
        await store.close()
        raise
    return store


def parse_phone_or_none(raw: str, settings: Settings) -> str | None:
    """A phone typed by an operator, in the queue's form (WORKER_DEFAULT_COUNTRY for one without
    a country code); None, with the reason on stderr, when it is no phone anywhere."""
    try:
        return parse_phone(raw, settings.default_country)
    except InvalidMessage as exc:
        print(f"whatsapp-worker: {exc}", file=sys.stderr)
        return None


def number_id(text: str) -> str:
    """A sending number's id as Meta gives it (`phone_number_id`): digits only."""
    if not (text.isascii() and text.isdigit() and len(text) <= 64):
        raise argparse.ArgumentTypeError(
            f"a phone_number_id is digits only (Meta's id of the number), got {text!r}"
        )
    return text


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# No bare `m`: `prune --older-than 1m` meant a month to one operator and deleted a minute's worth.
AGE_UNITS = {"min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Age(NamedTuple):
    seconds: int
    text: str


def age(text: str) -> Age:
    """`90min`, `12h`, `30d`, `4w`."""
    number = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = text[len(number) :].lower()
    if unit in ("m", "mo", "month", "months"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is ambiguous: write {number or 'N'}min for minutes, or days (30d) or weeks (4w)"
        )
    if unit not in AGE_UNITS or not number.isdigit() or int(number) < 1:
        raise argparse.ArgumentTypeError(
            f"an age like 90min, 12h, 30d or 4w (units: {', '.join(AGE_UNITS)}), got {text!r}"
        )
    return Age(int(number) * AGE_UNITS[unit], text)


def confirm(question: str, *, yes: bool) -> None:
    """Go on when `--yes` was given or a person at the terminal answers y; else refuse (exit 1)."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise RefusedChange("nothing changed: no terminal to ask; run again with --yes to go ahead")
    print(f"{question} [y/N] ", end="", flush=True)
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise RefusedChange("nothing changed")
