"""Meta's webhook bodies: the signature checked first, then the shapes, into checked value
types (`StatusUpdate`, `OptOut`); pure: no I/O, no database."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from worker.messages import phone_from_wa_id
from worker.models import SOURCE_KEYWORD, SOURCE_PREFERENCES, OptOut, StatusUpdate
from worker.store.statuses import STATUS_KINDS

# Column sizes (store/schema.py): a longer value is not a wamid / phone we could have sent.
WAMID_MAX, RECIPIENT_MAX, ERROR_TEXT_MAX, DETAIL_MAX = 128, 32, 1000, 1000
TIMESTAMP_RANGE = (946_684_800, 4_102_444_800)  # 2000-01-01 .. 2100-01-01: anything else is noise
INT_RANGE = (-(2**31), 2**31 - 1)
COLA_REFERENCE = re.compile(r"cola:([0-9]{1,19})")
COLA_MAX = 2**64 - 1
UNTRACKED_KINDS = frozenset({"played", "deleted"})


class Malformed(ValueError):
    """A signed body we cannot use; the reason is logged and Meta gets 200 (retrying cannot help)."""


@dataclass(slots=True)
class Parsed:
    statuses: list[StatusUpdate] = field(default_factory=list)
    optouts: list[OptOut] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # why parts of the body were skipped
    resumed: list[str] = field(default_factory=list)  # phones that asked for marketing again
    # What Meta reports beside statuses and messages, for the log: (event, level, fields)
    notices: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.statuses) + len(self.optouts)


# -- authenticity -----------------------------------------------------------------------------


def sign(secret: str, body: bytes) -> str:
    """The `X-Hub-Signature-256` value Meta sends for `body`."""
    return "sha256=" + hmac.digest(secret.encode(), body, hashlib.sha256).hex()


def signature_ok(secret: str, body: bytes, header: str) -> bool:
    """Constant-time comparison of the header with the body's HMAC."""
    expected = sign(secret, body).encode()
    given = header.strip()
    if given[:7].lower() == "sha256=":
        given = "sha256=" + given[7:].lower()
    return hmac.compare_digest(expected, given.encode("utf-8", "surrogateescape"))


# -- shapes -------------------------------------------------------------------------------------


def parse_payload(body: bytes, keywords: Iterable[str]) -> Parsed:
    """The statuses and opt-out replies of a webhook body. Raises Malformed for a body that is
    not a webhook at all; skips (with a reason) the parts that do not fit."""
    try:
        payload = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise Malformed("nested too deeply") from None
    except (ValueError, TypeError) as exc:  # invalid JSON, not UTF-8, a number too long
        raise Malformed(f"not valid JSON ({type(exc).__name__})") from None
    if not isinstance(payload, dict):
        raise Malformed(f"the body is a JSON {type(payload).__name__}, not an object")
    entries = payload.get("entry")
    if not isinstance(entries, list):
        raise Malformed("no `entry` list")
    wanted = _stop_forms(tuple(keywords))
    parsed = Parsed()
    for entry in entries:
        changes = entry.get("changes") if isinstance(entry, dict) else None
        if not isinstance(changes, list):
            parsed.ignored.append("an entry without a `changes` list")
            continue
        for change in changes:
            value = change.get("value") if isinstance(change, dict) else None
            if not isinstance(value, dict):
                parsed.ignored.append("a change without a `value` object")
                continue
            metadata = value.get("metadata")
            number = metadata.get("phone_number_id") if isinstance(metadata, dict) else None
            number = number if isinstance(number, str) and number.isdigit() and len(number) <= 64 else None
            for item in _items(value, "statuses", parsed):
                status = _status(item, number)
                if isinstance(status, str):
                    parsed.ignored.append(status)
                elif status is not None:
                    parsed.statuses.append(status)
            for item in _items(value, "messages", parsed):
                optout = _optout(item, wanted)
                if optout is not None:
                    parsed.optouts.append(optout)
            parsed.notices += _notices(change.get("field"), value, number)
            for item in _items(value, "user_preferences", parsed):
                preference = _preference(item)
                if isinstance(preference, OptOut):
                    parsed.optouts.append(preference)
                elif preference is not None:
                    parsed.resumed.append(preference)
    return parsed


