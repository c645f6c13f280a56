"""A local fake of the WhatsApp Cloud API "send message" endpoint, for tests over real HTTP.

The server runs on 127.0.0.1 (ephemeral port) in a background thread with its own asyncio loop,
so synchronous tests (daemon subprocesses) and async tests (in-process daemon) can both use it::

    with FakeCloudAPI(token="test-token") as api:
        api.script("+51987654321", Step.drop(), Step.ok())
        ...  # daemon POSTs to f"{api.base_url}/{api.phone_number_id}/messages"

State is mutated on the server loop and read from the test thread under one lock. Blocking waits
(`wait_for_requests`, `wait_until`) use a condition variable; from async code call them through
`asyncio.to_thread` so the caller's loop keeps running.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

__all__ = ["FakeCloudAPI", "Received", "Step"]

StepKind = Literal["ok", "error", "drop", "late", "stale"]

_ERROR_TITLES = {
    0: "AuthException",
    4: "Application request limit reached",
    100: "Invalid parameter",
    130429: "Rate limit hit",
    131000: "Something went wrong",
    131026: "Message undeliverable",
    131056: "Pair rate limit hit",
    190: "Invalid OAuth access token",
}
# HTTP status used for faults drawn by `random_faults` (Meta says: decide on code, not status).
_FAULT_HTTP_STATUS = {0: 401, 190: 401, 1: 500, 2: 503, 131000: 500}


@dataclass(frozen=True)
class Step:
    """What the fake does with one request. Build with the constructors below."""

    kind: StepKind
    code: int = 0
    http_status: int = 200
    details: str = ""
    delay: float = 0.0
    wamid: str = ""

    @classmethod
    def ok(cls, wamid: str = "") -> Step:
        """HTTP 200 success with a fresh ``wamid.FAKE<n>`` (or `wamid`); recorded in `accepted`."""
        return cls("ok", wamid=wamid)

    @classmethod
    def error(cls, code: int, http_status: int = 400, details: str = "Fake error.") -> Step:
        """Cloud API error JSON with ``error.code == code`` and the given HTTP status."""
        return cls("error", code=code, http_status=http_status, details=details)

    @classmethod
    def drop(cls) -> Step:
        """Read the whole body, then close the connection without any response.

        An aiohttp client sees ``aiohttp.ServerDisconnectedError`` (a ``ClientConnectionError``).
        The message is NOT accepted.
        """
        return cls("drop")

    @classmethod
    def late(cls, delay: float) -> Step:
        """Read the body, wait `delay` seconds, then answer like `ok()`.

        The wamid counts as accepted even if the client gave up meanwhile (the provider got it).
        """
        return cls("late", delay=delay)


@dataclass(frozen=True)
class Received:
    """One request as the fake saw it."""

    phone: str
    body: dict[str, Any]
    callback_data: str | None
    authorization: str | None
    outcome: str  # "ok", "error:<code>", "drop", "late" or "stale" (see drop_stale_after)
    wamid: str | None
    number: str = ""  # the phone_number_id in the URL
    at: float = 0.0  # time.monotonic() when the request arrived


def busiest_second(times: list[float]) -> int:
    """The most events in any sliding one-second window (`times` in seconds)."""
    times, most, start = sorted(times), 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= 1.0:
            start += 1
        most = max(most, end - start + 1)
    return most


def _error_body(code: int, details: str) -> dict[str, Any]:
    title = _ERROR_TITLES.get(code, "Fake Cloud API error")
    return {
        "error": {
            "message": f"(#{code}) {title}",
            "type": "OAuthException",
            "code": code,
            "error_data": {"messaging_product": "whatsapp", "details": details},
            "error_subcode": 2494055,
            "fbtrace_id": "AFakeTraceId0000000000",
        }
    }


def _fault_step(key: str, late_delay: float) -> Step:
    if key == "drop":
        return Step.drop()
    if key == "late":
        return Step.late(late_delay)
    if key.startswith("error:"):
        code = int(key.removeprefix("error:"))
        return Step.error(code, http_status=_FAULT_HTTP_STATUS.get(code, 400))
    raise ValueError(f"unknown fault {key!r}")


class FakeCloudAPI:
    """Fake ``POST /{version}/{phone_number_id}/messages`` server in a background thread."""

    def __init__(
        self,
        token: str = "test-token",
        latency: float = 0.0,
        phone_number_id: str = "1234567890",
        version: str = "v23.0",
        keepalive_timeout: float | None = None,
        drop_stale_after: float | None = None,
    ) -> None:
        """`keepalive_timeout`: close a keep-alive connection idle this many seconds, like a
        provider's load balancer does (None: aiohttp's default, about an hour).

        `drop_stale_after`: a request that arrives on a keep-alive connection idle at least
        this long is dropped unanswered (outcome "stale", never accepted): the provider's idle
        close crossing the request on the wire, which on 127.0.0.1 is otherwise a sub-millisecond
        race. The client sees the same "server disconnected" as after `Step.drop()`.
        """
        self.token = token
        self.keepalive_timeout = keepalive_timeout
        self.drop_stale_after = drop_stale_after
        self._idle_since: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self.latency = latency
        self.phone_number_id = phone_number_id
        self.other_numbers: dict[str, str] = {}  # more sending numbers of the account: their tokens
        self.version = version
        self.late_delay = 5.0
        self.base_url = ""
        self._cond = threading.Condition(threading.RLock())
        self._default = Step.ok()
        self._override: Step | None = None
        self._scripts: dict[str, deque[Step]] = {}
        self._faults: tuple[int, dict[str, float]] | None = None
        self._seen: set[str] = set()  # phones that already reached step selection
        self._requests: list[Received] = []
        self._counts: Counter[str] = Counter()
        self._accepted: dict[str, list[str]] = {}
        self._in_flight = 0
        self._wamids = itertools.count(1)
        self._handlers: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeCloudAPI:
        """Start the server thread; returns once the port is bound (or raises the bind error)."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name="FakeCloudAPI", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error
        return self

    def close(self) -> None:
        """Stop the server, cancelling handlers still sleeping (late/latency); idempotent."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or not thread.is_alive():
            return
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        thread.join()

    def __enter__(self) -> FakeCloudAPI:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        try:
            import uvloop  # a project dependency on POSIX; about twice the throughput

            loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        except ImportError:  # pragma: no cover
            loop_factory = asyncio.new_event_loop
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post("/{version}/{phone_number_id}/messages", self._handle)
        options: dict[str, Any] = {}
        if self.keepalive_timeout is not None:
            options["keepalive_timeout"] = self.keepalive_timeout
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, **options)
        try:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            port = runner.addresses[0][1]
            self.base_url = f"http://127.0.0.1:{port}/{self.version}"
        except BaseException as exc:
            self._start_error = exc
            self._started.set()
            await runner.cleanup()
            return
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            for task in self._handlers:
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await runner.cleanup()

    # -- configuration (test thread) ---------------------------------------------------------

    @property
    def default(self) -> Step:
        """Step for phones with no remaining script (and no random fault)."""
        with self._cond:
            return self._default

    @default.setter
    def default(self, step: Step) -> None:
        with self._cond:
            self._default = step

    def script(self, phone: str, *steps: Step) -> None:
        """Append steps to `phone`'s queue; each request for that phone consumes one."""
        with self._cond:
            self._scripts.setdefault(phone, deque()).extend(steps)

    def fail_all(self, step: Step | None) -> None:
        """Answer every request with `step` (scripts untouched) until ``fail_all(None)``."""
        with self._cond:
            self._override = step

    def random_faults(self, seed: int, probabilities: dict[str, float]) -> None:
        """Give each phone's first request a random fault; later requests get the default.

        Keys: "drop", "late" (uses `late_delay`), "error:<code>". The draw for a phone uses
        ``random.Random(f"{seed}:{phone}")``, so it does not depend on arrival order. Scripted
        steps win; a phone whose first request was scripted or under `fail_all` gets no fault.
        """
        for key in probabilities:
            _fault_step(key, 0.0)  # validate keys early
        if sum(probabilities.values()) > 1.0 + 1e-9:
            raise ValueError("probabilities sum to more than 1")
        with self._cond:
            self._faults = (seed, dict(probabilities))

    # -- observation (test thread) -----------------------------------------------------------

    @property
    def requests(self) -> list[Received]:
        """Snapshot of all requests in arrival order."""
        with self._cond:
            return list(self._requests)

    @property
    def accepted(self) -> dict[str, list[str]]:
        """Snapshot: phone -> wamids answered (or, for late, decided) as HTTP 200 success."""
        with self._cond:
            return {phone: list(ids) for phone, ids in self._accepted.items()}

    @property
    def in_flight(self) -> int:
        """Requests received but not yet answered or dropped."""
        with self._cond:
            return self._in_flight

    def counts(self) -> Counter[str]:
        """Phone -> number of requests received (all outcomes)."""
        with self._cond:
            return Counter(self._counts)

    def busiest_second(self, number: str | None = None) -> int:
        """The most requests (for one number, or all) in any sliding one-second window."""
        return busiest_second([r.at for r in self.requests if number is None or r.number == number])

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Block until `predicate()` is true (re-checked on every state change); False on timeout.

        The predicate may read this object's properties (the lock is re-entrant).
        """
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least `n` requests were received; False on timeout."""
        return self.wait_until(lambda: len(self._requests) >= n, timeout)

    # -- server side (loop thread) -----------------------------------------------------------

    def _select(self, phone: str) -> Step:
        if self._override is not None:
            return self._override
        first = phone not in self._seen
        self._seen.add(phone)
        queue = self._scripts.get(phone)
        if queue:
            return queue.popleft()
        if first and self._faults is not None:
            seed, probabilities = self._faults
            draw = random.Random(f"{seed}:{phone}").random()
            for key, p in probabilities.items():
                draw -= p
                if draw < 0:
                    return _fault_step(key, self.late_delay)
        return self._default

    def _record(self, received: Received) -> None:
        with self._cond:
            self._requests.append(received)
            self._counts[received.phone] += 1
            self._cond.notify_all()

    def _accept(self, phone: str, wamid: str) -> None:
        with self._cond:
            self._accepted.setdefault(phone, []).append(wamid)
            self._cond.notify_all()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        with self._cond:
            self._in_flight += 1
        try:
            return await self._respond(request)
        finally:
            if request.transport is not None:
                self._idle_since[request.transport] = asyncio.get_running_loop().time()
            self._handlers.discard(task)
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    async def _respond(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        number = request.match_info["phone_number_id"]
        raw = await request.read()
        authorization = request.headers.get("Authorization")
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        body: dict[str, Any] = parsed if isinstance(parsed, dict) else {}
        to = body.get("to")
        phone = to if isinstance(to, str) else ""
        callback = body.get("biz_opaque_callback_data")
        callback_data = callback if isinstance(callback, str) else None

        idle_since = self._idle_since.get(request.transport) if request.transport else None
        stale = (
            self.drop_stale_after is not None
            and idle_since is not None
            and asyncio.get_running_loop().time() - idle_since >= self.drop_stale_after
        )
        if stale:
            step = Step("stale")
        elif number != self.phone_number_id and number not in self.other_numbers:
            step = Step.error(100, details="Unknown phone number id.")
        elif authorization != f"Bearer {self.other_numbers.get(number, self.token)}":
            step = Step.error(190, http_status=401, details="Error validating access token.")
        elif body.get("messaging_product") != "whatsapp" or not phone or "type" not in body:
            step = Step.error(100, details="messaging_product, to and type are required.")
        else:
            with self._cond:
                step = self._select(phone)

        wamid = (step.wamid or f"wamid.FAKE{next(self._wamids):08d}") if step.kind in ("ok", "late") else None
        outcome = f"error:{step.code}" if step.kind == "error" else step.kind
        self._record(Received(phone, body, callback_data, authorization, outcome, wamid, number, arrived))

        delay = self.latency + (step.delay if step.kind == "late" else 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        if step.kind == "error":
            return web.json_response(_error_body(step.code, step.details), status=step.http_status)
        if step.kind in ("drop", "stale"):
            if request.transport is not None:
                request.transport.close()
            return web.Response()  # never sent: aiohttp sees the closed transport and gives up
        assert wamid is not None
        self._accept(phone, wamid)
        return web.json_response(
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": phone, "wa_id": phone.removeprefix("+")}],
                "messages": [{"id": wamid, "message_status": "accepted"}],
            }
        )
