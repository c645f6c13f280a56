"""What `status` decides without a database: how a finished row is counted, what a daemon says
it is doing, and what of the report fits on a terminal under `--watch`."""

from __future__ import annotations

import asyncio

import pytest

from worker.cli.observe import fit_screen
from worker.daemon.control import RunReport
from worker.daemon.numbers import Numbers
from worker.daemon.pause import PauseReason
from worker.daemon.status import Status
from worker.models import CANCELLED_REASON
from worker.store.claims import OPTED_OUT_REASON, UNDELIVERABLE_REASON
from worker.store.prune import tally
from worker.store.reports import NO_CODE, outcome_of


@pytest.mark.parametrize(
    ("state", "code", "reason", "counted_as"),
    [
        ("enviado", None, None, "enviado"),
        ("error", 131026, "Message undeliverable", "error"),  # Meta's own answer: an error
        ("error", 131026, UNDELIVERABLE_REASON, "suppressed"),  # closed unsent for an earlier 131026
        ("error", None, OPTED_OUT_REASON, "opted_out"),  # closed unsent: the phone opted out
        ("error", 131050, "User stopped marketing messages.", "opted_out"),  # Meta said it opted out
        ("error", None, CANCELLED_REASON, "cancelled"),
        ("error", 100, CANCELLED_REASON, "error"),  # a real answer that happens to read the same
        ("error", None, None, "error"),
        ("desconocido", None, OPTED_OUT_REASON, "desconocido"),
        ("pendiente", None, None, "pendiente"),
    ],
)
def test_each_row_is_counted_under_one_outcome(
    state: str, code: int | None, reason: str | None, counted_as: str
) -> None:
    assert outcome_of(state, code, reason) == counted_as


def test_a_pruned_batch_is_counted_per_session_outcome_and_code_as_status_counts_it() -> None:
    batch = [  # id, session, state, code, text, delivered, read, settled (LOCK_FINISHED)
        (1, 7, "enviado", None, None, 1, 1, 0),
        (2, 7, "enviado", None, None, 1, 0, 1),
        (3, 7, "error", 131026, "Message undeliverable", 0, 0, 0),
        (4, 7, "error", 131026, UNDELIVERABLE_REASON, 0, 0, 0),
        (5, 7, "error", None, OPTED_OUT_REASON, 0, 0, 0),
        (6, 8, "enviado", None, None, 0, 0, 0),
    ]
    totals = {key: (t.rows, t.delivered, t.read, t.settled, t.example) for key, t in tally(batch).items()}
    assert totals == {
        (7, "enviado", NO_CODE): (2, 2, 1, 1, None),
        (7, "error", 131026): (1, 0, 0, 0, "Message undeliverable"),
        (7, "suppressed", 131026): (1, 0, 0, 0, UNDELIVERABLE_REASON),
        (7, "opted_out", NO_CODE): (1, 0, 0, 0, OPTED_OUT_REASON),
        (8, "enviado", NO_CODE): (1, 0, 0, 0, None),
    }


def blocks(count: int, lines: int = 2) -> list[list[str]]:
    return [
        [f"#{n} campana  waiting  [0/3] 0%"] + ["    enviado 0"] * (lines - 1) for n in range(1, count + 1)
    ]


def test_the_head_always_fits_and_the_sessions_are_cut_with_a_count_of_the_rest() -> None:
    head = ["PAUSED: code 190", "daemons: 1 live of 1 seen", "", ""]
    screen = fit_screen(head, blocks(10), unread=5, rows=12, columns=80)
    assert screen[:4] == head
    assert [line for line in screen if line.startswith("#")] == [
        f"#{n} campana  waiting  [0/3] 0%" for n in (1, 2, 3)
    ]
    assert screen[-1] == "+12 more session(s)" and len(screen) == 11


def test_sessions_that_fit_are_all_shown_without_a_more_line() -> None:
    screen = fit_screen(["daemons: none"], blocks(3), unread=0, rows=24, columns=80)
    assert len(screen) == 7 and not screen[-1].startswith("+")


def test_long_lines_count_as_the_rows_they_wrap_to() -> None:
    wide = [["#1 " + "x" * 150, "    enviado 0"], ["#2 short", "    enviado 0"]]
    screen = fit_screen(["daemons: none"], wide, unread=0, rows=5, columns=80)
    assert screen == ["daemons: none", "#1 " + "x" * 150, "    enviado 0", "+1 more session(s)"]
    # a head taller than the terminal is still shown whole: it comes first
    assert fit_screen(["a"] * 9, blocks(2), unread=0, rows=5, columns=80) == ["a"] * 9 + [
        "+2 more session(s)"
    ]


def status(
    numbers: Numbers, *, in_flight: int = 0, stopping: bool = False, holds: frozenset[str] = frozenset()
) -> Status:
    stop = asyncio.Event()
    if stopping:
        stop.set()
    return Status(
        numbers=numbers, report=RunReport(), stop=stop, in_flight=set(range(in_flight)), holds=lambda: holds
    )


def test_a_number_whose_due_rows_wait_for_the_rate_limit_makes_the_daemon_throttled() -> None:
    numbers = Numbers(default="1", rate_limit=1.0, concurrency=4)
    assert status(numbers).beat().state == "idle"
    first = numbers.room("1", 4)
    assert first.rows == 1 and not first.limited  # the bucket's one token
    held = numbers.room("1", 4)
    assert held.rows == 0 and held.limited and held.wait > 0
    numbers.held_by_limit = held.limited
    assert status(numbers).beat().state == "throttled"
    assert status(numbers, in_flight=1).beat().state == "sending"
    assert status(numbers, stopping=True).beat().state == "draining"
    assert status(numbers, holds=frozenset({"*"})).beat().state == "held"  # `pause --all`
    assert status(numbers, holds=frozenset({"2"})).beat().state == "throttled"  # another number held
    assert status(numbers, in_flight=1, holds=frozenset({"*"})).beat().state == "sending"  # finishing
    numbers.pauses.number("1").trip(60, PauseReason(190, "token expired"))
    assert status(numbers).beat().state == "paused"


def test_a_number_out_of_slots_is_not_throttled() -> None:
    numbers = Numbers(default="1", rate_limit=0.0, concurrency=1)
    numbers.started("1")
    full = numbers.room("1", 4)
    assert full.rows == 0 and not full.limited
