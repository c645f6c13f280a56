"""What happens after Meta answers: one table of error codes and one pure `decide`.

`classify_error` turns an answer into an Outcome (what the attempt proved); `decide` turns a
SendResult into a Decision (what the row becomes, whether an attempt is spent, how long until it
is due again, whether all sending or one template must pause, and the log event and metric).
No I/O and no clock here: the daemon carries a Decision out, the store writes it.
"""

from __future__ import annotations

import functools
import random

from worker.config import Settings
from worker.daemon.retry import backoff
from worker.models import OPTED_OUT_CODE, Decision, Outcome, RowState, SendResult

THROTTLED = 130429  # too many messages for this number: the rate is lowered, then recovers
MAINTENANCE_CODE = 131057  # account in maintenance / throughput upgrade: pause briefly
MAINTENANCE_PAUSE = 60.0  # Meta says about a minute
MARKETING_LIMIT_CODE = 131049  # marketing "healthy ecosystem" limit: defer at least 24 h
MARKETING_LIMIT_DELAY = 24 * 3600.0
TEMPLATE_PAUSED_CODE = 132015  # template paused for low quality: hold that template's rows
TEMPLATE_DEAD_CODES = frozenset({132001, 132007, 132016})  # missing / policy / disabled
INTEGRITY_BLOCK_CODE = 368  # the account is blocked for policy violations: every row would fail
COUNTRY_BLOCKED_CODE = 130497  # this account may not message users in the recipient's country
# A permanent error whose text from Meta does not say what it means for the row.
REASONS = {
    COUNTRY_BLOCKED_CODE: "this business account may not message users in the recipient's country",
}
# The API could not be reached at all (refused, DNS, connect timeout). A network blip usually
# lasts seconds, and a probe that cannot connect provably sends nothing, so probe sooner than
# after an account error (WORKER_PAUSE_SECONDS, which waits for a human).
UNREACHABLE_PAUSE = 10.0

# Meta's error codes (WHATSAPP_CLOUD_API.md, "Errors"). Meta asks clients to decide on the
# code, not on the HTTP status. A code not listed here is a rejection (PERMANENT), unless it
# came with a 5xx status (UNKNOWN: the service may have acted on it).
CODES: dict[int, Outcome] = {
    # not accepted: back off and retry
    4: Outcome.RETRY,  # app call-rate limit
    80007: Outcome.RETRY,  # WhatsApp Business Account rate limit
    THROTTLED: Outcome.RETRY,  # per-number throughput reached
    131056: Outcome.RETRY,  # pair rate limit
    MARKETING_LIMIT_CODE: Outcome.RETRY,  # deferred 24 h by decide()
    # outcome unknown: never re-send blindly
    1: Outcome.UNKNOWN,
    2: Outcome.UNKNOWN,
    131000: Outcome.UNKNOWN,
    131016: Outcome.UNKNOWN,
    # permanent (listed for the reader; any other code is permanent as well)
    100: Outcome.PERMANENT,
    131008: Outcome.PERMANENT,
    131009: Outcome.PERMANENT,
    131021: Outcome.PERMANENT,
    131026: Outcome.PERMANENT,
    OPTED_OUT_CODE: Outcome.PERMANENT,  # the user stopped marketing: recorded as an opt-out
    131047: Outcome.PERMANENT,
    131051: Outcome.PERMANENT,
    131052: Outcome.PERMANENT,
    131053: Outcome.PERMANENT,
    132000: Outcome.PERMANENT,
    132005: Outcome.PERMANENT,
    132012: Outcome.PERMANENT,
    135000: Outcome.PERMANENT,
    COUNTRY_BLOCKED_CODE: Outcome.PERMANENT,  # for that recipient only: the reason says so
    **dict.fromkeys(TEMPLATE_DEAD_CODES, Outcome.PERMANENT),  # and hold that template
    # pause: a template (132015) or all sending (account level)
    TEMPLATE_PAUSED_CODE: Outcome.PAUSE,
    MAINTENANCE_CODE: Outcome.PAUSE,
    **dict.fromkeys((0, 3, 10, 190, 131005, 131031, 131042, 131045, 131048, 133010), Outcome.PAUSE),
    INTEGRITY_BLOCK_CODE: Outcome.PAUSE,  # a block lasts hours or days: never burn the queue
    **dict.fromkeys(range(200, 300), Outcome.PAUSE),  # permissions
}


