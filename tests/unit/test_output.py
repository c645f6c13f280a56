"""What a person sees of the queue's data: terminal text and spreadsheet cells (a table)."""

from __future__ import annotations

import pytest

from worker.cli.output import printable, spreadsheet_cell


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("Cobranza diciembre", "Cobranza diciembre"),
        ("Ñandú 🙏 日本", "Ñandú 🙏 日本"),
        ("a\x1b[2Jb", "a\\x1b[2Jb"),  # clear screen
        ("x\x1b]0;title\x07", "x\\x1b]0;title\\x07"),  # set the window title
        ("one\r\ntwo\tthree", "one\\x0d\\x0atwo\\x09three"),
        ("\u202eevil", "\\u202eevil"),  # right-to-left override
        ("\x9b31m", "\\x9b31m"),  # C1 control sequence introducer
        ("no\xa0break", "no\xa0break"),
        (None, ""),
        (131026, "131026"),
    ],
)
def test_a_terminal_never_receives_control_characters(value: object, shown: str) -> None:
    assert printable(value) == shown


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ('=HYPERLINK("http://evil.example","Click")', '\'=HYPERLINK("http://evil.example","Click")'),
        ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"),
        ("@SUM(A1:A9)", "'@SUM(A1:A9)"),
        ("+1+cmd|' /C calc'!A0", "'+1+cmd|' /C calc'!A0"),
        ("-2+3", "'-2+3"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("+51987654321", "+51987654321"),  # a phone: a plain number, kept for sorting
        ("-5", "-5"),
        ("3.5", "3.5"),
        ("Message undeliverable", "Message undeliverable"),
        (None, ""),
    ],
)
def test_a_spreadsheet_never_runs_a_cell_as_a_formula(value: object, cell: str) -> None:
    assert spreadsheet_cell(value) == cell
