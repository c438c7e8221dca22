"""Structured logging: one JSON object per line on stdout, journald-friendly.

The protocols log through ``twisted.logger`` (they know nothing of structlog); this module
bridges those events into structlog so that everything leaves the process in one format.
Keys that could carry a secret are redacted on the way out, whatever logged them.

Under systemd (stdout is the journal stream named by ``JOURNAL_STREAM``) every line starts
with a ``<N>`` syslog priority, which journald strips and records as the entry's
``PRIORITY=``, so ``journalctl -p warning`` works. ``console`` format is for humans at a
terminal. Twisted's own start-up chatter ("Starting protocol <… object at 0x…>") is dropped.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from twisted.logger import (
    ILogObserver,
    LogLevel,
    formatEvent,
    globalLogBeginner,
)
from zope.interface import implementer, provider

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


LOG_FORMATS = ("json", "console")

# A file a phone asks for by its own name (CTLSEP…tlv, ITLSEP…tlv, SEP….cnf.xml[.sgn]).
_DEVICE_IN_FILE = re.compile(r"(?:^|/|ctl|itl)(sep[0-9a-f]{12})\.", re.IGNORECASE)


def _device_from_file(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """``device=SEP…`` on a transfer of a phone's own file, so one grep tells its story."""
    if "device" not in event:
        name = event.get("file")
        match = _DEVICE_IN_FILE.search(name) if isinstance(name, str) else None
        if match is not None:
            event["device"] = match.group(1).upper()
    return event