def classify_error(code: int | None, http_status: int) -> Outcome:
    """What an error answer proved: Meta asks clients to decide on the code, not the status."""
    if code is not None:
        known = CODES.get(code)
        if known is not None:
            return known
        return Outcome.UNKNOWN if http_status >= 500 else Outcome.PERMANENT
    if http_status == 429:
        return Outcome.RETRY
    if http_status == 401:
        return Outcome.PAUSE
    return Outcome.UNKNOWN if http_status >= 500 else Outcome.PERMANENT


def decide(result: SendResult, *, attempt: int, settings: Settings, rng: random.Random) -> Decision:
    """Pure: `attempt` is the number this send was (1 for the first)."""
    code, text = result.error_code, result.error_text
    make = functools.partial(_decision, result)
    template_hold = settings.template_pause_seconds
    match result.outcome:
        case Outcome.SENT:
            return make(RowState.SENT, "message_sent", "sent")
        case Outcome.RETRY if attempt >= settings.max_attempts:
            gave_up = f"gave up after {attempt} attempts: {text}"
            return make(RowState.ERROR, "message_failed", "error", error_text=gave_up)
        case Outcome.RETRY:
            if code == MARKETING_LIMIT_CODE:
                delay = MARKETING_LIMIT_DELAY
            else:
                delay = backoff(attempt, base=settings.retry_base, cap=settings.retry_cap, rng=rng)
            return make(RowState.PENDING, "message_retry_scheduled", "retry", delay=delay)
        case Outcome.PERMANENT:
            hold = template_hold if code in TEMPLATE_DEAD_CODES else None
            reason = REASONS.get(code or 0)
            explained = f"{reason} ({code}): {text}" if reason else text
            return make(RowState.ERROR, "message_failed", "error", hold=hold, error_text=explained)
        case Outcome.UNKNOWN:
            return make(RowState.UNKNOWN, "message_outcome_unknown", "unknown")
        case Outcome.PAUSE if code == TEMPLATE_PAUSED_CODE:
            # Only this template is paused: the row waits as long as its template is held.
            return make(
                RowState.PENDING,
                "message_retry_scheduled",
                "paused",
                spend=False,
                delay=template_hold,
                hold=template_hold,
            )
        case Outcome.PAUSE:
            seconds = settings.pause_seconds
            if code == MAINTENANCE_CODE:
                seconds = min(seconds, MAINTENANCE_PAUSE)
            return make(RowState.PENDING, "sending_paused", "paused", spend=False, pause=seconds)
        case Outcome.UNREACHABLE:
            seconds = min(settings.pause_seconds, UNREACHABLE_PAUSE)
            return make(RowState.PENDING, "api_unreachable", "paused", spend=False, pause=seconds)
    raise AssertionError(f"unhandled outcome {result.outcome!r}")  # pragma: no cover


def _decision(
    result: SendResult,
    state: RowState,
    event: str,
    metric: str,
    *,
    spend: bool = True,
    delay: float = 0.0,
    pause: float | None = None,
    hold: float | None = None,
    error_text: str | None = None,
) -> Decision:
    """A Decision for `result`: a sent row carries its wamid, any other its code and reason."""
    sent = state is RowState.SENT
    return Decision(
        state=state,
        spend_attempt=spend,
        delay=delay,
        wamid=result.wamid if sent else None,
        error_code=None if sent else result.error_code,
        error_text=None if sent else (error_text if error_text is not None else result.error_text),
        pause=pause,
        hold_template=hold,
        event=event,
        metric=metric,
    )
