"""A request's header section must arrive within the channel's deadline (408 otherwise):
twisted.web's idle timeout restarts with every byte, so a client trickling header lines held
its connection for ever. Sans sockets: a StringTransport and a task.Clock."""

from __future__ import annotations

import json

from callboard.protocols.http.channel import HEADER_DEADLINE, AnsweringHTTPChannel
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport


def channel_on(clock: Clock) -> tuple[AnsweringHTTPChannel, StringTransport]:
    channel = AnsweringHTTPChannel()
    channel.callLater = clock.callLater  # as HTTPFactory.buildProtocol sets it
    channel.timeOut = None  # twisted.web's idle timeout off: only the deadline is tested
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_trickled_headers_are_answered_408_at_the_deadline() -> None:
    clock = Clock()
    channel, transport = channel_on(clock)
    channel.dataReceived(b"GET /XMLDefault.cnf.xml HTTP/1.1\r\n")
    for i in range(int(HEADER_DEADLINE // 5) - 1):  # a header line every 5 s: never idle
        clock.advance(5)
        channel.dataReceived(b"X-Slow-%d: 1\r\n" % i)
    assert transport.value() == b"" and not transport.disconnecting
    clock.advance(HEADER_DEADLINE)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"Content-Type: application/problem+json" in head
    assert json.loads(body)["status"] == 408
    assert transport.disconnecting
    assert not clock.getDelayedCalls()


def test_headers_in_time_stop_the_deadline() -> None:
    clock = Clock()
    channel, transport = channel_on(clock)
    channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n")
    clock.advance(HEADER_DEADLINE - 1)
    channel.dataReceived(b"\r\n")  # the header section ends: the deadline is off
    assert not [c for c in clock.getDelayedCalls() if c.active()]
    clock.advance(2 * HEADER_DEADLINE)
    assert b"408" not in transport.value()


def test_a_connection_lost_midway_leaves_no_timer() -> None:
    clock = Clock()
    channel, _ = channel_on(clock)
    channel.dataReceived(b"GET /x HTTP/1.1\r\n")
    channel.connectionLost()
    assert not [c for c in clock.getDelayedCalls() if c.active()]
