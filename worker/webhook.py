"""The status-webhook receiver (`whatsapp-worker webhook`): Meta's callback, in its own process.

Meta POSTs status updates (`sent`, `delivered`, `read`, `failed`) of the messages we sent, and
the customers' inbound messages, to `/webhook`. Each request is handled in this order:
1. its size: above WORKER_WEBHOOK_MAX_BODY it is refused (413) unread;
2. its signature (`X-Hub-Signature-256`, HMAC-SHA256 of the raw body with the app secret,
   compared in constant time): missing 401, wrong 403; nothing is parsed before this;
3. its shape: malformed JSON or unexpected shapes are logged with a reason and answered 200,
   so Meta does not retry garbage for a week (nothing in a body can crash the process);
4. its statuses and opt-outs go to the `StatusWriter`, which writes the statuses of all the
   requests waiting at that moment in one transaction (like the daemon's result writer), and
   the request is answered 200 only after that commit. A database outage answers 503, so
   Meta retries: an acknowledged status is never lost.
The `Settler` then applies stored statuses to their rows (store/statuses.py), at once after
each write, and in a full sweep every few seconds for statuses that arrived before the
daemon's own result.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from worker import __version__
from worker.config import ConfigError, Settings
from worker.exits import EX_IOERR, EX_OK
from worker.log import on_sink_lost
from worker.messages import phone_from_wa_id
from worker.models import SOURCE_KEYWORD, OptOut, StatusUpdate
from worker.signals import stop_signals
from worker.store import DatabaseError, DatabaseUnavailable, RowRefused, Store
from worker.store.statuses import APPLY_BATCH, STATUS_KINDS, Applied, Statuses, Stored
from worker.systemd import Notifier

PATH = "/webhook"
SIGNATURE_HEADER = "X-Hub-Signature-256"
READ_TIMEOUT = 10.0  # seconds to receive a body (a client that trickles it is cut off)
BATCH_MAX_STATUSES = 2000  # statuses + opt-outs per transaction (whole requests only)
BATCH_MAX_BYTES = 4 * 1024 * 1024  # raw statuses per transaction (max_allowed_packet is 16 MiB+)
QUEUE_MAX = 50_000  # statuses waiting for the writer; beyond it requests get 503 at once
SWEEP_EVERY = 5.0  # seconds between full sweeps of the pending statuses
SHUTDOWN_TIMEOUT = 10.0  # seconds for requests in progress to finish after SIGTERM
ACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0)
# Column sizes (schema.py): a longer value is not a wamid / phone we could have sent.
WAMID_MAX, RECIPIENT_MAX, ERROR_TEXT_MAX, DETAIL_MAX = 128, 32, 1000, 1000
TIMESTAMP_RANGE = (946_684_800, 4_102_444_800)  # 2000-01-01 .. 2100-01-01: anything else is noise
INT_RANGE = (-(2**31), 2**31 - 1)
COLA_REFERENCE = re.compile(r"cola:([0-9]{1,19})")
COLA_MAX = 2**64 - 1
LOG_SAMPLE_EVERY = 10.0  # seconds: a flood of refused requests logs one line, then one summary


class Malformed(ValueError):
    """A signed body we cannot use; the reason is logged and Meta gets 200 (retrying cannot help)."""


@dataclass(slots=True)
class Parsed:
    statuses: list[StatusUpdate] = field(default_factory=list)
    optouts: list[OptOut] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # why parts of the body were skipped

    @property
    def size(self) -> int:
        return len(self.statuses) + len(self.optouts)


# -- authenticity -----------------------------------------------------------------------------


def sign(secret: str, body: bytes) -> str:
    """The `X-Hub-Signature-256` value Meta sends for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_ok(secret: str, body: bytes, header: str) -> bool:
    """Constant-time comparison of the header with the body's HMAC."""
    expected = sign(secret, body).encode()
    given = header.strip()
    if given[:7].lower() == "sha256=":
        given = "sha256=" + given[7:].lower()
    return hmac.compare_digest(expected, given.encode("utf-8", "surrogateescape"))


# -- shapes -------------------------------------------------------------------------------------


