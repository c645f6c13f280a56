"""The HTTP side: the subscription handshake and the signed POSTs, in the order the package's
docstring gives (size, signature, shape, then the writer)."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from worker.config import Settings
from worker.store import DatabaseError, DatabaseUnavailable
from worker.store.statuses import STATUS_KINDS
from worker.webhook.connections import ConnectionCap
from worker.webhook.metrics import WebhookMetrics
from worker.webhook.parse import Malformed, parse_payload, signature_ok
from worker.webhook.writer import Overloaded, StatusWriter

PATH = "/webhook"
SIGNATURE_HEADER = "X-Hub-Signature-256"
READ_TIMEOUT = 10.0  # seconds to receive a body (a client that trickles it is cut off)
LOG_SAMPLE_EVERY = 10.0  # seconds: a flood of refused requests logs one line, then one summary
LINGER = 2.0  # seconds an unread (refused) body is drained before the connection closes


class _Sampled:
    """Logs an event the first time, then at most one summary per LOG_SAMPLE_EVERY."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def warning(self, event: str, **fields: Any) -> None:
        now = time.monotonic()
        self._count[event] = self._count.get(event, 0) + 1
        if now - self._last.get(event, -LOG_SAMPLE_EVERY) >= LOG_SAMPLE_EVERY:
            self._last[event] = now
            self._log.warning(event, times=self._count.pop(event), **fields)


class _UnverifiedBytes:
    """Bytes of bodies whose signature is not checked yet, receiver-wide: without a bound, 400
    slow unsigned 1 MiB bodies held 400 MiB."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, amount: int) -> bool:
        if self.held + amount > self.limit:
            return False
        self.held += amount
        return True

    def give_back(self, amount: int) -> None:
        self.held -= amount


class _Reservation:
    """One request's share of the unverified bytes: what it announced, grown as it reads more."""

    def __init__(self, budget: _UnverifiedBytes) -> None:
        self._budget = budget
        self._amount = 0

    def grow_to(self, total: int) -> bool:
        if total <= self._amount:
            return True
        if not self._budget.take(total - self._amount):
            return False
        self._amount = total
        return True

    def release(self) -> None:
        self._budget.give_back(self._amount)
        self._amount = 0


