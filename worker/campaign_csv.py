"""The campaign CSV (`whatsapp-worker enqueue --csv`): read and checked whole before anything is written.

Header: `phone` (required; `telefono` or `teléfono` also name it), `client_id` (optional); every
other column, in order, is a body parameter of the template (or fills `{{1}}`, `{{2}}` ... of a
text body). A value that is sent must have no control characters (see `_Builder.problem`).

The file is read twice, as a stream, and never held in memory: the first pass checks every
row (and lets the store compare it with what the session already queued), the second builds
the same rows again for the inserts. Phones seen in the first pass are kept as sorted runs of
integers in a temporary file, so the duplicate check is bounded too. This module is pure: the
flags' values (`--at`, `--window`...) are checked here as well, the database is the store's.
"""

from __future__ import annotations

import csv
import heapq
import json
import os
import re
import tempfile
import unicodedata
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring  # what json.dumps(s, ensure_ascii=False) uses
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo

from worker.messages import (
    E164,
    MESSAGE_MAX_BYTES,
    PLACEHOLDER,
    TEXT_BODY_MAX,
    InvalidMessage,
    parse_message,
    parse_phone,
    placeholders,
    template_message,
    text_message,
)
from worker.windows import SendWindow, WindowError, zone

MAX_ERRORS_SHOWN = 50
BATCH_ROWS = 5000  # rows per INSERT transaction (and per look-up of what a session queued)
BATCH_BYTES = 1024 * 1024  # ... or fewer when the messages are long (max_allowed_packet)
RUN_ROWS = 131072  # phones sorted in memory at a time for the duplicate check (~6 MB)
BIGINT = 2**63  # cola_envios.cliente_id is a signed BIGINT
_LINE_BITS = 40  # duplicate-check key: phone << 40 | line

# (cliente_id, telefono, mensaje JSON): one row of cola_envios.
QueueRow = tuple[int | None, str, str]

# What the phone column may be headed, as _header_key leaves a name: the table's own Spanish too.
PHONE_HEADERS = ("phone", "telefono", "tel\u00e9fono")

# Control characters (C0, DEL, C1) never belong in a message; a text body may still break lines
# and have tabs, but Meta refuses a template parameter with them ("Param text cannot have
# new-line/tab characters or more than 4 consecutive spaces").
TEXT_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
TEMPLATE_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")
TEMPLATE_SPACES = re.compile(" {5,}")
LINE_BREAKS_AND_TABS = "\t\n\r"
# Their usual short names (unicodedata.name has none for control characters).
C0_NAMES = (
    "NUL SOH STX ETX EOT ENQ ACK BEL BS HT LF VT FF CR SO SI"
    " DLE DC1 DC2 DC3 DC4 NAK SYN ETB CAN EM SUB ESC FS GS RS US"
).split()
C1_NAMES = (
    "PAD HOP BPH NBH IND NEL SSA ESA HTS HTJ VTS PLD PLU RI SS2 SS3"
    " DCS PU1 PU2 STS CCH MW SPA EPA SOS SGC SCI CSI ST OSC PM APC"
).split()


class CsvError(Exception):
    """The file cannot be imported; `problems` lists the first bad lines, `total` counts them all."""

    def __init__(self, path: Path, problems: list[str], total: int | None = None) -> None:
        self.path = path
        self.problems = problems
        self.total = len(problems) if total is None else total
        super().__init__(f"{path}: {self.total} problem(s)")


class Problems:
    """The bad lines of one pass: all counted, the first MAX_ERRORS_SHOWN (by line) kept."""

    def __init__(self, limit: int = MAX_ERRORS_SHOWN) -> None:
        self.total = 0
        self._limit = limit
        self._kept: list[tuple[int, int, str]] = []  # a max-heap by line: (-line, -order, text)

    def add(self, line: int, text: str) -> None:
        self.total += 1
        entry = (-line, -self.total, text)
        if len(self._kept) < self._limit:
            heapq.heappush(self._kept, entry)
        elif entry > self._kept[0]:
            heapq.heapreplace(self._kept, entry)

    def shown(self) -> list[str]:
        return [text for _, _, text in sorted(self._kept, reverse=True)]


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


