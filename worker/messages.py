"""What a valid message is: E.164 phones, the Cloud API message object, the request body.

The daemon never trusts what producers wrote into `cola_envios`: a row that fails here ends
in `error` with the reason before any request is made.
"""

from __future__ import annotations

import json
import re
from typing import Any

import phonenumbers

E164 = re.compile(r"\+[1-9][0-9]{6,14}")  # use fullmatch: `$` would let a trailing newline through
PLACEHOLDER = re.compile(r"\{\{([0-9]+)\}\}")  # {{1}} in a text body
TEXT_BODY_MAX = 4096
MESSAGE_MAX_BYTES = 64 * 1024
CALLBACK_PREFIX = "cola:"
TYPES = frozenset(
    {
        "text",
        "template",
        "image",
        "audio",
        "video",
        "document",
        "sticker",
        "location",
        "contacts",
        "interactive",
        "reaction",
    }
)
# Keys the daemon owns: a producer must not be able to redirect a message.
RESERVED = ("to", "messaging_product", "recipient_type", "biz_opaque_callback_data")


class InvalidMessage(ValueError):
    """The row can never become a valid request; the text says why."""


def normalize_phone(raw: str) -> str:
    """'+51 987-654-321' -> '+51987654321'; raises InvalidMessage if not E.164."""
    if E164.fullmatch(raw):  # the stored form, checked before each send: no copy to make
        return raw
    phone = re.sub(r"[\s\-().]", "", raw)
    if not E164.fullmatch(phone):
        raise InvalidMessage(f"phone {raw!r} is not in E.164 form (+ country code and number)")
    return phone


