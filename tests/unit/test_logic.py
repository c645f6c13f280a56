"""Pure logic: error classification, validation, backoff, settings."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from worker.config import ConfigError, Settings
from worker.enqueue import CsvError, MessageSpec, read_rows
from worker.messages import InvalidMessage, normalize_phone, parse_message, request_body
from worker.models import Outcome
from worker.retry import backoff
from worker.sender import classify_error, parse_response


@pytest.mark.parametrize(
    ("code", "status", "outcome"),
    [
        (130429, 429, Outcome.RETRY),
        (131056, 400, Outcome.RETRY),
        (4, 400, Outcome.RETRY),
        (80007, 400, Outcome.RETRY),
        (131000, 500, Outcome.UNKNOWN),
        (131016, 503, Outcome.UNKNOWN),
        (1, 400, Outcome.UNKNOWN),
        (131026, 400, Outcome.PERMANENT),
        (100, 400, Outcome.PERMANENT),
        (132001, 404, Outcome.PERMANENT),
        (190, 401, Outcome.PAUSE),
        (131031, 403, Outcome.PAUSE),
        (131042, 400, Outcome.PAUSE),
        (200, 403, Outcome.PAUSE),
        (None, 502, Outcome.UNKNOWN),
        (None, 429, Outcome.RETRY),
        (None, 400, Outcome.PERMANENT),
    ],
)
def test_error_codes_are_classified_as_the_cloud_api_doc_says(
    code: int | None, status: int, outcome: Outcome
) -> None:
    assert classify_error(code, status) is outcome


def test_responses_are_parsed_into_results() -> None:
    ok = parse_response(200, b'{"messages":[{"id":"wamid.A","message_status":"accepted"}]}')
    assert (ok.outcome, ok.wamid) == (Outcome.SENT, "wamid.A")
    assert parse_response(200, b"<html>").outcome is Outcome.UNKNOWN
    error = parse_response(
        400,
        json.dumps(
            {
                "error": {
                    "code": 131026,
                    "message": "(#131026) x",
                    "error_data": {"details": "not on WhatsApp"},
                }
            }
        ).encode(),
    )
    assert (error.outcome, error.error_code) == (Outcome.PERMANENT, 131026)
    assert error.error_text == "(#131026) x: not on WhatsApp"


def test_phones_must_be_e164() -> None:
    assert normalize_phone("+51 987-654-321") == "+51987654321"
    for bad in ("987654321", "+0123456789", "+51abc", ""):
        with pytest.raises(InvalidMessage):
            normalize_phone(bad)


def test_messages_are_checked_before_any_request() -> None:
    assert parse_message('{"type":"text","text":{"body":"hola"}}')["type"] == "text"
    for raw, reason in [
        ("[]", "JSON object"),
        ('{"type":"fax","fax":{}}', "not a WhatsApp message type"),
        ('{"type":"template","template":{"language":{"code":"es"}}}', "template.name"),
        ('{"type":"text","text":{"body":""}}', "non-empty"),
        ('{"type":"text","text":{"body":"x"},"to":"+1"}', "'to'"),
    ]:
        with pytest.raises(InvalidMessage, match=reason):
            parse_message(raw)
    body = json.loads(request_body(7, "+51987654321", {"type": "text", "text": {"body": "x"}}))
    assert body["biz_opaque_callback_data"] == "cola:7" and body["to"] == "+51987654321"


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    rng = random.Random(1)
    delays = [backoff(n, base=1, cap=60, rng=rng) for n in range(1, 10)]
    assert 0.5 <= delays[0] <= 1 and 4 <= delays[3] <= 8
    assert all(30 <= d <= 60 for d in delays[6:])


def test_settings_errors_name_the_variable(tmp_path: Path) -> None:
    base = {"WORKER_DATABASE_URL": "mysql://u:p@db:3306/q", "WORKER_SENDER": "sandbox"}
    assert Settings.from_env(base).database.host == "db"
    for extra, name in [
        ({"WORKER_RATE_LIMIT": "-1"}, "WORKER_RATE_LIMIT"),
        ({"WORKER_SENDER": "carrier-pigeon"}, "WORKER_SENDER"),
        ({"WORKER_DATABASE_URL": "postgres://x/y"}, "WORKER_DATABASE_URL"),
        ({"WORKER_SENDER": "cloud"}, "WHATSAPP_PHONE_NUMBER_ID"),
    ]:
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({**base, **extra})
    token = tmp_path / "token"
    token.write_text("EAAG-secret\n")
    settings = Settings.from_env({**base, "WHATSAPP_ACCESS_TOKEN_FILE": str(token)})
    assert settings.access_token == "EAAG-secret" and "EAAG" not in repr(settings)
    url_file = tmp_path / "url"
    url_file.write_text("mysql://app:s3cret@db:3306/envios\n")
    from_file = Settings.from_env({"WORKER_SENDER": "sandbox", "WORKER_DATABASE_URL_FILE": str(url_file)})
    assert from_file.database.password == "s3cret" and "s3cret" not in repr(from_file)
    assert "p@" not in repr(settings)


def test_csv_problems_carry_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text('phone,client_id,name\n+51987000001,1,Ana\n+51987000001,2,Ana again\n+51987000003,3,""\n')
    with pytest.raises(CsvError) as caught:
        read_rows(path, MessageSpec(template="t", language="es"))
    assert caught.value.problems == [
        "line 3: phone +51987000001 already appears on line 2",
        "line 4: mensaje.template.components[0] has an empty text parameter",
    ]
    path.write_text("phone,name\n+51987000001,Ana\n")
    ((client, phone, message),) = read_rows(path, MessageSpec(text="Hola {{1}}"))
    assert client is None and phone == "+51987000001"
    assert json.loads(message)["text"]["body"] == "Hola Ana"
