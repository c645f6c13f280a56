"""The outcome policy as a table: Meta's answer -> what the row and the daemon do. No I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from worker.config import DatabaseURL, Settings
from worker.daemon.policy import CODES, classify_error, decide
from worker.models import Decision, Outcome, RowState, SendResult

SETTINGS = Settings(
    database=DatabaseURL("db", 3306, "u", "p", "q"),
    max_attempts=3,
    retry_base=2.0,
    retry_cap=30.0,
    pause_seconds=120.0,
    template_pause_seconds=3600.0,
)
DAY = 24 * 3600.0


@pytest.mark.parametrize(
    ("code", "status", "outcome"),
    [
        (130429, 429, Outcome.RETRY),
        (131056, 400, Outcome.RETRY),
        (4, 400, Outcome.RETRY),
        (80007, 400, Outcome.RETRY),
        (131049, 400, Outcome.RETRY),
        (131000, 500, Outcome.UNKNOWN),
        (131016, 503, Outcome.UNKNOWN),
        (1, 400, Outcome.UNKNOWN),
        (2, 503, Outcome.UNKNOWN),
        (131026, 400, Outcome.PERMANENT),
        (131026, 500, Outcome.PERMANENT),  # Meta: decide on the code, not the status
        (100, 400, Outcome.PERMANENT),
        (131047, 400, Outcome.PERMANENT),
        (132001, 404, Outcome.PERMANENT),
        (132016, 400, Outcome.PERMANENT),
        (135000, 400, Outcome.PERMANENT),
        (999999, 400, Outcome.PERMANENT),  # unlisted code: a rejection ...
        (999999, 502, Outcome.UNKNOWN),  # ... unless the service failed while answering
        (132015, 400, Outcome.PAUSE),
        (131057, 503, Outcome.PAUSE),
        (0, 401, Outcome.PAUSE),
        (190, 401, Outcome.PAUSE),
        (131031, 403, Outcome.PAUSE),
        (131042, 400, Outcome.PAUSE),
        (131048, 400, Outcome.PAUSE),
        (200, 403, Outcome.PAUSE),
        (299, 403, Outcome.PAUSE),
        (133010, 400, Outcome.PAUSE),
        (368, 403, Outcome.PAUSE),  # the account is blocked for policy violations
        (130497, 400, Outcome.PERMANENT),  # that recipient's country only
        (None, 502, Outcome.UNKNOWN),
        (None, 429, Outcome.RETRY),
        (None, 401, Outcome.PAUSE),
        (None, 400, Outcome.PERMANENT),
    ],
)
def test_error_codes_are_classified_as_the_cloud_api_doc_says(
    code: int | None, status: int, outcome: Outcome
) -> None:
    assert classify_error(code, status) is outcome


def test_every_code_of_the_doc_is_in_the_table() -> None:
    documented = {4, 80007, 130429, 131056, 131057, 1, 2, 131000, 131016, 100, 131008, 131009}
    documented |= {131021, 131026, 131047, 131051, 131052, 131053, 132000, 132005, 132012}
    documented |= {132001, 132007, 132016, 132015, 135000, 131049, 0, 190, 3, 10, 131005}
    documented |= {131031, 131042, 131045, 133010, 131048, *range(200, 300)}
    documented |= {131050}  # issue 10: the user stopped marketing messages (an opt-out)
    documented |= {368, 130497}  # an integrity block pauses; a blocked country is per row
    assert documented == set(CODES)


@dataclass(frozen=True)
class Row:
    """One line of the table: what `decide` must return (delay as a range: backoff jitters)."""

    state: RowState
    spend: bool
    delay: tuple[float, float]
    pause: float | None
    hold: float | None
    event: str
    metric: str


def result(outcome: Outcome, code: int | None = None) -> SendResult:
    wamid = "wamid.A" if outcome is Outcome.SENT else None
    text = None if outcome is Outcome.SENT else f"reason {code}"
    return SendResult(outcome, wamid=wamid, error_code=code, error_text=text)


NONE = (0.0, 0.0)
TABLE = {
    "sent": (result(Outcome.SENT), 1, Row(RowState.SENT, True, NONE, None, None, "message_sent", "sent")),
    "retry-first": (
        result(Outcome.RETRY, 130429),
        1,
        Row(RowState.PENDING, True, (1.0, 2.0), None, None, "message_retry_scheduled", "retry"),
    ),
    "retry-second": (
        result(Outcome.RETRY, 131056),
        2,
        Row(RowState.PENDING, True, (2.0, 4.0), None, None, "message_retry_scheduled", "retry"),
    ),
    "retry-gives-up": (
        result(Outcome.RETRY, 4),
        3,
        Row(RowState.ERROR, True, NONE, None, None, "message_failed", "error"),
    ),
    "marketing-limit-24h": (
        result(Outcome.RETRY, 131049),
        1,
        Row(RowState.PENDING, True, (DAY, DAY), None, None, "message_retry_scheduled", "retry"),
    ),
    "marketing-limit-gives-up": (
        result(Outcome.RETRY, 131049),
        3,
        Row(RowState.ERROR, True, NONE, None, None, "message_failed", "error"),
    ),
    "permanent": (
        result(Outcome.PERMANENT, 131026),
        1,
        Row(RowState.ERROR, True, NONE, None, None, "message_failed", "error"),
    ),
    "invalid-row": (
        result(Outcome.PERMANENT),
        1,
        Row(RowState.ERROR, True, NONE, None, None, "message_failed", "error"),
    ),
    "template-dead": (
        result(Outcome.PERMANENT, 132001),
        1,
        Row(RowState.ERROR, True, NONE, None, 3600.0, "message_failed", "error"),
    ),
    "template-disabled": (
        result(Outcome.PERMANENT, 132016),
        2,
        Row(RowState.ERROR, True, NONE, None, 3600.0, "message_failed", "error"),
    ),
    "template-paused": (
        result(Outcome.PAUSE, 132015),
        3,
        Row(RowState.PENDING, False, (3600.0, 3600.0), None, 3600.0, "message_retry_scheduled", "paused"),
    ),
    "unknown": (
        result(Outcome.UNKNOWN, 131000),
        1,
        Row(RowState.UNKNOWN, True, NONE, None, None, "message_outcome_unknown", "unknown"),
    ),
    "unknown-at-last-attempt": (
        result(Outcome.UNKNOWN),
        3,
        Row(RowState.UNKNOWN, True, NONE, None, None, "message_outcome_unknown", "unknown"),
    ),
    "account-paused": (
        result(Outcome.PAUSE, 190),
        3,
        Row(RowState.PENDING, False, NONE, 120.0, None, "sending_paused", "paused"),
    ),
    "maintenance-at-most-60s": (
        result(Outcome.PAUSE, 131057),
        1,
        Row(RowState.PENDING, False, NONE, 60.0, None, "sending_paused", "paused"),
    ),
    "unreachable": (
        result(Outcome.UNREACHABLE),
        3,
        Row(RowState.PENDING, False, NONE, 10.0, None, "api_unreachable", "paused"),
    ),
}


@pytest.mark.parametrize(("answer", "attempt", "row"), list(TABLE.values()), ids=list(TABLE))
def test_decisions_follow_the_table(answer: SendResult, attempt: int, row: Row) -> None:
    decision = decide(answer, attempt=attempt, settings=SETTINGS, rng=random.Random(7))
    assert isinstance(decision, Decision)
    got = Row(
        decision.state,
        decision.spend_attempt,
        row.delay,
        decision.pause,
        decision.hold_template,
        decision.event,
        decision.metric,
    )
    assert got == row
    assert row.delay[0] <= decision.delay <= row.delay[1]
    if decision.state is RowState.SENT:
        assert (decision.wamid, decision.error_code, decision.error_text) == ("wamid.A", None, None)
    else:
        assert decision.wamid is None
        assert (decision.error_code, decision.error_text is not None) == (answer.error_code, True)


def test_giving_up_says_after_how_many_attempts() -> None:
    decision = decide(result(Outcome.RETRY, 130429), attempt=3, settings=SETTINGS, rng=random.Random())
    assert decision.error_text == "gave up after 3 attempts: reason 130429"
    assert decision.error_code == 130429


def test_short_pauses_are_not_lengthened() -> None:
    """WORKER_PAUSE_SECONDS below the maintenance and unreachable pauses wins."""
    short = Settings(database=SETTINGS.database, pause_seconds=5.0)
    for answer in (result(Outcome.PAUSE, 131057), result(Outcome.UNREACHABLE), result(Outcome.PAUSE, 190)):
        assert decide(answer, attempt=1, settings=short, rng=random.Random()).pause == 5.0


def test_retry_delay_comes_from_the_injected_random_and_the_cap() -> None:
    answer = result(Outcome.RETRY, 130429)
    many = Settings(database=SETTINGS.database, max_attempts=100, retry_base=2.0, retry_cap=30.0)
    first = decide(answer, attempt=20, settings=many, rng=random.Random(1)).delay
    assert first == decide(answer, attempt=20, settings=many, rng=random.Random(1)).delay
    assert 15.0 <= first <= 30.0


def test_every_outcome_has_a_decision() -> None:
    for outcome in Outcome:
        decision = decide(result(outcome), attempt=1, settings=SETTINGS, rng=random.Random())
        assert decision.metric in {"sent", "retry", "error", "unknown", "paused"}
        assert decision.delay >= 0
