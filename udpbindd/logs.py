"""Logging setup: structlog events as JSON lines, or a console renderer on a terminal.

``configure`` is called once, by the CLI, never on import. Under journald (JOURNAL_STREAM set)
no timestamp is added: the journal stamps every line itself.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog

from udpbindd.config import LogFormat, LogLevel

_LEVELS = {
    LogLevel.DEBUG: logging.DEBUG,
    LogLevel.INFO: logging.INFO,
    LogLevel.WARNING: logging.WARNING,
    LogLevel.ERROR: logging.ERROR,
}


def configure(level: LogLevel, fmt: LogFormat, stream: TextIO | None = None) -> None:
    """Route udpbindd's events to ``stream`` (stderr by default) at ``level``."""
    out = sys.stderr if stream is None else stream
    console = fmt is LogFormat.CONSOLE or (fmt is LogFormat.AUTO and out.isatty())
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if "JOURNAL_STREAM" not in os.environ or console:
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors.append(structlog.processors.format_exc_info)
    processors.append(
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
