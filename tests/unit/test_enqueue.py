"""The pure parts of `enqueue`: reading and checking the CSV, building messages, the flags."""

from __future__ import annotations

import csv
import json
from datetime import datetime
from pathlib import Path

import pytest

import worker.campaign_csv as enqueue_module
from worker.campaign_csv import (
    BadFlag,
    CsvError,
    CsvSource,
    MessageSpec,
    Problems,
    _Builder,
    describe,
    phone_number_id,
    read_rows,
    schedule,
    send_window,
    time_zone,
    unstorable,
)
from worker.messages import TEXT_BODY_MAX, fill, parse_message, placeholders, same_message


def problems_of(path: Path, spec: MessageSpec) -> list[str]:
    with pytest.raises(CsvError) as caught:
        read_rows(path, spec)
    return caught.value.problems


TEMPLATE = MessageSpec(template="recordatorio_pago", language="es")


def test_csv_problems_carry_line_numbers_and_name_the_column(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text('phone,client_id,name\n+51987000001,1,Ana\n+51987000001,2,Ana again\n+51987000003,3,""\n')
    assert problems_of(path, TEMPLATE) == [
        "line 3: phone +51987000001 already appears on line 2",
        "line 4, column 'name': empty value",
    ]
    path.write_text("phone,name\n+51987000001,Ana\n")
    ((client, phone, message),) = read_rows(path, MessageSpec(text="Hola {{1}}"))
    assert client is None and phone == "+51987000001"
    assert json.loads(message)["text"]["body"] == "Hola Ana"


def test_files_from_spreadsheets_are_read_whatever_their_separator(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    spec = MessageSpec(text="Hola {{1}}, debe {{2}}")
    for text in (
        "phone;client_id;name;amount\n+51987000001;7;Ana;S/ 1,50\n",  # a Spanish-locale spreadsheet
        "phone\tclient_id\tname\tamount\n+51987000001\t7\tAna\tS/ 1,50\n",
        'phone,client_id,name,amount\n+51987000001,7,Ana,"S/ 1,50"\n',
        '\ufeffPhone , Client_ID ,name,amount\r\n+51987000001,7,Ana,"S/ 1,50"\r\n',  # Excel: BOM, CRLF
    ):
        path.write_text(text, encoding="utf-8")
        ((client, phone, message),) = read_rows(path, spec)
        assert (client, phone) == (7, "+51987000001"), text
        assert json.loads(message)["text"]["body"] == "Hola Ana, debe S/ 1,50", text


def test_client_ids_must_be_whole_numbers_a_bigint_can_hold(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("phone,client_id\n+51987000001,\u00b2\n+51987000002,9223372036854775808\n+51987000003,\n")
    assert problems_of(path, MessageSpec(text="hola")) == [
        "line 2: client_id '\u00b2' is not a whole number",  # '²': str.isdigit() says yes
        "line 3: client_id '9223372036854775808' is too large (cliente_id is a BIGINT)",
    ]


def test_line_numbers_count_physical_lines_and_skip_blank_rows(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text('phone;name\n+51987000001;"two\nlines"\n\n;\n;  \n12;Ana\n')
    assert problems_of(path, MessageSpec(text="{{1}}")) == [
        "line 7: phone '12' is not in E.164 form (+ country code and number): for national numbers set"
        " WORKER_DEFAULT_COUNTRY (e.g. PE)"
    ]


def test_the_header_is_checked_first(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("tel,nombre\n+51987000001,Ana\n")
    with pytest.raises(CsvError) as caught:
        CsvSource(path, TEMPLATE)
    assert caught.value.problems == [
        "line 1: the header must have a phone column, headed 'phone', 'telefono' or 'tel\u00e9fono'"
        " (found 'tel', 'nombre')"
    ]
    path.write_text("phone,name,Phone\n")
    with pytest.raises(CsvError, match="problem"):
        CsvSource(path, TEMPLATE)
    path.write_bytes(b"phone,name\n+51987000001,Jos\xe9\n")  # latin-1
    assert problems_of(path, TEMPLATE) == [
        "line 2: the file is not UTF-8 text (byte 0xe9 at position 17 of the line): save it as CSV UTF-8"
    ]
    with pytest.raises(CsvError, match="problem") as missing:
        CsvSource(tmp_path / "missing.csv", TEMPLATE)
    assert missing.value.problems[0].startswith("cannot read the file")


@pytest.mark.parametrize(
    "header",
    [
        "phone",
        " Phone ",
        "telefono",
        "TELEFONO",
        "tel\u00e9fono",  # é as one character (NFC), as most editors save it
        "tele\u0301fono",  # e + a combining accent (NFD), as a Mac export may save it
        " TELE\u0301FONO ",  # capitals, decomposed, padded
        "Tel\u00e9fono",
    ],
)
def test_the_phone_column_may_be_headed_phone_telefono_or_telefono_with_accent(
    tmp_path: Path, header: str
) -> None:
    path = tmp_path / "x.csv"
    path.write_text(f"{header};client_id;nombre\n+51987000001;7;Ana\n", encoding="utf-8-sig")
    ((client, phone, message),) = read_rows(path, TEMPLATE)
    assert (client, phone) == (7, "+51987000001")
    assert json.loads(message)["template"]["components"][0]["parameters"] == [{"type": "text", "text": "Ana"}]


@pytest.mark.parametrize(
    ("header", "named"),
    [
        ("phone,telefono,nombre", "'phone' and 'telefono'"),
        ("Tel\u00e9fono,nombre,phone", "'Tel\u00e9fono' and 'phone'"),
        ("tele\u0301fono,tel\u00e9fono", "'tele\u0301fono' and 'tel\u00e9fono'"),  # the same name, twice
        ("phone,name,Phone", "'phone' and 'Phone'"),
    ],
)
def test_two_phone_columns_are_refused_naming_both(tmp_path: Path, header: str, named: str) -> None:
    path = tmp_path / "x.csv"
    path.write_text(f"{header}\n", encoding="utf-8")
    with pytest.raises(CsvError) as caught:
        CsvSource(path, TEMPLATE)
    assert caught.value.problems == [f"line 1: the header has 2 phone columns, {named}: keep one"]


def one_row(tmp_path: Path, value: str) -> Path:
    """A file whose second line has `value` in the column `nombre`, quoted as a spreadsheet would."""
    path = tmp_path / "x.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerows([["phone", "nombre"], ["+51987000001", value]])
    return path


TEXT = MessageSpec(text="Hola {{1}}")


@pytest.mark.parametrize(
    ("value", "spec", "problem"),
    [
        ("A\x00na", TEMPLATE, "a control character (U+0000 NUL)"),
        ("A\x00na", TEXT, "a control character (U+0000 NUL)"),
        ("\x1b[1mAna", TEMPLATE, "a control character (U+001B ESC)"),
        ("\x1b[1mAna", TEXT, "a control character (U+001B ESC)"),
        ("A\x07na", TEXT, "a control character (U+0007 BEL)"),
        ("Ana\x7fLuis", TEMPLATE, "a control character (U+007F DEL)"),
        ("A\x85na", TEMPLATE, "a control character (U+0085 NEL)"),
        ("A\x9bna", TEXT, "a control character (U+009B CSI)"),
        ("A\x9fna", TEMPLATE, "a control character (U+009F APC)"),
        # Meta: "Param text cannot have new-line/tab characters or more than 4 consecutive spaces"
        ("Ana\nLuis", TEMPLATE, "a control character (U+000A LF): a template parameter cannot have"),
        ("Ana\r\nLuis", TEMPLATE, "a control character (U+000D CR): a template parameter cannot have"),
        ("Ana\tLuis", TEMPLATE, "a control character (U+0009 HT): a template parameter cannot have"),
        ("Ana     Luis", TEMPLATE, "5 spaces in a row: a template parameter may have at most 4"),
    ],
)
def test_control_characters_in_a_parameter_are_refused_naming_line_column_and_character(
    tmp_path: Path, value: str, spec: MessageSpec, problem: str
) -> None:
    (shown,) = problems_of(one_row(tmp_path, value), spec)
    assert shown.startswith(f"line 2, column 'nombre': {problem}")


@pytest.mark.parametrize(
    ("value", "spec"),
    [
        ("\u00d1and\u00fa Jos\u00e9", TEMPLATE),  # accented letters
        ("Ana \U0001f600 \U0001f469\u200d\U0001f4bb", TEMPLATE),  # emoji, a zero-width joiner
        ("Ana    Luis", TEMPLATE),  # 4 spaces: Meta's limit, not past it
        ("S/\u00a010 \u00a1ya!", TEMPLATE),  # U+00A0 and U+00A1, just past the C1 controls
        ("Ana\nLuis\tS/ 10", TEXT),  # a text body may break lines and have tabs
        ("Ana\r\nLuis", TEXT),
        ("Ana     Luis", TEXT),  # ... and spaces: the limit is a template parameter's
        ("Ana\n", TEMPLATE),  # a trailing line break is trimmed with the spaces, never sent
    ],
)
def test_ordinary_text_near_the_refused_characters_is_queued(
    tmp_path: Path, value: str, spec: MessageSpec
) -> None:
    ((_, _, message),) = read_rows(one_row(tmp_path, value), spec)
    parse_message(message)


def test_a_control_character_in_a_column_the_text_does_not_use_is_not_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("phone,nombre,nota\n+51987000001,Ana,a\x1bb\n")
    ((_, _, message),) = read_rows(path, TEXT)  # the column is never sent
    assert json.loads(message)["text"]["body"] == "Hola Ana"


def test_every_line_with_a_control_character_is_listed_and_nothing_is_read(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text(
        "phone,nombre,monto\n+51987000001,Ana,10\n+51987000002,Luis,1\x1b0\n+51987000003,\x00,3\n"
    )
    assert problems_of(path, TEMPLATE) == [
        "line 3, column 'monto': a control character (U+001B ESC)",
        "line 4, column 'nombre': a control character (U+0000 NUL)",
    ]


def test_a_text_placeholder_without_a_column_is_refused_naming_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("phone,empresa,monto\n+51987000001,ACME,10\n")
    with pytest.raises(CsvError) as caught:
        CsvSource(path, MessageSpec(text="{{1}} debe {{3}} ({{0}})"))
    assert caught.value.problems == [
        "--text uses {{0}}, {{3}}, but the file has 2 parameter column(s): {{1}} = 'empresa', {{2}} = 'monto'"
    ]
    source = CsvSource(path, MessageSpec(text="Hola {{1}}"))
    assert source.unused == ["monto"]
    # A template takes every column, positionally: no such check.
    assert CsvSource(path, TEMPLATE).unused == []


def test_only_the_columns_a_text_uses_must_have_a_value(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("phone,nombre,nota\n+51987000001,Ana,\n+51987000002,,x\n")
    assert problems_of(path, MessageSpec(text="Hola {{1}}")) == ["line 3, column 'nombre': empty value"]


def test_messages_past_the_cloud_api_limits_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    long = "x" * TEXT_BODY_MAX
    path.write_text(f"phone,a\n+51987000001,{long}\n+51987000002,ok\n")
    assert problems_of(path, MessageSpec(text="{{1}}!")) == [
        "line 2: the text is 4,097 characters once filled in, more than 4,096"
    ]
    path.write_text(f"phone,a\n+51987000001,{'ñ' * 40000}\n")
    (problem,) = problems_of(path, TEMPLATE)
    assert problem.startswith("line 2: the message would be 80,") and "a parameter is too long" in problem


PARAMS = [
    ["Ana", "S/ 10"],
    ['O\'Brien "x" \\ / \t tab', "ñandú \U0001f600 \u2028"],
    ["{{1}}", "{{2}} {{1}}"],
    ["<script>", "x\u00a0y"],
]


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize(
    "spec",
    [TEMPLATE, MessageSpec(text="Hola {{1}}, debe {{2}}: {{1}}"), MessageSpec(text="sin parámetros")],
)
def test_the_fast_builder_makes_exactly_what_json_dumps_makes(spec: MessageSpec, params: list[str]) -> None:
    builder = _Builder(spec, ["a", "b"])
    made = builder.build(params)
    assert made == json.dumps(spec.build(params), ensure_ascii=False, separators=(",", ":"))
    parse_message(made)  # and the daemon accepts it


def test_a_template_without_parameters_has_no_components() -> None:
    made = _Builder(TEMPLATE, []).build([])
    assert made == json.dumps(TEMPLATE.build([]), ensure_ascii=False, separators=(",", ":"))
    assert "components" not in json.loads(made)["template"]


def test_placeholders_are_filled_in_one_pass() -> None:
    assert fill("{{1}} y {{2}}", ["{{2}}", "B"]) == "{{2}} y B"
    assert fill("{{1}}{{1}} {{3}}", ["a"]) == "aa {{3}}"  # no value: left as written
    assert placeholders("{{2}} {{1}} {{2}} {1} {{x}}") == [1, 2]


def test_same_message_ignores_json_formatting_only() -> None:
    ours = '{"type":"text","text":{"body":"hola","preview_url":false}}'
    assert same_message(ours, '{ "text": {"preview_url": false, "body": "hola"}, "type": "text" }')
    assert not same_message(ours, ours.replace("hola", "chau"))
    assert not same_message(ours, "not json")


def test_problems_keep_the_first_lines_and_count_all() -> None:
    problems = Problems(limit=3)
    for line in (9, 2, 7, 5, 1, 8):
        problems.add(line, f"line {line}")
    assert problems.shown() == ["line 1", "line 2", "line 5"]
    assert problems.total == 6


def test_duplicate_phones_are_found_across_runs_spilled_to_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(enqueue_module, "RUN_ROWS", 7)
    monkeypatch.setattr(enqueue_module, "BATCH_ROWS", 4)
    path = tmp_path / "x.csv"
    phones = [f"+5198700{i:04d}" for i in range(40)]
    rows = [*phones, phones[3], phones[39], phones[3], phones[0]]  # repeats far apart: other runs
    path.write_text("phone\n" + "".join(f"{p}\n" for p in rows))
    assert problems_of(path, MessageSpec(text="hola")) == [
        "line 42: phone +51987000003 already appears on line 5",
        "line 43: phone +51987000039 already appears on line 41",
        "line 44: phone +51987000003 already appears on line 5",
        "line 45: phone +51987000000 already appears on line 2",
    ]
    path.write_text("phone\n" + "".join(f"{p}\n" for p in phones))
    source = CsvSource(path, MessageSpec(text="hola"))
    first = list(source.read(first=True))
    assert [len(b) for b in first] == [4] * 10
    assert [r for b in source.read(first=False) for r in b] == [r for b in first for r in b]


def test_a_file_changed_between_the_passes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("phone\n+51987000001\n")
    source = CsvSource(path, MessageSpec(text="hola"))
    list(source.read(first=True))
    path.write_text("phone\n+51987000001\n+51987000002\n")
    with pytest.raises(CsvError, match="problem") as caught:
        list(source.read(first=False))
    assert caught.value.problems == ["the file changed while it was being imported"]


def test_at_is_a_local_time_stored_as_utc() -> None:
    lima = time_zone("America/Lima")
    assert schedule("2026-12-01 09:00", lima) == datetime(2026, 12, 1, 14, 0)
    assert schedule("2026-12-01T09:00:30", time_zone("UTC")) == datetime(2026, 12, 1, 9, 0, 30)
    madrid = time_zone("Europe/Madrid")
    assert schedule("2026-07-01 09:00", madrid) == datetime(2026, 7, 1, 7, 0)  # summer time
    assert schedule("2026-10-25 02:30", madrid) == datetime(2026, 10, 25, 0, 30)  # twice: the first
    with pytest.raises(BadFlag, match="--at: 2026-03-29 02:30 does not exist in Europe/Madrid"):
        schedule("2026-03-29 02:30", madrid)
    with pytest.raises(BadFlag, match="has a UTC offset"):
        schedule("2026-12-01 09:00+01:00", lima)
    with pytest.raises(BadFlag, match="--at: '1/12/2026' is not a date and time"):
        schedule("1/12/2026", lima)


@pytest.mark.parametrize("name", ["America/Lim", "", "../../etc/passwd", "/usr/share/zoneinfo/UTC", " UTC"])
def test_unknown_time_zones_are_refused_naming_the_flag(name: str) -> None:
    with pytest.raises(BadFlag, match=r"--timezone: .* is not a known time zone"):
        time_zone(name)


def test_send_windows() -> None:
    assert send_window("08:00-20:00") == "08:00-20:00"
    assert send_window(" 20:00 - 08:00 ") == "20:00-08:00"  # overnight
    for bad in ("8:00-20:00", "08:00-24:00", "08:00", "08:00-20:00-21:00", "08:60-09:00"):
        with pytest.raises(BadFlag, match=r"--window: .* is not a window"):
            send_window(bad)
    with pytest.raises(BadFlag, match="starts and ends at the same time"):
        send_window("09:30-09:30")


def test_phone_number_ids_are_digits() -> None:
    assert phone_number_id(" 123456789012345 ") == "123456789012345"
    for bad in ("", "12a", "+51", "\u0661\u0662"):  # Arabic-Indic digits: isdigit() says yes
        with pytest.raises(BadFlag, match="--phone-number-id"):
            phone_number_id(bad)


def test_describe_shortens_a_message_for_people() -> None:
    template = TEMPLATE.build(["ACME", "S/ 10"])
    assert describe(json.dumps(template)) == 'template recordatorio_pago (es): "ACME", "S/ 10"'
    assert describe(json.dumps({"type": "text", "text": {"body": "x" * 200}}), 20) == 'text "xxxxxxxxxxx...'
    assert describe("{broken", 80) == "{broken"


@pytest.mark.parametrize(
    ("charset", "text", "bad"),
    [
        ("utf8mb4", "hola 😀", None),
        ("latin1", "Campaña €", None),  # MySQL's latin1 is Windows-1252: it has the euro sign
        ("latin1", "hola 😀", "'😀'"),
        ("latin1", "Привет", "'П'"),
        ("utf8mb3", "Ñandú", None),
        ("utf8", "hola 😀", "'😀'"),
        ("koi8r", "anything", None),  # a character set we do not know: the server decides
    ],
)
def test_a_message_the_queue_column_cannot_store_is_named_before_anything_is_queued(
    charset: str, text: str, bad: str | None
) -> None:
    problem = unstorable(text, charset)
    assert (problem is None) == (bad is None)
    if bad is not None:
        assert problem is not None and bad in problem and f"cola_envios.mensaje ({charset})" in problem