@lru_cache(maxsize=8)
def _stop_forms(keywords: tuple[str, ...]) -> frozenset[str]:
    """The keywords as replies are compared with them: the same few for every request."""
    return frozenset(stop_form(k) for k in keywords)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _items(value: dict[str, Any], key: str, parsed: Parsed) -> list[Any]:
    items = value.get(key)
    if items is None:
        return []
    if not isinstance(items, list):
        parsed.ignored.append(f"`{key}` is not a list")
        return []
    return items


def _text(value: Any, limit: int) -> str | None:
    """A non-empty string that fits the column and can be stored as utf8mb4, else None."""
    if not isinstance(value, str) or not value or len(value) > limit:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        return None
    return value


def _clean(value: Any, limit: int) -> str | None:
    """Free text for a message column: cut to size, unstorable characters replaced."""
    if not isinstance(value, str) or not value:
        return None
    return value.encode("utf-8", "replace").decode("utf-8")[:limit]


def _integer(value: Any, low: int, high: int) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        value = int(value)
    return value if isinstance(value, int) and low <= value <= high else None


def _status(item: Any, number: str | None = None) -> StatusUpdate | str | None:
    """A status object as a row of `whatsapp_worker_statuses`, or why it was skipped."""
    if not isinstance(item, dict):
        return "a status that is not an object"
    wamid = _text(item.get("id"), WAMID_MAX)
    if wamid is None:
        return "a status without a usable `id`"
    kind = item.get("status")
    if isinstance(kind, str) and kind in UNTRACKED_KINDS:  # a voice message played, a deletion
        return None
    if kind not in STATUS_KINDS:
        shown = kind[:20] if isinstance(kind, str) else type(kind).__name__  # never str() a tree
        return f"a status of kind {shown!r} (not tracked)"
    at = _timestamp(item)
    reference = item.get("biz_opaque_callback_data")
    cola_id = None
    if isinstance(reference, str) and (match := COLA_REFERENCE.fullmatch(reference)):
        cola_id = int(match.group(1))
        if not 0 < cola_id <= COLA_MAX:
            cola_id = None
    code, title = _error(item.get("errors")) if kind == "failed" else (None, None)
    try:
        raw = json.dumps(item, ensure_ascii=True, separators=(",", ":"))
    except (ValueError, RecursionError):  # pragma: no cover - what json.loads built, it can dump
        raw = "{}"
    return StatusUpdate(
        wamid=wamid,
        status=kind,
        cola_id=cola_id,
        status_at=at,
        recipient_id=_text(item.get("recipient_id"), RECIPIENT_MAX),
        error_code=code,
        error_title=title,
        raw=raw,
        phone_number_id=number,
    )


def _timestamp(item: dict[str, Any]) -> datetime | None:
    """Meta's `timestamp` (Unix seconds, a string or a number) as a naive UTC datetime."""
    stamp = _integer(item.get("timestamp"), *TIMESTAMP_RANGE)
    return None if stamp is None else datetime.fromtimestamp(stamp, UTC).replace(tzinfo=None)


def _error(errors: Any) -> tuple[int | None, str | None]:
    """Meta's first error: its code and `(#code) title: details`."""
    first = errors[0] if isinstance(errors, list) and errors else None
    if not isinstance(first, dict):
        return None, None
    code = _integer(first.get("code"), *INT_RANGE)
    data = first.get("error_data")
    parts = [
        _clean(first.get("title"), ERROR_TEXT_MAX) or _clean(first.get("message"), ERROR_TEXT_MAX),
        _clean(data.get("details"), ERROR_TEXT_MAX) if isinstance(data, dict) else None,
    ]
    text = ": ".join(p for p in parts if p) or None
    if code is not None:
        text = f"(#{code}) {text or 'no reason given'}"
    return code, None if text is None else text[:ERROR_TEXT_MAX]


