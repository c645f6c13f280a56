"""The data layer, split by who calls it; the only package that speaks SQL.

- `claims`: the fetch path (claim, give back, recover expired leases, template holds);
- `results`: the result writer (fenced batches, progress totals);
- `sessions`: operators' commands on a session (pause, resume, cancel, retry, rows);
- `producers`: `enqueue`; `reports`: the progress report of `status`;
- `migrations`: the schema;
- `prune`: deleting finished rows in small batches;
- `statuses`, `optouts`: Meta's status webhooks (stored, then applied to rows) and opt-outs;
- `daemons`: each running daemon's row (the fleet's view, the shared rate limit);
- `db`: connections, and driver errors translated into three of ours.
"""

from __future__ import annotations

from worker.config import DatabaseURL
from worker.models import SENDABLE_STATES
from worker.store.claims import Claims
from worker.store.daemons import Beat, Daemons, Live
from worker.store.db import (
    TRANSACTION_TIMEOUT,
    Database,
    DatabaseError,
    DatabaseUnavailable,
    RowRefused,
    StatementRefused,
)
from worker.store.holds import Hold, Holds
from worker.store.migrations import Migrations
from worker.store.optouts import Optouts
from worker.store.producers import Producers
from worker.store.prune import Pruned, Pruner
from worker.store.reports import Reports
from worker.store.results import Recorded, Results
from worker.store.sessions import RefusedChange, RetryPlan, SessionChange, Sessions
from worker.store.statuses import Statuses
from worker.store.suppressions import Suppressions

__all__ = [
    "Beat",
    "Claims",
    "Daemons",
    "Database",
    "DatabaseError",
    "DatabaseUnavailable",
    "Hold",
    "Holds",
    "Live",
    "Migrations",
    "Optouts",
    "Producers",
    "Pruned",
    "Pruner",
    "Recorded",
    "RefusedChange",
    "Reports",
    "Results",
    "RetryPlan",
    "RowRefused",
    "SessionChange",
    "Sessions",
    "StatementRefused",
    "Statuses",
    "Store",
    "Suppressions",
]


class Store:
    """One database, its callers' views of it."""

    def __init__(
        self,
        db: Database,
        *,
        worker_id: str = "",
        sendable: tuple[str, ...] = SENDABLE_STATES,
        phone_number_id: str | None = None,
    ) -> None:
        self.db = db
        self.claims = Claims(db, worker_id=worker_id, sendable=sendable, default_number=phone_number_id)
        self.daemons = Daemons(db, worker_id=worker_id)
        self.results = Results(db)
        self.sessions = Sessions(db)
        self.producers = Producers(db)
        self.reports = Reports(db)
        self.migrations = Migrations(db, sendable=sendable)
        self.pruner = Pruner(db)
        self.statuses = Statuses(db, default_number=phone_number_id)
        self.optouts = Optouts(db)
        self.suppressions = Suppressions(db)
        self.holds = Holds(db)

    @classmethod
    async def connect(
        cls,
        url: DatabaseURL,
        *,
        size: int = 4,
        worker_id: str = "",
        db_timeout: float = TRANSACTION_TIMEOUT,
        create_database: bool = False,
        sendable: tuple[str, ...] = SENDABLE_STATES,
        phone_number_id: str | None = None,
    ) -> Store:
        db = await Database.connect(url, size=size, db_timeout=db_timeout, create_database=create_database)
        return cls(db, worker_id=worker_id, sendable=sendable, phone_number_id=phone_number_id)

    async def close(self) -> None:
        self.db.close()
