"""Senders: the Cloud API over aiohttp, and a sandbox that makes no network call.

Every outcome becomes one SendResult. For a network failure the question is whether the
request could have reached Meta: only failures before any byte of it was written (the connect
phase) are UNREACHABLE, which gives the row back; anything after is an unknown outcome, because
the API has no idempotency key. A row that cannot be serialised ends PERMANENT with no request.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from typing import Any, Protocol

import aiohttp

from worker.config import Settings, check_header_value
from worker.daemon.policy import classify_error
from worker.messages import InvalidMessage, request_body
from worker.models import Job, Outcome, SendResult

__all__ = [
    "CloudSender",
    "SandboxSender",
    "Sender",
    "classify_error",
    "classify_exception",
    "make_sender",
    "parse_response",
]

CONNECT_TIMEOUT_MAX = 10.0  # seconds for pool + DNS + TCP + TLS, at most


def classify_exception(exc: BaseException) -> SendResult:
    """Could the request have reached Meta before this failure?

    Only the connect phase (waiting for a pool slot, DNS, TCP, TLS) raises ClientConnectorError
    (refused, DNS failure, certificate) or ConnectionTimeoutError (our `connect` timer): nothing
    of the request was written yet, so it provably did not reach Meta. Anything after connecting
    (server disconnected, reset, the total timer, a broken payload) may follow a request Meta
    received, and so does an error we cannot place.
    """
    name = type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return SendResult(Outcome.UNREACHABLE, error_text=f"not sent: {name}: {exc}".strip())
    return SendResult(Outcome.UNKNOWN, error_text=f"outcome unknown: {name}: {exc}".strip())


def parse_response(status: int, payload: bytes) -> SendResult:
    try:
        data: Any = json.loads(payload)
    except ValueError:
        data = None
    if 200 <= status < 300:
        try:
            wamid = data["messages"][0]["id"]
        except (TypeError, KeyError, IndexError):
            return SendResult(Outcome.UNKNOWN, error_text=f"HTTP {status} without a message id")
        return SendResult(Outcome.SENT, wamid=str(wamid))
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return SendResult(classify_error(None, status), error_text=f"HTTP {status}: {payload[:200]!r}")
    code = error.get("code") if isinstance(error.get("code"), int) else None
    error_data = error.get("error_data")
    details = error_data.get("details") if isinstance(error_data, dict) else None
    text = str(error.get("message") or f"HTTP {status}")
    if details:
        text = f"{text}: {details}"
    return SendResult(classify_error(code, status), error_code=code, error_text=text)


class Sender(Protocol):
    async def send(self, job: Job, message: dict[str, Any]) -> SendResult: ...

    async def close(self) -> None: ...


def _invalid(exc: InvalidMessage) -> SendResult:
    return SendResult(Outcome.PERMANENT, error_text=f"invalid row: {exc}")


def client_timeout(send_timeout: float) -> aiohttp.ClientTimeout:
    """Two timers whose order never varies, so a timeout always says which phase it hit.

    aiohttp's `connect` timer covers the pool wait, DNS, TCP and TLS and raises
    ConnectionTimeoutError (client.py wraps it around `connector.connect`), which means
    "not sent". The `total` timer (a plain TimeoutError, "outcome unknown") starts a moment
    earlier but ends `send_timeout` later than the connect deadline, so the request after
    connecting has at least `send_timeout` and a connect that never completes always hits the
    connect timer first. Rounding deadlines up to whole seconds (aiohttp's `ceil_threshold`)
    is disabled: it could give both timers the same deadline.
    """
    connect = min(CONNECT_TIMEOUT_MAX, send_timeout)
    return aiohttp.ClientTimeout(total=connect + send_timeout, connect=connect, ceil_threshold=float("inf"))


class CloudSender:
    """POST {api_url}/{phone_number_id}/messages with a shared keep-alive connection pool."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._default = settings.phone_number_id
        # number: (url, headers of its own); the default number's token is a session header, so
        # its requests carry no per-request headers for aiohttp to merge.
        self._numbers: dict[str, tuple[str, dict[str, str] | None]] = {}
        self._headers = {
            "Authorization": f"Bearer {settings.access_token}",
            "Content-Type": "application/json",
        }
        # Settings.from_env checks these already; a Settings built by hand must not reach the
        # send path with a header aiohttp would refuse (an error there would look uncertain).
        check_header_value("WHATSAPP_ACCESS_TOKEN", settings.access_token)
        check_header_value("WHATSAPP_API_URL", settings.api_url)
        check_header_value("WHATSAPP_PHONE_NUMBER_ID", settings.phone_number_id)
        self._timeout = client_timeout(settings.send_timeout)
        self._limit = settings.concurrency
        self._keepalive = settings.http_keepalive
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Idle connections are dropped before the provider's idle timeout would close them:
            # a request written into a connection the server is closing looks uncertain.
            if self._keepalive > 0:
                connector = aiohttp.TCPConnector(
                    limit=self._limit, ttl_dns_cache=300, keepalive_timeout=self._keepalive
                )
            else:
                connector = aiohttp.TCPConnector(limit=self._limit, ttl_dns_cache=300, force_close=True)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                headers=self._headers,
                raise_for_status=False,
                auto_decompress=True,
            )
        return self._session

    def _endpoint(self, number: str | None) -> tuple[str, dict[str, str] | None]:
        """The URL and the Authorization header of a sending number (its own token, if any)."""
        key = number or self._default
        endpoint = self._numbers.get(key)
        if endpoint is None:
            if not (key.isascii() and key.isdigit()):
                raise InvalidMessage(f"phone_number_id {key!r} of the session is not a number id (digits)")
            token = self._settings.token_for(key)
            own = {"Authorization": f"Bearer {token}"} if token != self._settings.access_token else None
            endpoint = (f"{self._settings.api_url}/{key}/messages", own)
            self._numbers[key] = endpoint
        return endpoint

    async def send(self, job: Job, message: dict[str, Any]) -> SendResult:
        try:
            body = request_body(job.id, job.telefono, message)  # before anything touches aiohttp
            url, headers = self._endpoint(job.phone_number_id)
        except InvalidMessage as exc:
            return _invalid(exc)
        try:
            async with self._client().post(url, data=body, headers=headers) as response:
                payload = await response.read()
                return parse_response(response.status, payload)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return classify_exception(exc)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class SandboxSender:
    """Records a fake wamid without any network call: for demos and dry runs."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)
        self._prefix = f"wamid.SANDBOX.{os.getpid()}."

    async def send(self, job: Job, message: dict[str, Any]) -> SendResult:
        try:
            request_body(job.id, job.telefono, message)  # the same checks a real send makes
        except InvalidMessage as exc:
            return _invalid(exc)
        await asyncio.sleep(0)
        return SendResult(Outcome.SENT, wamid=f"{self._prefix}{next(self._counter)}")

    async def close(self) -> None:
        return None


def make_sender(settings: Settings) -> Sender:
    return SandboxSender() if settings.sender == "sandbox" else CloudSender(settings)
