"""The webhook parser, pure (no store, no HTTP), against Meta's 32 real bodies (tests/payloads,
a copy of shared/meta_payloads): what comes out is checked against each body's own structure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from worker.webhook.parse import Malformed, parse_payload, sign, signature_ok

PAYLOADS = Path(__file__).resolve().parents[1] / "payloads"
KINDS = {"sent", "delivered", "read", "failed"}
FILES = sorted(PAYLOADS.glob("*.json"))


def statuses_in(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The status objects of a body, as its JSON nests them."""
    return [
        status
        for entry in body.get("entry", [])
        for change in entry.get("changes", [])
        for status in (change.get("value") or {}).get("statuses", []) or []
    ]


def test_the_real_bodies_are_here() -> None:
    assert len(FILES) == 32, PAYLOADS


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_real_body_parses_into_exactly_its_own_statuses(path: Path) -> None:
    raw = path.read_bytes()
    body = json.loads(raw)
    parsed = parse_payload(raw, ("BAJA", "STOP"))
    expected = [s for s in statuses_in(body) if s.get("status") in KINDS and s.get("id")]
    assert [(s.wamid, s.status) for s in parsed.statuses] == [(s["id"], s["status"]) for s in expected]
    for update, status in zip(parsed.statuses, expected, strict=True):
        reference = str(status.get("biz_opaque_callback_data") or "")
        expected_row = (
            int(reference[5:]) if reference.startswith("cola:") and reference[5:].isdigit() else None
        )
        assert update.cola_id == expected_row  # "some data" of another program is no row of ours
        assert json.loads(update.raw)["id"] == status["id"]  # kept as received, for audit
        if status["status"] == "failed":
            assert update.error_code == status["errors"][0]["code"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "not an object"),
        (b'{"object": "whatsapp_business_account"}', "no `entry` list"),
        (b'{"entry": [' * 5000 + b"]}" * 5000, "nested too deeply"),
        (b'{"entry": [], "x": NaN}', "not valid JSON"),
    ],
)
def test_a_body_that_is_no_webhook_is_refused_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(Malformed, match=reason):
        parse_payload(body, ("BAJA",))


def test_the_signature_is_checked_in_any_hex_case_and_refused_otherwise() -> None:
    body = (PAYLOADS / "01_meta_status_sent_pmp_marketing.json").read_bytes()
    header = sign("app-secret", body)
    assert signature_ok("app-secret", body, header)
    assert signature_ok("app-secret", body, "SHA256=" + header[7:].upper())
    assert not signature_ok("another-secret", body, header)
    assert not signature_ok("app-secret", body + b" ", header)
    assert not signature_ok("app-secret", body, "")


KEYWORDS = ("BAJA", "STOP", "CANCELAR", "UNSUBSCRIBE", "STOP PROMOTIONS", "STOP_PROMOTIONS")


def reply(kind: str, part: dict[str, Any], sender: str = "51987654321") -> bytes:
    message = {"from": sender, "id": "wamid.IN", "timestamp": "1750091045", "type": kind, kind: part}
    value = {"messaging_product": "whatsapp", "messages": [message]}
    return json.dumps(
        {"object": "whatsapp_business_account", "entry": [{"changes": [{"value": value}]}]}
    ).encode()


@pytest.mark.parametrize(
    ("kind", "part"),
    [
        ("text", {"body": "BAJA"}),
        ("text", {"body": "Baja."}),
        ("text", {"body": "  stop!! "}),
        ("text", {"body": "STOP."}),
        ("text", {"body": "BAJA 🙏"}),
        ("text", {"body": "ＳＴＯＰ"}),  # fullwidth, as some keyboards type it  # noqa: RUF001
        ("text", {"body": "BÁJA"}),
        ("text", {"body": "¡Cancelar!"}),
        ("text", {"body": "Stop promotions"}),
        ("button", {"text": "Unsubscribe", "payload": "Unsubscribe"}),  # Meta's own example
        ("button", {"text": "No más mensajes", "payload": "STOP_PROMOTIONS"}),  # the payload a designer set
        ("interactive", {"type": "button_reply", "button_reply": {"id": "baja", "title": "Darme de baja"}}),
        ("interactive", {"type": "list_reply", "list_reply": {"id": "opt-1", "title": "STOP"}}),
    ],
)
def test_every_way_of_saying_stop_opts_the_phone_out(kind: str, part: dict[str, Any]) -> None:
    parsed = parse_payload(reply(kind, part), KEYWORDS)
    assert [(o.telefono, o.source) for o in parsed.optouts] == [("+51987654321", "keyword")]


@pytest.mark.parametrize(
    ("kind", "part"),
    [
        ("text", {"body": "No me des de baja todavía"}),  # a whole-message match only
        ("text", {"body": "stop sending me the wrong invoice"}),
        ("text", {"body": "bajar"}),
        ("text", {"body": "¿baja de precio?"}),
        ("button", {"text": "Change", "payload": "change-button"}),
        ("interactive", {"type": "button_reply", "button_reply": {"id": "pay-now", "title": "Pagar"}}),
        ("reaction", {"message_id": "wamid.X", "emoji": "🛑"}),
    ],
)
def test_a_near_miss_does_not_opt_out(kind: str, part: dict[str, Any]) -> None:
    assert parse_payload(reply(kind, part), KEYWORDS).optouts == []


def test_metas_user_preferences_stop_is_an_opt_out_and_resume_is_reported() -> None:
    stop = parse_payload((PAYLOADS / "24_meta_user_preferences_stop.json").read_bytes(), KEYWORDS)
    assert [(o.telefono, o.source) for o in stop.optouts] == [("+16505551234", "user_preferences")]
    resume = parse_payload((PAYLOADS / "23_meta_user_preferences_resume.json").read_bytes(), KEYWORDS)
    assert resume.optouts == [] and resume.resumed == ["+16505551234"]


def test_of_the_real_bodies_only_the_stops_opt_out() -> None:
    stopped = {path.stem for path in FILES if parse_payload(path.read_bytes(), KEYWORDS).optouts}
    assert stopped == {"14_meta_button_unsubscribe", "24_meta_user_preferences_stop"}


def test_a_status_of_any_shape_is_skipped_or_read_never_a_crash() -> None:
    statuses = [{"id": "wamid.A", "status": ["read"]}, {"id": "wamid.B", "status": "played"}, None]
    value = {"metadata": {"phone_number_id": "1234567890"}, "statuses": statuses}
    body = json.dumps({"entry": [{"changes": [{"value": value}]}]}).encode()
    parsed = parse_payload(body, KEYWORDS)
    assert parsed.statuses == [] and parsed.ignored == [
        "a status of kind 'list' (not tracked)",
        "a status that is not an object",
    ]


def test_what_meta_reports_beside_statuses_is_heard() -> None:
    def notices(stem: str) -> list[tuple[str, str, dict[str, Any]]]:
        return parse_payload((PAYLOADS / f"{stem}.json").read_bytes(), KEYWORDS).notices

    (error,) = notices("11_meta_errors_value_130429")
    assert error[:2] == ("webhook_error_reported", "warning") and error[2]["code"] == 130429
    (restriction,) = notices("22_pywa_account_update_restriction")
    assert restriction[:2] == ("account_update", "error")
    assert restriction[2]["restrictions"][0] == "RESTRICTED_BIZ_INITIATED_MESSAGING"
    (template,) = notices("20_meta_template_status_rejected")
    assert (
        template[:2] == ("template_status_update", "warning")
        and template[2]["template"] == "order_confirmation"
    )
    assert notices("01_meta_status_sent_pmp_marketing") == []