class _Builder:
    """Builds one row's `mensaje` JSON text straight from strings (no dict, no json.dumps per
    row) and checks it the way the daemon's `parse_message` would. The output is byte for byte
    `json.dumps(spec.build(params), ensure_ascii=False, separators=(",", ":"))` (a unit test
    holds the two together), so rows queued by earlier versions compare equal."""

    def __init__(self, spec: MessageSpec, names: list[str]) -> None:
        self.names = names  # the parameter columns, as the header names them
        self._for_template = spec.text is None
        self._controls = TEMPLATE_CONTROLS if self._for_template else TEXT_CONTROLS
        if spec.text is not None:
            # "Hola {{1}}, debe {{2}}" -> ["Hola ", 0, ", debe ", 1, ""]: literals and indexes
            pieces = PLACEHOLDER.split(spec.text)
            self._parts: list[str | int] = [
                piece if i % 2 == 0 else int(piece) - 1 for i, piece in enumerate(pieces)
            ]
            self.used = sorted({p for p in self._parts if isinstance(p, int)})
            self.build: Callable[[list[str]], str] = self._text
        else:
            assert spec.template is not None and spec.language is not None
            head = f'{{"type":"template","template":{{"name":{encode_basestring(spec.template)}'
            head += f',"language":{{"code":{encode_basestring(spec.language)}}}'
            self._bare = head + "}}"
            self._head = head + ',"components":[{"type":"body","parameters":['
            self.used = list(range(len(names)))
            self.build = self._template

    def problem(self, params: list[str]) -> str | None:
        """What is wrong with this row's parameters (None: nothing). Only the values that are
        sent are checked: a column a text body does not use may hold anything."""
        for index in self.used:
            if (problem := self._value_problem(params[index])) is not None:
                return f", column {self.names[index]!r}: {problem}"
        return None

    def _value_problem(self, value: str) -> str | None:
        if not value:
            return "empty value"
        if (control := self._controls.search(value)) is not None:
            return _control_problem(control[0])
        if self._for_template and (spaces := TEMPLATE_SPACES.search(value)) is not None:
            return f"{len(spaces[0])} spaces in a row: a template parameter may have at most 4"
        return None

    def _text(self, params: list[str]) -> str:
        body = "".join(params[p] if isinstance(p, int) else p for p in self._parts)
        if len(body) > TEXT_BODY_MAX:
            raise InvalidMessage(
                f"the text is {len(body):,} characters once filled in, more than {TEXT_BODY_MAX:,}"
            )
        return f'{{"type":"text","text":{{"body":{encode_basestring(body)},"preview_url":false}}}}'

    def _template(self, params: list[str]) -> str:
        if not params:
            return self._bare
        values = ",".join(f'{{"type":"text","text":{encode_basestring(p)}}}' for p in params)
        message = f"{self._head}{values}]}}]}}}}"
        if len(message) > MESSAGE_MAX_BYTES // 4 and len(message.encode()) > MESSAGE_MAX_BYTES:
            raise InvalidMessage(
                f"the message would be {len(message.encode()):,} bytes, more than"
                f" {MESSAGE_MAX_BYTES:,}: a parameter is too long"
            )
        return message


