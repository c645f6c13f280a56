"""What every command module shares: opening the store, the schema check, argument types."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple

from worker.config import Settings
from worker.models import SENDABLE_STATES
from worker.store import Store

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


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


AGE_UNITS = {"d": 86400, "h": 3600, "m": 60}


class Age(NamedTuple):
    seconds: int
    text: str


def age(text: str) -> Age:
    """`30d`, `12h`, `90m`."""
    number, unit = text[:-1], text[-1:].lower()
    if unit not in AGE_UNITS or not number.isdigit() or int(number) < 1:
        raise argparse.ArgumentTypeError(f"an age like 30d, 12h or 90m, got {text!r}")
    return Age(int(number) * AGE_UNITS[unit], text)
