"""Value types shared by the store, the sender and the daemon."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class RowState(StrEnum):
    """`cola_envios.estado`: the values the PHP application and the runbook know."""

    PENDING = "pendiente"
    PROCESSING = "procesando"
    SENT = "enviado"
    ERROR = "error"
    UNKNOWN = "desconocido"  # the request may have reached Meta: never re-sent automatically


# The reason a cancelled session's waiting rows end with (`error`, no code): `status` counts
# them apart from errors, so every statement that cancels rows writes this very string.
CANCELLED_REASON = "session cancelled by the operator: not sent"


class SessionState(StrEnum):
    ACTIVE = "activa"
    PAUSED = "pausada"
    CANCELLED = "cancelada"
    COMPLETED = "completada"


# The session states as the commands speak of them (the table keeps the PHP era's Spanish); a
# PHP application's own state (`borrador`) is shown as it is.
STATE_WORDS = {"activa": "active", "pausada": "paused", "cancelada": "cancelled", "completada": "completed"}


def state_word(state: str) -> str:
    return STATE_WORDS.get(state, state)


# The session states whose rows the daemon sends. Any other state (a PHP application's own
# `borrador`, `detenida`..., or NULL) holds the session's rows, unless WORKER_SEND_STATES names it.
SENDABLE_STATES = (SessionState.ACTIVE.value, SessionState.COMPLETED.value)


class Outcome(StrEnum):
    """What one send attempt proved."""

    SENT = "sent"  # Meta accepted it: we hold its wamid
    RETRY = "retry"  # Meta provably did not accept it: try again later
    PERMANENT = "permanent"  # Meta rejected it for good
    UNKNOWN = "unknown"  # the request may have been delivered: never re-send blindly
    PAUSE = "pause"  # account-level problem: stop all sending, give the row back untouched
    # The request never left: connection refused, DNS failure, connect timeout. Provably not
    # sent, and not the row's fault: pause all sending and probe, give the row back untouched.
    UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class Job:
    """A claimed row. `lease_token` fences every write made after the claim."""

    id: int
    sesion_id: int
    telefono: str
    mensaje: str | None  # None when it is longer than the API allows (not loaded)
    attempts: int  # spent since the row's last `retry` (its budget); the column keeps them all
    lease_token: str
    mensaje_bytes: int = 0
    phone_number_id: str | None = None  # the session's sending number; None: the daemon's


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: Outcome
    wamid: str | None = None
    error_code: int | None = None
    error_text: str | None = None
    retry_after: float | None = None  # seconds; set by the daemon for RETRY


# Meta's error code for "the user stopped marketing messages from this business": an opt-out.
OPTED_OUT_CODE = 131050
# Meta could not deliver to this phone (not on WhatsApp, an old app...): suppressed per number.
UNDELIVERABLE_CODE = 131026
# Where an opt-out came from (whatsapp_worker_optouts.source).
SOURCE_KEYWORD = "keyword"
SOURCE_META = "131050"
SOURCE_OPERATOR = "operator"
SOURCE_PREFERENCES = "user_preferences"  # Meta's marketing-messages preference: value "stop"


@dataclass(frozen=True, slots=True)
class Decision:
    """What one send's result means for its row and for the daemon."""

    state: RowState  # SENT / PENDING (retry, pause, unreachable) / ERROR / UNKNOWN
    spend_attempt: bool  # sent, retry, permanent, unknown spend one; pause and unreachable do not
    delay: float  # seconds until the row is due again (state PENDING); 0 otherwise
    wamid: str | None
    error_code: int | None
    error_text: str | None
    pause: float | None  # stop ALL sending this long, then probe with one send
    hold_template: float | None  # hold back this template's waiting rows this long
    event: str  # stable log event name
    metric: str  # whatsapp_worker_messages_total{outcome}: sent, retry, error, unknown, paused


@dataclass(frozen=True, slots=True)
class Finished:
    """What a send decided for a row, waiting to be written, with the claim it belongs to."""

    job: Job
    decision: Decision


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """One status object from a webhook, checked and cut to the columns' sizes."""

    wamid: str
    status: str  # one of STATUS_KINDS
    cola_id: int | None  # from biz_opaque_callback_data `cola:<id>`
    status_at: datetime | None  # Meta's timestamp, UTC (naive)
    recipient_id: str | None
    error_code: int | None
    error_title: str | None
    raw: str  # the status object as received (JSON, ASCII)
    phone_number_id: str | None = None  # the sending number it reports on (`metadata`)


@dataclass(frozen=True, slots=True)
class OptOut:
    telefono: str  # E.164, `+` included
    source: str  # keyword, 131050, operator
    detail: str | None = None
    # When the customer said stop (Meta's timestamp, UTC naive); None: now (an operator, a send).
    # A stop said before the phone's last `optout remove` is not recorded again.
    said_at: datetime | None = None
