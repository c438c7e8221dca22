"""Logging: journald priority prefixes, the console format, and no Twisted start-up chatter."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from callboard.daemon.logs import (
    journal_stream,
    make_renderer,
    twisted_chatter,
    with_priority_prefix,
)
from twisted.internet import protocol, reactor
from twisted.logger import formatEvent, globalLogPublisher

# -- journald detection -----------------------------------------------------------------------


def test_journal_stream_matches_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "out", "w") as out:
        st = os.fstat(out.fileno())
        assert journal_stream(out, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        # Set, but for another stream (stdout was redirected): no prefixes.
        assert not journal_stream(out, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not journal_stream(out, {})
        for bad in ("", "x:y", "12", f"{st.st_dev}:", f":{st.st_ino}"):
            assert not journal_stream(out, {"JOURNAL_STREAM": bad})
    assert not journal_stream(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


# -- renderers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "priority"),
    [("debug", 7), ("info", 6), ("warning", 4), ("error", 3), ("critical", 2)],
)
def test_json_lines_carry_the_syslog_priority(level: str, priority: int) -> None:
    render = make_renderer("json", journal=True)
    line = render(None, level, {"event": "hello", "level": level, "device": "SEP00AABBCCDDEE"})
    assert isinstance(line, str)
    prefix = f"<{priority}>"
    assert line.startswith(prefix)
    assert json.loads(line.removeprefix(prefix)) == {
        "event": "hello",
        "level": level,
        "device": "SEP00AABBCCDDEE",
    }


def test_without_journal_json_is_unprefixed() -> None:
    line = make_renderer("json", journal=False)(None, "info", {"event": "x", "level": "info"})
    assert isinstance(line, str) and json.loads(line) == {"event": "x", "level": "info"}


def test_every_line_of_a_multiline_event_is_prefixed() -> None:
    render = with_priority_prefix(lambda _l, _n, e: f"{e['event']}\nTraceback\n  line")
    assert render(None, "error", {"event": "boom", "level": "error"}) == (
        "<3>boom\n<3>Traceback\n<3>  line"
    )


def test_console_format_is_for_people() -> None:
    render = make_renderer("console", journal=False, colors=False)
    line = render(None, "warning", {"event": "lockout", "level": "warning", "device": "SEP1"})
    assert isinstance(line, str)
    assert "lockout" in line and "device=SEP1" in line and "warning" in line
    assert not line.lstrip().startswith("{") and "\x1b[" not in line
    journal = make_renderer("console", journal=True, colors=True)(
        None, "warning", {"event": "lockout", "level": "warning"}
    )
    assert isinstance(journal, str)
    assert journal.startswith("<4>") and "\x1b[" not in journal  # no colours into the journal


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format 'xml'"):
        make_renderer("xml", journal=False)


# -- Twisted's chatter, as Twisted itself emits it ---------------------------------------------


@pytest.fixture
def twisted_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


class Noisy(protocol.DatagramProtocol):
    noisy = True


def test_chatter_is_recognised(twisted_events: list[dict[str, Any]]) -> None:
    factory = protocol.Factory()
    factory.noisy = True
    factory.doStart()
    factory.doStop()
    udp = reactor.listenUDP(0, Noisy(), interface="127.0.0.1")  # type: ignore[attr-defined]
    udp.stopListening()
    tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    tcp.stopListening()
    verdicts = {twisted_chatter(e) for e in twisted_events}
    texts = [(twisted_chatter(e), str(e.get("log_format"))) for e in twisted_events]
    assert "drop" in verdicts and "debug" in verdicts, texts
    for event in twisted_events:
        text = formatEvent(event)
        if text.startswith(("Starting ", "Stopping ")):
            assert twisted_chatter(event) == "drop", text
        elif " starting on " in text or text.endswith("Closed)"):
            assert twisted_chatter(event) == "debug", text


def test_ordinary_events_are_not_chatter() -> None:
    ours = {"log_format": "tftp {file} ok", "log_namespace": "callboard.x", "file": "a"}
    assert twisted_chatter(ours) is None
    legacy = {"log_namespace": "log_legacy", "log_format": "{log_text}"}
    assert twisted_chatter({**legacy, "log_text": "Received SIGTERM, shutting down."}) is None
    assert twisted_chatter({**legacy, "log_text": "Starting protocol handshake"}) == "drop"


# -- the whole pipeline in a process of its own ------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import sys
    from callboard.daemon.logs import configure_logging, get_logger
    from twisted.internet import protocol, reactor
    from twisted.logger import Logger

    configure_logging(sys.argv[1], log_format=sys.argv[2])

    class Noisy(protocol.DatagramProtocol):
        noisy = True

    class NoisyFactory(protocol.Factory):
        noisy = True

    def run():
        udp = reactor.listenUDP(0, Noisy(), interface="127.0.0.1")
        tcp = reactor.listenTCP(0, NoisyFactory(), interface="127.0.0.1")
        get_logger("callboard.test").warning("code redeemed", device="SEP00AABBCCDDEE",
                                             code="1234567812345678")
        Logger(namespace="callboard.protocols.x").info("tftp {file} ok", file="XMLDefault.cnf.xml")
        Logger(namespace="callboard.protocols.x").error("tvs went wrong")
        udp.stopListening()
        tcp.stopListening()
        reactor.callLater(0.05, reactor.stop)

    reactor.callWhenRunning(run)
    reactor.run()
    """
)


