"""structlog set-up: JSON lines for journald/docker, a readable console on a terminal.

Tracebacks never carry local variables (they would hold tokens and phone numbers), and every
rendered line passes through a redactor that blanks the configured secrets.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

REDACTED = "***"


class _Redactor:
    """Final processor: replaces secrets anywhere in the rendered line, tracebacks included."""

    def __init__(self, renderer: Any, secrets: Iterable[str]) -> None:
        self._renderer = renderer
        self._secrets = tuple(s for s in secrets if s)

    def __call__(self, logger: WrappedLogger, name: str, event: EventDict) -> str:
        line: str = self._renderer(logger, name, event)
        for secret in self._secrets:
            if secret in line:
                line = line.replace(secret, REDACTED)
        return line


def configure(*, secrets: Iterable[str] = (), stream: TextIO | None = None, fmt: str | None = None) -> None:
    stream = stream or sys.stdout
    fmt = (fmt or os.environ.get("WORKER_LOG_FORMAT") or "auto").lower()
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    level_name = os.environ.get("WORKER_LOG_LEVEL", "info").upper()
    level = logging.getLevelNamesMapping().get(level_name, logging.INFO)
    renderer: Any
    if as_json:
        renderer = structlog.processors.JSONRenderer()
        exceptions: list[Any] = [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        ]
    else:
        renderer = structlog.dev.ConsoleRenderer(
            exception_formatter=structlog.dev.plain_traceback, sort_keys=False, colors=stream.isatty()
        )
        exceptions = []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *exceptions,
            _Redactor(renderer, secrets),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


def get_logger(**context: Any) -> Any:
    return structlog.get_logger("whatsapp-worker").bind(**context)
