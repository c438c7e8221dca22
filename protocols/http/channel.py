# mypy: allow-untyped-calls
# (twisted.web.http is not annotated upstream.)
"""twisted.web's HTTP/1.1 channel with its framing refusals answered in words.

twisted.web drops the connection without a status when a request line or a header line is
longer than its line limit (16 KiB), and answers a bare ``400`` without a body for the other
framing errors (headers over 16 KiB in all, too many headers, a malformed line). A client
then sees an empty reply or a status with no reason. Here the first is answered ``414 URI
Too Long`` (the request line) or ``431 Request Header Fields Too Large`` (a header line), and
each carries an RFC 9457 problem body saying why, as every other 4xx of the REST API does.

``bounded_lines(site)`` makes a Site build its connections with this channel.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web import http, server

__all__ = ["AnsweringHTTPChannel", "bounded_lines"]


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
    """An HTTPChannel whose framing refusals carry a status line, a reason and a body."""

    def lineLengthExceeded(self, line: bytes) -> None:
        """A request or header line over the limit: 414 or 431, then close (was a silent
        close)."""
        if getattr(self, "_HTTPChannel__first_line", 0):
            answer = _refusal(
                414, "URI Too Long", f"the request line is longer than {self.MAX_LENGTH} bytes"
            )
        else:
            answer = _refusal(
                431,
                "Request Header Fields Too Large",
                f"a header line is longer than {self.MAX_LENGTH} bytes",
            )
        self._refuse(answer)

    def _respondToBadRequestAndDisconnect(self) -> None:
        """twisted.web's answer to a request it cannot read (a bare 400), with a reason."""
        self._refuse(
            _refusal(
                400,
                "Bad Request",
                "the request could not be read as HTTP/1.1 "
                f"(malformed, or headers over {self.totalHeadersSize} bytes or "
                f"{self.maxHeaders} fields)",
            )
        )

    def _refuse(self, answer: bytes) -> None:
        if self.transport is not None:
            self.transport.write(answer)
        self.loseConnection()


def _channel_protocol() -> Any:
    # The same wrapper twisted.web builds (it switches to HTTP/2 on ALPN), around our channel.
    return http._GenericHTTPChannelProtocol(AnsweringHTTPChannel())


def bounded_lines(site: server.Site) -> server.Site:
    """``site``, building its connections with :class:`AnsweringHTTPChannel`."""
    site.protocol = _channel_protocol  # type: ignore[method-assign]
    return site
