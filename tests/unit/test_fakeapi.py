"""Self-test of tests/fakeapi.py with a real aiohttp client."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from tests.support.fakeapi import FakeCloudAPI, Step

TOKEN = "test-token"
PHONE = "+51987654321"


@pytest.fixture
def api() -> Iterator[FakeCloudAPI]:
    with FakeCloudAPI(token=TOKEN) as fake:
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def body(to: str = PHONE, cb: str = "cola:1") -> dict[str, Any]:
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "text",
        "text": {"body": "hola", "preview_url": False},
        "biz_opaque_callback_data": cb,
    }


async def send(
    session: aiohttp.ClientSession,
    api: FakeCloudAPI,
    payload: dict[str, Any] | None = None,
    token: str = TOKEN,
    client_timeout: float = 5.0,
    phone_number_id: str | None = None,
) -> tuple[int, dict[str, Any]]:
    url = f"{api.base_url}/{phone_number_id or api.phone_number_id}/messages"
    async with session.post(
        url,
        json=payload if payload is not None else body(),
        headers={"Authorization": f"Bearer {token}"},
        timeout=aiohttp.ClientTimeout(total=client_timeout),
    ) as resp:
        return resp.status, await resp.json()


async def test_ok_returns_wamid_and_is_accepted(api: FakeCloudAPI, session: aiohttp.ClientSession) -> None:
    assert api.base_url.startswith("http://127.0.0.1:") and api.base_url.endswith("/v23.0")
    status, data = await send(session, api)
    assert status == 200
    wamid = data["messages"][0]["id"]
    assert wamid.startswith("wamid.FAKE")
    assert data["messages"][0]["message_status"] == "accepted"
    assert data["contacts"] == [{"input": PHONE, "wa_id": "51987654321"}]
    assert api.accepted == {PHONE: [wamid]}
    [rec] = api.requests
    assert (rec.phone, rec.outcome, rec.wamid) == (PHONE, "ok", wamid)
    assert rec.callback_data == "cola:1"
    assert rec.authorization == f"Bearer {TOKEN}"
    assert rec.body["text"]["body"] == "hola"
    assert api.in_flight == 0


async def test_error_step_returns_cloud_api_error(api: FakeCloudAPI, session: aiohttp.ClientSession) -> None:
    api.script(PHONE, Step.error(130429, http_status=429, details="throughput reached"))
    status, data = await send(session, api)
    assert status == 429
    err = data["error"]
    assert err["code"] == 130429
    assert err["message"].startswith("(#130429)")
    assert err["type"] == "OAuthException"
    assert err["error_data"] == {"messaging_product": "whatsapp", "details": "throughput reached"}
    assert err["error_subcode"] == 2494055 and err["fbtrace_id"]
    assert api.requests[0].outcome == "error:130429"
    assert api.requests[0].wamid is None
    assert api.accepted == {}


async def test_drop_closes_connection_without_response(
    api: FakeCloudAPI, session: aiohttp.ClientSession
) -> None:
    api.script(PHONE, Step.drop())
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await send(session, api)
    assert [r.outcome for r in api.requests] == ["drop"]
    assert api.accepted == {}
    # The same session keeps working afterwards.
    status, _ = await send(session, api)
    assert status == 200


async def test_late_answers_after_client_gave_up(api: FakeCloudAPI, session: aiohttp.ClientSession) -> None:
    api.script(PHONE, Step.late(0.4))
    with pytest.raises(asyncio.TimeoutError):
        await send(session, api, client_timeout=0.1)
    [rec] = api.requests
    assert rec.outcome == "late" and rec.wamid is not None
    done = await asyncio.to_thread(
        api.wait_until, lambda: api.accepted.get(PHONE) == [rec.wamid] and api.in_flight == 0, 5.0
    )
    assert done


async def test_wrong_token_is_401_code_190_without_consuming_script(
    api: FakeCloudAPI, session: aiohttp.ClientSession
) -> None:
    api.script(PHONE, Step.drop())
    status, data = await send(session, api, token="wrong")
    assert status == 401 and data["error"]["code"] == 190
    assert api.requests[0].outcome == "error:190"
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await send(session, api)


async def test_invalid_body_and_wrong_phone_number_id_are_code_100(
    api: FakeCloudAPI, session: aiohttp.ClientSession
) -> None:
    status, data = await send(session, api, payload={"to": PHONE, "type": "text"})
    assert (status, data["error"]["code"]) == (400, 100)
    status, data = await send(session, api, phone_number_id="999")
    assert (status, data["error"]["code"]) == (400, 100)
    assert [r.outcome for r in api.requests] == ["error:100", "error:100"]


async def test_script_then_default_counts_and_fail_all(
    api: FakeCloudAPI, session: aiohttp.ClientSession
) -> None:
    other = "+51900000000"
    api.script(PHONE, Step.error(131000, http_status=500), Step.ok())
    api.default = Step.error(131026)
    assert (await send(session, api))[0] == 500
    assert (await send(session, api))[0] == 200
    assert (await send(session, api))[1]["error"]["code"] == 131026
    assert (await send(session, api, payload=body(other)))[1]["error"]["code"] == 131026
    api.fail_all(Step.error(190, http_status=401))
    api.script(other, Step.ok())
    assert (await send(session, api, payload=body(other)))[0] == 401
    api.fail_all(None)
    assert (await send(session, api, payload=body(other)))[0] == 200
    assert api.counts() == {PHONE: 3, other: 3}
    assert [r.outcome for r in api.requests] == [
        "error:131000",
        "ok",
        "error:131026",
        "error:131026",
        "error:190",
        "ok",
    ]
    assert {p: len(w) for p, w in api.accepted.items()} == {PHONE: 1, other: 1}


async def test_random_faults_first_request_only(api: FakeCloudAPI, session: aiohttp.ClientSession) -> None:
    api.random_faults(seed=7, probabilities={"error:131000": 1.0})
    api.script("+1", Step.ok())
    assert (await send(session, api, payload=body("+1")))[0] == 200  # script wins
    assert (await send(session, api, payload=body("+2")))[0] == 500  # first request: fault
    assert (await send(session, api, payload=body("+2")))[0] == 200  # then default
    with pytest.raises(ValueError):
        api.random_faults(seed=1, probabilities={"bogus": 0.1})


async def test_concurrent_requests_are_unique(api: FakeCloudAPI, session: aiohttp.ClientSession) -> None:
    results = await asyncio.gather(*(send(session, api, payload=body(f"+{i}")) for i in range(50)))
    wamids = {data["messages"][0]["id"] for _, data in results}
    assert len(wamids) == 50
    assert sum(api.counts().values()) == 50


def test_wait_for_requests_blocks_until_enough() -> None:
    with FakeCloudAPI(token=TOKEN) as api:
        assert api.wait_for_requests(1, timeout=0.05) is False

        async def two() -> None:
            async with aiohttp.ClientSession() as s:
                await send(s, api)
                await send(s, api)

        t = threading.Thread(target=asyncio.run, args=(two(),))
        t.start()
        assert api.wait_for_requests(2, timeout=5.0) is True
        t.join()
        assert len(api.requests) == 2


def test_close_cancels_sleeping_late_handlers() -> None:
    api = FakeCloudAPI(token=TOKEN, latency=0.0)
    api.start()
    api.default = Step.late(30.0)

    async def fire() -> None:
        async with aiohttp.ClientSession() as s:
            with pytest.raises(asyncio.TimeoutError):
                await send(s, api, client_timeout=0.2)

    asyncio.run(fire())
    assert api.in_flight == 1
    api.close()
    api.close()  # idempotent
    assert api.accepted == {}


async def test_keepalive_timeout_closes_idle_connections() -> None:
    """`keepalive_timeout=N`: the fake closes a keep-alive connection idle for N seconds."""
    with FakeCloudAPI(token=TOKEN, keepalive_timeout=0.3) as fake:
        port = int(fake.base_url.split(":")[2].split("/")[0])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            payload = json.dumps(body()).encode()
            writer.write(
                f"POST /v23.0/{fake.phone_number_id}/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            idle_from = asyncio.get_running_loop().time()
            assert await asyncio.wait_for(reader.read(), timeout=5.0) == b""  # EOF: closed by the fake
            assert asyncio.get_running_loop().time() - idle_from >= 0.25
        finally:
            writer.close()
