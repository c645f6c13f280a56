"""CSV import for `whatsapp-worker enqueue`: every row is checked before anything is written.

Header: `phone` (required), `client_id` (optional); every other column, in order, is a body
parameter of the template (or fills `{{1}}`, `{{2}}` ... of a text body).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.messages import (
    InvalidMessage,
    normalize_phone,
    parse_message,
    template_message,
    text_message,
)

MAX_ERRORS_SHOWN = 50


class CsvError(Exception):
    """The file cannot be imported; `problems` lists each bad line."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s)")


@dataclass(frozen=True, slots=True)
class MessageSpec:
    template: str | None = None
    language: str | None = None
    text: str | None = None

    def build(self, params: list[str]) -> dict[str, Any]:
        if self.text is not None:
            return text_message(self.text, params)
        assert self.template is not None and self.language is not None
        return template_message(self.template, self.language, params)


def read_rows(path: Path, spec: MessageSpec) -> list[tuple[int | None, str, str]]:
    """(cliente_id, telefono, mensaje JSON) for every row, or CsvError naming each bad line."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            delimiter = _delimiter(handle.readline())
            handle.seek(0)
            return _parse(path, csv.reader(handle, delimiter=delimiter), spec)
    except OSError as exc:
        raise CsvError(path, [f"cannot read the file: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise CsvError(path, [f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    except csv.Error as exc:
        raise CsvError(path, [f"malformed CSV: {exc}"]) from None


def _parse(path: Path, reader: Any, spec: MessageSpec) -> list[tuple[int | None, str, str]]:
    header = [name.strip().lower() for name in next(reader, [])]
    if "phone" not in header:
        raise CsvError(path, ["line 1: the header must have a 'phone' column"])
    phone_at = header.index("phone")
    client_at = header.index("client_id") if "client_id" in header else None
    param_at = [i for i in range(len(header)) if i not in (phone_at, client_at)]
    rows: list[tuple[int | None, str, str]] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for fields in reader:
        line = reader.line_num
        if not any(field.strip() for field in fields):
            continue
        if len(fields) != len(header):
            problems.append(f"line {line}: expected {len(header)} columns, found {len(fields)}")
            continue
        try:
            phone = normalize_phone(fields[phone_at])
            if phone in seen:
                raise InvalidMessage(f"phone {phone} already appears on line {seen[phone]}")
            client = _client_id(fields[client_at]) if client_at is not None else None
            message = spec.build([fields[i].strip() for i in param_at])
            parse_message(json.dumps(message))  # the checks the daemon makes before sending
        except InvalidMessage as exc:
            problems.append(f"line {line}: {exc}")
            continue
        seen[phone] = line
        rows.append((client, phone, json.dumps(message, ensure_ascii=False, separators=(",", ":"))))
    if problems:
        raise CsvError(path, problems)
    return rows


def _delimiter(header: str) -> str:
    """`,`, or the `;` a Spanish-locale spreadsheet saves, or a tab: whichever the header uses."""
    return max((",", ";", "\t"), key=header.count)


def _client_id(raw: str) -> int | None:
    raw = raw.strip()
    if not raw:
        return None
    if not (raw.isascii() and raw.lstrip("-").isdigit()):  # not '²', which isdigit() accepts
        raise InvalidMessage(f"client_id {raw!r} is not a whole number")
    return int(raw)
