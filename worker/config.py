"""Settings from the environment. A bad value fails at start-up naming the variable."""

from __future__ import annotations

import math
import os
import re
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import phonenumbers

from worker.windows import SendWindow, WindowError

DAY = 86_400.0
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
# What an HTTP header value or a URL may carry: visible ASCII, no space, no control character.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]*")


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the variable."""


def check_header_value(variable: str, value: str) -> None:
    """Refuse what aiohttp would refuse (or mangle) in a header or URL, without showing it.

    A token file with two lines keeps its inner line break after `.strip()`; a non-ASCII
    character would be sent as UTF-8 bytes no server expects.
    """
    if _HEADER_SAFE.fullmatch(value) is None:
        position = next(i for i, ch in enumerate(value) if _HEADER_SAFE.fullmatch(ch) is None)
        raise ConfigError(
            f"{variable} must be printable ASCII without spaces, line breaks or control characters"
            f" (offending character at position {position + 1})"
        )


@dataclass(frozen=True, slots=True)
class DatabaseURL:
    host: str
    port: int
    user: str
    password: str = field(repr=False)
    database: str

    @classmethod
    def parse(cls, raw: str, variable: str = "WORKER_DATABASE_URL") -> DatabaseURL:
        parts = urlsplit(raw)
        if parts.scheme not in ("mysql", "mariadb"):
            raise ConfigError(f"{variable} must start with mysql://, got scheme {parts.scheme!r}")
        database = parts.path.lstrip("/")
        if not parts.hostname or not database:
            raise ConfigError(f"{variable} must look like mysql://user:password@host:port/database")
        try:
            port = parts.port or 3306
        except ValueError:
            raise ConfigError(f"{variable} has an invalid port") from None
        return cls(
            host=parts.hostname,
            port=port,
            user=unquote(parts.username or "root"),
            password=unquote(parts.password or ""),
            database=unquote(database),
        )

    def with_database(self, database: str) -> DatabaseURL:
        return DatabaseURL(self.host, self.port, self.user, self.password, database)

    def redacted(self) -> str:
        return f"mysql://{self.user}:***@{self.host}:{self.port}/{self.database}"


# What a customer replies, taps or selects to say stop (text, a button's text or payload, an
# interactive reply's id or title), compared whole after folding case, accents, width and the
# punctuation or emoji around it. Meta's own marketing button says "Stop promotions".
OPTOUT_KEYWORDS = ("BAJA", "STOP", "CANCELAR", "UNSUBSCRIBE", "STOP PROMOTIONS", "STOP_PROMOTIONS")


# Bytes the receiver's bodies may hold before their signature is checked: 16 bodies of the
# largest size at once, thousands of Meta's usual few-KiB ones.
UNVERIFIED_BYTES = 16 * 1_048_576


@dataclass(frozen=True, slots=True)
class LocalFiles:
    """The daemon's files on this host: all `health` reads. No database URL and no secret, so a
    container's HEALTHCHECK or an operator who cannot read them can still run it."""

    pidfile: Path
    db_timeout: float = 15.0  # a loop turn may wait on database calls: the heartbeat's tolerance

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LocalFiles:
        env = os.environ if env is None else env
        reader = _Reader(env)
        return cls(
            pidfile=Path(reader.text("WORKER_PIDFILE", _default_pidfile(env))),
            db_timeout=reader.number("WORKER_DB_TIMEOUT", 15.0, minimum=0.5, maximum=600.0),
        )

    @property
    def heartbeat_path(self) -> Path:
        """Touched each time the daemon's loop goes round; read by `health`."""
        return self.pidfile.with_suffix(".heartbeat")

    @property
    def last_exit_path(self) -> Path:
        """Why the last `run` stopped with an error (e.g. the schema needs `migrate`)."""
        return self.pidfile.with_suffix(".last-exit")

    @property
    def heartbeat_max_age(self) -> float:
        """Longest quiet spell of a healthy loop. Its one wait lasts at most 5 s and sends run
        beside it, so only database calls hold it up: one turn makes at most three (recover,
        give back, claim), each bounded by WORKER_DB_TIMEOUT. Plus a wait on each side."""
        return 3 * self.db_timeout + 2 * 5.0


