"""structlog set-up: configure once at start, human-readable on a terminal, JSON otherwise."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(level: str | None = None, *, json: bool | None = None) -> None:
    """Configure structlog for this process.

    ``json`` defaults to "not a terminal", so services under a supervisor log one JSON object
    per line, while a person at a shell sees aligned, coloured lines.
    """
    level_name = (level or os.environ.get("FEDJET_LOG_LEVEL", "info")).upper()
    numeric = logging.getLevelNamesMapping().get(level_name, logging.INFO)
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