def run_script(tmp_path: Path, level: str, fmt: str, journal: bool) -> list[str]:
    out_path = tmp_path / f"out-{level}-{fmt}-{journal}.log"
    environ = dict(os.environ)
    environ["PYTHONPATH"] = str(Path("build/typecheck").resolve())
    environ.pop("JOURNAL_STREAM", None)
    with open(out_path, "w") as out:
        if journal:
            st = os.fstat(out.fileno())
            environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT, level, fmt],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            env=environ,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    return out_path.read_text().splitlines()


def test_under_journald_every_line_has_a_priority(tmp_path: Path) -> None:
    lines = run_script(tmp_path, "info", "json", journal=True)
    assert lines
    events = []
    for line in lines:
        assert line[0] == "<" and line[2] == ">", line
        event = json.loads(line[3:])
        events.append((int(line[1]), event))
    by_text = {e["event"]: (p, e) for p, e in events}
    assert by_text["code redeemed"][0] == 4
    assert by_text["code redeemed"][1]["code"] == "[redacted]"
    assert by_text["code redeemed"][1]["device"] == "SEP00AABBCCDDEE"
    assert by_text["tftp XMLDefault.cnf.xml ok"][0] == 6
    assert by_text["tvs went wrong"][0] == 3
    text = "\n".join(lines)
    assert "Starting protocol" not in text and "Starting factory" not in text
    assert "Stopping protocol" not in text and "Stopping factory" not in text
    assert " object at 0x" not in text
    assert "starting on" not in text and "Port" not in text  # debug only


def test_port_notes_remain_at_debug(tmp_path: Path) -> None:
    lines = run_script(tmp_path, "debug", "json", journal=True)
    debug = [json.loads(line[3:])["event"] for line in lines if line.startswith("<7>")]
    assert any(" starting on " in text for text in debug), lines
    assert any(text.endswith("Closed)") for text in debug), lines
    assert not any("Starting protocol" in line or "object at 0x" in line for line in lines)


def test_plain_json_without_journald(tmp_path: Path) -> None:
    lines = run_script(tmp_path, "info", "json", journal=False)
    assert lines and all(json.loads(line)["event"] for line in lines)


def test_console_format_end_to_end(tmp_path: Path) -> None:
    lines = run_script(tmp_path, "info", "console", journal=False)
    redeemed = [line for line in lines if "code redeemed" in line]
    assert len(redeemed) == 1
    assert "device=SEP00AABBCCDDEE" in redeemed[0] and "1234567812345678" not in redeemed[0]
    assert not any(line.startswith("{") for line in lines)
    assert not any("Starting protocol" in line for line in lines)


# -- the cheap paths give what the general ones give -------------------------------------------


class _Thing:
    name = "thing"

    def __repr__(self) -> str:
        return "<Thing>"

    def shout(self) -> str:
        return "THING"


@pytest.mark.parametrize(
    "log_format",
    [
        "{transport} {client_host}:{client_port} {method} {file} {status} {bytes} bytes",
        "plain text, no fields",
        "{thing!r} {thing!s} {thing!a} {thing.name} {number:>6.2f} {items[0]} {mapping[k]}",
        "{thing.shout()} and {caller()}",  # Twisted's call syntax: the general path
        "{missing} field",  # unformattable: Twisted says so
        "{0} positional",
        "{unbalanced",
        "",
    ],
)
def test_event_text_is_twisted_format_event(log_format: str) -> None:
    from callboard.daemon.logs import event_text

    event: dict[str, Any] = {
        "log_format": log_format,
        "log_namespace": "callboard.test",
        "transport": "http",
        "client_host": "127.0.0.1",
        "client_port": 4000,
        "method": "GET",
        "file": "/ITLSEP00AABBCCDDEE.tlv",
        "status": 200,
        "bytes": 4991,
        "thing": _Thing(),
        "number": 3.14159,
        "items": ["first"],
        "mapping": {"k": "v"},
        "caller": lambda: "called",
    }
    assert event_text(event) == formatEvent(event)
    assert event_text({"log_namespace": "x"}) == formatEvent({"log_namespace": "x"}) == ""
    as_bytes = {**event, "log_format": log_format.encode()}
    assert event_text(as_bytes) == formatEvent(as_bytes)


