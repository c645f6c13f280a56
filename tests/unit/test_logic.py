"""Pure logic: response parsing, validation, backoff, settings (the policy: test_policy.py)."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import random
import re
from pathlib import Path

import pymysql
import pytest
import structlog

from worker.config import ConfigError, Settings
from worker.daemon.ratelimit import RateLimiter
from worker.daemon.retry import backoff
from worker.daemon.sender import parse_response
from worker.log import configure, get_logger
from worker.messages import InvalidMessage, normalize_phone, parse_message, request_body
from worker.models import Outcome
from worker.store.db import PASSING_STATES, DatabaseUnavailable, StatementRefused, translate
from worker.waits import wait_any


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


def test_a_message_read_as_bytes_is_checked_like_text() -> None:
    """The driver may hand `mensaje` over as bytes (a BLOB column): read as json.loads reads
    bytes, and NaN is refused either way."""
    text = '{"type":"text","text":{"body":"¿hola?"}}'
    for raw in (text.encode(), text.encode("utf-16")):
        assert parse_message(raw)["text"]["body"] == "¿hola?"
    for raw in ('{"type":"text","text":{"body":NaN}}', b'{"type":"text","text":{"body":NaN}}'):
        with pytest.raises(InvalidMessage, match="not valid JSON: NaN is not JSON"):
            parse_message(raw)
    assert parse_message(b"\xef\xbb\xbf" + text.encode())["type"] == "text"  # json.loads reads it too
    with pytest.raises(InvalidMessage, match="Unexpected UTF-8 BOM"):  # a str: the hint stays
        parse_message("\ufeff" + text)


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


def test_messages_that_cannot_be_serialised_are_invalid() -> None:
    """Caught before any request: a lone surrogate fails UTF-8, deep nesting json's recursion."""
    surrogate = parse_message('{"type":"text","text":{"body":"\\ud800"}}')  # parses ...
    with pytest.raises(InvalidMessage, match="cannot be encoded"):
        request_body(1, "+51987654321", surrogate)  # ... but can never be sent
    for raw, reason in [
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        ('{"type":"text","text":{"body":"x","a":' + "[" * 5000 + "]" * 5000 + "}}", "nested too deeply"),
        ('{"type":"text","text":{"body":"x","n":NaN}}', "NaN is not JSON"),
        (b'{"type":"text","text":{"body":"\xff"}}', "not valid JSON"),
    ]:
        with pytest.raises(InvalidMessage, match=reason):
            parse_message(raw)
    nested: list[object] = []
    for _ in range(5000):
        nested = [nested]
    with pytest.raises(InvalidMessage, match="nested too deeply"):
        request_body(1, "+51987654321", {"type": "text", "text": {"body": "x", "a": nested}})


BASE = {"WORKER_DATABASE_URL": "mysql://u:p@db:3306/q", "WORKER_SENDER": "sandbox"}
CLOUD = {**BASE, "WORKER_SENDER": "cloud", "WHATSAPP_PHONE_NUMBER_ID": "123", "WHATSAPP_ACCESS_TOKEN": "EAAG"}


@pytest.mark.parametrize(
    ("extra", "name"),
    [
        ({"WORKER_LOG_LEVEL": "verbose"}, "WORKER_LOG_LEVEL"),
        ({"WORKER_LOG_FORMAT": "xml"}, "WORKER_LOG_FORMAT"),
        ({"WORKER_HTTP_KEEPALIVE": "-1"}, "WORKER_HTTP_KEEPALIVE"),
        ({"WORKER_HTTP_KEEPALIVE": "301"}, "WORKER_HTTP_KEEPALIVE"),
        ({"WORKER_RATE_LIMIT": "10001"}, "WORKER_RATE_LIMIT"),
        ({"WORKER_RATE_LIMIT": "nan"}, "WORKER_RATE_LIMIT"),
        ({"WORKER_POLL_INTERVAL": "NaN"}, "WORKER_POLL_INTERVAL"),
        ({"WORKER_POLL_INTERVAL": "3601"}, "WORKER_POLL_INTERVAL"),
        ({"WORKER_LEASE_SECONDS": "86401"}, "WORKER_LEASE_SECONDS"),
        ({"WORKER_LEASE_SECONDS": "inf"}, "WORKER_LEASE_SECONDS"),
        ({"WORKER_DRAIN_TIMEOUT": "3601"}, "WORKER_DRAIN_TIMEOUT"),
        ({"WORKER_SEND_TIMEOUT": "601"}, "WORKER_SEND_TIMEOUT"),
        ({"WORKER_SEND_TIMEOUT": "1e999"}, "WORKER_SEND_TIMEOUT"),
        ({"WORKER_RETRY_BASE": "86401"}, "WORKER_RETRY_BASE"),
        ({"WORKER_RETRY_CAP": "-inf"}, "WORKER_RETRY_CAP"),
        ({"WORKER_PAUSE_SECONDS": "86401"}, "WORKER_PAUSE_SECONDS"),
        ({"WORKER_TEMPLATE_PAUSE_SECONDS": "604801"}, "WORKER_TEMPLATE_PAUSE_SECONDS"),
        ({"WORKER_CONCURRENCY": "10001"}, "WORKER_CONCURRENCY"),
        ({"WORKER_MAX_ATTEMPTS": "0"}, "WORKER_MAX_ATTEMPTS"),
        ({"WHATSAPP_PHONE_NUMBER_ID": "١٢٣"}, "WHATSAPP_PHONE_NUMBER_ID"),  # digits, not ASCII
        ({"WHATSAPP_PHONE_NUMBER_ID": "12/3"}, "WHATSAPP_PHONE_NUMBER_ID"),
        ({"WHATSAPP_ACCESS_TOKEN": "EAAG\nX-Evil: 1"}, "WHATSAPP_ACCESS_TOKEN"),
        ({"WHATSAPP_ACCESS_TOKEN": "EAAG\x01abc"}, "WHATSAPP_ACCESS_TOKEN"),
        ({"WHATSAPP_ACCESS_TOKEN": "EAAGñabc"}, "WHATSAPP_ACCESS_TOKEN"),
        ({"WHATSAPP_ACCESS_TOKEN": "EAAG abc"}, "WHATSAPP_ACCESS_TOKEN"),
        ({"WHATSAPP_API_URL": "https://graph.face\nbook.com/v23.0"}, "WHATSAPP_API_URL"),
        ({"WHATSAPP_API_URL": "https://graph.facebook.com:http/v23.0"}, "WHATSAPP_API_URL"),
        ({"WHATSAPP_API_URL": "ftp://graph.facebook.com"}, "WHATSAPP_API_URL"),
    ],
)
def test_bad_values_fail_naming_the_variable(extra: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError, match=name) as caught:
        Settings.from_env({**CLOUD, **extra})
    assert "\n" not in str(caught.value)  # one line
    assert "EAAG" not in str(caught.value)  # never the token