def parse_payload(body: bytes, keywords: Iterable[str]) -> Parsed:
    """The statuses and opt-out replies of a webhook body. Raises Malformed for a body that is
    not a webhook at all; skips (with a reason) the parts that do not fit."""
    try:
        payload = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise Malformed("nested too deeply") from None
    except (ValueError, TypeError) as exc:  # invalid JSON, not UTF-8, a number too long
        raise Malformed(f"not valid JSON ({type(exc).__name__})") from None
    if not isinstance(payload, dict):
        raise Malformed(f"the body is a JSON {type(payload).__name__}, not an object")
    entries = payload.get("entry")
    if not isinstance(entries, list):
        raise Malformed("no `entry` list")
    wanted = frozenset(k.casefold() for k in keywords)
    parsed = Parsed()
    for entry in entries:
        changes = entry.get("changes") if isinstance(entry, dict) else None
        if not isinstance(changes, list):
            parsed.ignored.append("an entry without a `changes` list")
            continue
        for change in changes:
            value = change.get("value") if isinstance(change, dict) else None
            if not isinstance(value, dict):
                parsed.ignored.append("a change without a `value` object")
                continue
            for item in _items(value, "statuses", parsed):
                status = _status(item)
                if isinstance(status, str):
                    parsed.ignored.append(status)
                else:
                    parsed.statuses.append(status)
            for item in _items(value, "messages", parsed):
                optout = _optout(item, wanted)
                if optout is not None:
                    parsed.optouts.append(optout)
    return parsed


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _items(value: dict[str, Any], key: str, parsed: Parsed) -> list[Any]:
    items = value.get(key)
    if items is None:
        return []
    if not isinstance(items, list):
        parsed.ignored.append(f"`{key}` is not a list")
        return []
    return items


def _text(value: Any, limit: int) -> str | None:
    """A non-empty string that fits the column and can be stored as utf8mb4, else None."""
    if not isinstance(value, str) or not value or len(value) > limit:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        return None
    return value


def _clean(value: Any, limit: int) -> str | None:
    """Free text for a message column: cut to size, unstorable characters replaced."""
    if not isinstance(value, str) or not value:
        return None
    return value.encode("utf-8", "replace").decode("utf-8")[:limit]


def _integer(value: Any, low: int, high: int) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        value = int(value)
    return value if isinstance(value, int) and low <= value <= high else None


def _status(item: Any) -> StatusUpdate | str:
    """A status object as a row of `whatsapp_worker_statuses`, or why it was skipped."""
    if not isinstance(item, dict):
        return "a status that is not an object"
    wamid = _text(item.get("id"), WAMID_MAX)
    if wamid is None:
        return "a status without a usable `id`"
    kind = item.get("status")
    if kind not in STATUS_KINDS:
        shown = kind[:20] if isinstance(kind, str) else type(kind).__name__  # never str() a tree
        return f"a status of kind {shown!r} (not tracked)"
    stamp = _integer(item.get("timestamp"), *TIMESTAMP_RANGE)
    at = None if stamp is None else datetime.fromtimestamp(stamp, UTC).replace(tzinfo=None)
    reference = item.get("biz_opaque_callback_data")
    cola_id = None
    if isinstance(reference, str) and (match := COLA_REFERENCE.fullmatch(reference)):
        cola_id = int(match.group(1))
        if not 0 < cola_id <= COLA_MAX:
            cola_id = None
    code, title = _error(item.get("errors")) if kind == "failed" else (None, None)
    try:
        raw = json.dumps(item, ensure_ascii=True, separators=(",", ":"))
    except (ValueError, RecursionError):  # pragma: no cover - what json.loads built, it can dump
        raw = "{}"
    return StatusUpdate(
        wamid=wamid,
        status=kind,
        cola_id=cola_id,
        status_at=at,
        recipient_id=_text(item.get("recipient_id"), RECIPIENT_MAX),
        error_code=code,
        error_title=title,
        raw=raw,
    )


def _error(errors: Any) -> tuple[int | None, str | None]:
    """Meta's first error: its code and `(#code) title: details`."""
    first = errors[0] if isinstance(errors, list) and errors else None
    if not isinstance(first, dict):
        return None, None
    code = _integer(first.get("code"), *INT_RANGE)
    data = first.get("error_data")
    parts = [
        _clean(first.get("title"), ERROR_TEXT_MAX) or _clean(first.get("message"), ERROR_TEXT_MAX),
        _clean(data.get("details"), ERROR_TEXT_MAX) if isinstance(data, dict) else None,
    ]
    text = ": ".join(p for p in parts if p) or None
    if code is not None:
        text = f"(#{code}) {text or 'no reason given'}"
    return code, None if text is None else text[:ERROR_TEXT_MAX]


