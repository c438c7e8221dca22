# mypy: allow-untyped-calls
# (twisted.web.http is not annotated upstream.)
"""A plain GET answered without twisted.web's parser and request objects.

A booting phone sends a handful of small GETs, each a few hundred bytes in one segment, and
waits for each answer. twisted.web spends about 60 µs on each before the resource runs
(a line parser, a ``Request`` with its header objects, a resource lookup, a timeout reset per
line). :class:`PlainFront` sits in front of the site's own protocol: a request that
:func:`parse_plain_get` accepts is answered by the same resource through a
:class:`PlainRequest` (the part of ``twisted.web`` ``Request`` a resource uses, writing the
same bytes); anything else -- another method, a body, ``Connection: close``, a request split
over two reads or pipelined behind another -- goes to twisted.web, and so does everything
after it on that connection. The channel stays untouched until then, its idle timeout reset
by each plain request as its own parser would.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import (
    INTERNAL_SERVER_ERROR,
    NO_BODY_CODES,
    NO_CONTENT,
    NOT_MODIFIED,
    OK,
    RESPONSES,
    datetimeToString,
    toChunk,
)

__all__ = ["PlainFront", "PlainGet", "PlainRequest", "parse_plain_get"]

log = Logger(namespace="callboard.http")

PLAIN_LIMIT = 8192  # bytes of one plain request (a phone's GET: a few hundred)
# One complete GET in origin form (printable ASCII target), HTTP/1.1, each header line a token,
# a colon and a value without CR or LF (so no folded lines), then the empty line.
_PLAIN_GET = re.compile(
    rb"GET (/[\x21-\x7e]*) HTTP/1\.1\r\n"
    rb"((?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n]*\r\n)*)\r\n"
)
_HEADER = re.compile(rb"([^:]+):([^\r\n]*)\r\n")
# Headers that make twisted.web do more than store them: a body, an interim answer, a switch.
_NOT_PLAIN = frozenset({b"content-length", b"transfer-encoding", b"expect", b"upgrade"})
_EAGER_READ = 0x4000  # as twisted.web: buffer this much behind an answer, then pause reading


_date: tuple[int, bytes] = (-1, b"")  # the last second formatted, and its text


def http_date() -> bytes:
    """``twisted.web.http.datetimeToString()`` for now, formatted once a second.

    (Its module is a deprecation proxy: every attribute read of it runs Python code.)
    """
    global _date
    second = int(time.time())
    cached = _date
    if cached[0] != second:
        cached = _date = (second, datetimeToString(second))
    return cached[1]


@dataclass(frozen=True)
class PlainGet:
    """One plain GET: its target as sent and its headers (lower-case names, last value)."""

    uri: bytes
    headers: dict[bytes, bytes]


def parse_plain_get(data: bytes) -> PlainGet | None:
    """``data`` as exactly one complete HTTP/1.1 GET with nothing twisted.web would treat
    specially, else None (twisted.web then parses it, answering errors as it does)."""
    if len(data) > PLAIN_LIMIT or b"\x00" in data:
        return None
    match = _PLAIN_GET.fullmatch(data)
    if match is None:
        return None
    headers = {name.lower(): value.strip(b" \t") for name, value in _HEADER.findall(match.group(2))}
    if not _NOT_PLAIN.isdisjoint(headers):
        return None
    if b"close" in [t.lower() for t in headers.get(b"connection", b"").split(b" ")]:
        return None
    return PlainGet(match.group(1), headers)


class PlainRequest:
    """What a resource uses of ``twisted.web.server.Request``, for one :class:`PlainGet`.

    The answer is the bytes twisted.web writes: status line, ``Server`` and ``Date`` first,
    then the headers in the order set, the body as given (chunked when no length was set).
    Producers register with the channel, as a ``Request`` registers them.
    """

    method = b"GET"
    clientproto = b"HTTP/1.1"
    defaultContentType = b"text/html"

    def __init__(self, front: PlainFront, get: PlainGet) -> None:
        self._front = front
        self.uri = get.uri
        self.path = get.uri.split(b"?", 1)[0]
        self._headers = get.headers
        self.code = OK
        self.code_message = RESPONSES[OK]
        self._response: dict[bytes, tuple[bytes, bytes]] = {
            b"server": (b"Server", server.version),
            b"date": (b"Date", http_date()),
        }
        self.started = False
        self.finished = False
        self._chunked = False
        self._gone: Failure | None = None
        self._waiting: list[Deferred[None]] = []

    # -- what the resource asks -----------------------------------------------------------

    def getClientAddress(self) -> Any:
        return self._front.out.getPeer()

    def getHeader(self, key: bytes) -> bytes | None:
        return self._headers.get(key.lower())

    def notifyFinish(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self._gone is not None:
            d.errback(self._gone)
        elif self.finished:
            d.callback(None)
        else:
            self._waiting.append(d)
        return d

    # -- what the resource answers -----------------------------------------------------------

    def setResponseCode(self, code: int) -> None:
        self.code = code
        self.code_message = RESPONSES.get(code, b"Unknown Status")

    def setHeader(self, name: bytes, value: bytes) -> None:
        self._response[name.lower()] = (name, value)

    def write(self, data: bytes) -> None:
        if self.finished:
            raise RuntimeError("PlainRequest.write called after finish")
        if self._gone is not None:
            return
        head = b"" if self.started else self._head()
        if self._chunked and data:
            data = b"".join(toChunk(data))
        self._front.out.write(head + data)

    def finish(self) -> None:
        if self._gone is not None:
            raise RuntimeError("PlainRequest.finish called after the connection was lost")
        if self.finished:
            return
        if not self.started:
            self.write(b"")
        if self._chunked:
            self._front.out.write(b"0\r\n\r\n")
        self.finished = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
        self._front.answered(self)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._front.channel.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._front.channel.unregisterProducer()

    # -- internals -------------------------------------------------------------------------

    def _head(self) -> bytes:
        """Status line and headers, as ``Request.write`` and ``HTTPChannel.writeHeaders``."""
        self.started = True
        response = self._response
        length = response.get(b"content-length")
        if (
            b"content-type" not in response
            and self.code not in (NOT_MODIFIED, NO_CONTENT)
            and not (length and length[1] == b"0")
        ):
            response[b"content-type"] = (b"Content-Type", self.defaultContentType)
        if length is None and self.code not in NO_BODY_CODES:
            response[b"transfer-encoding"] = (b"Transfer-Encoding", b"chunked")
            self._chunked = True
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.code, self.code_message)]
        lines += [b"%s: %s\r\n" % pair for pair in response.values()]
        lines.append(b"\r\n")
        return b"".join(lines)

    def connection_lost(self, reason: Failure) -> None:
        self._gone = reason
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(reason)


Render = Callable[[Any], "bytes | int"]
"""A resource's ``render``: it is handed a :class:`PlainRequest` for a ``Request``."""