def parse_message(raw: str | bytes) -> dict[str, Any]:
    """Parse and check a `mensaje` column value."""
    if len(raw) > MESSAGE_MAX_BYTES:
        raise InvalidMessage(f"mensaje is {len(raw)} bytes, more than {MESSAGE_MAX_BYTES}")
    try:
        text = raw if isinstance(raw, str) else _text_of(raw)
        if text.startswith("\ufeff"):  # json.loads's own hint, for a PHP file saved with a BOM
            raise ValueError("Unexpected UTF-8 BOM (decode using utf-8-sig)")
        message = _MESSAGE_JSON.decode(text)
    except RecursionError:
        raise InvalidMessage("mensaje is nested too deeply") from None
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise InvalidMessage(f"mensaje is not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise InvalidMessage("mensaje must be a JSON object")
    for key in RESERVED:
        if key in message:
            raise InvalidMessage(f"mensaje must not contain {key!r} (the worker sets it)")
    kind = message.get("type")
    if kind not in TYPES:
        raise InvalidMessage(f"mensaje.type {kind!r} is not a WhatsApp message type")
    if not isinstance(message.get(kind), dict):
        raise InvalidMessage(f"mensaje.{kind} must be an object")
    if kind == "text":
        _check_text(message["text"])
    elif kind == "template":
        _check_template(message["template"])
    return message


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Built once: json.loads with an argument builds a decoder per call, half the cost of a message.
_MESSAGE_JSON = json.JSONDecoder(parse_constant=_refuse_constant)


def _text_of(raw: bytes) -> str:
    """Bytes as json.loads reads them (UTF-8, -16 or -32, told by the first bytes)."""
    return raw.decode(json.detect_encoding(raw), "surrogatepass")


def _check_text(text: dict[str, Any]) -> None:
    body = text.get("body")
    if not isinstance(body, str) or not body.strip():
        raise InvalidMessage("mensaje.text.body must be a non-empty string")
    if len(body) > TEXT_BODY_MAX:
        raise InvalidMessage(f"mensaje.text.body has {len(body)} characters, more than {TEXT_BODY_MAX}")


def _check_template(template: dict[str, Any]) -> None:
    if not isinstance(template.get("name"), str) or not template["name"]:
        raise InvalidMessage("mensaje.template.name must be a non-empty string")
    language = template.get("language")
    if not isinstance(language, dict) or not isinstance(language.get("code"), str):
        raise InvalidMessage("mensaje.template.language.code must be a string")
    components = template.get("components", [])
    if not isinstance(components, list):
        raise InvalidMessage("mensaje.template.components must be a list")
    for index, component in enumerate(components):
        params = component.get("parameters", []) if isinstance(component, dict) else None
        if not isinstance(params, list):
            raise InvalidMessage(f"mensaje.template.components[{index}] is malformed")
        for param in params:
            if isinstance(param, dict) and param.get("type") == "text":
                if not str(param.get("text", "")).strip():
                    raise InvalidMessage(f"mensaje.template.components[{index}] has an empty text parameter")


def template_message(name: str, language: str, params: list[str]) -> dict[str, Any]:
    template: dict[str, Any] = {"name": name, "language": {"code": language}}
    if params:
        template["components"] = [
            {"type": "body", "parameters": [{"type": "text", "text": p} for p in params]}
        ]
    return {"type": "template", "template": template}


def placeholders(body: str) -> list[int]:
    """The `{{N}}` numbers a text body uses, in order, each once."""
    return sorted({int(number) for number in PLACEHOLDER.findall(body)})


def fill(body: str, params: list[str]) -> str:
    """`{{1}}`, `{{2}}` ... replaced by params, in one pass: a value is never searched again,
    so a parameter that itself contains `{{1}}` stays as written. A number without a value
    stays literal (enqueue refuses such a body before it reads a row)."""

    def value(match: re.Match[str]) -> str:
        number = int(match[1])
        return params[number - 1] if 0 < number <= len(params) else match[0]

    return PLACEHOLDER.sub(value, body)


def text_message(body: str, params: list[str]) -> dict[str, Any]:
    """A text message; `{{1}}`, `{{2}}` ... in the body take the CSV's extra columns."""
    return {"type": "text", "text": {"body": fill(body, params), "preview_url": False}}


def same_message(a: str, b: str) -> bool:
    """Two `mensaje` values that make the same request (a producer may format JSON its own way)."""
    if a == b:
        return True
    try:
        return bool(json.loads(a) == json.loads(b))
    except (ValueError, RecursionError):
        return False


def request_body(row_id: int, phone: str, message: dict[str, Any]) -> bytes:
    """The POST body: the row id rides in biz_opaque_callback_data for webhook reconciliation."""
    body = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": phone,
        **message,
        "biz_opaque_callback_data": f"{CALLBACK_PREFIX}{row_id}",
    }
    # A message that cannot be serialised fails here, before any request: a lone surrogate
    # ("\\ud800" in the JSON text) fails the UTF-8 encoding, deep nesting the encoder's recursion.
    try:
        return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    except RecursionError:
        raise InvalidMessage("mensaje is nested too deeply") from None
    except (ValueError, TypeError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvalidMessage(f"mensaje cannot be encoded as JSON: {exc}") from None


def phone_from_wa_id(raw: str) -> str | None:
    """A phone as the queue stores it (`+51987654321`) from Meta's form (`51987654321`, the
    `from` of an inbound message, a status's `recipient_id`) or an operator's (`+51 987 654 321`);
    None when it is not an E.164 phone."""
    candidate = raw.strip()
    if not candidate.startswith("+"):
        candidate = f"+{candidate}"
    try:
        return normalize_phone(candidate)
    except InvalidMessage:
        return None


def parse_phone(raw: str, default_country: str | None = None) -> str:
    """E.164 of a phone as a person or a file writes it: with its + (`+51 987-654-321`), with
    00, in Meta's form without the + (`51987654321`, `5215512345678`), or national (`987 654
    321`) when a default country (`WORKER_DEFAULT_COUNTRY`, e.g. `PE`) says whose. Digits without
    a + are read as that country's, or with its calling code in front; a number that is none of
    these is an error, never a number of another country."""
    compact = re.sub(r"[\s\-().]", "", raw)
    if compact.startswith("00"):
        compact = "+" + compact[2:]
    if compact.startswith("+"):
        return normalize_phone(compact)
    if not compact.isdigit():
        raise InvalidMessage(f"phone {raw!r} is not in E.164 form (+ country code and number)")
    if default_country:
        national = _valid(compact, default_country)
        if national is not None:
            return national
        prefix = str(phonenumbers.country_code_for_region(default_country))
        if compact.startswith(prefix) and (international := _valid_in_any_form("+" + compact)) is not None:
            return international
        raise InvalidMessage(
            f"phone {raw!r} is not in E.164 form (+ country code and number),"
            f" nor a valid {default_country} number"
        )
    international = _valid_in_any_form("+" + compact)
    if international is not None:
        return international
    raise InvalidMessage(
        f"phone {raw!r} is not in E.164 form (+ country code and number): for national numbers set"
        " WORKER_DEFAULT_COUNTRY (e.g. PE)"
    )


def _valid(digits: str, region: str | None) -> str | None:
    """E.164 of `digits` read in `region` (None: with its + already), if a valid number."""
    try:
        number = phonenumbers.parse(digits, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _valid_in_any_form(phone: str) -> str | None:
    """`phone` as written when it, or another form of the same mobile (Meta's +52 1, an old
    Brazilian eight-digit mobile), is a valid number: Meta's own form is kept as given."""
    if not E164.fullmatch(phone):
        return None
    if any(_valid(form, None) for form in phone_variants(phone)):
        return phone
    return None


def phone_variants(phone: str) -> frozenset[str]:
    """The forms one mobile number is written in, E.164 each: Meta's `wa_id` of a Mexican mobile
    keeps the old 1 after 52, an Argentine one the 9 after 54, and older Brazilian accounts lack
    the ninth digit, while the CSVs and the queue write the other form. An opt-out is looked up
    under every form, so a BAJA from +52 1 55... stops the +52 55... row."""
    forms = {phone}
    if phone.startswith("+521") and len(phone) == 14:
        forms.add("+52" + phone[4:])
    elif phone.startswith("+52") and len(phone) == 13:
        forms.add("+521" + phone[3:])
    if phone.startswith("+549") and len(phone) == 14:
        forms.add("+54" + phone[4:])
    elif phone.startswith("+54") and len(phone) == 13:
        forms.add("+549" + phone[3:])
    if phone.startswith("+55"):
        national = phone[3:]
        if len(national) == 11 and national[2] == "9":
            forms.add("+55" + national[:2] + national[3:])
        elif len(national) == 10 and national[2] in "6789":
            forms.add("+55" + national[:2] + "9" + national[2:])
    return frozenset(forms)