def test_level_filter_decides_as_twisted_predicate() -> None:
    from callboard.daemon.logs import TwistedLevelFilter
    from twisted.logger import LogLevel, LogLevelFilterPredicate, PredicateResult

    for name in ("debug", "info", "warning", "error", "critical"):
        twisted_name = "warn" if name == "warning" else name
        predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(twisted_name))
        passed: list[dict[str, Any]] = []
        cheap = TwistedLevelFilter(name, passed.append)
        for level in [*LogLevel.iterconstants(), None]:
            for namespace in ("callboard.http", "a", "", None):
                event: dict[str, Any] = {"log_level": level, "log_namespace": namespace}
                if level is None:
                    del event["log_level"]
                if namespace is None:
                    del event["log_namespace"]
                passed.clear()
                cheap(event)
                assert bool(passed) == (predicate(event) is not PredicateResult.no), (name, event)


def _old_chain(event: dict[str, Any], method: str) -> str:
    """The processor chain logs.py used before it had one finishing processor."""
    import structlog
    from callboard.daemon import logs

    chain = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        logs._device_from_file,
        logs._redact,
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(default=str, sort_keys=False),
    ]
    out: Any = event
    for processor in chain:
        out = processor(None, method, out)
    return str(out)


@pytest.mark.parametrize("method", ["debug", "info", "warn", "warning", "error", "exception"])
def test_finishing_processor_writes_the_old_chains_line(method: str) -> None:
    from callboard.daemon import logs

    try:
        raise ValueError("boom")
    except ValueError:
        failing = sys.exc_info()
    samples: list[dict[str, Any]] = [
        {"event": "http GET", "file": "/ITLSEP00AABBCCDDEE.tlv", "status": 200, "duration": 0.5},
        {"event": "config served", "device": "SEP1", "file": "SEP00AABBCCDDEE.cnf.xml"},
        {"event": "redeem", "code": "1234567812345678", "password": "pw", "key": b"k", "n": None},
        {"event": "odd", "when": Path("/x"), "exc_info": failing, "file": 7, "ünï": "cödé"},
        {"event": "no exception", "exc_info": False},
    ]
    stamp = re.compile(r'"timestamp": "[^"]*"')
    for sample in samples:
        finished = logs._finish_event(None, method, dict(sample))
        new = logs.render_json(None, method, finished)
        old = _old_chain(dict(sample), method)
        assert stamp.sub("T", new) == stamp.sub("T", old)  # the same line, byte for byte
        assert re.search(r'"timestamp": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z"', new)
        assert "1234567812345678" not in repr(new)


REENTRY_SCRIPT = textwrap.dedent(
    """
    import io, sys
    from callboard.daemon.logs import configure_logging
    from twisted.logger import Logger

    class Interrupted(io.StringIO):
        # The first write is interrupted as a signal handler would interrupt it: Twisted's
        # SIGTERM handler logs on the same thread while the line is being written.
        interrupted = False

        def write(self, text):
            if not Interrupted.interrupted:
                Interrupted.interrupted = True
                Logger(namespace="twisted").info("Received SIGTERM, shutting down.")
            return super().write(text)

    out = Interrupted()
    configure_logging("info", out, journal=False)
    Logger(namespace="callboard.test").info("first line")
    sys.stdout.write(out.getvalue())
    """
)


