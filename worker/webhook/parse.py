"""Meta's webhook bodies: the signature checked first, then the shapes, into checked value
types (`StatusUpdate`, `OptOut`); pure: no I/O, no database."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from worker.messages import phone_from_wa_id
from worker.models import SOURCE_KEYWORD, OptOut, StatusUpdate
from worker.store.statuses import STATUS_KINDS

# Column sizes (store/schema.py): a longer value is not a wamid / phone we could have sent.
WAMID_MAX, RECIPIENT_MAX, ERROR_TEXT_MAX, DETAIL_MAX = 128, 32, 1000, 1000
TIMESTAMP_RANGE = (946_684_800, 4_102_444_800)  # 2000-01-01 .. 2100-01-01: anything else is noise
INT_RANGE = (-(2**31), 2**31 - 1)
COLA_REFERENCE = re.compile(r"cola:([0-9]{1,19})")
COLA_MAX = 2**64 - 1


class Malformed(ValueError):
    """A signed body we cannot use; the reason is logged and Meta gets 200 (retrying cannot help)."""


@dataclass(slots=True)
class Parsed:
    statuses: list[StatusUpdate] = field(default_factory=list)
    optouts: list[OptOut] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # why parts of the body were skipped

    @property
    def size(self) -> int:
        return len(self.statuses) + len(self.optouts)


# -- authenticity -----------------------------------------------------------------------------


def sign(secret: str, body: bytes) -> str:
    """The `X-Hub-Signature-256` value Meta sends for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


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
    wanted = frozenset(k.casefold() for k in keywords)
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
            for item in _items(value, "statuses", parsed):
                status = _status(item)
                if isinstance(status, str):
                    parsed.ignored.append(status)
                else:
                    parsed.statuses.append(status)
            for item in _items(value, "messages", parsed):
                optout = _optout(item, wanted)
                if optout is not None:
                    parsed.optouts.append(optout)
    return parsed


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


def _status(item: Any) -> StatusUpdate | str:
    """A status object as a row of `whatsapp_worker_statuses`, or why it was skipped."""
    if not isinstance(item, dict):
        return "a status that is not an object"
    wamid = _text(item.get("id"), WAMID_MAX)
    if wamid is None:
        return "a status without a usable `id`"
    kind = item.get("status")
    if kind not in STATUS_KINDS:
        shown = kind[:20] if isinstance(kind, str) else type(kind).__name__  # never str() a tree
        return f"a status of kind {shown!r} (not tracked)"
    stamp = _integer(item.get("timestamp"), *TIMESTAMP_RANGE)
    at = None if stamp is None else datetime.fromtimestamp(stamp, UTC).replace(tzinfo=None)
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
    )


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


def _optout(item: Any, keywords: frozenset[str]) -> OptOut | None:
    """An inbound reply whose whole text is an opt-out keyword (trimmed, any case)."""
    if not isinstance(item, dict):
        return None
    body = None
    kind = item.get("type")
    if kind == "text" and isinstance(item.get("text"), dict):
        body = item["text"].get("body")
    elif kind == "button" and isinstance(item.get("button"), dict):  # a template's quick reply
        body = item["button"].get("text")
    if not isinstance(body, str) or len(body) > 100 or body.strip().casefold() not in keywords:
        return None
    sender = item.get("from")
    phone = phone_from_wa_id(sender) if isinstance(sender, str) and len(sender) <= RECIPIENT_MAX else None
    if phone is None:
        return None
    return OptOut(phone, SOURCE_KEYWORD, _clean(f"replied {body.strip()!r}", DETAIL_MAX))
