"""Data from the queue shown to a person: on a terminal without control characters, and in CSV
without cells a spreadsheet would run as formulas.

A producer writes session names, error texts and row fields; an ESC in a session name can
rewrite the operator's terminal, and a `=HYPERLINK(...)` or `=cmd|' /C calc'!A0` cell runs
when the CSV is opened in a spreadsheet (CWE-1236).
"""

from __future__ import annotations

import csv
import re
import sys
import unicodedata
from collections.abc import Iterable
from typing import Any

# A cell a spreadsheet reads as a formula (OWASP's list), unless it is a plain number: a phone
# `+51987654321` or `-5` stays as it is, so that the file still sorts and sums.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
PLAIN_NUMBER = re.compile(r"[+-]?\d+(\.\d+)?")


def printable(value: object) -> str:
    """`value` for a terminal: control and format characters (ESC, CR, bidi overrides) shown as
    `\\x1b`-style escapes, so that data cannot move the cursor or reorder what is shown."""
    text = "" if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else _escape(c) for c in text)


def _escape(char: str) -> str:
    if unicodedata.category(char) == "Zs":  # a no-break or thin space: harmless
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def spreadsheet_cell(value: object) -> str:
    """`value` for a CSV cell: a formula-like text gets a leading `'` (shown, never run)."""
    text = "" if value is None else str(value)
    if text.startswith(FORMULA_START) and not PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


class SafeCSV:
    """A CSV writer on stdout whose every cell is a `spreadsheet_cell`."""

    def __init__(self, header: Iterable[str]) -> None:
        self._writer = csv.writer(sys.stdout)
        self._writer.writerow(header)

    def row(self, values: Iterable[Any]) -> None:
        self._writer.writerow([spreadsheet_cell(v) for v in values])
