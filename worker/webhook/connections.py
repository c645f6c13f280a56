"""The receiver's connection budget: open files, and how many connections may take them.

systemd gives a service 1,024 descriptors by default (soft limit); a thousand idle connections
took them all and Meta's POSTs were reset. At start the soft limit is raised to the hard one and
the connection cap is fitted below it, leaving room for the database pool, the metrics port and
the logs. Past the cap a new connection closes the oldest idle one, as nginx does, or is closed
itself when every connection has a request in progress.
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from worker.config import ConfigError
from worker.webhook.metrics import WebhookMetrics

# The database pool (4), the metrics port and its scrapes, stdio, the event loop, sd_notify,
# the files read at start: what the process needs besides the webhook's connections.
RESERVED_DESCRIPTORS = 64


@dataclass(frozen=True, slots=True)
class DescriptorBudget:
    open_files_limit: int  # the soft RLIMIT_NOFILE, once raised
    max_connections: int  # the cap in force
    wanted: int  # WORKER_WEBHOOK_MAX_CONNECTIONS

    @property
    def lowered(self) -> bool:
        return self.max_connections < self.wanted


def descriptor_budget(wanted: int) -> DescriptorBudget:
    """Raise the open files limit as far as allowed, then fit the connection cap below it."""
    limit = raise_open_files_limit()
    room = limit - RESERVED_DESCRIPTORS
    if room < 1:
        raise ConfigError(
            f"WORKER_WEBHOOK_MAX_CONNECTIONS cannot fit: the open files limit ({limit}) leaves nothing"
            f" beyond the {RESERVED_DESCRIPTORS} descriptors the process needs; raise LimitNOFILE="
            " (systemd) or ulimits nofile (compose)"
        )
    return DescriptorBudget(open_files_limit=limit, max_connections=min(wanted, room), wanted=wanted)


def raise_open_files_limit() -> int:
    """The soft RLIMIT_NOFILE raised to the hard one (systemd's default: 1,024 of 524,288)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # a hard limit the kernel will not grant: keep the soft one
        return soft
    return hard


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ConnectionCap:
    """At most `limit` open connections on the webhook port."""

    def __init__(self, limit: int, *, metrics: WebhookMetrics, warn: Callable[..., None]) -> None:
        self.limit = limit
        self._metrics = metrics
        self._warn = warn  # sampled: a flood of closings logs one line, then a summary
        self._busy: set[web.RequestHandler] = set()

    def watch(self, server: web.Server) -> None:
        """Check the cap at each new connection; count the open ones at each scrape."""
        accept = server.connection_made

        def connection_made(handler: web.RequestHandler, transport: asyncio.Transport) -> None:
            accept(handler, transport)
            self._enforce(_open(server), handler)

        server.connection_made = connection_made  # type: ignore[method-assign]
        self._metrics.connections.set_function(lambda: len(_open(server)))

    @web.middleware
    async def mark_busy(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """From its headers to its answer a connection is busy: never the one closed for room."""
        connection = request.protocol
        self._busy.add(connection)
        try:
            return await handler(request)
        finally:
            self._busy.discard(connection)

    def _enforce(self, connections: list[web.RequestHandler], newcomer: web.RequestHandler) -> None:
        if len(connections) <= self.limit:
            return
        # the server lists connections in accept order: the first idle one is the oldest
        idle = next((c for c in connections if c is not newcomer and c not in self._busy), None)
        if idle is not None:
            idle.force_close()
            self._closed("idle_evicted", "webhook_idle_connection_closed")
        else:
            newcomer.force_close()
            self._closed("refused_full", "webhook_connections_full")

    def _closed(self, reason: str, event: str) -> None:
        self._metrics.connections_closed.labels(reason).inc()
        self._warn(event, max_connections=self.limit)


def _open(server: web.Server) -> list[web.RequestHandler]:
    """Connections not closed yet (a closed one stays listed until its task ends)."""
    return [c for c in server.connections if c.transport is not None]