_LEVEL_OF_METHOD = {"warn": "warning", "exception": "error"}  # structlog's add_log_level
_second_text: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def utc_timestamp(ns: int) -> str:
    """``datetime.fromtimestamp(ns / 1e9, UTC).isoformat()`` ending in ``Z`` (microseconds
    truncated, none shown when they are 0), as structlog's ISO ``TimeStamper`` writes it.

    The date and time of day are formatted once a second; a line adds its microseconds.
    """
    global _second_text
    second, micro = divmod(ns // 1000, 1_000_000)
    cached = _second_text
    if cached[0] != second:
        cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        _second_text = cached  # one assignment: another thread sees the old pair or this one
    return f"{cached[1]}.{micro:06d}Z" if micro else f"{cached[1]}Z"


def _finish_event(
    logger: Any, name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Level, UTC timestamp, ``device``, redaction and exception text, in one processor.

    The keys and their order are those of structlog's ``add_log_level``,
    ``TimeStamper(fmt="iso", utc=True)``, :func:`_device_from_file`, :func:`_redact` and
    ``format_exc_info`` in a row; one call per line instead of five.
    """
    event["level"] = _LEVEL_OF_METHOD.get(name, name)
    event["timestamp"] = utc_timestamp(time.time_ns())
    if "device" not in event:
        _device_from_file(logger, name, event)
    if not SECRET_KEYS.isdisjoint(event):  # no set made for the lines with no secret
        _redact(logger, name, event)
    if "exc_info" in event:
        structlog.processors.format_exc_info(logger, name, event)
    return event


# syslog(3) priorities, as journald reads them from a "<N>" line prefix.
SYSLOG_PRIORITIES = {
    "critical": 2,
    "error": 3,
    "exception": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
}

Renderer = Callable[[Any, str, MutableMapping[str, Any]], str | bytes]


def journal_stream(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` is the journal stream systemd connected us to.

    ``JOURNAL_STREAM`` is ``DEVICE:INODE`` of that stream; comparing it with the stream's
    own ``fstat`` (as ``sd_journal_stream_fd`` users are told to) means a redirected stdout
    (``callboard serve > file`` under a unit, a pipe into another tool) gets no prefixes.
    """
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        status = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def with_priority_prefix(renderer: Renderer) -> Renderer:
    """Wrap a renderer so each output line starts with ``<N>`` for the event's level.

    Every line, not just the first: a console-format traceback spans several, and journald
    reads the prefix per line.
    """

    def render(logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        priority = SYSLOG_PRIORITIES.get(str(event.get("level", name)), 6)
        rendered = renderer(logger, name, event)
        text = rendered.decode() if isinstance(rendered, bytes) else rendered
        return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))

    return render


class _JSONLines:
    """``json.JSONEncoder(default=str).encode`` for a dict, without building its C encoder
    again for every line (``encode`` makes one per call: a fifth of a line's rendering).

    One encoder per thread: its circular-reference marks are its own.
    """

    def __init__(self) -> None:
        self._general = json.JSONEncoder(default=str)
        self._local = threading.local()

    @staticmethod
    def _build() -> Any:
        make = json.encoder.c_make_encoder  # type: ignore[attr-defined]
        if make is None:  # no C accelerator: the general encoder
            return None
        # Its arguments as JSONEncoder.iterencode passes them: circular check (markers),
        # default, ASCII strings, no indent, ": " and ", ", unsorted, no skipping, NaN allowed.
        # ``c_make_encoder`` is the json module's own, not a public API: one that does not
        # take these arguments or encode like the general one is not used.
        ascii_strings = json.encoder.encode_basestring_ascii
        probe = {"a": [1, "é", None], "b": object}
        try:
            encode = make({}, str, ascii_strings, None, ": ", ", ", False, False, True)
            if "".join(encode(probe, 0)) != json.JSONEncoder(default=str).encode(probe):
                return None
        except Exception:
            return None
        return encode

    def __call__(self, event: MutableMapping[str, Any]) -> str:
        local = self._local
        encode = getattr(local, "encode", None)
        if encode is None:
            encode = local.encode = self._build()
        if encode is None or type(event) is not dict:
            return self._general.encode(event)
        try:
            return "".join(encode(event, 0))
        except BaseException:
            local.encode = None  # a failed encoding may leave its circular-check marks behind
            raise


_JSON = _JSONLines()


def render_json(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> str:
    """One JSON line, as structlog's ``JSONRenderer(default=str)`` writes it."""
    return _JSON(event)


def make_renderer(log_format: str, *, journal: bool, colors: bool = False) -> Renderer:
    """The final processor: JSON lines or the console format, prefixed for journald."""
    if log_format == "json":
        renderer: Renderer = render_json
    elif log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=colors and not journal)
    else:
        raise ValueError(f"log format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
    return with_priority_prefix(renderer) if journal else renderer


class LineWriter:
    """Writes each rendered event as one line, under a lock that the same thread may take again.

    structlog's ``PrintLogger`` holds a plain lock while it writes. Twisted logs from its
    SIGTERM handler, and Python runs a signal handler on the main thread between two
    bytecodes, perhaps inside that very write: the handler then waited for a lock its own
    thread held, and the daemon hung instead of stopping. Here the lock is re-entrant and the
    line goes out in one ``write`` call (no bytecode runs inside it), so a line logged by a
    handler comes whole, after the one it interrupted.
    """

    _locks: dict[int, threading.RLock] = {}

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._lock = self._locks.setdefault(id(file), threading.RLock())

    def msg(self, message: str) -> None:
        with self._lock:
            self._file.write(message + "\n")
            self._file.flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class LineWriterFactory:
    """structlog's logger factory for :class:`LineWriter` on one stream."""

    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> LineWriter:
        return LineWriter(self._file)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def configure_logging(
    level: str = "info",
    stream: TextIO | None = None,
    *,
    log_format: str = "json",
    journal: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Send structlog and Twisted's log events to ``stream`` (JSON lines by default).

    ``journal=None`` detects journald from ``JOURNAL_STREAM`` (see :func:`journal_stream`);
    ``log_format="console"`` renders for a human (coloured only on a terminal).
    """
    out = stream or sys.stdout
    if journal is None:
        journal = journal_stream(out, environ)
    renderer = make_renderer(log_format, journal=journal, colors=_is_terminal(out))
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _finish_event,
        renderer,
    ]
    lowest = _LEVEL_NUMBERS[level.lower()]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lowest),
        logger_factory=LineWriterFactory(out),
        cache_logger_on_first_use=True,
    )
    global _sink  # where Twisted's events go out (see where it is defined)
    _sink = _Sink(processors, LineWriter(out), lowest)
    globalLogBeginner.beginLoggingTo(
        [TwistedLevelFilter(level, twisted_to_structlog)],
        discardBuffer=True,
        redirectStandardIO=False,
    )


# Twisted's notes that it started or stopped a factory or protocol: an object repr each, no
# information. Dropped.
_CHATTER_FORMATS = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})
_CHATTER_TEXT = re.compile(r"^(Starting|Stopping) (protocol|factory) ")
# Its notes that a port opened or closed: the daemon announces its listeners itself, so these
# are kept for --log-level debug only.
_PORT_TEXT = re.compile(r"^(\S.* starting on \S.*|\((TCP |UDP |UNIX )?Port \S.* Closed\))$")


def twisted_chatter(event: Mapping[str, Any]) -> str | None:
    """``"drop"`` for Twisted's start/stop chatter, ``"debug"`` for port notes, else None."""
    log_format = event.get("log_format")
    if log_format in _CHATTER_FORMATS:
        return "drop"
    if event.get("log_namespace") != "log_legacy" or not log_format:
        return None
    text = formatEvent(dict(event))
    if _CHATTER_TEXT.match(text):
        return "drop"
    if _PORT_TEXT.match(text):
        return "debug"
    return None


_TWISTED_OWN_KEYS = frozenset({"format", "message", "isError", "system", "time"})


class _KeptKeys(dict[str, bool]):
    """Event keys → whether a line shows them (not ``log_*``, not Twisted's own): the few
    dozen names events use, each judged once, on first sight."""

    def __missing__(self, key: str) -> bool:
        kept = not key.startswith("log_") and key not in _TWISTED_OWN_KEYS
        if len(self) < 4096:
            self[key] = kept
        return kept


_KEPT_KEYS = _KeptKeys()


def event_text(event: Mapping[str, Any]) -> str:
    """The event's message, as Twisted's ``formatEvent`` writes it, for less.

    ``formatEvent`` wraps every field in a proxy (for its ``{name()}`` call syntax) and runs
    ``string.Formatter`` in Python: a third of the cost of an info line. ``str.format_map``
    gives the same text for every format without that syntax; anything it cannot do
    (``{name()}``, a missing key, a flattened or bytes format) goes to ``formatEvent``.
    """
    log_format = event.get("log_format")
    if log_format is None:
        return ""
    if type(log_format) is str and "log_flattened" not in event:
        try:
            return log_format.format_map(event)
        except Exception:  # formatEvent does it, or says why it cannot
            pass
    return formatEvent(dict(event))


@implementer(ILogObserver)
class TwistedLevelFilter:
    """Pass on the Twisted events at ``level`` or above that name a namespace.

    The rule of Twisted's ``LogLevelFilterPredicate`` with one namespace-wide level (the
    daemon sets no other), as a set lookup: that predicate splits and joins the namespace
    and compares levels in Python for every event.
    """

    def __init__(self, level: str, observer: Callable[[dict[str, Any]], None]) -> None:
        lowest = LogLevel.levelWithName("warn" if level == "warning" else level)
        self._levels = frozenset(each for each in LogLevel.iterconstants() if each >= lowest)
        self._observer = observer

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_level") in self._levels and event.get("log_namespace"):
            self._observer(event)


Processor = Callable[[Any, str, MutableMapping[str, Any]], Any]
_LEVEL_NUMBERS = {name.lower(): number for name, number in logging.getLevelNamesMapping().items()}
_LEVEL_NUMBERS.update(warn=logging.WARNING, exception=logging.ERROR)


class _Sink:
    """The configured processor chain and output, for events that need no structlog logger.

    What a structlog logger does with ``log.info("text", **fields)`` -- drop it below the
    level, add ``event``, run the processors, write the line -- without the lazy proxy, the
    bound logger and its context copy: a third of the cost of a Twisted event's line.
    """

    def __init__(self, processors: list[Processor], writer: LineWriter, lowest: int) -> None:
        self._processors = processors
        self._writer = writer
        self._lowest = lowest

    def emit(self, method: str, text: str, fields: dict[str, Any]) -> None:
        """One line, as a structlog logger's ``method(text, **fields)`` writes it."""
        if _LEVEL_NUMBERS[method] < self._lowest:
            return
        fields["event"] = text
        event: Any = fields
        writer = self._writer
        for processor in self._processors:
            event = processor(writer, method, event)
        writer.msg(event)


@provider(ILogObserver)
def twisted_to_structlog(event: dict[str, Any]) -> None:
    """Re-emit one ``twisted.logger`` event through structlog's processors, keeping its
    fields (an ``event`` field gives way to the message, which structlog calls ``event``)."""
    chatter = twisted_chatter(event)
    if chatter == "drop":
        return
    level = "debug" if chatter == "debug" else _LEVELS.get(event.get("log_level"), "info")
    kept = _KEPT_KEYS
    fields: dict[str, Any] = {key: value for key, value in event.items() if kept[key]}
    namespace = event.get("log_namespace")
    if namespace:
        fields["logger"] = namespace
    failure = event.get("log_failure")
    if failure is not None:
        fields["exception"] = failure.getTraceback()
    fields.pop("event", None)  # the message takes its place, last, as structlog puts it
    _sink.emit(level, event_text(event) or "twisted", fields)


# Where Twisted's events go out: set again by configure_logging; until then, structlog's
# default chain (as the events went before any configuration).
_sink = _Sink(list(structlog.get_config()["processors"]), LineWriter(sys.stdout), 0)


def get_logger(name: str) -> Any:
    return structlog.get_logger(logger_name=name)