class CsvSource:
    """A CSV file whose header has been checked; `read` streams its rows, as often as needed."""

    def __init__(self, path: Path, spec: MessageSpec) -> None:
        self.path = path
        self.spec = spec
        self.problems = Problems()  # of the last pass
        self.unused: list[str] = []  # parameter columns a text body does not use
        self.column_charset: str | None = None  # cola_envios.mensaje's: a message must fit it
        self.default_country: str | None = None  # WORKER_DEFAULT_COUNTRY: phones without a country code
        try:
            with path.open(newline="", encoding="utf-8-sig") as handle:
                self.delimiter = _delimiter(handle.readline())
                handle.seek(0)
                header = next(csv.reader(handle, delimiter=self.delimiter), [])
            self._stat = _fingerprint(path)
        except OSError as exc:
            raise CsvError(path, [f"cannot read the file: {exc.strerror}"]) from None
        except UnicodeDecodeError:
            raise CsvError(path, [_not_utf8(path)[1]]) from None
        except csv.Error as exc:
            raise CsvError(path, [f"line 1: malformed CSV: {exc}"]) from None
        self._layout(header)

    def _layout(self, header: list[str]) -> None:
        names = [name.strip() for name in header]
        keys = [_header_key(name) for name in names]
        self.phone_at = self._phone_column(names, keys)
        if keys.count("client_id") > 1:
            raise CsvError(self.path, ["line 1: the header has the column 'client_id' twice"])
        self.width = len(names)
        self.client_at = keys.index("client_id") if "client_id" in keys else None
        self.param_at = [i for i in range(self.width) if i not in (self.phone_at, self.client_at)]
        params = [names[i] or f"column {i + 1}" for i in self.param_at]
        self.builder = _Builder(self.spec, params)
        if self.spec.text is not None:
            missing = [n for n in placeholders(self.spec.text) if not 0 < n <= len(params)]
            if missing:
                have = ", ".join(f"{{{{{n}}}}} = {name!r}" for n, name in enumerate(params, start=1))
                raise CsvError(
                    self.path,
                    [
                        f"--text uses {', '.join(f'{{{{{n}}}}}' for n in missing)}, but the file has"
                        f" {len(params)} parameter column(s)" + (f": {have}" if have else "")
                    ],
                )
            self.unused = [name for i, name in enumerate(params) if i not in self.builder.used]

    def _phone_column(self, names: list[str], keys: list[str]) -> int:
        """Where the one phone column is, whichever of PHONE_HEADERS heads it."""
        found = [i for i, key in enumerate(keys) if key in PHONE_HEADERS]
        if not found:
            allowed = f"{PHONE_HEADERS[0]!r}, {PHONE_HEADERS[1]!r} or {PHONE_HEADERS[2]!r}"
            seen = ", ".join(repr(n) for n in names) or "nothing"
            problem = f"line 1: the header must have a phone column, headed {allowed} (found {seen})"
            raise CsvError(self.path, [problem])
        if len(found) > 1:
            both = ", ".join(repr(names[i]) for i in found[:-1]) + f" and {names[found[-1]]!r}"
            raise CsvError(
                self.path, [f"line 1: the header has {len(found)} phone columns, {both}: keep one"]
            )
        return found[0]

    @property
    def parameters(self) -> list[str]:
        return self.builder.names

    def read(self, *, first: bool) -> Iterator[list[QueueRow]]:
        """Batches of valid rows. The first pass checks the whole file (duplicate phones too)
        and raises CsvError at its end if any line is bad; a later pass raises at the first bad
        line, which only happens if the file changed in between."""
        self.problems = Problems()
        if not first and _fingerprint(self.path) != self._stat:
            raise CsvError(self.path, ["the file changed while it was being imported"])
        phones = _PhoneRuns() if first else None
        try:
            batch: list[QueueRow] = []
            size = 0
            for line, row in self._rows():
                if row is None:
                    if not first:
                        raise CsvError(self.path, self.problems.shown(), self.problems.total)
                    continue
                if phones is not None:
                    if not phones.count:  # the daemon's own checks, once, on what the builder makes
                        try:
                            parse_message(row[2])
                        except InvalidMessage as exc:
                            self.problems.add(line, f"line {line}: {exc}")
                            continue
                    phones.add(row[1], line)
                batch.append(row)
                size += len(row[2])
                if len(batch) >= BATCH_ROWS or size >= BATCH_BYTES:
                    yield batch
                    batch, size = [], 0
            if phones is not None:
                for line, text in phones.duplicates():
                    self.problems.add(line, text)
            if self.problems.total:
                raise CsvError(self.path, self.problems.shown(), self.problems.total)
            if batch:
                yield batch
        finally:
            if phones is not None:
                phones.close()

    def _rows(self) -> Iterator[tuple[int, QueueRow | None]]:
        """(line, row), or (line, None) after adding the line's problem to self.problems."""
        problems, build, check = self.problems, self.builder.build, self.builder.problem
        width, phone_at, client_at, param_at = self.width, self.phone_at, self.client_at, self.param_at
        with self.path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=self.delimiter)
            end = 0
            try:
                next(reader, None)
                end = reader.line_num
                for fields in reader:
                    line, end = end + 1, reader.line_num  # a quoted field may span lines
                    try:
                        if len(fields) != width:
                            raise InvalidMessage(f": expected {width} columns, found {len(fields)}")
                        phone = fields[phone_at]
                        if not E164.fullmatch(phone):
                            phone = parse_phone(phone, self.default_country)
                        client = _client_id(fields[client_at]) if client_at is not None else None
                        params = [fields[i].strip() for i in param_at]
                        if (problem := check(params)) is not None:
                            raise InvalidMessage(problem)
                        message = build(params)
                        if (problem := unstorable(message, self.column_charset)) is not None:
                            raise InvalidMessage(problem)
                    except InvalidMessage as exc:
                        if not any(field.strip() for field in fields):
                            continue  # a blank line (or one of separators only: ";;;")
                        text = str(exc)
                        problems.add(line, f"line {line}{text if text[0] in ',:' else ': ' + text}")
                        yield line, None
                        continue
                    yield line, (client, phone, message)
            except UnicodeDecodeError:  # the rest of the file cannot be read
                line, problem = _not_utf8(self.path)
                problems.add(line, problem)
                yield line, None
            except csv.Error as exc:
                problems.add(end + 1, f"line {end + 1}: malformed CSV: {exc}")
                yield end + 1, None


