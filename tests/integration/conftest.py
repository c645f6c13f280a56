"""Fixtures of the integration tests: the store on a fresh, migrated database."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from worker.config import DatabaseURL
from worker.store import Store


@pytest.fixture
async def store(db_url: DatabaseURL) -> AsyncIterator[Store]:
    """The store of one fresh database, as a daemon on `test-host` would open it."""
    store = await Store.connect(db_url, size=4, worker_id="test-host:1")
    yield store
    await store.close()
