# mypy: allow-untyped-calls
# (twisted.web.http is not annotated upstream.)
"""twisted.web's HTTP/1.1 channel with its refusals answered in words, and bodies bounded.

twisted.web drops the connection without a status when a request line or a header line is
longer than its line limit (16 KiB), answers a bare ``400`` without a body for the other
framing errors (headers over 16 KiB in all, too many headers, a malformed line), and reads
any request body whole, to memory or a temporary file, before a resource can refuse it: one
client could fill the disk. Here the first is answered ``414 URI Too Long`` (the request line)
or ``431 Request Header Fields Too Large`` (a header line), a body over the site's limit
``413 Content Too Large`` as soon as its Content-Length (or a chunked body's bytes) says so,
and each carries an RFC 9457 problem body saying why, as every other 4xx of the REST API does.

A request's header section must also arrive whole within ``HEADER_DEADLINE`` seconds of its
first byte (``408 Request Timeout`` otherwise): twisted.web's idle timeout starts again with
every byte, so a client trickling a header line every few seconds held a connection (and its
descriptor) for as long as it liked.

A request target in absolute form (``GET http://host:6970/SEP….cnf.xml``, as sent through a
proxy), which RFC 9112 §3.2.2 has servers accept, is handed on as its path: twisted.web kept
the whole URI as the request's path, and no resource matched it.

``bounded(site, max_body)`` makes a Site build its connections with this channel.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, TypeVar

from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http, server

__all__ = ["AnsweringHTTPChannel", "bounded", "origin_form"]

#: Chunk-size lines and CRLFs a chunked body may add to its bytes before it is refused.
_CHUNKED_SLACK = 64 * 1024
#: Seconds from a request's first byte to the end of its header section.
HEADER_DEADLINE = 30.0


def _refusal(status: int, title: str, detail: str) -> bytes:
    body = json.dumps(
        {"type": "about:blank", "title": title, "status": status, "detail": detail},
        separators=(",", ":"),
    ).encode()
    head = (
        f"HTTP/1.1 {status} {title}\r\n"
        "Content-Type: application/problem+json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class AnsweringHTTPChannel(http.HTTPChannel):
    """An HTTPChannel whose refusals carry a status line, a reason and a body, and which
    refuses a request body over ``max_body`` bytes (None: any size) before reading it."""

    max_body: int | None = None
    header_deadline: float = HEADER_DEADLINE
    _refused = False
    _chunked_seen: int | None = None  # raw bytes of a chunked body so far; None: not chunked
    _header_timer: Any = None  # the running deadline of a header section being read

    def dataReceived(self, data: bytes) -> None:
        if self._refused:  # after a refusal nothing more is read
            return
        if data and self._header_timer is None and self.line_mode and not self._handlingRequest:
            self._header_timer = self.callLater(self.header_deadline, self._headers_too_slow)
        super().dataReceived(data)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        self._refuse(
            408,
            "Request Timeout",
            f"the request's header section did not arrive within {self.header_deadline:g} s",
        )

    def _stop_header_timer(self) -> None:
        timer, self._header_timer = self._header_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_header_timer()
        super().connectionLost(reason)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A request or header line over the limit: 414 or 431, then close (was a silent
        close)."""
        if getattr(self, "_HTTPChannel__first_line", 0):
            self._refuse(
                414, "URI Too Long", f"the request line is longer than {self.MAX_LENGTH} bytes"
            )
        else:
            self._refuse(
                431,
                "Request Header Fields Too Large",
                f"a header line is longer than {self.MAX_LENGTH} bytes",
            )

    def _respondToBadRequestAndDisconnect(self) -> None:
        """twisted.web's answer to a request it cannot read (a bare 400), with a reason."""
        self._refuse(
            400,
            "Bad Request",
            "the request could not be read as HTTP/1.1 "
            f"(malformed, or headers over {self.totalHeadersSize} bytes or "
            f"{self.maxHeaders} fields)",
        )

    def allHeadersReceived(self) -> None:
        self._stop_header_timer()
        limit = self.max_body
        if limit is not None and self.length is not None and self.length > limit:
            self._too_large(limit)  # before twisted.web says "100 Continue" or reads a byte
            return
        if limit is not None and self.length is None:  # chunked: counted as it arrives
            self._chunked_seen = 0
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._chunked_seen is not None and not self._handlingRequest:
            self._chunked_seen += len(data)
            limit = self.max_body or 0
            if self._chunked_seen > limit + _CHUNKED_SLACK:
                self._too_large(limit)
                return
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self._chunked_seen = None
        super().allContentReceived()

    def _too_large(self, limit: int) -> None:
        self._refuse(413, "Content Too Large", f"the request body exceeds {limit} bytes")

    def _refuse(self, status: int, title: str, detail: str) -> None:
        if self._refused:
            return
        self._refused = True
        if self.transport is not None:
            self.transport.write(_refusal(status, title, detail))
        self.loseConnection()


_ABSOLUTE_FORM = re.compile(rb"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def origin_form(target: bytes) -> bytes:
    """The path (and query) of a request target, also when it is in absolute form."""
    if target[:1] == b"/":  # origin form, nearly every request: as it is
        return target
    match = _ABSOLUTE_FORM.match(target)
    if match is None:
        return target
    rest = target[match.end() :]
    return rest if rest.startswith(b"/") else b"/" + rest


_R = TypeVar("_R", bound=http.Request)


@functools.cache
def _accepting_absolute_form(request_factory: type[_R]) -> type[_R]:
    """``request_factory`` whose requests take an absolute-form target as its path."""

    class Request(request_factory):  # type: ignore[valid-type,misc]
        def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
            super().requestReceived(command, origin_form(path), version)

    Request.__name__ = Request.__qualname__ = f"AbsoluteForm{request_factory.__name__}"
    return Request


def _channel_protocol(max_body: int | None) -> Any:
    # The same wrapper twisted.web builds (it switches to HTTP/2 on ALPN), around our channel.
    channel = AnsweringHTTPChannel()
    channel.max_body = max_body
    return http._GenericHTTPChannelProtocol(channel)


def bounded(site: server.Site, max_body: int | None = None) -> server.Site:
    """``site``, building its connections with :class:`AnsweringHTTPChannel` (request bodies
    up to ``max_body`` bytes; None: any size) and taking absolute-form targets."""
    site.protocol = functools.partial(_channel_protocol, max_body)  # type: ignore[method-assign]
    site.requestFactory = _accepting_absolute_form(site.requestFactory)
    return site
