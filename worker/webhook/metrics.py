"""The receiver's Prometheus counters, in a registry of their own, and their endpoint."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from worker.store.statuses import STATUS_KINDS

ACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0)


class WebhookMetrics:
    """The receiver's counters, in a registry of its own (no phone or row id as a label)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.statuses = Counter(
            "whatsapp_worker_webhook_statuses",
            "Statuses received, by kind (duplicates included)",
            ["status"],
            registry=self.registry,
        )
        for kind in STATUS_KINDS:
            self.statuses.labels(kind)
        self.requests = Counter(
            "whatsapp_worker_webhook_requests",
            "POSTs to the webhook, by what became of them",
            ["result"],
            registry=self.registry,
        )
        for result in (
            "stored",
            "empty",
            "malformed",
            "unsigned",
            "bad_signature",
            "too_large",
            "busy",
            "overloaded",
            "failed",
        ):
            self.requests.labels(result)
        self.signature_failures = Counter(
            "whatsapp_worker_webhook_signature_failures",
            "POSTs refused for a missing or wrong X-Hub-Signature-256",
            registry=self.registry,
        )
        self.settled = Counter(
            "whatsapp_worker_webhook_settled",
            "Unknown-outcome rows a status settled, by what they became",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("sent", "failed"):
            self.settled.labels(outcome)
        self.optouts = Counter(
            "whatsapp_worker_webhook_optouts", "Phones newly opted out", registry=self.registry
        )
        self.refused = Counter(
            "whatsapp_worker_webhook_statuses_refused",
            "Statuses the database refused to apply (kept with the reason in apply_error)",
            registry=self.registry,
        )
        self.mismatched = Counter(
            "whatsapp_worker_webhook_statuses_mismatched",
            "Statuses about another recipient or sending number than the row they name (not applied)",
            registry=self.registry,
        )
        self.earlier_sends = Counter(
            "whatsapp_worker_webhook_earlier_sends",
            "Statuses of an earlier send of a row sent again: evidence of a possible double message",
            registry=self.registry,
        )
        self.pending = Gauge(
            "whatsapp_worker_webhook_pending_statuses",
            "Stored statuses not applied yet (their row is still being sent), at the last sweep",
            registry=self.registry,
        )
        self.ack_seconds = Histogram(
            "whatsapp_worker_webhook_ack_seconds",
            "From a signed POST's body to its answer (the batch committed)",
            buckets=ACK_BUCKETS,
            registry=self.registry,
        )
        self.connections = Gauge(
            "whatsapp_worker_webhook_connections",
            "Open connections to the webhook port (at most WORKER_WEBHOOK_MAX_CONNECTIONS)",
            registry=self.registry,
        )
        self.connections_closed = Counter(
            "whatsapp_worker_webhook_connections_closed",
            "Connections closed at the cap: the oldest idle one (idle_evicted), or the new one when"
            " every connection is busy (refused_full)",
            ["reason"],
            registry=self.registry,
        )
        for reason in ("idle_evicted", "refused_full"):
            self.connections_closed.labels(reason)
        self.unverified_bytes = Gauge(
            "whatsapp_worker_webhook_unverified_bytes",
            "Bytes reserved by bodies whose signature is not checked yet (WORKER_WEBHOOK_UNVERIFIED_BYTES)",
            registry=self.registry,
        )


def metrics_app(metrics: WebhookMetrics) -> web.Application:
    async def handle(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", handle)
    return app