def stop_form(text: str) -> str:
    """A reply as it is compared with the keywords: width and compatibility forms unified
    (fullwidth `STOP`), accents removed (`BÁJA`), case folded, and the punctuation, symbols, emoji and
    spaces around it dropped (`Baja.`, `STOP!`, `BAJA 🙏`). Whole messages only: "no me des de
    baja todavía" is not a stop."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    start, end = 0, len(text)
    while start < end and _around(text[start]):
        start += 1
    while end > start and _around(text[end - 1]):
        end -= 1
    return " ".join(text[start:end].split())


def _around(char: str) -> bool:
    """Punctuation, a symbol (emoji are), a space or an invisible joiner / variation selector."""
    return unicodedata.category(char)[0] in "PSZC"


def _said(item: dict[str, Any]) -> list[Any]:
    """Everything an inbound message says that could be a stop: its text, a button's text and
    payload, an interactive reply's id and title."""
    kind = item.get("type")
    part = item.get(kind) if isinstance(kind, str) else None
    if not isinstance(part, dict):
        return []
    if kind == "text":
        return [part.get("body")]
    if kind == "button":  # a template's quick reply (Meta's "Unsubscribe", "Stop promotions")
        return [part.get("text"), part.get("payload")]
    if kind == "interactive":
        reply = part.get(part.get("type")) if isinstance(part.get("type"), str) else None
        if isinstance(reply, dict):  # button_reply, list_reply
            return [reply.get("id"), reply.get("title")]
    return []


def _optout(item: Any, keywords: frozenset[str]) -> OptOut | None:
    """An inbound reply that says stop, in any of the forms `_said` reads."""
    if not isinstance(item, dict):
        return None
    said = [s for s in _said(item) if isinstance(s, str) and 0 < len(s) <= 200]
    stop = next((s for s in said if stop_form(s) in keywords), None)
    if stop is None:
        return None
    phone = _sender(item.get("from"))
    if phone is None:
        return None
    detail = _clean(f"replied {stop.strip()!r}", DETAIL_MAX)
    return OptOut(phone, SOURCE_KEYWORD, detail, said_at=_timestamp(item))


def _preference(item: Any) -> OptOut | str | None:
    """Meta's `user_preferences`: `stop` of marketing messages is an opt-out; `resume` is logged
    (the phone stays opted out until an operator removes it: a keyword reply covers more)."""
    if not isinstance(item, dict):
        return None
    value, phone = item.get("value"), _sender(item.get("wa_id"))
    if phone is None:
        return None
    if value == "stop":
        detail = _clean(f"user_preferences {item.get('category')}: {item.get('detail')}", DETAIL_MAX)
        return OptOut(phone, SOURCE_PREFERENCES, detail, said_at=_timestamp(item))
    if value == "resume":
        return phone
    return None


def _sender(raw: Any) -> str | None:
    return phone_from_wa_id(raw) if isinstance(raw, str) and len(raw) <= RECIPIENT_MAX else None


def _notices(kind: Any, value: dict[str, Any], number: str | None) -> list[tuple[str, str, dict[str, Any]]]:
    """Value-level errors (Meta's 130429 report), account updates (a restriction) and template
    status updates (rejected, paused): nothing to store, but an operator must hear of them."""
    found: list[tuple[str, str, dict[str, Any]]] = []
    errors = value.get("errors")
    for error in errors if isinstance(errors, list) else []:
        if isinstance(error, dict):
            code = _integer(error.get("code"), *INT_RANGE)
            title = _clean(error.get("title") or error.get("message"), 200)
            found.append(
                ("webhook_error_reported", "warning", {"code": code, "title": title, "number": number})
            )
    event = _clean(value.get("event"), 100)
    if kind == "account_update" and event:
        restrictions = value.get("restriction_info")
        kinds = [
            _clean(r.get("restriction_type"), 100)
            for r in (restrictions if isinstance(restrictions, list) else [])
            if isinstance(r, dict)
        ]
        found.append(("account_update", "error", {"update": event, "restrictions": kinds[:10]}))
    elif kind == "message_template_status_update" and event:
        template = _clean(value.get("message_template_name"), 200)
        reason = _clean(value.get("reason"), 200)
        found.append(
            ("template_status_update", "warning", {"update": event, "template": template, "reason": reason})
        )
    return found
