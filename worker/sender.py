"""Senders: the Cloud API over aiohttp, and a sandbox that makes no network call.

Every outcome becomes one SendResult. For a network failure the question is whether the
request could have reached Meta: only failures before the request was written are retried;
anything after is an unknown outcome, because the API has no idempotency key.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from typing import Any, Protocol

import aiohttp

from worker.config import Settings
from worker.messages import request_body
from worker.models import Job, Outcome, SendResult

RETRY_CODES = frozenset({4, 80007, 130429, 131056, 131049})
MAINTENANCE_CODE = 131057  # account in maintenance: pause briefly (about a minute)
TEMPLATE_PAUSED_CODE = 132015  # template paused for low quality: hold that template's rows
TEMPLATE_DEAD_CODES = frozenset({132001, 132007, 132016})  # missing / policy / disabled
UNKNOWN_CODES = frozenset({1, 2, 131000, 131016})
PAUSE_CODES = frozenset({0, 3, 10, 190, 131005, 131031, 131042, 131045, 131048, 133010}) | frozenset(
    range(200, 300)
)
# Everything else Meta answers with an error code is a rejection: 100, 131008, 131026, 132xxx...


def classify_error(code: int | None, http_status: int) -> Outcome:
    """Meta asks clients to decide on the error code, not on the HTTP status."""
    if code in RETRY_CODES:
        return Outcome.RETRY
    if code in UNKNOWN_CODES:
        return Outcome.UNKNOWN
    if code in PAUSE_CODES or code in (MAINTENANCE_CODE, TEMPLATE_PAUSED_CODE):
        return Outcome.PAUSE
    if code is None:
        if http_status == 429:
            return Outcome.RETRY
        if http_status == 401:
            return Outcome.PAUSE
        if http_status < 500:
            return Outcome.PERMANENT
        return Outcome.UNKNOWN
    return Outcome.UNKNOWN if http_status >= 500 and code not in PAUSE_CODES else Outcome.PERMANENT


def classify_exception(exc: BaseException) -> SendResult:
    """Could the request have reached Meta before this failure?"""
    name = type(exc).__name__
    # Connect failures (refused, DNS, TLS handshake, connect timeout) happen before any byte
    # of the request is written: provably not sent.
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return SendResult(Outcome.RETRY, error_text=f"not sent: {name}: {exc}")
    # Anything after connecting (server disconnected, reset, read timeout, broken payload)
    # may follow a request Meta received.
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


class CloudSender:
    """POST {api_url}/{phone_number_id}/messages with a shared keep-alive connection pool."""

    def __init__(self, settings: Settings) -> None:
        self._url = f"{settings.api_url}/{settings.phone_number_id}/messages"
        self._headers = {
            "Authorization": f"Bearer {settings.access_token}",
            "Content-Type": "application/json",
        }
        self._timeout = aiohttp.ClientTimeout(
            total=settings.send_timeout, sock_connect=min(10.0, settings.send_timeout)
        )
        self._limit = settings.concurrency
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._limit, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                headers=self._headers,
                raise_for_status=False,
                auto_decompress=True,
            )
        return self._session

    async def send(self, job: Job, message: dict[str, Any]) -> SendResult:
        body = request_body(job.id, job.telefono, message)
        try:
            async with self._client().post(self._url, data=body) as response:
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
        request_body(job.id, job.telefono, message)  # the same checks a real send makes
        await asyncio.sleep(0)
        return SendResult(Outcome.SENT, wamid=f"{self._prefix}{next(self._counter)}")

    async def close(self) -> None:
        return None


def make_sender(settings: Settings) -> Sender:
    return SandboxSender() if settings.sender == "sandbox" else CloudSender(settings)
