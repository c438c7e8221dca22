"""A SIP stream message that never completes (a Content-Length larger than what was sent, a
header section never ended) is answered 400 and closed after the message timeout, instead of
holding the connection forever, and a connection that never says anything (or never finishes
its TLS handshake) is closed after as long; a connection idle between messages is left
alone."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
import pytest_twisted
from callboard.protocols.sip.registrar import (
    PolicyDecision,
    Registrar,
    RegistrarSettings,
    RegistrationRequest,
)
from callboard.protocols.sip.transports import (
    MESSAGE_TIMEOUT,
    SIPStreamProtocol,
    make_stream_factory,
)
from twisted.internet import reactor, task, threads
from twisted.internet.testing import StringTransport

from .conftest import open_stream, stream_responses  # type: ignore[import-not-found]


class _RefuseAll:
    def decide(self, request: RegistrationRequest) -> PolicyDecision:
        return PolicyDecision.refuse(404, "unknown device")


def _registrar() -> Registrar:
    return Registrar(_RefuseAll(), RegistrarSettings(), now=lambda: 1000.0, wall_now=time.time)


def _options(content_length: int, body: bytes = b"") -> bytes:
    return (
        b"OPTIONS sip:192.0.2.10 SIP/2.0\r\n"
        b"Via: SIP/2.0/TCP 192.0.2.50:50057;branch=z9hG4bK-w8-1\r\n"
        b"From: <sip:1001@192.0.2.10>;tag=a\r\n"
        b"To: <sip:1001@192.0.2.10>\r\n"
        b"Call-ID: w8-timeout@192.0.2.50\r\n"
        b"CSeq: 7 OPTIONS\r\n"
        b"Content-Length: " + str(content_length).encode() + b"\r\n\r\n" + body
    )


def _open(clock: task.Clock) -> tuple[SIPStreamProtocol, StringTransport]:
    return open_stream(_registrar(), clock)


def test_a_body_shorter_than_content_length_is_answered_400_then_closed() -> None:
    clock = task.Clock()
    proto, transport = _open(clock)
    proto.dataReceived(_options(100, b"only ten!!"))
    clock.advance(MESSAGE_TIMEOUT - 1)
    assert transport.value() == b"" and not transport.disconnecting  # still within its time
    clock.advance(1.5)
    [answer] = stream_responses(transport.value())
    assert (answer.status, answer.headers.get("cseq")) == (400, "7 OPTIONS")
    assert "incomplete message" in (answer.headers.get("warning") or "")
    assert transport.disconnecting
    assert clock.getDelayedCalls() == []


def test_a_header_section_never_ended_is_closed_without_an_answer() -> None:
    clock = task.Clock()
    proto, transport = _open(clock)
    proto.dataReceived(b"OPTIONS sip:192.0.2.10 SIP/2.0\r\nVia: SIP/2.0/TCP x")
    clock.advance(MESSAGE_TIMEOUT + 1)
    assert transport.value() == b"" and transport.disconnecting


def test_the_time_is_per_message_not_per_byte() -> None:
    """A trickle of bytes does not keep an incomplete message alive (slowloris)."""
    clock = task.Clock()
    proto, transport = _open(clock)
    whole = _options(4, b"abcd")
    for i in range(len(whole) - 1):
        proto.dataReceived(whole[i : i + 1])
        clock.advance(MESSAGE_TIMEOUT / len(whole))
    clock.advance(1)
    assert transport.disconnecting


def test_whole_messages_and_an_idle_connection_are_never_timed_out() -> None:
    clock = task.Clock()
    proto, transport = _open(clock)
    proto.dataReceived(_options(4, b"ab"))
    clock.advance(MESSAGE_TIMEOUT - 1)
    proto.dataReceived(b"cd")  # completed in time
    proto.dataReceived(b"\r\n\r\n")  # a keep-alive ping
    assert clock.getDelayedCalls() == []
    clock.advance(10 * MESSAGE_TIMEOUT)
    [answer] = stream_responses(transport.value())
    assert answer.status == 200 and not transport.disconnecting
    # A second message gets a full timeout of its own.
    proto.dataReceived(_options(4, b"a"))
    clock.advance(MESSAGE_TIMEOUT - 1)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting


def test_a_connection_that_says_nothing_is_closed() -> None:
    clock = task.Clock()
    _, transport = _open(clock)
    clock.advance(MESSAGE_TIMEOUT - 1)
    assert not transport.disconnecting
    clock.advance(1.5)
    assert transport.value() == b"" and transport.disconnecting


def test_a_keepalive_is_enough_to_stay() -> None:
    clock = task.Clock()
    proto, transport = _open(clock)
    proto.dataReceived(b"\r\n\r\n")
    clock.advance(10 * MESSAGE_TIMEOUT)
    assert not transport.disconnecting


def test_a_lost_connection_leaves_no_timer() -> None:
    clock = task.Clock()
    proto, _ = _open(clock)
    proto.dataReceived(_options(100))
    proto.connectionLost(None)
    assert clock.getDelayedCalls() == []


def _until_closed(port: int, say: bytes) -> tuple[bytes, float]:
    """Connect, send ``say`` (perhaps nothing), read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        started = time.monotonic()
        s.sendall(say)
        got = b""
        while chunk := s.recv(4096):
            got += chunk
        return got, time.monotonic() - started


@pytest.mark.parametrize(
    ("say", "statuses"),
    [(_options(100), [400]), (b"", [])],  # a body promised and never sent; silence
    ids=["content-length-lie", "silent"],
)
@pytest_twisted.inlineCallbacks
def test_over_loopback_the_socket_is_answered_and_closed(say: bytes, statuses: list[int]) -> Any:
    factory = make_stream_factory(_registrar(), "tcp", reactor, message_timeout=0.5)
    listen: Any = reactor.listenTCP
    port = listen(0, factory, interface="127.0.0.1")
    try:
        got, took = yield threads.deferToThread(_until_closed, port.getHost().port, say)
    finally:
        yield port.stopListening()
    assert [answer.status for answer in stream_responses(got)] == statuses and 0.4 < took < 5