def _optout(item: Any, keywords: frozenset[str]) -> OptOut | None:
    """An inbound reply whose whole text is an opt-out keyword (trimmed, any case)."""
    if not isinstance(item, dict):
        return None
    body = None
    kind = item.get("type")
    if kind == "text" and isinstance(item.get("text"), dict):
        body = item["text"].get("body")
    elif kind == "button" and isinstance(item.get("button"), dict):  # a template's quick reply
        body = item["button"].get("text")
    if not isinstance(body, str) or len(body) > 100 or body.strip().casefold() not in keywords:
        return None
    sender = item.get("from")
    phone = phone_from_wa_id(sender) if isinstance(sender, str) and len(sender) <= RECIPIENT_MAX else None
    if phone is None:
        return None
    return OptOut(phone, SOURCE_KEYWORD, _clean(f"replied {body.strip()!r}", DETAIL_MAX))


# -- metrics ------------------------------------------------------------------------------------


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
        for result in ("stored", "empty", "malformed", "unsigned", "bad_signature", "too_large", "failed"):
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


# -- writing ------------------------------------------------------------------------------------


class Overloaded(DatabaseUnavailable):
    """Too many statuses already wait for the database: answer 503 at once."""


@dataclass(slots=True)
class _Waiting:
    parsed: Parsed
    done: asyncio.Future[Stored]
    size: int
    raw_bytes: int


class StatusWriter:
    """Writes the statuses of concurrent requests in one transaction per batch.

    A request waits for the commit of the batch that holds it (`submit`). While one batch is
    being written the next one gathers, so a slow database makes batches bigger rather than
    queueing one transaction per request.
    """

    def __init__(self, *, statuses: Statuses, log: Any, on_stored: Callable[[Stored], None]) -> None:
        self._statuses = statuses
        self._log = log
        self._on_stored = on_stored
        self._queue: deque[_Waiting] = deque()
        self._queued = 0
        self._ready = asyncio.Event()
        self._closing = False
        self._outage = False

    async def submit(self, parsed: Parsed) -> Stored:
        """Resolves once the request's statuses are committed; raises DatabaseError if not."""
        if self._closing:
            raise DatabaseUnavailable("the receiver is stopping")
        if self._queued + parsed.size > QUEUE_MAX:
            raise Overloaded(f"{self._queued} statuses already wait for the database")
        done: asyncio.Future[Stored] = asyncio.get_running_loop().create_future()
        raw_bytes = sum(len(s.raw) for s in parsed.statuses)
        self._queue.append(_Waiting(parsed, done, parsed.size, raw_bytes))
        self._queued += parsed.size
        self._ready.set()
        return await done

    def close(self) -> None:
        """Write what is queued, then stop."""
        self._closing = True
        self._ready.set()

    async def run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            batch = self._take()
            try:
                await self._write(batch)
            except Exception as exc:  # a bug must not leave requests waiting forever
                self._log.exception("status_writer_failed")
                for waiting in batch:
                    _answer(waiting, DatabaseError(f"{type(exc).__name__}: {exc}"))

    def _take(self) -> list[_Waiting]:
        batch: list[_Waiting] = []
        size = raw = 0
        while self._queue:
            head = self._queue[0]
            if batch and (size + head.size > BATCH_MAX_STATUSES or raw + head.raw_bytes > BATCH_MAX_BYTES):
                break
            batch.append(self._queue.popleft())
            size, raw = size + head.size, raw + head.raw_bytes
        self._queued -= size
        return batch

    async def _write(self, batch: list[_Waiting]) -> None:
        """One transaction for the batch; a refused value is isolated to its request."""
        statuses = [s for w in batch for s in w.parsed.statuses]
        optouts = [o for w in batch for o in w.parsed.optouts]
        try:
            stored = await self._statuses.store(statuses, optouts)
        except RowRefused as exc:
            if len(batch) == 1:
                self._log.error("statuses_refused", statuses=len(statuses), code=exc.code, error=str(exc))
                _answer(batch[0], exc)
                return
            middle = len(batch) // 2
            await self._write(batch[:middle])
            await self._write(batch[middle:])
            return
        except DatabaseError as exc:
            if not self._outage:
                self._outage = True
                self._log.error(
                    "statuses_not_written",
                    requests=len(batch),
                    error=str(exc),
                    action="answered 503: Meta retries",
                )
            for waiting in batch:
                _answer(waiting, exc)
            return
        if self._outage:
            self._outage = False
            self._log.warning("statuses_written_again")
        for waiting in batch:
            _answer(waiting, stored)
        self._on_stored(stored)


def _answer(waiting: _Waiting, outcome: Stored | Exception) -> None:
    """Wake a request's handler, unless it is gone (cancelled at shutdown after its deadline)."""
    if waiting.done.done():
        return
    if isinstance(outcome, Exception):
        waiting.done.set_exception(outcome)
    else:
        waiting.done.set_result(outcome)