@dataclass(frozen=True, slots=True)
class Settings:
    database: DatabaseURL
    api_url: str = "https://graph.facebook.com/v23.0"
    phone_number_id: str = ""
    access_token: str = field(default="", repr=False)
    # Tokens of other sending numbers (WHATSAPP_ACCESS_TOKEN_<ID>[_FILE]); the default token
    # serves any number without one (a system user's token usually covers the whole account).
    number_tokens: Mapping[str, str] = field(default_factory=dict, repr=False)
    sender: str = "cloud"
    concurrency: int = 32
    max_unwritten: int = 0  # results not yet written before claiming stops; 0: concurrency // 2
    rate_limit: float = 80.0
    poll_interval: float = 1.0
    lease_seconds: float = 300.0
    drain_timeout: float = 30.0
    send_timeout: float = 15.0
    db_timeout: float = 15.0
    ddl_lock_wait: int = 10  # seconds `migrate` waits for a table's metadata lock
    max_attempts: int = 5
    retry_base: float = 5.0
    retry_cap: float = 900.0
    pause_seconds: float = 60.0
    template_pause_seconds: float = 3600.0
    http_keepalive: float = 10.0  # seconds an idle connection to the API is kept; 0 = no reuse
    fleet_beat: float = 1.0  # seconds between beats of this daemon's row in the daemons table
    send_window: SendWindow | None = None  # quiet hours for every session (WORKER_SEND_WINDOW)
    metrics_port: int = 0  # 0: no metrics endpoint
    metrics_host: str = "127.0.0.1"
    log_level: str = "info"
    log_format: str = "auto"
    pidfile: Path = Path("/run/whatsapp-worker/whatsapp-worker.pid")
    # Unique per process start: containers with a fixed `hostname:` and pid 1, Swarm templates
    # and cloned VMs share host and pid, and the fleet must still count each daemon.
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    )
    # `whatsapp-worker webhook` (status webhooks, opt-outs); the secrets are required there only.
    webhook_host: str = "127.0.0.1"
    webhook_port: int = 8080  # 0: any free port (tests; the port is logged)
    webhook_metrics_port: int = 0  # 0: no metrics endpoint for the receiver
    webhook_max_body: int = 1_048_576  # bytes; a larger POST is refused (413) unread
    webhook_idle_timeout: float = 30.0  # seconds a connection without a request stays open
    webhook_max_connections: int = 1000  # lowered at start to fit the open files limit
    webhook_unverified_bytes: int = UNVERIFIED_BYTES  # bodies read, signature not checked yet
    webhook_max_wait: float = 1.0  # seconds statuses may wait for the database before new POSTs get 503
    verify_token: str = field(default="", repr=False)
    app_secret: str = field(default="", repr=False)
    optout_keywords: tuple[str, ...] = OPTOUT_KEYWORDS
    send_states: tuple[str, ...] = ()  # session states of the PHP application's whose rows are sent too
    default_country: str | None = None  # ISO region (PE) of phones written without a country code
    undeliverable_days: float = 30.0  # how long a 131026 phone is not sent to from that number; 0: off

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, need_sender: bool = True) -> Settings:
        """Read every variable; `need_sender=False` skips the API credentials (for `migrate`)."""
        env = os.environ if env is None else env
        reader = _Reader(env)
        files = LocalFiles.from_env(env)
        sender = reader.choice("WORKER_SENDER", "cloud", ("cloud", "sandbox"))
        max_body = reader.integer("WORKER_WEBHOOK_MAX_BODY", 1_048_576, minimum=1024, maximum=64 * 1_048_576)
        settings = cls(
            database=DatabaseURL.parse(reader.required_secret("WORKER_DATABASE_URL")),
            api_url=reader.url("WHATSAPP_API_URL", "https://graph.facebook.com/v23.0"),
            phone_number_id=reader.digits("WHATSAPP_PHONE_NUMBER_ID"),
            access_token=reader.header_secret("WHATSAPP_ACCESS_TOKEN"),
            number_tokens=reader.number_tokens("WHATSAPP_ACCESS_TOKEN_"),
            sender=sender,
            concurrency=reader.integer("WORKER_CONCURRENCY", 32, minimum=1, maximum=10_000),
            max_unwritten=reader.integer("WORKER_MAX_UNWRITTEN", 0, minimum=0, maximum=10_000),
            rate_limit=reader.number("WORKER_RATE_LIMIT", 80.0, minimum=0.0, maximum=10_000.0),
            poll_interval=reader.number("WORKER_POLL_INTERVAL", 1.0, minimum=0.01, maximum=3600.0),
            lease_seconds=reader.number("WORKER_LEASE_SECONDS", 300.0, minimum=1.0, maximum=DAY),
            drain_timeout=reader.number("WORKER_DRAIN_TIMEOUT", 30.0, minimum=0.0, maximum=3600.0),
            send_timeout=reader.number("WORKER_SEND_TIMEOUT", 15.0, minimum=0.1, maximum=600.0),
            db_timeout=files.db_timeout,
            ddl_lock_wait=reader.integer("WORKER_DDL_LOCK_WAIT", 10, minimum=1, maximum=3600),
            max_attempts=reader.integer("WORKER_MAX_ATTEMPTS", 5, minimum=1, maximum=1000),
            retry_base=reader.number("WORKER_RETRY_BASE", 5.0, minimum=0.0, maximum=DAY),
            retry_cap=reader.number("WORKER_RETRY_CAP", 900.0, minimum=0.0, maximum=DAY),
            pause_seconds=reader.number("WORKER_PAUSE_SECONDS", 60.0, minimum=0.1, maximum=DAY),
            template_pause_seconds=reader.number(
                "WORKER_TEMPLATE_PAUSE_SECONDS", 3600.0, minimum=1.0, maximum=7 * DAY
            ),
            http_keepalive=reader.number("WORKER_HTTP_KEEPALIVE", 10.0, minimum=0.0, maximum=300.0),
            fleet_beat=reader.number("WORKER_FLEET_BEAT", 1.0, minimum=0.1, maximum=10.0),
            send_window=reader.window("WORKER_SEND_WINDOW", "WORKER_TIME_ZONE"),
            metrics_port=reader.integer("WORKER_METRICS_PORT", 0, minimum=0, maximum=65535),
            metrics_host=reader.text("WORKER_METRICS_HOST", "127.0.0.1"),
            log_level=reader.choice("WORKER_LOG_LEVEL", "info", LOG_LEVELS),
            log_format=reader.choice("WORKER_LOG_FORMAT", "auto", LOG_FORMATS),
            pidfile=files.pidfile,
            webhook_host=reader.text("WORKER_WEBHOOK_HOST", "127.0.0.1"),
            webhook_port=reader.integer("WORKER_WEBHOOK_PORT", 8080, minimum=0, maximum=65535),
            webhook_metrics_port=reader.integer("WORKER_WEBHOOK_METRICS_PORT", 0, minimum=0, maximum=65535),
            webhook_max_body=max_body,
            webhook_idle_timeout=reader.number(
                "WORKER_WEBHOOK_IDLE_TIMEOUT", 30.0, minimum=1.0, maximum=3600.0
            ),
            webhook_max_connections=reader.integer(
                "WORKER_WEBHOOK_MAX_CONNECTIONS", 1000, minimum=1, maximum=1_000_000
            ),
            webhook_unverified_bytes=reader.integer(  # by default room for one largest body at least
                "WORKER_WEBHOOK_UNVERIFIED_BYTES",
                max(UNVERIFIED_BYTES, max_body),
                minimum=1024,
                maximum=1024 * 1_048_576,
            ),
            webhook_max_wait=reader.number("WORKER_WEBHOOK_MAX_WAIT", 1.0, minimum=0.01, maximum=60.0),
            verify_token=reader.secret("WHATSAPP_VERIFY_TOKEN"),
            app_secret=reader.secret("WHATSAPP_APP_SECRET"),
            optout_keywords=reader.words("WORKER_OPTOUT_KEYWORDS", OPTOUT_KEYWORDS),
            send_states=reader.words("WORKER_SEND_STATES", ()),
            default_country=reader.country("WORKER_DEFAULT_COUNTRY"),
            undeliverable_days=reader.number("WORKER_UNDELIVERABLE_DAYS", 30.0, minimum=0.0, maximum=3650.0),
        )
        settings._check(need_sender=need_sender)
        return settings

    def _check(self, *, need_sender: bool) -> None:
        """What no single variable says: the sender's credentials, the lease against the timeout,
        the receiver's unverified-bytes budget against its largest body."""
        if need_sender and self.sender == "cloud":
            if not self.phone_number_id:
                raise ConfigError("WHATSAPP_PHONE_NUMBER_ID must be set to the sending number's id")
            if not self.access_token:
                raise ConfigError(
                    "WHATSAPP_ACCESS_TOKEN or WHATSAPP_ACCESS_TOKEN_FILE must be set for the cloud sender"
                )
        if self.webhook_unverified_bytes < self.webhook_max_body:  # one largest body must fit
            raise ConfigError(
                "WORKER_WEBHOOK_UNVERIFIED_BYTES must be at least WORKER_WEBHOOK_MAX_BODY "
                f"({self.webhook_unverified_bytes} < {self.webhook_max_body})"
            )
        if self.lease_seconds <= self.send_timeout * 2:
            raise ConfigError(
                "WORKER_LEASE_SECONDS must be more than twice WORKER_SEND_TIMEOUT "
                f"({self.lease_seconds:g} <= 2 x {self.send_timeout:g})"
            )

    @property
    def files(self) -> LocalFiles:
        """The files `health` reads, named in one place for the daemon that writes them."""
        return LocalFiles(self.pidfile, self.db_timeout)

    @property
    def heartbeat_path(self) -> Path:
        return self.files.heartbeat_path

    @property
    def last_exit_path(self) -> Path:
        return self.files.last_exit_path

    @property
    def unwritten_cap(self) -> int:
        """Results held in memory, not yet written, before the loop stops claiming."""
        return self.max_unwritten or max(1, self.concurrency // 2)

    def token_for(self, number: str) -> str:
        return self.number_tokens.get(number, self.access_token)

    def secrets(self) -> tuple[str, ...]:
        """Strings the logs must never show."""
        candidates = (
            self.access_token,
            self.database.password,
            self.app_secret,
            self.verify_token,
            *self.number_tokens.values(),
        )
        return tuple(s for s in candidates if len(s) >= 4)


def _default_pidfile(env: Mapping[str, str]) -> str:
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]  # set by systemd's RuntimeDirectory=
    return f"{runtime or '/run/whatsapp-worker'}/whatsapp-worker.pid"


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def _get(self, name: str) -> str | None:
        value = self._env.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def required(self, name: str) -> str:
        value = self._get(name)
        if value is None:
            raise ConfigError(f"{name} is not set")
        return value

    def required_secret(self, name: str) -> str:
        value = self.secret(name)
        if not value:
            raise ConfigError(f"{name} (or {name}_FILE) is not set")
        return value

    def text(self, name: str, default: str) -> str:
        return self._get(name) or default

    def digits(self, name: str) -> str:
        """Empty when unset; otherwise ASCII digits only (it becomes part of the request URL)."""
        value = self._get(name) or ""
        if value and not (value.isascii() and value.isdigit()):
            raise ConfigError(f"{name} must be the sending number's id (digits only), got {value!r}")
        return value

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = (self._get(name) or default).lower()
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def url(self, name: str, default: str) -> str:
        value = self._get(name) or default
        # urlsplit silently drops tabs and line breaks: check the raw text as well.
        if _HEADER_SAFE.fullmatch(value) is None:
            raise ConfigError(f"{name} must be an http(s) URL of printable ASCII, got {value!r}")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise ConfigError(f"{name} must be an http(s) URL, got {value!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{name} must be an http(s) URL, got {value!r}")
        return value.rstrip("/")

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        raw = self._get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
        if not minimum <= value <= maximum:
            raise ConfigError(f"{name} must be between {minimum} and {maximum}, got {value}")
        return value

    def number(self, name: str, default: float, *, minimum: float, maximum: float) -> float:
        raw = self._get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if math.isnan(value) or not minimum <= value <= maximum:  # NaN compares false anyway
            raise ConfigError(f"{name} must be a number between {minimum:g} and {maximum:g}, got {raw!r}")
        return value

    def window(self, name: str, zone_name: str) -> SendWindow | None:
        raw = self._get(name)
        if raw is None or not raw.strip():
            return None
        try:
            return SendWindow.parse(raw, self._get(zone_name))
        except WindowError as exc:
            raise ConfigError(f"{name} / {zone_name}: {exc}") from None

    def country(self, name: str) -> str | None:
        """An ISO 3166 region code that phone numbering knows (PE, MX, BR...), or None."""
        raw = self._get(name)
        if raw is None or not raw.strip():
            return None
        code = raw.strip().upper()
        if code not in phonenumbers.SUPPORTED_REGIONS:
            raise ConfigError(f"{name} must be a two-letter country code such as PE or MX, got {raw!r}")
        return code

    def words(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """A comma-separated list (e.g. opt-out keywords); blanks dropped, at least one word."""
        raw = self._get(name)
        if raw is None:
            return default
        words = tuple(dict.fromkeys(w.strip() for w in raw.split(",") if w.strip()))
        if not words:
            raise ConfigError(f"{name} must list at least one word (comma-separated), got {raw!r}")
        return words

    def number_tokens(self, prefix: str) -> dict[str, str]:
        """`<prefix><digits>` or `<prefix><digits>_FILE`: one token per sending number."""
        pattern = re.compile(re.escape(prefix) + r"(\d+)(?:_FILE)?")
        numbers = sorted({m.group(1) for name in self._env if (m := pattern.fullmatch(name))})
        return {number: self.header_secret(prefix + number) for number in numbers}

    def header_secret(self, name: str) -> str:
        """A secret that goes into an HTTP header: checked without ever being shown."""
        value = self.secret(name)
        source = f"{name}_FILE" if self._get(f"{name}_FILE") is not None else name
        check_header_value(source, value)
        return value

    def secret(self, name: str) -> str:
        """`NAME` or `NAME_FILE` (systemd credentials, docker secrets); never both."""
        direct, path = self._get(name), self._get(f"{name}_FILE")
        if direct and path:
            raise ConfigError(f"set only one of {name} and {name}_FILE")
        if path is None:
            return direct or ""
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE cannot be read: {exc.strerror} ({path})") from None
        if not value:
            raise ConfigError(f"{name}_FILE is empty ({path})")
        return value
