"""CloudSender over real HTTP: which failures are provably "not sent" and which are uncertain.

Only a request that may have reached the provider may end UNKNOWN. The fake API runs on
127.0.0.1; "unreachable" is a closed local port or a listening socket whose accept queue is full
(the kernel drops the SYN, so connect hangs). No database is needed here.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest

from tests.support.fakeapi import FakeCloudAPI, Step
from worker.config import DatabaseURL, Settings
from worker.daemon.sender import CloudSender, SandboxSender
from worker.models import Job, Outcome, SendResult

PHONE = "+51987654321"
TEXT = {"type": "text", "text": {"body": "hola", "preview_url": False}}


def make_settings(api_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        database=DatabaseURL("127.0.0.1", 3306, "unused", "", "unused"),  # never connected to
        api_url=api_url,
        phone_number_id="1234567890",
        access_token="test-token",
        concurrency=4,
        send_timeout=2.0,
    )
    values.update(overrides)
    return Settings(**values)


def job(row_id: int = 1, phone: str = PHONE) -> Job:
    return Job(row_id, 1, phone, json.dumps(TEXT), 0, "token")


@asynccontextmanager
async def cloud(api_url: str, **overrides: Any) -> AsyncIterator[CloudSender]:
    sender = CloudSender(make_settings(api_url, **overrides))
    try:
        yield sender
    finally:
        await sender.close()


@contextmanager
def unanswered_port() -> Iterator[int]:
    """A port whose listener never completes a handshake: backlog 0, accept queue filled first.

    Linux drops a SYN while the accept queue is full, so the client's connect just hangs (the
    network rules here allow 127.0.0.0/8 only, so no black-hole address). Checked before use.
    """
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            fillers.append(filler)
            try:
                filler.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", port))
        except TimeoutError:
            pass
        else:
            pytest.fail("this kernel completed a handshake with a full accept queue", pytrace=False)
        finally:
            probe.close()
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def closed_port() -> int:
    """A local port nobody listens on: connect is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_normal_send_is_sent_with_the_row_id(fake_api: FakeCloudAPI) -> None:
    async with cloud(fake_api.base_url) as sender:
        result = await sender.send(job(7), TEXT)
    assert result.outcome is Outcome.SENT and result.wamid == fake_api.accepted[PHONE][0]
    assert [r.callback_data for r in fake_api.requests] == ["cola:7"]


async def test_connection_refused_is_unreachable() -> None:
    async with cloud(f"http://127.0.0.1:{closed_port()}/v23.0") as sender:
        result = await sender.send(job(), TEXT)
    assert result.outcome is Outcome.UNREACHABLE, result


@pytest.mark.parametrize("send_timeout", [2.0, 0.3])
async def test_a_connect_that_never_completes_is_unreachable(send_timeout: float) -> None:
    """Before: `total=send_timeout` raced the connect timer and a hung connect became UNKNOWN."""
    with unanswered_port() as port:
        async with cloud(f"http://127.0.0.1:{port}/v23.0", send_timeout=send_timeout) as sender:
            started = time.monotonic()
            result = await sender.send(job(), TEXT)
            elapsed = time.monotonic() - started
    assert result.outcome is Outcome.UNREACHABLE, result
    assert send_timeout * 0.9 <= elapsed < send_timeout * 2  # the connect timer, not the total one


async def test_a_connection_dropped_after_the_request_was_read_is_unknown(fake_api: FakeCloudAPI) -> None:
    fake_api.script(PHONE, Step.drop())
    async with cloud(fake_api.base_url) as sender:
        result = await sender.send(job(), TEXT)
    assert result.outcome is Outcome.UNKNOWN, result
    assert [r.outcome for r in fake_api.requests] == ["drop"]


async def test_an_answer_later_than_the_timeout_is_unknown(fake_api: FakeCloudAPI) -> None:
    fake_api.script(PHONE, Step.late(3.0))
    async with cloud(fake_api.base_url, send_timeout=0.5) as sender:
        result = await sender.send(job(), TEXT)
    assert result.outcome is Outcome.UNKNOWN, result
    assert [r.outcome for r in fake_api.requests] == ["late"]  # the provider did get it


def deep(levels: int) -> dict[str, Any]:
    nested: list[Any] = []
    for _ in range(levels):
        nested = [nested]
    return {"type": "text", "text": {"body": "hola", "extra": nested}}


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (json.loads('{"type":"text","text":{"body":"\\ud800"}}'), "surrogates not allowed"),
        (deep(5000), "nested too deeply"),
    ],
    ids=["lone-surrogate", "deep-nesting"],
)
@pytest.mark.parametrize("kind", ["cloud", "sandbox"])
async def test_a_message_that_cannot_be_serialised_is_permanent_without_a_request(
    fake_api: FakeCloudAPI, message: dict[str, Any], reason: str, kind: str
) -> None:
    result: SendResult
    if kind == "cloud":
        async with cloud(fake_api.base_url) as sender:
            result = await sender.send(job(), message)
    else:
        result = await SandboxSender().send(job(), message)
    assert result.outcome is Outcome.PERMANENT and reason in (result.error_text or ""), result
    assert fake_api.requests == []


async def test_idle_connections_are_dropped_before_the_provider_closes_them() -> None:
    """The provider closes idle keep-alive connections after 1 s; the client keeps them 0.5 s.

    A request written into a connection the server is closing fails as "server disconnected",
    which is uncertain. Waiting out the idle period is the condition under test, not a sync.
    """
    with FakeCloudAPI(token="test-token", keepalive_timeout=1.0) as api:
        async with cloud(api.base_url, http_keepalive=0.5) as sender:
            first = await sender.send(job(1, "+51987000001"), TEXT)
            await asyncio.sleep(1.05)
            second = await sender.send(job(2, "+51987000002"), TEXT)
        assert (first.outcome, second.outcome) == (Outcome.SENT, Outcome.SENT), (first, second)
        assert len(api.requests) == 2


async def test_keepalive_zero_opens_a_connection_per_send(fake_api: FakeCloudAPI) -> None:
    async with cloud(fake_api.base_url, http_keepalive=0.0) as sender:
        results = [await sender.send(job(n, f"+5198700000{n}"), TEXT) for n in (1, 2)]
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.SENT]


@pytest.mark.parametrize(("client_keepalive", "second"), [(0.5, Outcome.SENT), (5.0, Outcome.UNKNOWN)])
async def test_a_reused_connection_the_provider_is_closing_is_uncertain(
    client_keepalive: float, second: Outcome
) -> None:
    """The race above made deterministic: the provider drops a request that arrives on a
    connection idle for 1 s (its close crossed the request). Keeping idle connections only
    0.5 s never writes into such a connection; 5 s (aiohttp's habit) does, and the send is
    rightly UNKNOWN: the request was written and the connection closed without an answer."""
    with FakeCloudAPI(token="test-token", drop_stale_after=1.0) as api:
        async with cloud(api.base_url, http_keepalive=client_keepalive) as sender:
            first = await sender.send(job(1, "+51987000001"), TEXT)
            await asyncio.sleep(1.05)
            result = await sender.send(job(2, "+51987000002"), TEXT)
        assert (first.outcome, result.outcome) == (Outcome.SENT, second), result
        assert [r.outcome for r in api.requests] == ["ok", "ok" if second is Outcome.SENT else "stale"]