# -- applying -----------------------------------------------------------------------------------


class Settler:
    """Applies stored statuses: the new ones at once, all pending ones every SWEEP_EVERY."""

    def __init__(
        self, *, statuses: Statuses, metrics: WebhookMetrics, log: Any, on_turn: Callable[[], None]
    ) -> None:
        self._statuses = statuses
        self._metrics = metrics
        self._log = log
        self._on_turn = on_turn
        self._poke = asyncio.Event()
        self._stop = asyncio.Event()

    def poke(self) -> None:
        self._poke.set()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        cursor, next_sweep, failures = 0, 0.0, 0
        while not self._stop.is_set():
            self._poke.clear()
            full = time.monotonic() >= next_sweep
            if full:
                cursor, next_sweep = 0, time.monotonic() + SWEEP_EVERY
            try:
                cursor = await self._apply_from(cursor)
                if full:
                    self._metrics.pending.set(await self._statuses.pending_count())
            except DatabaseError as exc:
                failures += 1
                if failures == 1:
                    self._log.error("statuses_not_applied", error=str(exc), action="retrying")
                next_sweep = 0.0  # start over from the first pending status once it answers
                await _wait_any((self._stop,), min(SWEEP_EVERY, 0.2 * 2**failures))
                self._on_turn()
                continue
            except Exception:  # a bug: say so, keep receiving; the next sweep tries again
                self._log.exception("settler_failed")
                next_sweep = time.monotonic() + SWEEP_EVERY
            if failures:
                self._log.warning("statuses_applied_again", retries=failures)
                failures = 0
            self._on_turn()
            await _wait_any((self._poke, self._stop), max(0.0, next_sweep - time.monotonic()))

    async def _apply_from(self, cursor: int) -> int:
        while True:
            applied = await self._statuses.apply_pending(after_id=cursor, limit=APPLY_BATCH)
            self._report(applied)
            self._on_turn()  # a long backlog is progress too
            if applied.seen < APPLY_BATCH:
                return max(cursor, applied.last_id)
            cursor = applied.last_id

    def _report(self, applied: Applied) -> None:
        for refused in applied.refused:
            self._log.error(
                "status_refused",
                wamid=refused.wamid,
                job_id=refused.cola_id,
                error=refused.reason,
                action="kept with the reason (whatsapp_worker_statuses.apply_error); the others are applied",
            )
        if applied.refused:
            self._metrics.refused.inc(len(applied.refused))
        for outcome, count in applied.settled.items():
            if count:
                self._metrics.settled.labels(outcome).inc(count)
        if applied.optouts:
            self._metrics.optouts.inc(applied.optouts)
        if applied.settled["sent"] or applied.settled["failed"]:
            self._log.info(
                "unknown_outcomes_settled",
                sent=applied.settled["sent"],
                failed=applied.settled["failed"],
                job_ids=applied.settled_ids[:100],
            )
        if applied.optouts:
            self._log.info("opted_out", source="131050", phones=applied.optouts)


async def _wait_any(events: Iterable[asyncio.Event], seconds: float) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


# -- HTTP -----------------------------------------------------------------------------------------


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


class Receiver:
    """The aiohttp application: GET (handshake) and POST (notifications) on /webhook."""

    def __init__(
        self, *, settings: Settings, writer: StatusWriter, metrics: WebhookMetrics, log: Any
    ) -> None:
        self._secret = settings.app_secret
        self._verify_token = settings.verify_token
        self._max_body = settings.webhook_max_body
        self._keywords = settings.optout_keywords
        self._writer = writer
        self._metrics = metrics
        self._log = log
        self._sampled = _Sampled(log)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body, middlewares=[self._never_crash])
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
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(None)
        except TimeoutError:
            self._sampled.warning("webhook_body_timeout", seconds=READ_TIMEOUT)
            return web.Response(status=408, text="request timeout")
        started = time.perf_counter()
        signature = request.headers.get(SIGNATURE_HEADER)
        if signature is None:
            self._metrics.signature_failures.inc()
            self._metrics.requests.labels("unsigned").inc()
            self._sampled.warning("webhook_signature_missing", bytes=len(body))
            return web.Response(status=401, text="signature required")
        if not signature_ok(self._secret, body, signature):
            self._metrics.signature_failures.inc()
            self._metrics.requests.labels("bad_signature").inc()
            self._sampled.warning("webhook_signature_invalid", bytes=len(body))
            return web.Response(status=403, text="bad signature")
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
            self._metrics.statuses.labels(status.status).inc()
        if not parsed.size:
            self._metrics.requests.labels("empty").inc()
            return web.Response(text="ok")
        try:
            await self._writer.submit(parsed)  # opt-outs are counted and logged per batch
        except DatabaseUnavailable:
            self._metrics.requests.labels("failed").inc()
            return web.Response(status=503, text="try again later")
        except DatabaseError:
            self._metrics.requests.labels("failed").inc()
            return web.Response(status=500, text="not stored")
        self._metrics.requests.labels("stored").inc()
        self._metrics.ack_seconds.observe(time.perf_counter() - started)
        return web.Response(text="ok")

    def _too_large(self, length: int | None) -> web.Response:
        self._metrics.requests.labels("too_large").inc()
        self._sampled.warning("webhook_body_too_large", bytes=length, limit=self._max_body)
        response = web.Response(status=413, text="body too large")
        response.force_close()  # the rest of the body is never read: this connection is done
        return response