def test_a_token_file_with_two_lines_is_refused_without_showing_it(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("EAAG-first-line\nEAAG-second-line\n")
    env = {**CLOUD, "WHATSAPP_ACCESS_TOKEN": "", "WHATSAPP_ACCESS_TOKEN_FILE": str(token)}
    with pytest.raises(ConfigError, match="WHATSAPP_ACCESS_TOKEN_FILE") as caught:
        Settings.from_env(env)
    assert "EAAG" not in str(caught.value) and "position 16" in str(caught.value)


def test_each_sending_number_may_have_its_own_token_never_shown(tmp_path: Path) -> None:
    token = tmp_path / "token-222"
    token.write_text("EAAG-of-number-222\n")
    env = {
        **CLOUD,
        "WHATSAPP_ACCESS_TOKEN_111": "EAAG-of-number-111",
        "WHATSAPP_ACCESS_TOKEN_222_FILE": str(token),
    }
    settings = Settings.from_env(env)
    assert settings.token_for("111") == "EAAG-of-number-111"
    assert settings.token_for("222") == "EAAG-of-number-222"
    assert settings.token_for("333") == settings.access_token  # the account's token by default
    assert {"EAAG-of-number-111", "EAAG-of-number-222"} <= set(settings.secrets())
    assert "EAAG" not in repr(settings)
    with pytest.raises(ConfigError, match="WHATSAPP_ACCESS_TOKEN_111"):
        Settings.from_env({**env, "WHATSAPP_ACCESS_TOKEN_111": "two words"})


def test_new_settings_have_defaults_and_are_read() -> None:
    defaults = Settings.from_env(CLOUD)
    assert (defaults.http_keepalive, defaults.log_level, defaults.log_format) == (10.0, "info", "auto")
    read = Settings.from_env(
        {**CLOUD, "WORKER_HTTP_KEEPALIVE": "0", "WORKER_LOG_LEVEL": "DEBUG", "WORKER_LOG_FORMAT": "json"}
    )
    assert (read.http_keepalive, read.log_level, read.log_format) == (0.0, "debug", "json")
    edge = Settings.from_env({**CLOUD, "WORKER_SEND_TIMEOUT": "600", "WORKER_LEASE_SECONDS": "86400"})
    assert (edge.send_timeout, edge.lease_seconds) == (600.0, 86400.0)


def test_a_non_ascii_database_password_is_read_from_the_url() -> None:
    """Percent-encoded UTF-8 in the URL; the store sends it as UTF-8 (an acceptance test logs in)."""
    settings = Settings.from_env({**BASE, "WORKER_DATABASE_URL": "mysql://app:contrase%C3%B1a%E2%82%AC@db/q"})
    assert settings.database.password == "contraseña€"
    assert "contraseña" not in repr(settings)


def test_logging_takes_level_and_format_from_settings() -> None:
    stream = io.StringIO()
    try:
        configure(stream=stream, fmt="json", level="warning")
        get_logger().info("hidden_event")
        get_logger().warning("shown_event")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [line["event"] for line in lines] == ["shown_event"]
        with pytest.raises(ValueError, match="log level"):
            configure(stream=io.StringIO(), level="verbose")
        configure(stream=io.StringIO())  # cli.py's call today: falls back to the environment
    finally:
        structlog.reset_defaults()


def test_a_json_line_keeps_its_fields_in_order_with_level_utc_time_and_no_secret() -> None:
    stream = io.StringIO()
    try:
        configure(stream=stream, fmt="json", secrets=["tok-123"])
        log = get_logger()
        log.info("message_sent", job_id=7, wamid="wamid.X", note="has tok-123 inside", odd={1})
        log.warn("old_alias")
        try:
            raise RuntimeError("the tok-123 leaked into an error")
        except RuntimeError:
            log.exception("failed", job_id=8)
    finally:
        structlog.reset_defaults()
    sent, warned, failed = (json.loads(line) for line in stream.getvalue().splitlines())
    assert list(sent) == ["job_id", "wamid", "note", "odd", "event", "level", "timestamp"]
    assert sent["note"] == "has *** inside" and sent["odd"] == "{1}" and sent["level"] == "info"
    stamped = datetime.datetime.fromisoformat(sent["timestamp"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", sent["timestamp"])
    assert abs(stamped - datetime.datetime.now(datetime.UTC)) < datetime.timedelta(seconds=5)
    assert warned["level"] == "warning" and failed["level"] == "error"
    assert failed["exception"][0]["exc_type"] == "RuntimeError"
    assert "tok-123" not in stream.getvalue()


def test_a_secret_with_quotes_or_accents_is_blanked_as_the_json_line_writes_it() -> None:
    """JSON writes `pa"ss` as `pa\\"ss` and `ñ` as `\\u00f1`: the secret as given would not match."""
    secrets = ['pa"ss\\wörd', "contraseña"]
    stream = io.StringIO()
    try:
        configure(stream=stream, fmt="json", secrets=secrets)
        get_logger().error("database_unavailable", error=f"login as app:{secrets[0]} / {secrets[1]} refused")
    finally:
        structlog.reset_defaults()
    line = stream.getvalue()
    assert json.loads(line)["error"] == "login as app:*** / *** refused"
    for secret in secrets:
        assert secret not in line and json.dumps(secret)[1:-1] not in line
    console = io.StringIO()  # the console shows a dict by its repr: `\\` for a backslash
    try:
        configure(stream=console, fmt="console", secrets=secrets)
        get_logger().error("database_unavailable", login={"app": secrets[0]})
    finally:
        structlog.reset_defaults()
    assert "'app': '***'" in console.getvalue()
    assert secrets[0] not in console.getvalue() and repr(secrets[0])[1:-1] not in console.getvalue()


def test_a_very_low_rate_gives_its_token_then_names_the_wait_for_the_next() -> None:
    """At 0.01 sends/s the next token is 100 s away: the loop is told so, and waits its beat."""
    now = [0.0]
    limiter = RateLimiter(0.01, burst=1, clock=lambda: now[0])
    assert limiter.take_now(5) == 1
    limiter.claimed(1, 1)
    assert limiter.take_now(5) == 0 and limiter.wait_time() == pytest.approx(100.0)
    now[0] += 100.0
    assert limiter.take_now(5) == 1


@pytest.mark.parametrize("code", sorted(PASSING_STATES))
def test_a_server_state_that_passes_is_an_outage(code: int) -> None:
    error = translate(pymysql.err.OperationalError(code, "the server says why"))
    assert isinstance(error, DatabaseUnavailable) and error.code == code


@pytest.mark.parametrize(
    ("code", "remedy"),
    [
        (1054, "run `whatsapp-worker migrate`"),  # unknown column
        (1146, "run `whatsapp-worker migrate`"),  # no such table
        (1142, "grant the database user"),  # UPDATE command denied to user
        (1044, "grant the database user"),  # access denied to the database
    ],
)
def test_a_statement_no_wait_can_fix_says_what_a_person_must_do(code: int, remedy: str) -> None:
    error = translate(pymysql.err.OperationalError(code, "refused"))
    assert isinstance(error, StatementRefused) and remedy in error.remedy


def test_read_only_is_an_outage_on_both_servers_wordings() -> None:
    # MariaDB and MySQL both answer 1290 to a user without SUPER; MySQL's InnoDB read-only
    # mode answers 1836, a START TRANSACTION READ ONLY 1792.
    for code in (1290, 1836, 1792):
        assert isinstance(translate(pymysql.err.InternalError(code, "read-only")), DatabaseUnavailable)


async def test_every_background_wait_ends_at_an_event_or_at_its_timeout() -> None:
    stop, poke = asyncio.Event(), asyncio.Event()
    assert await wait_any(stop, poke, seconds=0.01) is False  # nothing set: the timeout
    asyncio.get_running_loop().call_soon(poke.set)
    assert await wait_any(stop, poke, seconds=5) is True  # the first event set ends it
    assert await wait_any(poke, seconds=0) is True  # already set: at once
    assert await wait_any(stop, seconds=-1) is False  # a deadline already passed waits nothing
