"""`whatsapp-worker enqueue` in a subprocess against the real database: what a producer sees."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import pytest

from tests.support.env import WORKER_BIN, base_env
from tests.support.sql import SQL
from worker.campaign_csv import BATCH_ROWS
from worker.config import DatabaseURL

TEMPLATE = ["--template", "recordatorio_pago", "--language", "es"]


def enqueue(db_url: DatabaseURL, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WORKER_BIN, "enqueue", *map(str, args)],
        env=base_env(db_url),
        capture_output=True,
        text=True,
        timeout=120,
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def big_csv(path: Path, rows: int, *, start: int = 0) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        handle.write("phone,client_id,empresa\n")
        handle.writelines(f"+5198{start + i:07d},{start + i + 1},Empresa {i}\n" for i in range(rows))
    return path


def test_a_bad_file_is_refused_whole_and_each_error_names_its_line_and_column(
    sql: SQL, db_url: DatabaseURL, tmp_path: Path
) -> None:
    bad = write(
        tmp_path / "bad.csv",
        "phone;client_id;empresa;monto\n"
        "+51987000001;1;ACME;S/ 10\n"
        "+51987000002;2;ACME;\n"
        "+51987000003;\u00b2;ACME;S/ 30\n"
        "+51987000004;4;ACME\n"
        "\n"
        ";;;\n"
        "+51 987 000 001;6;Otra;S/ 60\n",
    )
    result = enqueue(db_url, "--session", "noviembre", *TEMPLATE, "--csv", bad)

    assert result.returncode == 65, result.stderr
    assert f"{bad}: nothing was queued" in result.stderr
    assert "line 3, column 'monto': empty value" in result.stderr
    assert "line 4: client_id '\u00b2' is not a whole number" in result.stderr
    assert "line 5: expected 4 columns, found 3" in result.stderr
    assert "line 8: phone +51987000001 already appears on line 2" in result.stderr
    assert "line 6" not in result.stderr and "line 7" not in result.stderr  # blank lines
    assert "Traceback" not in result.stderr
    assert sql.value("SELECT COUNT(*) FROM cola_envios") == 0
    assert sql.value("SELECT COUNT(*) FROM sesiones_envio") == 0


def test_more_problems_than_shown_are_counted(sql: SQL, db_url: DatabaseURL, tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.csv", "phone\n" + "".join(f"98700{i:04d}\n" for i in range(120)))
    result = enqueue(db_url, "--session", "s", "--text", "hola", "--csv", bad)
    assert result.returncode == 65
    assert "line 2: phone '987000000' is not in E.164 form" in result.stderr
    assert "line 51:" in result.stderr and "line 52:" not in result.stderr
    assert "... and 70 more" in result.stderr


def test_a_spreadsheet_headed_telefono_is_queued(sql: SQL, db_url: DatabaseURL, tmp_path: Path) -> None:
    excel = tmp_path / "clientes.csv"  # Excel's "CSV UTF-8": a BOM, `;`, CRLF
    excel.write_text(
        "Tel\u00e9fono;client_id;nombre\r\n+51987000001;1;Ana\r\n+51987000002;2;Jos\u00e9\r\n",
        encoding="utf-8-sig",
    )
    result = enqueue(db_url, "--session", "s", *TEMPLATE, "--csv", excel)
    assert result.returncode == 0, result.stderr
    assert "queued 2 new message(s), 0 already queued" in result.stdout
    rows = sql.rows("SELECT cliente_id, telefono, mensaje FROM cola_envios ORDER BY telefono")
    assert [(r["cliente_id"], r["telefono"]) for r in rows] == [(1, "+51987000001"), (2, "+51987000002")]
    names = [json.loads(r["mensaje"])["template"]["components"][0]["parameters"][0]["text"] for r in rows]
    assert names == ["Ana", "Jos\u00e9"]


def test_a_control_character_in_a_parameter_is_refused_naming_its_line_and_column(
    sql: SQL, db_url: DatabaseURL, tmp_path: Path
) -> None:
    bad = write(
        tmp_path / "bad.csv",
        "phone,nombre,monto\n"
        "+51987000001,Ana,S/ 10\n"
        "+51987000002,\x1b[1mLuis,S/ 20\n"  # line 3: an ESC a terminal would act on
        "+51987000003,Eva,S/ 30\n",
    )
    result = enqueue(db_url, "--session", "s", *TEMPLATE, "--csv", bad)
    assert result.returncode == 65, result.stderr
    assert f"{bad}: nothing was queued" in result.stderr
    assert "line 3, column 'nombre': a control character (U+001B ESC)" in result.stderr
    assert "\x1b" not in result.stderr  # the value is named, not replayed on the terminal
    assert sql.value("SELECT COUNT(*) FROM cola_envios") == 0
    assert sql.value("SELECT COUNT(*) FROM sesiones_envio") == 0


def test_text_placeholders_are_filled_once_and_a_placeholder_without_a_column_is_refused(
    sql: SQL, db_url: DatabaseURL, tmp_path: Path
) -> None:
    spreadsheet = write(
        tmp_path / "es.csv",
        "phone;client_id;nombre;monto\n+51987000001;7;Ana {{2}};S/ 1,50\n+51987000002;8;Luis;S/ 2,00\n",
    )
    refused = enqueue(db_url, "--session", "s", "--text", "Hola {{1}}, debe {{3}}", "--csv", spreadsheet)
    assert refused.returncode == 65
    assert "--text uses {{3}}, but the file has 2 parameter column(s)" in refused.stderr
    assert "{{1}} = 'nombre', {{2}} = 'monto'" in refused.stderr
    assert sql.value("SELECT COUNT(*) FROM cola_envios") == 0

    done = enqueue(db_url, "--session", "s", "--text", "Hola {{1}}, debe {{2}}", "--csv", spreadsheet)
    assert done.returncode == 0, done.stderr
    assert "queued 2 new message(s), 0 already queued" in done.stdout
    bodies = [
        json.loads(r["mensaje"])["text"]["body"]
        for r in sql.rows("SELECT mensaje FROM cola_envios ORDER BY telefono")
    ]
    assert bodies == ["Hola Ana {{2}}, debe S/ 1,50", "Hola Luis, debe S/ 2,00"]  # never re-substituted


def test_text_columns_the_body_does_not_use_are_pointed_out(
    sql: SQL, db_url: DatabaseURL, tmp_path: Path
) -> None:
    path = write(tmp_path / "x.csv", "phone,nombre,ciudad\n+51987000001,Ana,Lima\n")
    result = enqueue(db_url, "--session", "s", "--text", "Hola {{1}}", "--csv", path)
    assert result.returncode == 0, result.stderr
    assert "column 'ciudad' is not used by --text" in result.stderr


def test_values_reach_the_table_exactly_as_written(sql: SQL, db_url: DatabaseURL, tmp_path: Path) -> None:
    tricky = 'O\'Brien \\ "comillas" 100% ñandú \U0001f600 \\n'
    path = tmp_path / "x.csv"
    path.write_text(f'phone,client_id,empresa\n+51987000001,-5,"{tricky.replace(chr(34), chr(34) * 2)}"\n')
    result = enqueue(db_url, "--session", "s", *TEMPLATE, "--csv", path)
    assert result.returncode == 0, result.stderr
    row = sql.rows("SELECT cliente_id, mensaje FROM cola_envios")[0]
    assert row["cliente_id"] == -5
    params = json.loads(row["mensaje"])["template"]["components"][0]["parameters"]
    assert params == [{"type": "text", "text": tricky}]


def test_a_large_file_is_queued_in_batches_and_a_rerun_queues_nothing_twice(
    sql: SQL, db_url: DatabaseURL, tmp_path: Path
) -> None:
    rows = 2 * BATCH_ROWS + 123
    path = big_csv(tmp_path / "big.csv", rows)
    first = enqueue(db_url, "--session", "big", *TEMPLATE, "--csv", path)
    assert first.returncode == 0, first.stderr
    assert f"queued {rows:,} new message(s), 0 already queued" in first.stdout
    assert "\r" not in first.stderr  # no progress line on a pipe
    again = enqueue(db_url, "--session", "big", *TEMPLATE, "--csv", path)
    assert f"queued 0 new message(s), {rows:,} already queued" in again.stdout
    assert sql.value("SELECT COUNT(*) FROM cola_envios") == rows
    assert sql.value("SELECT COUNT(DISTINCT telefono) FROM cola_envios") == rows


def test_an_import_cut_short_by_the_database_is_completed_by_running_it_again(
    sql: SQL, db_url: DatabaseURL, tmp_path: Path
) -> None:
    rows = 3 * BATCH_ROWS
    path = big_csv(tmp_path / "big.csv", rows)
    # The server refuses the second batch's first row: a failure after the first commit.
    refused_phone = f"+5198{BATCH_ROWS:07d}"
    sql.execute(
        "CREATE TRIGGER refuse_one BEFORE INSERT ON cola_envios FOR EACH ROW"
        f" BEGIN IF NEW.telefono = '{refused_phone}' THEN"
        " SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'refused for the test'; END IF; END"
    )
    cut = enqueue(db_url, "--session", "big", *TEMPLATE, "--csv", path)
    assert cut.returncode != 0
    assert "refused for the test" in cut.stderr
    assert f"{BATCH_ROWS:,} new row(s) of this file had been queued" in cut.stderr
    assert "run the same command again" in cut.stderr
    assert sql.value("SELECT COUNT(*) FROM cola_envios") == BATCH_ROWS

    sql.execute("DROP TRIGGER refuse_one")
    rerun = enqueue(db_url, "--session", "big", *TEMPLATE, "--csv", path)
    assert rerun.returncode == 0, rerun.stderr
    assert f"queued {rows - BATCH_ROWS:,} new message(s), {BATCH_ROWS:,} already queued" in rerun.stdout
    assert sql.value("SELECT COUNT(*) FROM cola_envios") == rows
    assert sql.value("SELECT COUNT(DISTINCT telefono) FROM cola_envios") == rows


def test_a_changed_message_is_refused_unless_the_queued_ones_are_kept(
    sql: SQL, db_url: DatabaseURL, tmp_path: Path
) -> None:
    first = write(tmp_path / "a.csv", "phone,nombre\n+51987000001,Ana\n+51987000002,Luis\n")
    assert enqueue(db_url, "--session", "s", "--text", "Hola {{1}}", "--csv", first).returncode == 0
    before = sql.rows("SELECT id, telefono, mensaje FROM cola_envios ORDER BY id")

    second = write(
        tmp_path / "b.csv", "phone,nombre\n+51987000001,Ana\n+51987000002,Luis\n+51987000003,Eva\n"
    )
    changed = ["--session", "s", "--text", "Buenos días {{1}}", "--csv", second]
    refused = enqueue(db_url, *changed)
    assert refused.returncode == 65
    assert "2 row(s) of" in refused.stderr and "e.g. +51987000001" in refused.stderr
    assert 'queued:    text "Hola Ana"' in refused.stderr
    assert 'this file: text "Buenos días Ana"' in refused.stderr
    assert "nothing was queued" in refused.stderr and "--keep-queued" in refused.stderr
    assert sql.rows("SELECT id, telefono, mensaje FROM cola_envios ORDER BY id") == before

    dry = enqueue(db_url, *changed, "--dry-run")
    assert dry.returncode == 65, dry.stderr  # what the real run would do
    assert "a real run would queue nothing" in dry.stderr
    assert "dry run: session #" in dry.stdout and "nothing was written" in dry.stdout
    assert "3 row(s) in the file: 1 new, 0 already queued with the same message" in dry.stdout
    assert "2 queued with another message" in dry.stdout
    assert 'sample message: text "Buenos días Ana"' in dry.stdout
    assert sql.rows("SELECT id, telefono, mensaje FROM cola_envios ORDER BY id") == before

    kept = enqueue(db_url, *changed, "--keep-queued")
    assert kept.returncode == 0, kept.stderr
    assert "queued 1 new message(s), 2 already queued (2 of them with another message" in kept.stdout
    after = sql.rows("SELECT id, telefono, mensaje FROM cola_envios ORDER BY id")
    assert after[:2] == before
    assert json.loads(after[2]["mensaje"])["text"]["body"] == "Buenos días Eva"


def test_a_dry_run_of_a_new_session_writes_nothing(sql: SQL, db_url: DatabaseURL, tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "phone,empresa\n+51987000001,ACME\n")
    result = enqueue(
        db_url, "--session", "nueva", *TEMPLATE, "--csv", path, "--dry-run", "--window", "08:00-20:00"
    )
    assert result.returncode == 0, result.stderr
    assert "dry run: session 'nueva' (new): nothing was written" in result.stdout
    assert "1 row(s) in the file: 1 new" in result.stdout
    assert 'sample message: template recordatorio_pago (es): "ACME"' in result.stdout
    assert "would set send window: 08:00-20:00 UTC" in result.stdout
    assert sql.value("SELECT COUNT(*) FROM sesiones_envio") == 0
    assert sql.value("SELECT COUNT(*) FROM cola_envios") == 0


def test_at_schedules_the_new_rows_in_utc_from_a_local_time(
    sql: SQL, db_url: DatabaseURL, tmp_path: Path
) -> None:
    path = write(tmp_path / "a.csv", "phone\n+51987000001\n+51987000002\n")
    args = ["--session", "s", "--text", "hola", "--csv", path]
    result = enqueue(db_url, *args, "--at", "2099-12-01 09:00", "--timezone", "America/Lima")
    assert result.returncode == 0, result.stderr
    assert "new rows due from 2099-12-01 14:00 UTC" in result.stdout
    due = {r["next_attempt_at"] for r in sql.rows("SELECT next_attempt_at FROM cola_envios")}
    assert due == {datetime(2099, 12, 1, 14, 0)}  # Lima is UTC-5, queue times are UTC

    more = write(tmp_path / "b.csv", "phone\n+51987000001\n+51987000003\n")
    past = enqueue(db_url, "--session", "s", "--text", "hola", "--csv", more, "--at", "2020-01-01 00:00")
    assert past.returncode == 0, past.stderr
    assert "--at 2020-01-01 00:00 UTC is in the past: the new rows are due now" in past.stderr
    assert "rows already queued keep their time" in past.stderr
    rows = {r["telefono"]: r["next_attempt_at"] for r in sql.rows("SELECT * FROM cola_envios")}
    assert rows["+51987000001"] == datetime(2099, 12, 1, 14, 0)
    assert rows["+51987000003"] == datetime(2020, 1, 1)
    assert sql.value("SELECT COUNT(*) FROM cola_envios WHERE next_attempt_at <= UTC_TIMESTAMP()") == 1


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--at", "mañana"], "--at: 'mañana' is not a date and time like '2026-12-01 09:00'"),
        (["--at", "2026-12-01 09:00", "--timezone", "America/Lim"], "--timezone: 'America/Lim' is not a"),
        (
            ["--at", "2026-03-08 02:30", "--timezone", "America/New_York"],
            "does not exist in America/New_York",
        ),
        (["--window", "8-20"], "--window: '8-20' is not a window like 08:00-20:00"),
        (["--window", "08:00-08:00"], "--window: '08:00-08:00' starts and ends at the same time"),
        (["--window", "08:00-24:00"], "--window: '08:00-24:00' is not a window"),
        (["--phone-number-id", "+51 1234"], "--phone-number-id: '+51 1234' is not a phone number id"),
        (["--timezone", "UTC"], "--timezone goes with --at or --window"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag_before_anything_is_read(
    sql: SQL, db_url: DatabaseURL, tmp_path: Path, flags: list[str], error: str
) -> None:
    path = write(tmp_path / "a.csv", "phone\n+51987000001\n")
    result = enqueue(db_url, "--session", "s", "--text", "hola", "--csv", path, *flags)
    assert result.returncode == 2
    assert error in result.stderr
    assert sql.value("SELECT COUNT(*) FROM cola_envios") == 0


def test_window_and_sending_number_are_stored_on_the_session_and_changes_are_said(
    sql: SQL, db_url: DatabaseURL, tmp_path: Path
) -> None:
    path = write(tmp_path / "a.csv", "phone\n+51987000001\n")
    args = ["--session", "s", "--text", "hola", "--csv", path]
    first = enqueue(
        db_url, *args, "--window", "20:00-08:00", "--timezone", "America/Lima", "--phone-number-id", "1234"
    )
    assert first.returncode == 0, first.stderr
    assert "send window: 20:00-08:00 America/Lima" in first.stdout  # overnight is allowed
    assert "sending number: 1234" in first.stdout
    session = "SELECT send_window, time_zone, phone_number_id FROM sesiones_envio"
    assert sql.rows(session) == [
        {"send_window": "20:00-08:00", "time_zone": "America/Lima", "phone_number_id": "1234"}
    ]

    same = enqueue(db_url, *args, "--window", "20:00-08:00", "--timezone", "America/Lima")
    assert same.returncode == 0 and "changed" not in same.stdout

    changed = enqueue(db_url, *args, "--window", "09:00-18:00", "--phone-number-id", "5678")
    assert changed.returncode == 0, changed.stderr
    assert "changed send window: 09:00-18:00 UTC (was 20:00-08:00 America/Lima)" in changed.stdout
    assert "changed sending number: 5678 (was 1234)" in changed.stdout
    assert sql.rows(session) == [
        {"send_window": "09:00-18:00", "time_zone": "UTC", "phone_number_id": "5678"}
    ]

    untouched = enqueue(db_url, *args)
    assert untouched.returncode == 0 and "changed" not in untouched.stdout
    assert sql.rows(session)[0]["phone_number_id"] == "5678"


def test_session_states_cancelled_paused_and_completed(sql: SQL, db_url: DatabaseURL, tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "phone\n+51987000001\n")
    for name, state in (("cancelada", "cancelada"), ("pausada", "pausada"), ("hecha", "completada")):
        sql.execute("INSERT INTO sesiones_envio (nombre, estado) VALUES (%s, %s)", (name, state))

    cancelled = enqueue(db_url, "--session", "cancelada", "--text", "hola", "--csv", path)
    assert cancelled.returncode == 1 and "is cancelled" in cancelled.stderr

    paused = enqueue(db_url, "--session", "pausada", "--text", "hola", "--csv", path)
    assert paused.returncode == 0, paused.stderr
    # Parked out of the claim range as `pause` parks rows: `resume` brings it back to due now.
    parked = sql.value(
        "SELECT next_attempt_at > UTC_TIMESTAMP() + INTERVAL 50 YEAR FROM cola_envios c"
        " JOIN sesiones_envio s ON s.id = c.sesion_id WHERE s.nombre = 'pausada'"
    )
    assert parked == 1

    completed = enqueue(db_url, "--session", "hecha", "--text", "hola", "--csv", path)
    assert completed.returncode == 0, completed.stderr
    assert sql.value("SELECT estado FROM sesiones_envio WHERE nombre = 'hecha'") == "activa"
    assert sql.value("SELECT COUNT(*) FROM cola_envios") == 2


def test_a_progress_line_is_drawn_in_place_on_a_terminal(
    sql: SQL, db_url: DatabaseURL, tmp_path: Path
) -> None:
    rows = BATCH_ROWS + 10
    path = big_csv(tmp_path / "big.csv", rows)
    controller, terminal = pty.openpty()
    seen = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's last writer has gone
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        process = subprocess.Popen(
            [*WORKER_BIN, "enqueue", "--session", "tty", *TEMPLATE, "--csv", str(path)],
            env=base_env(db_url),
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
        )
        os.close(terminal)
        stdout, _ = process.communicate(timeout=120)
        reader.join(timeout=30)
    finally:
        os.close(controller)
    assert process.returncode == 0
    assert f"queued {rows:,} new message(s)" in stdout
    text = seen.decode()
    assert f"\rchecked {BATCH_ROWS:,} rows" in text and f"\rchecked {rows:,} rows" in text
    assert f"\rqueued {BATCH_ROWS:,} of {rows:,} rows" in text and f"\rqueued {rows:,} of {rows:,}" in text
    assert text.endswith("\r\x1b[K")  # the line is cleared before the summary


def test_memory_does_not_hold_the_file(sql: SQL, db_url: DatabaseURL, tmp_path: Path) -> None:
    """Peak RSS of the command for 20,000 and for 200,000 rows: within a few MiB (the file,
    with ten times the rows, is about 6 MiB larger)."""
    peaks = []
    for rows in (20_000, 200_000):
        path = big_csv(tmp_path / f"{rows}.csv", rows)
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "import resource, subprocess, sys;"
                " code = subprocess.run(sys.argv[1:]).returncode;"
                " print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr);"
                " sys.exit(code)",
                *WORKER_BIN,
                "enqueue",
                "--session",
                f"m{rows}",
                *TEMPLATE,
                "--csv",
                str(path),
            ],
            env=base_env(db_url),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        peaks.append(int(result.stderr.strip().splitlines()[-1]))
    assert peaks[1] - peaks[0] < 12 * 1024, peaks  # KiB
    assert sql.value("SELECT COUNT(*) FROM cola_envios") == 220_000


def test_old_rows_queued_with_the_same_message_count_as_identical(
    sql: SQL, db_url: DatabaseURL, tmp_path: Path
) -> None:
    """A producer (the PHP application) may format the same JSON its own way."""
    session = sql.add_session("php")
    sql.execute(
        "INSERT INTO cola_envios (sesion_id, telefono, mensaje) VALUES (%s, '+51987000001', %s)",
        (session, '{"text": {"preview_url": false, "body": "hola"}, "type": "text"}'),
    )
    path = write(tmp_path / "a.csv", "phone\n+51987000001\n+51987000002\n")
    result = enqueue(db_url, "--session", "php", "--text", "hola", "--csv", path)
    assert result.returncode == 0, result.stderr
    assert "queued 1 new message(s), 1 already queued" in result.stdout
    assert sql.value("SELECT COUNT(*) FROM cola_envios") == 2