# -- the process ------------------------------------------------------------------------------


async def run_receiver(settings: Settings, store: Store, *, log: Any) -> int:
    """Serve until SIGTERM/SIGINT/SIGHUP; then stop accepting, let requests in progress get
    their answer (their batch committed), and stop. Exit code: 0, or 74 when the log output
    was lost (a closed pipe): every status it acknowledged is stored, and the supervisor
    restarts it with a log that works, as it does the daemon."""
    exit_code = EX_OK
    metrics = WebhookMetrics()
    notifier = Notifier()
    watchdog = _Watchdog(notifier)
    settler = Settler(statuses=store.statuses, metrics=metrics, log=log, on_turn=watchdog.ping)

    def on_stored(stored: Stored) -> None:
        settler.poke()
        if stored.optouts:
            metrics.optouts.inc(stored.optouts)
            log.info("opted_out", source="keyword", phones=stored.optouts)

    writer = StatusWriter(statuses=store.statuses, log=log, on_stored=on_stored)
    receiver = Receiver(settings=settings, writer=writer, metrics=metrics, log=log)
    runner = web.AppRunner(
        receiver.app(), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT, lingering_time=LINGER
    )
    await runner.setup()
    metrics_runner: web.AppRunner | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        port = await _listen(runner, settings.webhook_host, settings.webhook_port, "WORKER_WEBHOOK_PORT")
        if settings.webhook_metrics_port:
            metrics_runner = web.AppRunner(_metrics_app(metrics), access_log=None)
            await metrics_runner.setup()
            await _listen(
                metrics_runner,
                settings.metrics_host,
                settings.webhook_metrics_port,
                "WORKER_WEBHOOK_METRICS_PORT",
            )
        tasks = [asyncio.create_task(writer.run()), asyncio.create_task(settler.run())]
        stop = asyncio.Event()

        def on_signal(name: str) -> None:
            log.info("stop_requested", signal=name)
            notifier.notify(stopping=1)
            stop.set()

        def on_log_lost() -> None:
            nonlocal exit_code
            exit_code = EX_IOERR
            stop.set()

        on_sink_lost(on_log_lost)

        with stop_signals(on_signal):
            log.info(
                "webhook_started",
                version=__version__,
                host=settings.webhook_host,
                port=port,
                path=PATH,
                metrics_port=settings.webhook_metrics_port or None,
                database=settings.database.redacted(),
            )
            notifier.notify(ready=1, status=f"listening on {settings.webhook_host}:{port}{PATH}")
            await stop.wait()
    finally:
        await runner.cleanup()  # no new requests; those in progress finish (their batch commits)
        writer.close()
        settler.stop()
        if tasks:
            await asyncio.gather(*tasks)
        if metrics_runner is not None:
            await metrics_runner.cleanup()
    log.info("webhook_stopped")
    return exit_code


LINGER = 2.0  # seconds an unread (refused) body is drained before the connection closes


async def _listen(runner: web.AppRunner, host: str, port: int, variable: str) -> int:
    """Bind, and return the port (the one the system chose when 0 asked for any free one)."""
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        raise ConfigError(f"{variable} {port} on {host}: {exc.strerror or exc}") from None
    return int(runner.addresses[-1][1])


def _metrics_app(metrics: WebhookMetrics) -> web.Application:
    async def handle(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", handle)
    return app


class _Watchdog:
    """WATCHDOG=1 when the settler's loop goes round (at least every SWEEP_EVERY), no more often
    than systemd asks for."""

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier
        self._last = 0.0

    def ping(self) -> None:
        every = self._notifier.watchdog_interval
        now = time.monotonic()
        if every is not None and now - self._last >= min(every, 1.0):
            self._last = now
            self._notifier.notify(watchdog=1)
