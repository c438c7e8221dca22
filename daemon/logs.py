"""Structured logging: one JSON object per line on stdout, journald-friendly.

The protocols log through ``twisted.logger`` (they know nothing of structlog); this module
bridges those events into structlog so that everything leaves the process in one format.
Keys that could carry a secret are redacted on the way out, whatever logged them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)
from zope.interface import provider

SECRET_KEYS = frozenset(
    {"code", "activation_code", "password", "auth_password", "authPassword", "private_key", "key"}
)
_LEVELS = {
    LogLevel.debug: "debug",
    LogLevel.info: "info",
    LogLevel.warn: "warning",
    LogLevel.error: "error",
    LogLevel.critical: "critical",
}


def _redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in SECRET_KEYS.intersection(event):
        event[key] = "[redacted]"
    return event


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Send structlog and Twisted's log events to ``stream`` as JSON lines."""
    out = stream or sys.stdout
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(default=str, sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    predicate = LogLevelFilterPredicate(
        defaultLogLevel=LogLevel.levelWithName("warn" if level == "warning" else level)
    )
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(twisted_to_structlog, [predicate])],
        discardBuffer=True,
        redirectStandardIO=False,
    )


@provider(ILogObserver)
def twisted_to_structlog(event: dict[str, Any]) -> None:
    """Re-emit one ``twisted.logger`` event through structlog, keeping its fields."""
    level = _LEVELS.get(event.get("log_level", LogLevel.info), "info")
    fields: dict[str, Any] = {
        key: value
        for key, value in event.items()
        if not key.startswith("log_")
        and key not in ("format", "message", "isError", "system", "time")
    }
    namespace = event.get("log_namespace")
    if namespace:
        fields["logger"] = namespace
    failure = event.get("log_failure")
    if failure is not None:
        fields["exception"] = failure.getTraceback()
    message = formatEvent(event) if event.get("log_format") else ""
    getattr(structlog.get_logger(), level)(message or "twisted", **fields)


def get_logger(name: str) -> Any:
    return structlog.get_logger(logger_name=name)