# What a character set of MySQL's can hold, as Python's codec names it (MySQL's latin1 is
# Windows-1252); utf8mb3 holds the Basic Multilingual Plane only (no emoji).
CHARSET_CODECS = {"latin1": "cp1252", "ascii": "ascii", "latin2": "iso8859_2", "cp1250": "cp1250"}


def unstorable(message: str, charset: str | None) -> str | None:
    """Why `message` cannot be stored in a cola_envios.mensaje of `charset` (None: it can)."""
    name = (charset or "utf8mb4").lower()
    if name == "utf8mb4" or name == "binary":
        return None
    if name in ("utf8", "utf8mb3"):
        bad = next((c for c in message if ord(c) > 0xFFFF), None)
    elif name in CHARSET_CODECS:
        bad = next((c for c in message if not c.encode(CHARSET_CODECS[name], "ignore")), None)
    else:
        return None  # a character set we do not know: the server decides
    if bad is None:
        return None
    return (
        f"the message has {bad!r}, which cola_envios.mensaje ({name}) cannot store: convert the column"
        " to utf8mb4 (ALTER TABLE cola_envios MODIFY mensaje ... CHARACTER SET utf8mb4), or leave it out"
    )


def read_rows(path: Path, spec: MessageSpec) -> list[QueueRow]:
    """Every row of a (small) file, checked: a convenience over CsvSource for tests and tools."""
    source = CsvSource(path, spec)
    return [row for batch in source.read(first=True) for row in batch]


class _PhoneRuns:
    """Duplicate phones with bounded memory: (phone, line) keys are sorted a run at a time,
    runs past the first go to a temporary file, and a k-way merge finds equal phones."""

    def __init__(self) -> None:
        self.count = 0
        self._keys: list[int] = []
        self._file: IO[bytes] | None = None
        self._runs: list[tuple[int, int]] = []  # (offset, count): phones, then lines, as int64

    def add(self, phone: str, line: int) -> None:
        self.count += 1
        self._keys.append(int(phone[1:]) << _LINE_BITS | line)
        if len(self._keys) >= RUN_ROWS:
            self._spill()

    def _spill(self) -> None:
        self._keys.sort()
        mask = (1 << _LINE_BITS) - 1
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="whatsapp-worker-enqueue-")
        offset = self._file.seek(0, os.SEEK_END)
        array("q", [k >> _LINE_BITS for k in self._keys]).tofile(self._file)
        array("q", [k & mask for k in self._keys]).tofile(self._file)
        self._file.flush()  # read back with os.pread, past the file object's buffer
        self._runs.append((offset, len(self._keys)))
        self._keys = []

    def _run(self, offset: int, count: int) -> Iterator[int]:
        assert self._file is not None
        fd, step, itemsize = self._file.fileno(), 8192, array("q").itemsize
        for start in range(0, count, step):
            n = min(step, count - start)
            phones, lines = array("q"), array("q")
            phones.frombytes(os.pread(fd, n * itemsize, offset + start * itemsize))
            lines.frombytes(os.pread(fd, n * itemsize, offset + (count + start) * itemsize))
            for phone, line in zip(phones, lines, strict=True):
                yield phone << _LINE_BITS | line

    def duplicates(self) -> Iterator[tuple[int, str]]:
        """(line, problem) for each later line of a phone, in phone order."""
        if self._file is not None:
            if self._keys:
                self._spill()
            keys: Iterator[int] = heapq.merge(*(self._run(o, c) for o, c in self._runs))
        else:
            self._keys.sort()
            keys = iter(self._keys)
        mask = (1 << _LINE_BITS) - 1
        previous, first = -1, 0
        for key in keys:
            phone, line = key >> _LINE_BITS, key & mask
            if phone == previous:
                yield line, f"line {line}: phone +{phone} already appears on line {first}"
            else:
                previous, first = phone, line

    def close(self) -> None:
        self._keys = []
        if self._file is not None:
            self._file.close()


