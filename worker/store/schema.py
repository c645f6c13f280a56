"""The target schema: what the daemon and the commands need, table by table.

Table, column and state names of the existing deployment are kept (`sesiones_envio`,
`cola_envios`, `envios_whatsapp`, `estado`...), so the PHP application that enqueues keeps
working. Columns the worker adds are named in English.

One description serves both paths of `whatsapp-worker migrate` (worker/store/migrations.py):
on an empty database it becomes `CREATE TABLE`; on the PHP application's own tables each
missing column is added with the very same definition and each missing key is added, so
both paths end at the same schema.

Legacy duplicates. The PHP era left rows that break keys we need (one phone twice in a
session, several `envios_whatsapp` rows for one `cola_id`). They are kept: `legacy_duplicate`
numbers the later copies of each group (0 for the first row, 1, 2... for the others) and the
unique key includes it. Every row written from now on has `legacy_duplicate = 0`, so the key
is exactly `UNIQUE (sesion_id, telefono)` for it, and `INSERT ... ON DUPLICATE KEY UPDATE`
meets the group's first row. Plain columns: no generated column, same on MySQL and MariaDB.
"""

from __future__ import annotations

from dataclasses import dataclass

TABLE_OPTIONS = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
LEGACY_DUPLICATE = "legacy_duplicate"
LEGACY_DUPLICATE_DDL = "INT UNSIGNED NOT NULL DEFAULT 0"


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    ddl: str  # the definition after the name, used by CREATE TABLE and by ADD COLUMN alike


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    columns: tuple[str, ...]
    unique: bool = False

    @property
    def guarantee(self) -> tuple[str, ...]:
        """The columns a unique key makes unique for rows written from now on."""
        return tuple(c for c in self.columns if c != LEGACY_DUPLICATE)

    def ddl(self) -> str:
        kind = "UNIQUE KEY" if self.unique else "KEY"
        return f"{kind} {self.name} ({', '.join(self.columns)})"


@dataclass(frozen=True, slots=True)
class State:
    """An ENUM column the code writes: the values it needs and the default producers rely on."""

    column: str
    values: tuple[str, ...]
    default: str
    # Whether producers rely on the default: cola_envios' rows are inserted without a state. A
    # session's is not (ours are inserted `activa`): a PHP default such as 'borrador' is kept.
    default_required: bool = True


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    keys: tuple[Key, ...]
    state: State

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    def create(self) -> str:
        lines = [f"{c.name} {c.ddl}" for c in self.columns] + [k.ddl() for k in self.keys]
        body = ",\n    ".join(lines)
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n    {body}\n) {TABLE_OPTIONS}"


def _enum(state: State, *, null: str = "NOT NULL") -> str:
    values = ",".join(f"'{v}'" for v in state.values)
    return f"ENUM({values}) {null} DEFAULT '{state.default}'"


SESSION_STATE = State(
    "estado", ("activa", "pausada", "cancelada", "completada"), "activa", default_required=False
)
ROW_STATE = State("estado", ("pendiente", "procesando", "enviado", "error", "desconocido"), "pendiente")
# envios_whatsapp has no state; this keeps the Table shape uniform (no value is checked).
NO_STATE = State("", (), "")

TEXT = "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
ID = "BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY"

SESIONES_ENVIO = Table(
    "sesiones_envio",
    (
        Column("id", ID),
        Column("nombre", "VARCHAR(191) NOT NULL"),
        Column("estado", _enum(SESSION_STATE)),
        Column("created_at", "DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)"),
        Column(
            "updated_at",
            "DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6)",
        ),
        Column(LEGACY_DUPLICATE, LEGACY_DUPLICATE_DDL),
        # The sending number (Meta's phone_number_id); NULL: the daemon's WHATSAPP_PHONE_NUMBER_ID.
        Column("phone_number_id", "VARCHAR(64) CHARACTER SET ascii NULL"),
        # Quiet hours: rows go out only between these local times ("08:00-20:00") in time_zone
        # (an IANA name; NULL: UTC). NULL window: any time (the daemon's WORKER_SEND_WINDOW).
        Column("send_window", "VARCHAR(11) CHARACTER SET ascii NULL"),
        Column("time_zone", "VARCHAR(64) CHARACTER SET ascii NULL"),
    ),
    (Key("uq_sesiones_envio_nombre", ("nombre", LEGACY_DUPLICATE), unique=True),),
    SESSION_STATE,
)