class _Refused(Exception):
    """A POST answered before its body was accepted (too large, busy, too slow, a bad signature)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


class Receiver:
    """The aiohttp application: GET (handshake) and POST (notifications) on /webhook."""

    def __init__(
        self,
        *,
        settings: Settings,
        writer: StatusWriter,
        metrics: WebhookMetrics,
        log: Any,
        max_connections: int,
    ) -> None:
        self._secret = settings.app_secret
        self._verify_token = settings.verify_token
        self._max_body = settings.webhook_max_body
        self._keywords = settings.optout_keywords
        self._writer = writer
        self._metrics = metrics
        # The children counted on every request, looked up once: `labels()` takes a lock each time.
        self._stored = metrics.requests.labels("stored")
        self._status_kinds = {kind: metrics.statuses.labels(kind) for kind in STATUS_KINDS}
        self._log = log
        self._sampled = _Sampled(log)
        self._unverified = _UnverifiedBytes(settings.webhook_unverified_bytes)
        metrics.unverified_bytes.set_function(lambda: self._unverified.held)
        self.connections = ConnectionCap(max_connections, metrics=metrics, warn=self._sampled.warning)

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self._max_body, middlewares=[self.connections.mark_busy, self._never_crash]
        )
        app.router.add_get(PATH, self.handshake)
        app.router.add_post(PATH, self.notification)
        return app

    @web.middleware
    async def _never_crash(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as exc:  # a bug: answer 500 (Meta retries) and say what happened
            self._log.exception("webhook_request_failed", error=type(exc).__name__)
            self._metrics.requests.labels("failed").inc()
            return web.Response(status=500, text="internal error")

    async def handshake(self, request: web.Request) -> web.Response:
        query = request.query
        token = query.get("hub.verify_token", "")
        good = hmac.compare_digest(
            token.encode("utf-8", "surrogateescape"), self._verify_token.encode("utf-8", "surrogateescape")
        )
        if query.get("hub.mode") != "subscribe" or not good:
            self._sampled.warning("webhook_handshake_refused", mode=str(query.get("hub.mode"))[:20])
            return web.Response(status=403, text="forbidden")
        self._log.info("webhook_handshake_answered")
        return web.Response(text=query.get("hub.challenge", ""))

    async def notification(self, request: web.Request) -> web.Response:
        length = request.content_length
        if length is not None and length > self._max_body:
            return self._too_large(length)
        signature = request.headers.get(SIGNATURE_HEADER)
        if signature is None:  # refused before a byte of the body is read
            return self._unsigned(length)
        if reason := self._writer.overloaded():  # nor read, checked and parsed only to wait
            # The connection stays open (aiohttp discards the small unread body): closing it
            # would make the retry pay for a new connection exactly when the CPU is short.
            return self._overloaded(reason)
        try:
            body = await self._verified_body(request, signature)
        except _Refused as refused:
            return refused.response
        return await self._accept(body)

    async def _verified_body(self, request: web.Request, signature: str) -> bytes:
        """The body, once its signature checks out; until then it counts against
        WORKER_WEBHOOK_UNVERIFIED_BYTES (given back however the read or the check ends)."""
        reservation = _Reservation(self._unverified)
        try:
            body = await self._read_reserved(request, reservation)
            if not signature_ok(self._secret, body, signature):
                self._metrics.signature_failures.inc()
                self._metrics.requests.labels("bad_signature").inc()
                self._sampled.warning("webhook_signature_invalid", bytes=len(body))
                raise _Refused(web.Response(status=403, text="bad signature"))
            return body
        finally:
            reservation.release()

    async def _read_reserved(self, request: web.Request, reservation: _Reservation) -> bytes:
        """Read the body, reserving its bytes before holding them: all it announced at once,
        then whatever arrives beyond (a chunked body, one without a length)."""
        if not reservation.grow_to(request.content_length or 0):
            raise _Refused(self._busy(request.content_length))
        body = bytearray()
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                async for chunk in request.content.iter_any():
                    if len(body) + len(chunk) > self._max_body:
                        raise _Refused(self._too_large(None))
                    if not reservation.grow_to(len(body) + len(chunk)):
                        raise _Refused(self._busy(None))
                    body += chunk
        except TimeoutError:
            self._sampled.warning("webhook_body_timeout", seconds=READ_TIMEOUT)
            raise _Refused(web.Response(status=408, text="request timeout")) from None
        return bytes(body)

    async def _accept(self, body: bytes) -> web.Response:
        """A signed body: parsed, and stored before the answer."""
        started = time.perf_counter()
        try:
            parsed = parse_payload(body, self._keywords)
        except Malformed as exc:
            self._metrics.requests.labels("malformed").inc()
            self._sampled.warning("webhook_malformed", reason=str(exc), bytes=len(body))
            return web.Response(text="ignored")
        if parsed.ignored:
            self._sampled.warning(
                "webhook_parts_ignored", reasons=sorted(set(parsed.ignored))[:5], parts=len(parsed.ignored)
            )
        for status in parsed.statuses:
            self._status_kinds[status.status].inc()
        for event, level, fields in parsed.notices:
            getattr(self._log, level)(event, **fields)
        if parsed.resumed:  # Meta's user_preferences "resume": the opt-out stays; a person decides
            self._log.info(
                "optout_resume_requested",
                phones=len(parsed.resumed),
                action="still opted out: `whatsapp-worker optout remove PHONE` to message it again",
            )
        if not parsed.size:
            self._metrics.requests.labels("empty").inc()
            return web.Response(text="ok")
        try:
            await self._writer.submit(parsed)  # opt-outs are counted and logged per batch
        except Overloaded as exc:
            return self._overloaded(str(exc))
        except DatabaseUnavailable:
            self._metrics.requests.labels("failed").inc()
            return web.Response(status=503, text="try again later")
        except DatabaseError:
            self._metrics.requests.labels("failed").inc()
            return web.Response(status=500, text="not stored")
        self._stored.inc()
        self._metrics.ack_seconds.observe(time.perf_counter() - started)
        return web.Response(text="ok")

    def _too_large(self, length: int | None) -> web.Response:
        self._metrics.requests.labels("too_large").inc()
        self._sampled.warning("webhook_body_too_large", bytes=length, limit=self._max_body)
        return _closing(web.Response(status=413, text="body too large"))

    def _unsigned(self, length: int | None) -> web.Response:
        self._metrics.signature_failures.inc()
        self._metrics.requests.labels("unsigned").inc()
        self._sampled.warning("webhook_signature_missing", bytes=length)
        return _closing(web.Response(status=401, text="signature required"))

    def _busy(self, length: int | None) -> web.Response:
        """The unverified bytes are all taken: 503 at once, and Meta retries later."""
        self._metrics.requests.labels("busy").inc()
        self._sampled.warning(
            "webhook_busy", bytes=length, held=self._unverified.held, limit=self._unverified.limit
        )
        return _closing(web.Response(status=503, text="busy, try again later"))

    def _overloaded(self, reason: str) -> web.Response:
        """Statuses wait too long for the database already: 503 at once, and Meta retries later."""
        self._metrics.requests.labels("overloaded").inc()
        self._sampled.warning("webhook_overloaded", reason=reason, action="answered 503: Meta retries")
        return web.Response(status=503, text="overloaded, try again later")


def _closing(response: web.Response) -> web.Response:
    """The rest of the body is never read: this connection is done after the answer."""
    response.force_close()
    return response
