"""Prometheus metrics on an opt-in port (`WORKER_METRICS_PORT`), served from the daemon's own
event loop by aiohttp (no thread). Labels never carry a phone number or a row id."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from worker import __version__

OUTCOMES = ("sent", "retry", "error", "unknown", "paused")
SEND_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The daemon's counters and gauges, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._messages = Counter(
            "whatsapp_worker_messages",
            "Send attempts by what they decided for the row",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self._messages.labels(outcome)
        self._send_seconds = Histogram(
            "whatsapp_worker_send_seconds",
            "Time from the request to Meta's answer (or the failure)",
            buckets=SEND_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "whatsapp_worker_in_flight", "Sends waiting for Meta's answer", registry=self.registry
        )
        self.unwritten = Gauge(
            "whatsapp_worker_unwritten", "Results held in memory, not yet written", registry=self.registry
        )
        self._paused = Gauge(
            "whatsapp_worker_sending_paused",
            "1 while sending from a number is paused, by number and reason (an error code, or 'unreachable')",
            ["phone_number_id", "reason"],
            registry=self.registry,
        )
        self._last_sent = Gauge(
            "whatsapp_worker_last_sent_timestamp_seconds",
            "When Meta last accepted a message from this daemon (Unix time)",
            registry=self.registry,
        )
        self.queue_due = Gauge(
            "whatsapp_worker_queue_due", "Rows due now (read at scrape time)", registry=self.registry
        )
        self.oldest_due_age = Gauge(
            "whatsapp_worker_oldest_due_age_seconds",
            "Age of the oldest due row (read at scrape time)",
            registry=self.registry,
        )
        Info("whatsapp_worker_build", "Version of the daemon", registry=self.registry).info(
            {"version": __version__}
        )
        self._pauses: set[tuple[str, str]] = set()

    def finished(self, outcome: str, seconds: float) -> None:
        self._messages.labels(outcome).inc()
        self._send_seconds.observe(seconds)
        if outcome == "sent":
            self._last_sent.set(time.time())

    def paused(self, pauses: Iterable[tuple[str, str]]) -> None:
        """The (sending number, reason) of each pause now (empty once every number sends again).
        A sending number is the business's own, a handful per account: a label, unlike phones."""
        now = set(pauses)
        for number, reason in self._pauses - now:
            self._paused.labels(number, reason).set(0)
        for number, reason in now:
            self._paused.labels(number, reason).set(1)
        self._pauses = now


async def serve(
    metrics: Metrics, *, host: str, port: int, refresh: Callable[[], Awaitable[None]]
) -> web.AppRunner:
    """Start `/metrics`; `refresh()` updates the gauges read from the database first."""

    async def handle(_: web.Request) -> web.Response:
        await refresh()
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