COLA_ENVIOS = Table(
    "cola_envios",
    (
        Column("id", ID),
        Column("sesion_id", "BIGINT UNSIGNED NOT NULL"),
        Column("cliente_id", "BIGINT NULL"),
        Column("telefono", "VARCHAR(32) NOT NULL"),
        Column("mensaje", "MEDIUMTEXT NOT NULL"),
        Column("estado", _enum(ROW_STATE)),
        Column("attempts", "SMALLINT UNSIGNED NOT NULL DEFAULT 0"),
        # UTC (UTC_TIMESTAMP(6) in all our SQL); NULL means "due at once". A DEFAULT
        # CURRENT_TIMESTAMP would be evaluated in the producer's session time_zone.
        Column("next_attempt_at", "DATETIME(6) NULL DEFAULT NULL"),
        Column("claimed_at", "DATETIME(6) NULL"),
        Column("lease_owner", f"VARCHAR(128) {TEXT} NULL"),
        Column("lease_token", "CHAR(32) CHARACTER SET ascii NULL"),
        Column("lease_expires_at", "DATETIME(6) NULL"),
        Column("wamid", f"VARCHAR(128) {TEXT} NULL"),
        Column("last_error_code", "INT NULL"),
        Column("last_error", f"VARCHAR(1000) {TEXT} NULL"),
        Column("created_at", "DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)"),
        Column(
            "updated_at",
            "DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6)",
        ),
        Column("sent_at", "DATETIME(6) NULL"),
        Column(LEGACY_DUPLICATE, LEGACY_DUPLICATE_DDL),
        # From Meta's status webhooks (UTC): what the campaign owner wants to know.
        Column("delivered_at", "DATETIME(6) NULL"),
        Column("read_at", "DATETIME(6) NULL"),
        # When a status webhook settled this row's unknown outcome (`desconocido`).
        Column("settled_at", "DATETIME(6) NULL"),
        # `attempts` as it was at the last `retry`: attempts are never reset (the row's story),
        # and only those after it count against WORKER_MAX_ATTEMPTS.
        Column("attempts_before_retry", "SMALLINT UNSIGNED NOT NULL DEFAULT 0"),
    ),
    (
        Key("uq_cola_envios_sesion_telefono", ("sesion_id", "telefono", LEGACY_DUPLICATE), unique=True),
        Key("ix_cola_envios_claim", ("estado", "next_attempt_at", "id")),
        # A status without our `cola:<id>` (a send of the PHP era) is matched by its wamid.
        Key("ix_cola_envios_wamid", ("wamid",)),
        # The fair claim: per session, due rows in order, an index range with no filesort.
        Key("ix_cola_envios_session_due", ("estado", "sesion_id", "next_attempt_at", "id")),
        Key("ix_cola_envios_lease", ("estado", "lease_expires_at")),
    ),
    ROW_STATE,
)

ENVIOS_WHATSAPP = Table(
    "envios_whatsapp",
    (
        Column("id", ID),
        Column("cola_id", "BIGINT UNSIGNED NOT NULL"),
        # NULL for history rows of a PHP table that had no such column: never guessed.
        Column("sesion_id", "BIGINT UNSIGNED NULL"),
        Column("cliente_id", "BIGINT NULL"),
        Column("telefono", "VARCHAR(32) NULL"),
        Column("wamid", f"VARCHAR(128) {TEXT} NULL"),
        # Server local time (NOW()), as the PHP application and the runbook read it. No
        # CURRENT_TIMESTAMP default: added to a history table it would date every old row "now"
        # and the runbook query would see the old bug's duplicates as a fresh mass send.
        Column("fecha_envio", "DATETIME NULL DEFAULT NULL"),
        Column(LEGACY_DUPLICATE, LEGACY_DUPLICATE_DDL),
    ),
    (
        Key("uq_envios_whatsapp_cola", ("cola_id", LEGACY_DUPLICATE), unique=True),
        Key("ix_envios_whatsapp_fecha", ("fecha_envio",)),
        Key("ix_envios_whatsapp_cliente", ("cliente_id", "fecha_envio")),
    ),
    NO_STATE,
)

# Tables only whatsapp-worker writes (the PHP application never had them).
UTC = "DATETIME(6) NOT NULL"

