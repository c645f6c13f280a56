"""The daemon's periodic sweep (at most every 30 s, or half a lease): rows of dead workers become
unknown, rows of cancelled sessions end in error, rows a pause parked in a session that was
re-activated some other way are due again."""

from __future__ import annotations

from typing import Any

from worker.daemon.control import Control
from worker.store import Claims, DatabaseError


class Sweep:
    def __init__(self, *, claims: Claims, control: Control, log: Any) -> None:
        self._claims = claims
        self._control = control
        self._log = log

    async def run(self) -> bool:
        """One sweep; False when the database failed (the loop tries again soon)."""
        try:
            recovered = await self._claims.recover_expired()
            closed = await self._claims.close_cancelled()
            unparked = await self._claims.unpark_active()
        except DatabaseError as exc:
            self._control.database_failed(exc)
            return False
        if recovered.rows:
            self._log.warning("expired_leases_recovered", rows=recovered.rows, state="desconocido")
        for row_id, error in recovered.kept_in_flight:
            self._log.error(
                "row_state_refused",
                job_id=row_id,
                error=error,
                action="kept procesando with the reason; never re-sent",
            )
        if closed:
            self._log.warning("cancelled_rows_closed", rows=closed, state="error")
        if unparked:
            self._log.warning("held_rows_released", rows=unparked, reason="their session is no longer paused")
        return True