class PlainFront(Protocol):
    """Answers plain GETs itself (``render``: the site's resource), hands the rest of the
    connection to ``inner`` (the protocol the site built) at the first request that is not.
    """

    def __init__(self, inner: Any, render: Render) -> None:
        self.inner = inner
        # The HTTPChannel behind twisted.web's generic (ALPN-switching) protocol.
        self.channel: Any = getattr(inner, "_channel", inner)
        self._render = render
        self._handing_over = False  # twisted.web has the connection from now on
        self._answering: PlainRequest | None = None
        self._held: list[bytes] = []  # what arrived while an answer was still coming

    out: Any = None  # the transport, as the producer and consumer it is

    def connectionMade(self) -> None:
        self.out = self.transport
        self.inner.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._handing_over:
            if self._answering is None:
                self.inner.dataReceived(data)
            else:
                self._hold(data)
            return
        get = parse_plain_get(data) if self._speaks_http11() else None
        if get is None:
            self._handing_over = True
            self.inner.dataReceived(data)
            return
        self.channel.resetTimeout()  # what its own parser does with every read
        self._answer(PlainRequest(self, get))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        answering, self._answering = self._answering, None
        if answering is not None and not answering.finished:
            answering.connection_lost(reason)
        self.inner.connectionLost(reason)

    def answered(self, request: PlainRequest) -> None:
        """``request`` is finished: the connection takes the next one."""
        if request is not self._answering:
            return
        self._answering = None
        if self._saved_timeout is not None:
            self.channel.setTimeout(self._saved_timeout)
        held, self._held = b"".join(self._held), []
        if self._paused:
            self._paused = False
            self.out.resumeProducing()
        if held:
            self.inner.dataReceived(held)

    # -- internals -------------------------------------------------------------------------

    _saved_timeout: float | None = None
    _paused = False

    def _speaks_http11(self) -> bool:
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        return negotiated in (None, b"http/1.1")

    def _answer(self, request: PlainRequest) -> None:
        """As ``twisted.web.server.Request.render`` does with what the resource returns."""
        self._answering = request
        try:
            body = self._render(request)
        except Exception:
            log.failure("http: answer failed", Failure())
            body = _processing_failed(request)
        if body is server.NOT_DONE_YET:
            if not request.finished:
                # Later: no idle timeout meanwhile, and what arrives waits its turn.
                self._handing_over = True
                self._saved_timeout = self.channel.setTimeout(None)
            return
        assert isinstance(body, bytes)
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
        request.write(body)
        request.finish()

    def _hold(self, data: bytes) -> None:
        self._held.append(data)
        if not self._paused and sum(map(len, self._held)) > _EAGER_READ:
            self._paused = True
            self.out.pauseProducing()


def _processing_failed(request: PlainRequest) -> bytes:
    """``Request.processingFailed`` without tracebacks (the provisioning site shows none)."""
    body = (
        b"<html><head><title>Processing Failed</title></head><body>"
        b"<b>Processing Failed</b></body></html>"
    )
    request.setResponseCode(INTERNAL_SERVER_ERROR)
    request.setHeader(b"Content-Type", b"text/html")
    return body