def test_a_line_logged_while_another_is_written_does_not_hang(tmp_path: Path) -> None:
    """The daemon once hung on SIGTERM: the handler's log line waited for the output lock
    its own thread held (structlog's PrintLogger lock is not re-entrant)."""
    environ = dict(os.environ, PYTHONPATH=str(Path("build/typecheck").resolve()))
    result = subprocess.run(
        [sys.executable, "-c", REENTRY_SCRIPT],
        capture_output=True, text=True, env=environ, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = [json.loads(line)["event"] for line in result.stdout.splitlines()]
    assert events == ["Received SIGTERM, shutting down.", "first line"]


# -- the line's cheap pieces give what structlog and json give ----------------------------------


@pytest.mark.parametrize(
    "ns",
    [
        1_796_000_000_000_000_000,  # a whole second: no fraction, as isoformat writes it
        1_796_000_000_123_456_789,
        1_796_000_000_999_999_999,
        1_796_000_001_000_000_999,  # the next second, 999 ns: still no fraction
        1_796_000_001_000_001_000,
        0,
    ],
)
def test_utc_timestamp_is_isoformat_of_the_same_instant(ns: int) -> None:
    import datetime

    from callboard.daemon.logs import utc_timestamp

    expected = datetime.datetime.fromtimestamp(0, datetime.UTC) + datetime.timedelta(
        microseconds=ns // 1000
    )
    for _ in range(2):  # formatted, then from the cached second
        assert utc_timestamp(ns) == expected.isoformat().replace("+00:00", "Z")


def test_json_lines_are_the_general_encoders() -> None:
    from callboard.daemon.logs import render_json

    general = json.JSONEncoder(default=str)
    samples: list[dict[str, Any]] = [
        {"event": "x", "level": "info"},
        {"event": 'ünï\n"q"', "n": 1.5e-05, "nan": float("nan"), "big": 10**30, "none": None},
        {"event": "nested", "list": [1, "a", {"b": (2, 3)}], "path": Path("/x"), "t": True},
        {"event": "odd keys", 1: "int key", 2.5: "float key", None: "none key"},
    ]
    for sample in samples:
        assert render_json(None, "info", sample) == general.encode(sample)
    loop: dict[str, Any] = {"event": "loop"}
    loop["self"] = loop
    for _ in range(2):  # refused as the general encoder refuses it, and the next line is fine
        with pytest.raises(ValueError, match="Circular reference"):
            render_json(None, "info", loop)
        assert render_json(None, "info", samples[0]) == general.encode(samples[0])


BRIDGE_SCRIPT = textwrap.dedent(
    """
    import io, re, sys
    import structlog
    from callboard.daemon import logs
    from twisted.logger import Logger, LogLevel
    from twisted.python.failure import Failure

    out = io.StringIO()
    logs.configure_logging(sys.argv[1], out, journal=sys.argv[2] == "journal")
    events = []
    log = Logger(namespace="callboard.http", observer=events.append)
    log.info("{transport} {client_host}:{client_port} {method} {file} {status} {bytes} bytes",
             transport="http", client_host="127.0.0.1", client_port=4000, method="GET",
             file="/ITLSEP00AABBCCDDEE.tlv", status=200, bytes=4991, duration=0.5)
    log.warn("redeem {device}", device="SEP1", code="1234567812345678", password="pw")
    log.error("boom", reason=ValueError("x"))
    log.debug("detail {n}", n=3)
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("went wrong in {where}", Failure(), where="here")
    Logger(namespace="log_legacy", observer=events.append).info(
        "{log_text}", log_text="HTTPFactory starting on 6970")  # chatter: debug
    Logger(namespace="", observer=events.append).info("no namespace")

    def old_bridge(event):  # logs.twisted_to_structlog before the sink: a structlog logger
        chatter = logs.twisted_chatter(event)
        if chatter == "drop":
            return
        level = "debug" if chatter == "debug" else logs._LEVELS.get(event.get("log_level"), "info")
        fields = {k: v for k, v in event.items()
                  if not k.startswith("log_") and k not in logs._TWISTED_OWN_KEYS}
        if event.get("log_namespace"):
            fields["logger"] = event["log_namespace"]
        if event.get("log_failure") is not None:
            fields["exception"] = event["log_failure"].getTraceback()
        getattr(structlog.get_logger(), level)(logs.event_text(event) or "twisted", **fields)

    stamp = re.compile(r'"timestamp": "[^"]*"|\\d\\d:\\d\\d:\\d\\d(\\.\\d+)?')
    for event in events:
        for bridge in (logs.twisted_to_structlog, old_bridge):
            out.seek(0); out.truncate()
            bridge(dict(event))
            print(repr(stamp.sub("T", out.getvalue())))
    """
)


@pytest.mark.parametrize(("level", "journal"), [("info", "plain"), ("debug", "journal")])
def test_twisted_events_give_the_structlog_loggers_line(level: str, journal: str) -> None:
    """Twisted's events skip structlog's logger for the processors; the lines stay the same,
    byte for byte (times masked), levels filtered alike."""
    environ = dict(os.environ, PYTHONPATH=str(Path("build/typecheck").resolve()))
    result = subprocess.run(
        [sys.executable, "-c", BRIDGE_SCRIPT, level, journal],
        capture_output=True, text=True, env=environ, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 14
    pairs = list(zip(lines[::2], lines[1::2], strict=True))
    for new, old in pairs:
        assert new == old
    written = [new for new, _ in pairs if new != "''"]
    assert len(written) == (7 if level == "debug" else 5)
    assert "1234567812345678" not in result.stdout and '"pw"' not in result.stdout
