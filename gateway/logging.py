"""structlog set-up: JSON lines on stdout, dotted event names, ids only.

Never pass PHI (names, birth dates, phones, emails, addresses, answers), payloads, FHIR
resources, HL7 segments, response bodies, ``str(httpx error)`` (it holds the URL) or
``str(ValidationError)`` (it holds the input) to a logger. Log ids: ``message_id``,
``delivery_id``, ``target``, ``resource_type``, ``attempt``, ``status_code``.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _stdout_logger(*_args: object) -> structlog.PrintLogger:
    """A structlog logger that prints to whatever ``sys.stdout`` is now."""
    return structlog.PrintLogger(sys.stdout)


def configure_logging(level: str = "info", *, json: bool = True) -> None:
    """Configure structlog and the standard library root logger (uvicorn, alembic)."""
    numeric = _LEVELS.get(level, logging.INFO)
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # sys.stdout is looked up on every call, not bound once: a stream swapped
        # after configuration (a test runner's capture, a daemon's redirect) is
        # followed instead of writing to a closed file.
        logger_factory=_stdout_logger,
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(
        level=numeric, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s"
    )
    # httpx logs full request URLs (with query strings) at INFO: keep it quiet.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # aiosqlite logs every statement with its parameters (names, birth dates, whole
    # resources) at DEBUG: never let GATEWAY_LOG_LEVEL=debug turn that on.
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger named ``name``."""
    return structlog.get_logger(name)  # type: ignore[no-any-return]


def log_failure(logger: Any, event: str, exc: BaseException, **ids: Any) -> None:
    """Log an unexpected exception by type and stack frames, without its message.

    Exception messages can carry PHI (a ``KeyError`` naming a value, a driver error
    quoting a row), so only ``error_type`` and the traceback frames (file, line, function,
    source line) are logged, with the ids given.
    """
    frames = "".join(traceback.format_tb(exc.__traceback__))[-4000:]
    logger.error(event, error_type=type(exc).__name__, frames=frames, **ids)