DAEMONS = Table(
    "whatsapp_worker_daemons",
    (
        Column("id", ID),
        Column("worker_id", f"VARCHAR(128) {TEXT} NOT NULL"),
        Column("host", f"VARCHAR(255) {TEXT} NOT NULL"),
        Column("pid", "INT UNSIGNED NOT NULL"),
        Column("version", "VARCHAR(32) CHARACTER SET ascii NOT NULL"),
        Column("started_at", UTC),
        Column("beat_at", UTC),  # the daemon's last beat; a row older than the horizon is dead
        Column("state", "VARCHAR(16) CHARACTER SET ascii NOT NULL"),  # sending, paused, draining...
        Column("in_flight", "INT UNSIGNED NOT NULL DEFAULT 0"),
        Column("sent_total", "BIGINT UNSIGNED NOT NULL DEFAULT 0"),
        Column("rate", "DOUBLE NOT NULL DEFAULT 0"),  # sends/s over the last minute
        Column("rate_share", "DOUBLE NOT NULL DEFAULT 0"),  # sends/s this daemon may use now
        Column("paused_reason", f"VARCHAR(1000) {TEXT} NULL"),
        Column("paused_since", "DATETIME(6) NULL"),
        Column("paused_until", "DATETIME(6) NULL"),
        Column("stopped_at", "DATETIME(6) NULL"),
        # Each daemon's own settings, so that the fleet can see a daemon configured differently.
        Column("rate_limit", "DOUBLE NULL"),
        Column("fleet_beat", "DOUBLE NULL"),
    ),
    (
        Key("uq_whatsapp_worker_daemons_worker", ("worker_id",), unique=True),
        Key("ix_whatsapp_worker_daemons_beat", ("beat_at",)),
    ),
    NO_STATE,
)

STATUSES = Table(
    "whatsapp_worker_statuses",
    (
        Column("id", ID),
        Column("wamid", f"VARCHAR(128) {TEXT} NOT NULL"),
        Column("status", "VARCHAR(16) CHARACTER SET ascii NOT NULL"),  # sent, delivered, read, failed
        Column("cola_id", "BIGINT UNSIGNED NULL"),  # from biz_opaque_callback_data `cola:<id>`
        Column("status_at", "DATETIME(6) NULL"),  # Meta's timestamp, UTC
        Column("recipient_id", "VARCHAR(32) NULL"),
        Column("error_code", "INT NULL"),
        Column("error_title", f"VARCHAR(1000) {TEXT} NULL"),
        Column("raw", f"MEDIUMTEXT {TEXT} NOT NULL"),  # the status object as received, for audit
        Column("received_at", "DATETIME(6) NOT NULL"),
        Column("applied_at", "DATETIME(6) NULL"),  # NULL: not yet applied to its row
        # Why applying it was refused (a wamid too long for an adopted column, a trigger): the
        # status is kept and marked applied so that every other status still is.
        Column("apply_error", f"VARCHAR(1000) {TEXT} NULL"),
        # The sending number the status reports on (Meta's `metadata.phone_number_id`): a status
        # of another installation's number never changes our rows.
        Column("phone_number_id", "VARCHAR(64) CHARACTER SET ascii NULL"),
    ),
    (
        Key("uq_whatsapp_worker_statuses", ("wamid", "status"), unique=True),
        Key("ix_whatsapp_worker_statuses_pending", ("applied_at", "id")),
        Key("ix_whatsapp_worker_statuses_cola", ("cola_id",)),
    ),
    NO_STATE,
)

OPTOUTS = Table(
    "whatsapp_worker_optouts",
    (
        Column("id", ID),
        Column("telefono", "VARCHAR(32) NOT NULL"),
        Column("source", "VARCHAR(32) CHARACTER SET ascii NOT NULL"),  # keyword, 131050, operator
        Column("detail", f"VARCHAR(1000) {TEXT} NULL"),
        Column("created_at", "DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)"),
    ),
    (Key("uq_whatsapp_worker_optouts_telefono", ("telefono",), unique=True),),
    NO_STATE,
)

# Every attempt that did not end in `enviado` (a sent row's own `sent_at` and `wamid` tell that
# one), and each `retry` with what the row was before it: `rows --id N` prints the row's story.
# `prune` ages it out with the rows.
ATTEMPTS = Table(
    "whatsapp_worker_attempts",
    (
        Column("id", ID),
        Column("cola_id", "BIGINT UNSIGNED NOT NULL"),
        Column("attempted_at", "DATETIME(6) NOT NULL"),  # UTC
        # retry, error, unknown, paused (what the attempt decided), or requeued (an operator's retry)
        Column("outcome", "VARCHAR(16) CHARACTER SET ascii NOT NULL"),
        Column("state", "VARCHAR(16) CHARACTER SET ascii NULL"),  # the row's state it left (requeued)
        Column("code", "INT NULL"),
        Column("detail", f"VARCHAR(1000) {TEXT} NULL"),
    ),
    (
        Key("ix_whatsapp_worker_attempts_cola", ("cola_id", "id")),
        Key("ix_whatsapp_worker_attempts_at", ("attempted_at",)),
    ),
    NO_STATE,
)

# `pause --all` / `pause --number ID`: scopes no daemon claims for until `resume` (worker/store/holds.py).
HOLDS = Table(
    "whatsapp_worker_holds",
    (
        Column("id", ID),
        Column("scope", "VARCHAR(64) CHARACTER SET ascii NOT NULL"),  # '*' (every number) or a number
        Column("reason", f"VARCHAR(200) {TEXT} NULL"),
        Column("created_at", "DATETIME(6) NOT NULL"),  # UTC
    ),
    (Key("uq_whatsapp_worker_holds_scope", ("scope",), unique=True),),
    NO_STATE,
)