def _not_utf8(path: Path) -> tuple[int, str]:
    """Where a file stops being UTF-8 (text decoders only say which chunk): found line by line,
    as a newline byte is never part of a multi-byte UTF-8 character."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return number, (
                    f"line {number}: the file is not UTF-8 text (byte 0x{raw[exc.start]:02x} at"
                    f" position {exc.start + 1} of the line): save it as CSV UTF-8"
                )
    return 1, "line 1: the file is not UTF-8 text"


def _fingerprint(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _header_key(name: str) -> str:
    """A header name as it is compared: trimmed, composed (a Mac may save `é` as `e` and an
    accent, NFD) and lower-case."""
    return unicodedata.normalize("NFC", name.strip()).lower()


def _control_problem(char: str) -> str:
    """`a control character (U+001B ESC)`, and why a line break or tab is refused."""
    code = ord(char)
    name = C0_NAMES[code] if code < 0x20 else "DEL" if code == 0x7F else C1_NAMES[code - 0x80]
    problem = f"a control character (U+{code:04X} {name})"
    if char in LINE_BREAKS_AND_TABS:  # only a template refuses these
        problem += ": a template parameter cannot have line breaks or tabs"
    return problem


def _delimiter(header: str) -> str:
    """`,`, or the `;` a Spanish-locale spreadsheet saves, or a tab: whichever the header uses."""
    return max((",", ";", "\t"), key=header.count)


def _client_id(raw: str) -> int | None:
    raw = raw.strip()
    if not raw:
        return None
    if not (raw.isascii() and raw.lstrip("-").isdigit()):  # not '²', which isdigit() accepts
        raise InvalidMessage(f"client_id {raw!r} is not a whole number")
    value = int(raw)
    if not -BIGINT <= value < BIGINT:
        raise InvalidMessage(f"client_id {raw!r} is too large (cliente_id is a BIGINT)")
    return value


# --- the flags: schedule, window, sending number --------------------------------------------


class BadFlag(ValueError):
    """A flag's value cannot be used; the text names the flag."""


def time_zone(name: str) -> ZoneInfo:
    """An IANA zone ("America/Lima"), from the system or the tzdata package."""
    if not name or name != name.strip():
        raise BadFlag(f"--timezone: {name!r} is not a known time zone (an IANA name such as America/Lima)")
    try:
        return zone(name)
    except WindowError as exc:
        raise BadFlag(f"--timezone: {exc}") from None


def schedule(text: str, zone: ZoneInfo) -> datetime:
    """`--at "2026-12-01 09:00"` read in `zone`, as a naive UTC datetime (the queue's times)."""
    try:
        local = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadFlag(f"--at: {text!r} is not a date and time like '2026-12-01 09:00'") from None
    if local.tzinfo is not None:
        raise BadFlag(
            f"--at: {text!r} has a UTC offset; give the local time and name its zone with --timezone"
        )
    aware = local.replace(tzinfo=zone)
    utc = aware.astimezone(UTC)
    if utc.astimezone(zone).replace(tzinfo=None) != local:
        raise BadFlag(f"--at: {text} does not exist in {zone.key} (the clocks skip that hour)")
    return utc.replace(tzinfo=None)


def send_window(text: str) -> str:
    """`08:00-20:00` (an overnight `20:00-08:00` too), normalised to 'HH:MM-HH:MM'."""
    try:
        window = SendWindow.parse(text.replace(" ", ""))
    except WindowError as exc:
        raise BadFlag(f"--window: {exc}") from None
    return f"{window.start:%H:%M}-{window.end:%H:%M}"


def phone_number_id(text: str) -> str:
    """Meta's id of a sending number: digits only."""
    value = text.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 64:
        raise BadFlag(f"--phone-number-id: {text!r} is not a phone number id (digits only)")
    return value


def describe(message: str, width: int = 80) -> str:
    """A short human form of a `mensaje`: `text "Hola Ana"` or `template pago (es): "ACME", ...`."""
    try:
        parsed = json.loads(message)
        kind = parsed["type"]
        if kind == "text":
            text = f"text {json.dumps(parsed['text']['body'], ensure_ascii=False)}"
        elif kind == "template":
            template = parsed["template"]
            values = [
                json.dumps(p.get("text"), ensure_ascii=False)
                for c in template.get("components", [])
                for p in c.get("parameters", [])
            ]
            text = f"template {template['name']} ({template['language']['code']})"
            text += f": {', '.join(values)}" if values else ""
        else:
            text = message
    except (ValueError, TypeError, KeyError, AttributeError):
        text = message
    return text if len(text) <= width else text[: width - 3] + "..."
