"""`whatsapp-worker webhook` over real HTTP: the receiver runs as its own process, the database
is real, and every request is signed (or not) exactly as Meta's would be."""

from __future__ import annotations

import csv
import hashlib
import hmac
import http.client
import io
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.env import WORKER_BIN, base_env, eventually, free_port, run_worker, scrape
from tests.support.fakeapi import FakeCloudAPI, Step
from tests.support.processes import RUNBOOK, WorkerProcess
from tests.support.sql import SQL, connect
from tests.support.tcpproxy import TcpProxy
from worker.config import DatabaseURL

APP_SECRET = "test-app-secret-0123456789"
VERIFY_TOKEN = "test-verify-token"
TS = 1772366400  # 2026-03-01 12:00:00 UTC


@dataclass
class Receiver:
    process: WorkerProcess
    port: int

    def post(
        self, body: bytes, *, signature: str | None = "good", headers: dict[str, str] | None = None
    ) -> int:
        """POST /webhook; `signature="good"` signs the body with the app secret."""
        sent = dict(headers or {})
        if signature == "good":
            sent["X-Hub-Signature-256"] = sign(body)
        elif signature is not None:
            sent["X-Hub-Signature-256"] = signature
        sent.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("POST", "/webhook", body=body, headers=sent)
            return conn.getresponse().status
        finally:
            conn.close()

    def get(self, query: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", f"/webhook?{query}")
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


def sign(body: bytes) -> str:
    return "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()


def status(
    cola_id: int | None, kind: str, wamid: str, *, ts: int = 0, to: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A status object; `to`: its recipient as Meta writes it (checked against the row's phone)."""
    item: dict[str, Any] = {"id": wamid, "status": kind, "timestamp": str(TS + ts), **extra}
    if to is not None:
        item["recipient_id"] = to
    if cola_id is not None:
        item["biz_opaque_callback_data"] = f"cola:{cola_id}"
    return item


def failed(cola_id: int, wamid: str, code: int, title: str) -> dict[str, Any]:
    error = {"code": code, "title": title, "message": title, "error_data": {"details": f"{title}."}}
    return status(cola_id, "failed", wamid, errors=[error])


def payload(*, statuses: list[Any] | None = None, messages: list[Any] | None = None) -> bytes:
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "51900000000", "phone_number_id": "1234567890"},
    }
    if statuses is not None:
        value["statuses"] = statuses
    if messages is not None:
        value["messages"] = messages
    entry = {"id": "102290129340398", "changes": [{"value": value, "field": "messages"}]}
    return json.dumps({"object": "whatsapp_business_account", "entry": [entry]}).encode()


def reply(phone: str, text: str) -> dict[str, Any]:
    return {"from": phone, "id": "wamid.IN", "timestamp": str(TS), "type": "text", "text": {"body": text}}


def started_port(process: WorkerProcess) -> int | None:
    for line in process.stdout.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if isinstance(event, dict) and event.get("event") == "webhook_started":
            return int(event["port"])
    return None


@pytest.fixture
def receiver(db_url: DatabaseURL, tmp_path: Path) -> Iterator[Callable[..., Receiver]]:
    """Start `whatsapp-worker webhook` on a free port; stopped (SIGTERM, exit 0) after the test."""
    running: list[Receiver] = []

    def start(**extra: str) -> Receiver:
        settings = {
            "WHATSAPP_APP_SECRET": APP_SECRET,
            "WHATSAPP_VERIFY_TOKEN": VERIFY_TOKEN,
            "WORKER_WEBHOOK_PORT": "0",
            "WORKER_LOG_FORMAT": "json",
        }
        env = base_env(db_url, **{**settings, **extra})
        process = WorkerProcess(env, "webhook", logs=tmp_path)
        assert eventually(lambda: started_port(process) is not None or not process.alive(), 30), (
            process.stderr
        )
        port = started_port(process)
        assert port is not None, f"the receiver did not start:\n{process.stderr}"
        running.append(Receiver(process, port))
        return running[-1]

    yield start
    for server in running:
        if server.process.alive():
            assert server.stop() == 0, server.process.stderr


def unknown_row(sql: SQL, *, count: int = 1) -> list[int]:
    session = sql.add_session(f"s{sql.value('SELECT COUNT(*) FROM sesiones_envio')}")
    sql.add_rows(session, count)
    ids = [
        int(r["id"])
        for r in sql.rows("SELECT id FROM cola_envios WHERE sesion_id = %s ORDER BY id", (session,))
    ]
    sql.execute(
        "UPDATE cola_envios SET estado = 'desconocido', attempts = 1,"
        " last_error = 'no answer within 15s' WHERE sesion_id = %s",
        (session,),
    )
    return ids


def snapshot(sql: SQL) -> dict[str, Any]:
    return {
        "cola": sql.rows("SELECT * FROM cola_envios ORDER BY id"),
        "envios": sql.rows("SELECT * FROM envios_whatsapp ORDER BY id"),
        "statuses": sql.rows("SELECT * FROM whatsapp_worker_statuses ORDER BY id"),
        "optouts": sql.rows("SELECT * FROM whatsapp_worker_optouts ORDER BY id"),
    }


def row(sql: SQL, row_id: int) -> dict[str, Any]:
    return sql.rows("SELECT * FROM cola_envios WHERE id = %s", (row_id,))[0]


# -- 1. settling, authenticity, replay -----------------------------------------------------------


def test_a_signed_status_settles_an_unknown_row_and_tampered_or_unsigned_ones_change_nothing(
    sql: SQL, receiver: Callable[..., Receiver]
) -> None:
    (row_id,) = unknown_row(sql)
    server = receiver()
    body = payload(statuses=[status(row_id, "delivered", "wamid.HBgLNTE5ODc2NTQzMjEVAgARGBI", ts=7)])
    before = snapshot(sql)

    tampered = bytearray(body)
    tampered[body.index(b"delivered")] ^= 0x01  # one byte changed after signing
    assert server.post(bytes(tampered), signature=sign(body)) == 403
    assert server.post(body, signature=None) == 401
    assert server.post(body, signature="sha256=" + "0" * 64) == 403
    assert server.post(body, signature=sign(body)[7:]) == 403  # no `sha256=` prefix
    assert snapshot(sql) == before

    assert server.post(body) == 200
    # the answer came after the commit: the status is there at once; applying follows it
    assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_statuses") == 1
    assert eventually(lambda: row(sql, row_id)["estado"] == "enviado", 10), row(sql, row_id)
    settled = row(sql, row_id)
    assert settled["wamid"] == "wamid.HBgLNTE5ODc2NTQzMjEVAgARGBI"
    assert settled["settled_at"] is not None and settled["delivered_at"] is not None
    assert settled["attempts"] == 1 and settled["last_error"] is None
    assert sql.rows("SELECT cola_id, wamid FROM envios_whatsapp") == [
        {"cola_id": row_id, "wamid": "wamid.HBgLNTE5ODc2NTQzMjEVAgARGBI"}
    ]

    after = snapshot(sql)
    for _ in range(3):  # Meta retries for days
        assert server.post(body) == 200
    assert snapshot(sql) == after
    assert sql.rows(RUNBOOK) == []


def test_a_failed_status_ends_an_unknown_row_in_error_with_metas_code(
    sql: SQL, receiver: Callable[..., Receiver]
) -> None:
    (row_id,) = unknown_row(sql)
    server = receiver()
    assert server.post(payload(statuses=[failed(row_id, "wamid.F", 131026, "Message undeliverable")])) == 200
    assert eventually(lambda: row(sql, row_id)["estado"] == "error", 10)
    ended = row(sql, row_id)
    assert ended["last_error_code"] == 131026 and "Message undeliverable" in ended["last_error"]
    assert ended["settled_at"] is not None
    assert sql.value("SELECT COUNT(*) FROM envios_whatsapp") == 0


# -- 2. order and duplicates ---------------------------------------------------------------------


def test_out_of_order_and_duplicated_statuses_leave_each_row_right(
    sql: SQL,
    receiver: Callable[..., Receiver],
    fake_api: FakeCloudAPI,
    worker_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    server = receiver()
    # a row sent by the daemon: read arrives before delivered; delivered arrives twice
    session = sql.add_session("order")
    phones = sql.add_rows(session, 2)
    fake_api.script(phones[1], Step.late(3.0))  # the webhook will beat this answer
    daemon = WorkerProcess(worker_env(WORKER_SEND_TIMEOUT="10"), "run", "--once", logs=tmp_path / "daemon")
    assert fake_api.wait_until(lambda: len(fake_api.requests) == 2, timeout=20)
    by_phone = {r.phone: r for r in fake_api.requests}
    first_id, second_id = (int(r["id"]) for r in sql.rows("SELECT id FROM cola_envios ORDER BY id"))

    # the second row: its statuses arrive while the daemon still waits for Meta's answer
    early = by_phone[phones[1]].wamid
    assert server.post(payload(statuses=[status(second_id, "read", early, ts=30)])) == 200
    assert server.post(payload(statuses=[status(second_id, "delivered", early, ts=20)])) == 200
    waiting = sql.rows(
        "SELECT status, applied_at FROM whatsapp_worker_statuses WHERE cola_id = %s ORDER BY id", (second_id,)
    )
    assert [w["status"] for w in waiting] == ["read", "delivered"]
    assert row(sql, second_id)["estado"] == "procesando" and all(w["applied_at"] is None for w in waiting)

    assert daemon.wait(timeout=30) == 0, daemon.stderr
    wamid = by_phone[phones[0]].wamid
    assert server.post(payload(statuses=[status(first_id, "read", wamid, ts=50)])) == 200
    assert server.post(payload(statuses=[status(first_id, "delivered", wamid, ts=40)])) == 200
    assert server.post(payload(statuses=[status(first_id, "delivered", wamid, ts=40)])) == 200
    assert server.post(payload(statuses=[status(first_id, "sent", wamid, ts=10)])) == 200

    def settled() -> bool:
        return (
            sql.value("SELECT COUNT(*) FROM whatsapp_worker_statuses WHERE applied_at IS NULL") == 0
            and row(sql, second_id)["read_at"] is not None
        )

    assert eventually(settled, 20), sql.rows("SELECT * FROM whatsapp_worker_statuses")
    first, second = row(sql, first_id), row(sql, second_id)
    # read implies delivered; a later `delivered` (or `sent`) never moves the row backwards
    assert first["estado"] == "enviado" and first["wamid"] == wamid
    assert (first["delivered_at"], first["read_at"]) == (utc(50), utc(50))
    # the daemon's own result landed (fenced on its lease), then the waiting statuses applied
    assert second["estado"] == "enviado" and second["wamid"] == early
    assert (second["delivered_at"], second["read_at"]) == (utc(30), utc(30))
    assert first["settled_at"] is None and second["settled_at"] is None
    assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_statuses") == 5  # (wamid, status) once each
    assert sql.value("SELECT COUNT(*) FROM envios_whatsapp") == 2


def utc(seconds: int) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(TS + seconds, UTC).replace(tzinfo=None)


def test_a_send_that_timed_out_is_settled_by_its_status(
    sql: SQL,
    receiver: Callable[..., Receiver],
    fake_api: FakeCloudAPI,
    worker_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    """End to end: the daemon gives up on Meta's answer (unknown outcome); the status settles it."""
    session = sql.add_session("timeout")
    (phone,) = sql.add_rows(session, 1)
    fake_api.script(phone, Step.late(5.0))
    run = subprocess.run(
        [*WORKER_BIN, "run", "--once"],
        env=worker_env(WORKER_SEND_TIMEOUT="0.5"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert sql.states() == {"desconocido": 1}
    (request,) = fake_api.requests
    row_id = int(sql.value("SELECT id FROM cola_envios"))
    assert request.callback_data == f"cola:{row_id}"

    server = receiver()
    assert server.post(payload(statuses=[status(row_id, "sent", request.wamid)])) == 200
    assert eventually(lambda: sql.states() == {"enviado": 1}, 10)
    assert row(sql, row_id)["wamid"] == request.wamid
    assert sql.value("SELECT wamid FROM envios_whatsapp WHERE cola_id = %s", (row_id,)) == request.wamid


# -- 3. the handshake -------------------------------------------------------------------------------


def test_the_handshake_answers_the_right_token_only(receiver: Callable[..., Receiver]) -> None:
    server = receiver()
    good = f"hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}&hub.challenge=1158201444"
    assert server.get(good) == (200, "1158201444")
    assert server.get("hub.mode=subscribe&hub.verify_token=wrong&hub.challenge=1158201444")[0] == 403
    assert server.get(f"hub.mode=unsubscribe&hub.verify_token={VERIFY_TOKEN}&hub.challenge=1")[0] == 403
    assert server.get("hub.mode=subscribe&hub.challenge=1")[0] == 403
    assert server.get(f"hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}%FF&hub.challenge=1")[0] == 403


# -- 4. hostile bodies ------------------------------------------------------------------------------


def hostile_bodies(row_id: int) -> list[bytes]:
    deep = b'{"entry":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    # a usable status (no row of ours) carrying a deeply nested extra field: kept for audit
    deep_inside = payload(statuses=[status(None, "sent", "wamid.D", extra=json.loads("[" * 500 + "]" * 500))])
    return [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b'{"entry": [{"changes": [{"value": {"statuses": [{"id": "wamid.\xff", "status": "sent"}]}}]}]}',
        b"[1, 2, 3]",
        b"null",
        b'{"entry": "nope"}',
        b'{"entry": [1, "x", null, {"changes": {"a": 1}}, {"changes": [7, {"value": []}]}]}',
        deep,
        deep_inside,
        b'{"entry": [], "n": ' + b"9" * 5000 + b"}",  # more digits than Python parses
        b'{"entry": [], "n": NaN}',
        payload(statuses={"id": "x"}),  # type: ignore[arg-type]
        payload(
            statuses=[
                None,
                [],
                "sent",
                {"id": 123, "status": "sent"},
                {"id": "wamid.\ud800", "status": "sent"},  # a lone surrogate, as a JSON escape
                {"id": "w" * 500, "status": "read"},
                {"id": "wamid.T", "status": ["read"]},
                {"id": "wamid.U", "status": "deleted", "biz_opaque_callback_data": f"cola:{row_id}"},
                status(None, "read", "wamid.V", biz_opaque_callback_data="cola:" + "9" * 30),
                status(None, "read", "wamid.W", timestamp="1" * 4000),
            ]
        ),
        payload(messages=[None, {"from": 5, "type": "text", "text": {"body": "BAJA"}}, {"type": "text"}]),
    ]


def test_hostile_malformed_and_oversized_bodies_never_crash_it_and_change_nothing(
    sql: SQL, receiver: Callable[..., Receiver]
) -> None:
    (row_id,) = unknown_row(sql)
    server = receiver(WORKER_WEBHOOK_MAX_BODY="262144")
    before = snapshot(sql)
    for body in hostile_bodies(row_id):
        code = server.post(body)
        assert code == 200, (code, body[:80])  # logged with a reason; Meta must not retry it
        assert server.process.alive(), server.process.stderr
    stored = sql.rows("SELECT wamid, status, cola_id FROM whatsapp_worker_statuses ORDER BY wamid")
    # what could be used was kept for audit (a wamid and a kind that fit), with no row of ours
    assert stored == [
        {"wamid": "wamid.D", "status": "sent", "cola_id": None},
        {"wamid": "wamid.V", "status": "read", "cola_id": None},
        {"wamid": "wamid.W", "status": "read", "cola_id": None},
    ]
    statuses_before = len(stored)
    assert snapshot(sql)["cola"] == before["cola"] and snapshot(sql)["optouts"] == []

    # too large: refused (413) before a byte is parsed, whether announced or streamed
    big = payload(statuses=[status(row_id, "sent", "wamid.BIG", pad="x" * 400_000)])
    for headers in ({}, {"Transfer-Encoding": "chunked"}):
        try:
            code = post_big(server.port, big, headers)
        except (ConnectionResetError, BrokenPipeError):
            code = 413  # closed while the client was still writing: refused just the same
        assert code == 413
    assert server.process.alive()
    assert row(sql, row_id) == before["cola"][0]
    assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_statuses") == statuses_before

    # it still works: a good status settles the row
    assert server.post(payload(statuses=[status(row_id, "sent", "wamid.OK")])) == 200
    assert eventually(lambda: row(sql, row_id)["estado"] == "enviado", 10)
    events = [e.get("event") for e in json_lines(server.process.stdout)]
    assert "webhook_malformed" in events and "webhook_body_too_large" in events


def post_big(port: int, body: bytes, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        sent = {"X-Hub-Signature-256": sign(body), "Content-Type": "application/json", **headers}
        if headers.get("Transfer-Encoding") == "chunked":
            chunks = (body[i : i + 16384] for i in range(0, len(body), 16384))
            conn.request("POST", "/webhook", body=chunks, headers=sent, encode_chunked=True)
        else:
            conn.request("POST", "/webhook", body=body, headers=sent)
        return conn.getresponse().status
    finally:
        conn.close()


def json_lines(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


# -- durability -------------------------------------------------------------------------------------


def test_a_database_outage_answers_503_and_the_retried_status_is_kept(
    sql: SQL, db_url: DatabaseURL, receiver: Callable[..., Receiver]
) -> None:
    (row_id,) = unknown_row(sql)
    body = payload(statuses=[status(row_id, "read", "wamid.R", ts=9)])
    with TcpProxy(db_url.host, db_url.port) as proxy:
        server = receiver(WORKER_DATABASE_URL=proxy.database_url(db_url), WORKER_DB_TIMEOUT="2")
        proxy.cut()
        assert server.post(body) == 503  # never a 200 for a status that was not stored
        assert server.post(body) == 503
        assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_statuses") == 0
        proxy.restore()
        assert eventually(lambda: server.post(body) == 200, 15)  # Meta's retry
        assert eventually(lambda: row(sql, row_id)["estado"] == "enviado", 15)
        assert server.process.alive()
    assert row(sql, row_id)["read_at"] == utc(9)


def test_while_statuses_wait_on_a_stalled_database_new_posts_are_answered_503_at_once(
    sql: SQL, db_url: DatabaseURL, receiver: Callable[..., Receiver]
) -> None:
    first_row, second_row = unknown_row(sql, count=2)
    first = payload(statuses=[status(first_row, "read", "wamid.A", ts=1)])
    second = payload(statuses=[status(second_row, "read", "wamid.B", ts=2)])
    server = receiver(WORKER_WEBHOOK_MAX_WAIT="0.2", WORKER_DB_TIMEOUT="60")
    stalled = (  # the receiver's write of the first status, held by the lock for a second already
        "SELECT COUNT(*) FROM information_schema.processlist WHERE command = 'Query' AND time >= 1"
        " AND info LIKE 'INSERT INTO whatsapp_worker_statuses%%'"
    )
    locker = connect(db_url, db_url.database)
    try:
        with locker.cursor() as cur:  # a long report, a backup, a migration: the table is held
            cur.execute("LOCK TABLES whatsapp_worker_statuses WRITE")
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(server.post, first)
            assert eventually(lambda: sql.value(stalled) == 1, 15)
            assert server.post(second) == 503  # answered while the first one still waits
            assert not waiting.done()
            with locker.cursor() as cur:
                cur.execute("UNLOCK TABLES")
            assert waiting.result(timeout=30) == 200
    finally:
        locker.close()
    assert eventually(lambda: server.post(second) == 200, 15)  # Meta's retry, once it is quiet
    assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_statuses") == 2
    events = [e.get("event") for e in json_lines(server.process.stdout)]
    assert "webhook_overloaded" in events


# -- opt-outs -----------------------------------------------------------------------------------------


def test_keyword_replies_record_opt_outs_and_the_optout_command_manages_them(
    sql: SQL, db_url: DatabaseURL, receiver: Callable[..., Receiver]
) -> None:
    server = receiver()
    body = payload(
        messages=[
            reply("51987654321", "  baja \n"),
            reply("51911111111", "Stop"),
            reply("51922222222", "baja por favor"),  # not the keyword alone: a conversation
            reply("51933333333", "hola"),
        ]
    )
    assert server.post(body) == 200
    assert server.post(body) == 200  # again: nothing new
    assert sql.rows("SELECT telefono, source FROM whatsapp_worker_optouts ORDER BY telefono") == [
        {"telefono": "+51911111111", "source": "keyword"},
        {"telefono": "+51987654321", "source": "keyword"},
    ]

    def optout(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*WORKER_BIN, "optout", *args], env=base_env(db_url), capture_output=True, text=True, timeout=60
        )

    added = optout("add", "+51 944-444-444", "--reason", "asked by phone")
    assert added.returncode == 0 and "+51944444444 opted out" in added.stdout
    assert "already" in optout("add", "51944444444").stdout
    assert optout("add", "not-a-phone").returncode == 2
    listed = optout("list", "--csv")
    rows = list(csv.DictReader(io.StringIO(listed.stdout)))
    assert [(r["telefono"], r["source"]) for r in rows] == [
        ("+51987654321", "keyword"),
        ("+51911111111", "keyword"),
        ("+51944444444", "operator"),
    ]
    assert rows[2]["detail"] == "asked by phone"
    assert "3 opted-out phone(s)" in optout("list").stderr
    assert optout("remove", "+51944444444").returncode == 0
    assert optout("remove", "+51944444444").returncode == 1
    assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_optouts") == 2


def test_a_stop_said_before_optout_remove_does_not_opt_the_phone_out_again(
    sql: SQL, db_url: DatabaseURL, receiver: Callable[..., Receiver]
) -> None:
    server = receiver()
    said_in_march = payload(messages=[reply("5215512345678", "BAJA")])  # Mexico's wa_id form
    assert server.post(said_in_march) == 200
    assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_optouts") == 1
    # The customer asks, by phone, to be messaged again; the agent types the number as in the CSV.
    assert run_worker(db_url, "optout", "remove", "+52 55 1234 5678").returncode == 0
    # Meta retries that POST for days, and a captured signed body can be sent again: same stop.
    assert server.post(said_in_march) == 200
    assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_optouts") == 0
    assert eventually(lambda: any(e["event"] == "optout_replay_ignored" for e in server.process.events()), 10)
    # A stop the customer says after the removal counts.
    said_now = reply("5215512345678", "stop") | {"timestamp": str(int(time.time()) + 1)}
    assert server.post(payload(messages=[said_now])) == 200
    assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_optouts") == 1


def test_an_opted_out_phone_is_never_sent_to_and_the_opt_out_survives_re_enqueue(
    sql: SQL,
    db_url: DatabaseURL,
    receiver: Callable[..., Receiver],
    fake_api: FakeCloudAPI,
    worker_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    """Needs the claim path to consult the opt-outs (store/optouts.py `opted_out`)."""
    server = receiver()
    assert server.post(payload(messages=[reply("51987654321", "CANCELAR")])) == 200
    clients = tmp_path / "clientes.csv"
    clients.write_text("phone,client_id\n+51987654321,1\n+51911111111,2\n")

    def cycle(session: str) -> None:
        enqueue = subprocess.run(
            [*WORKER_BIN, "enqueue", "--session", session, "--text", "hola", "--csv", str(clients)],
            env=base_env(db_url),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert enqueue.returncode == 0, enqueue.stderr
        run = subprocess.run(
            [*WORKER_BIN, "run", "--once"], env=worker_env(), capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, run.stderr

    cycle("campaign-1")
    cycle("campaign-1")  # the same file again: nothing new
    cycle("campaign-2")  # the same phones in a new session
    assert fake_api.counts() == {"+51911111111": 2}
    opted = sql.rows("SELECT estado, last_error FROM cola_envios WHERE telefono = '+51987654321'")
    assert len(opted) == 2
    assert all(r["estado"] == "error" and "opted out" in r["last_error"] for r in opted)


# -- the process --------------------------------------------------------------------------------------


def test_metrics_count_statuses_signature_failures_and_settled_rows(
    sql: SQL, receiver: Callable[..., Receiver]
) -> None:
    metrics_port = free_port()
    (row_id,) = unknown_row(sql)
    server = receiver(WORKER_WEBHOOK_METRICS_PORT=str(metrics_port))
    assert (
        server.post(
            payload(statuses=[status(row_id, "sent", "wamid.M"), status(row_id, "delivered", "wamid.M")])
        )
        == 200
    )
    assert server.post(b"{}", signature=None) == 401
    assert server.post(b"{}", signature="sha256=00") == 403
    assert eventually(lambda: row(sql, row_id)["estado"] == "enviado", 10)
    assert eventually(
        lambda: scrape(metrics_port).get('whatsapp_worker_webhook_settled_total{outcome="sent"}') == 1.0, 10
    )
    figures = scrape(metrics_port)
    assert figures['whatsapp_worker_webhook_statuses_total{status="sent"}'] == 1.0
    assert figures['whatsapp_worker_webhook_statuses_total{status="delivered"}'] == 1.0
    assert figures["whatsapp_worker_webhook_signature_failures_total"] == 2.0
    # the public port serves /webhook only
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/metrics")
    assert conn.getresponse().status == 404
    conn.close()


def test_it_refuses_to_start_without_its_secrets(db_url: DatabaseURL) -> None:
    for missing in ("WHATSAPP_APP_SECRET", "WHATSAPP_VERIFY_TOKEN"):
        env = base_env(db_url, WHATSAPP_APP_SECRET=APP_SECRET, WHATSAPP_VERIFY_TOKEN=VERIFY_TOKEN)
        del env[missing]
        result = subprocess.run([*WORKER_BIN, "webhook"], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 78
        assert missing in result.stderr and APP_SECRET not in result.stderr + result.stdout


def test_the_secret_file_form_and_a_clean_stop(
    db_url: DatabaseURL, receiver: Callable[..., Receiver], tmp_path: Path
) -> None:
    secret_file = tmp_path / "app-secret"
    secret_file.write_text(APP_SECRET + "\n")
    server = receiver(WHATSAPP_APP_SECRET="", WHATSAPP_APP_SECRET_FILE=str(secret_file))
    assert server.post(payload(statuses=[])) == 200
    assert server.stop() == 0
    assert APP_SECRET not in server.process.stdout + server.process.stderr
    assert VERIFY_TOKEN not in server.process.stdout + server.process.stderr


def test_a_receiver_whose_log_reader_goes_away_stores_what_it_acknowledged_and_exits_74(
    sql: SQL, db_url: DatabaseURL
) -> None:
    (row,) = unknown_row(sql)
    env = base_env(
        db_url,
        WHATSAPP_APP_SECRET=APP_SECRET,
        WHATSAPP_VERIFY_TOKEN=VERIFY_TOKEN,
        WORKER_WEBHOOK_PORT="0",
        WORKER_LOG_FORMAT="json",
    )
    process = subprocess.Popen([*WORKER_BIN, "webhook"], env=env, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    started = json.loads(process.stdout.readline())
    assert started["event"] == "webhook_started"
    process.stdout.close()  # the log reader goes away
    server = Receiver(WorkerProcess.__new__(WorkerProcess), int(started["port"]))
    assert server.post(payload(statuses=[status(row, "delivered", "wamid.GONE")])) == 200
    assert process.wait(timeout=30) == 74  # the next log line found the pipe closed
    assert sql.rows("SELECT estado, wamid FROM cola_envios WHERE id = %s", (row,)) == [
        {"estado": "enviado", "wamid": "wamid.GONE"}
    ]


def test_phones_without_a_country_code_need_the_default_country_and_are_never_another_country(
    sql: SQL, db_url: DatabaseURL, tmp_path: Path
) -> None:
    # a Peruvian mobile as agents type it: without WORKER_DEFAULT_COUNTRY it is refused, not +987654321
    refused = run_worker(db_url, "optout", "add", "987654321")
    assert refused.returncode == 2 and "WORKER_DEFAULT_COUNTRY" in refused.stderr
    assert sql.value("SELECT COUNT(*) FROM whatsapp_worker_optouts") == 0
    added = run_worker(db_url, "optout", "add", "987 654 321", WORKER_DEFAULT_COUNTRY="PE")
    assert added.returncode == 0, added.stderr
    assert sql.value("SELECT telefono FROM whatsapp_worker_optouts") == "+51987654321"
    bad = run_worker(db_url, "optout", "list", WORKER_DEFAULT_COUNTRY="Peru")
    assert bad.returncode == 78 and "WORKER_DEFAULT_COUNTRY" in bad.stderr
    # enqueue reads a file of national numbers under the same rule
    csv_path = tmp_path / "nacional.csv"
    csv_path.write_text("phone\n912 345 678\n+51 911 111 111\n")
    args = ["enqueue", "--session", "nacional", "--text", "hola", "--csv", str(csv_path)]
    assert run_worker(db_url, *args).returncode == 65  # without the default country
    queued = run_worker(db_url, *args, WORKER_DEFAULT_COUNTRY="PE")
    assert queued.returncode == 0, queued.stderr
    assert sorted(r["telefono"] for r in sql.rows("SELECT telefono FROM cola_envios")) == [
        "+51911111111",
        "+51912345678",
    ]


PAYLOADS = Path(__file__).resolve().parents[1] / "payloads"


def test_every_real_meta_body_is_answered_200_stored_as_its_kind_and_no_valid_shape_warns(
    sql: SQL, receiver: Callable[..., Receiver]
) -> None:
    bodies = sorted(PAYLOADS.glob("*.json"))
    assert len(bodies) == 32
    server = receiver()
    for path in bodies:
        assert server.post(path.read_bytes()) == 200, path.name
    statuses = {  # a (wamid, status) Meta sends again is stored once
        (s["id"], s["status"])
        for path in bodies
        for entry in json.loads(path.read_bytes())["entry"]
        for change in entry["changes"]
        for s in change["value"].get("statuses", [])
        if s.get("status") in ("sent", "delivered", "read", "failed")
    }
    assert eventually(lambda: sql.value("SELECT COUNT(*) FROM whatsapp_worker_statuses") == len(statuses), 15)
    assert eventually(
        lambda: sql.value("SELECT COUNT(*) FROM whatsapp_worker_statuses WHERE applied_at IS NULL") == 0, 15
    )  # no row of ours: kept for audit, nothing to wait for
    # the stops: Meta's "Unsubscribe" button and the user_preferences stop (both from +16505551234)
    # (one phone said it twice: the first source is kept)
    assert sql.rows("SELECT telefono, source FROM whatsapp_worker_optouts") == [
        {"telefono": "+16505551234", "source": "keyword"}
    ]
    assert server.stop() == 0
    events = [json.loads(line) for line in server.process.stdout.splitlines() if line.startswith("{")]
    warned = sorted({e["event"] for e in events if e.get("level") in ("warning", "error")})
    # what Meta reports for a person to hear (a rate limit, a restriction, a rejected template)
    assert set(warned) <= {"webhook_error_reported", "account_update", "template_status_update"}, warned
    assert "webhook_parts_ignored" not in warned and "webhook_malformed" not in warned