# Phones an operator took off the opt-out list (`optout remove`), and when: a stop the customer
# said before that (Meta retrying an old POST, a captured signed body sent again) is not recorded.
OPTOUT_REMOVALS = Table(
    "whatsapp_worker_optout_removals",
    (
        Column("id", ID),
        Column("telefono", "VARCHAR(32) NOT NULL"),
        Column("removed_at", "DATETIME(6) NOT NULL"),  # UTC
    ),
    (Key("uq_whatsapp_worker_optout_removals_telefono", ("telefono",), unique=True),),
    NO_STATE,
)

# Phones a sending number could not deliver to (131026): not sent to from that number again until
# `expires_at` (WORKER_UNDELIVERABLE_DAYS), instead of failing again in the next campaign.
SUPPRESSIONS = Table(
    "whatsapp_worker_suppressions",
    (
        Column("id", ID),
        Column("phone_number_id", "VARCHAR(64) CHARACTER SET ascii NOT NULL"),
        Column("telefono", "VARCHAR(32) NOT NULL"),
        Column("code", "INT NULL"),
        Column("reason", f"VARCHAR(1000) {TEXT} NULL"),
        Column("expires_at", "DATETIME(6) NOT NULL"),  # UTC
        Column("created_at", "DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)"),
    ),
    (
        Key("uq_whatsapp_worker_suppressions", ("telefono", "phone_number_id"), unique=True),
        Key("ix_whatsapp_worker_suppressions_expires", ("expires_at",)),
    ),
    NO_STATE,
)

# What `prune` deleted, counted per session, outcome and error code in the transaction that
# deleted it, so that `status` tells the same story of a session before and after a prune.
PRUNED = Table(
    "whatsapp_worker_pruned",
    (
        Column("id", ID),
        Column("sesion_id", "BIGINT UNSIGNED NOT NULL"),
        # enviado, error, cancelled, opted_out, suppressed (worker/store/reports.py:outcome_of)
        Column("outcome", "VARCHAR(16) CHARACTER SET ascii NOT NULL"),
        Column("code", "INT NOT NULL"),  # the rows' last_error_code; -1: none (a unique key needs a value)
        Column("pruned_rows", "BIGINT UNSIGNED NOT NULL DEFAULT 0"),
        Column("delivered_rows", "BIGINT UNSIGNED NOT NULL DEFAULT 0"),
        Column("read_rows", "BIGINT UNSIGNED NOT NULL DEFAULT 0"),
        Column("settled_rows", "BIGINT UNSIGNED NOT NULL DEFAULT 0"),
        Column("last_error", f"VARCHAR(1000) {TEXT} NULL"),  # one of the deleted rows' texts
    ),
    (Key("uq_whatsapp_worker_pruned", ("sesion_id", "outcome", "code"), unique=True),),
    NO_STATE,
)

TABLES: tuple[Table, ...] = (
    SESIONES_ENVIO,
    COLA_ENVIOS,
    ENVIOS_WHATSAPP,
    DAEMONS,
    STATUSES,
    ATTEMPTS,
    HOLDS,
    OPTOUTS,
    OPTOUT_REMOVALS,
    SUPPRESSIONS,
    PRUNED,
)

# Rows the PHP cron left mid-send (no lease: the daemon never took them).
LEGACY_PROCESSING_REASON = (
    "procesando before whatsapp-worker adopted this table: may have been sent; not re-sent automatically"
)
LEGACY_COPY_REASON = (
    "a copy of an earlier row of this session for this phone when whatsapp-worker adopted this table:"
    " not sent (it would have been a second message)"
)
EMPTY_STATE_REASON = (
    "estado was empty (an invalid value stored under a non-strict sql_mode) when whatsapp-worker"
    " adopted this table: may have been sent; not re-sent automatically"
)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str


# The version table records what has been done; what to do is read from the tables
# themselves (information_schema), so a migrate interrupted half-way completes on the next run.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "queue tables"),
    Migration(2, "adopt and upgrade in place"),
    Migration(3, "daemons, sending numbers and windows, status webhooks, opt-outs"),
    Migration(4, "InnoDB only, the fleet's settings, refused statuses"),
    Migration(
        5,
        "undeliverable phones, opt-out removals, attempts kept across retry, attempt history, holds,"
        " pruned totals",
    ),
)

VERSION_TABLE = f"""CREATE TABLE IF NOT EXISTS whatsapp_worker_migrations (
    version INT NOT NULL PRIMARY KEY,
    name VARCHAR(200) NOT NULL,
    applied_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) {TABLE_OPTIONS}"""

LATEST = MIGRATIONS[-1].version
