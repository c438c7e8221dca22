"""The emulated phone's HTTP/1.1 on the wire, without sockets: a GET request, a response reader.

A phone only ever GETs a file and reads the answer, so this is all the HTTP it needs: the
request line and a few headers out; a status line, headers and a body (``Content-Length``,
``chunked``, or up to the connection's end) in. :class:`ResponseReader` takes bytes as they
arrive and hands back the :class:`HttpResponse` once it is whole; anything that is not HTTP
raises :class:`HttpWireError`, a body past the limit :class:`BodyTooLarge`.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

__all__ = [
    "BodyTooLarge",
    "HttpResponse",
    "HttpWireError",
    "ResponseReader",
    "get_request",
]

MAX_HEAD = 64 * 1024
"""Status line and headers together; a provisioning server's are a few hundred bytes."""


class HttpWireError(Exception):
    """The server's bytes are not an HTTP/1.x response."""


class BodyTooLarge(HttpWireError):
    """The body is larger than the reader was allowed to keep."""


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes
    keep_alive: bool  # the connection may carry the next request


def get_request(host: str, port: int, name: str, user_agent: str, *, keep_alive: bool) -> bytes:
    """``GET /<name>`` (percent-quoted) for ``host:port``."""
    shown = f"[{host}]" if ":" in host else host
    lines = [
        f"GET /{quote(name.lstrip('/'))} HTTP/1.1",
        f"Host: {shown}:{port}",
        f"User-Agent: {user_agent}",
        "Connection: " + ("keep-alive" if keep_alive else "close"),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class ResponseReader:
    """One response to a GET, fed as it arrives (:meth:`feed`), ended by :meth:`closed`."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = bytearray()
        self._status = 0
        self._keep_alive = False
        self._length: int | None = None  # None: chunked or until the connection ends
        self._chunked = False
        self._in_body = False
        self._body = bytearray()
        self._chunk_left = -1  # -1: expecting a chunk-size line
        self._trailers = False
        self.received = False  # any byte at all (a reused connection that dies before is stale)

    def feed(self, data: bytes) -> HttpResponse | None:
        """Take ``data``; the response once it is complete, else None."""
        if data:
            self.received = True
        self._buffer += data
        if not self._in_body and not self._read_head():
            return None
        if self._chunked:
            return self._read_chunks()
        if self._length is None:
            self._take(len(self._buffer))
            return None
        self._take(min(len(self._buffer), self._length - len(self._body)))
        return self._response() if len(self._body) == self._length else None

    def closed(self) -> HttpResponse:
        """The connection ended: the response if it was whole (or ran to the end), else raise."""
        if self._in_body and self._length is None and not self._chunked:
            self._keep_alive = False
            return self._response()
        raise HttpWireError("connection closed before the response was complete")

    # The head ----------------------------------------------------------------------------

    def _read_head(self) -> bool:
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    raise HttpWireError("response head too large")
                return False
            head = bytes(self._buffer[:end]).decode("latin-1")
            del self._buffer[: end + 4]
            status, version, headers = _parse_head(head)
            if 100 <= status < 200:
                continue  # an interim answer (100 Continue): the real one follows
            self._start_body(status, version, headers)
            return True

    def _start_body(self, status: int, version: str, headers: dict[str, str]) -> None:
        self._status = status
        self._in_body = True
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        self._keep_alive = (
            "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
        )
        if status in (204, 304):
            self._length = 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._chunked = True
        elif "content-length" in headers:
            self._length = _content_length(headers["content-length"])
            if self._length > self.max_size:
                raise BodyTooLarge(f"body of {self._length} bytes")
        else:
            self._keep_alive = False  # the body runs to the end of the connection

    # The body ----------------------------------------------------------------------------

    def _take(self, count: int) -> None:
        if len(self._body) + count > self.max_size:
            raise BodyTooLarge(f"body larger than {self.max_size} bytes")
        self._body += self._buffer[:count]
        del self._buffer[:count]

    def _read_chunks(self) -> HttpResponse | None:
        while True:
            if self._trailers:
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    return None
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                if not line:
                    return self._response()
                continue
            if self._chunk_left < 0:
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    if len(self._buffer) > 1024:
                        raise HttpWireError("chunk size line too long")
                    return None
                size = bytes(self._buffer[:end]).split(b";", 1)[0].strip()
                del self._buffer[: end + 2]
                try:
                    self._chunk_left = int(size, 16)
                except ValueError:
                    raise HttpWireError(f"bad chunk size {size!r}") from None
                if self._chunk_left < 0:
                    raise HttpWireError(f"bad chunk size {size!r}")
                if self._chunk_left == 0:
                    self._trailers = True
                continue
            if len(self._buffer) < self._chunk_left + 2:
                return None
            if self._buffer[self._chunk_left : self._chunk_left + 2] != b"\r\n":
                raise HttpWireError("chunk not followed by CRLF")
            self._take(self._chunk_left)
            del self._buffer[:2]
            self._chunk_left = -1

    def _response(self) -> HttpResponse:
        keep_alive = self._keep_alive and not self._buffer  # stray bytes: do not reuse
        return HttpResponse(self._status, bytes(self._body), keep_alive)


def _parse_head(head: str) -> tuple[int, str, dict[str, str]]:
    """(status, version, headers with lower-case names; repeated ones joined by commas)."""
    status_line, *lines = head.split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpWireError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    if len(parts[1]) != 3 or not parts[1].isdigit():
        raise HttpWireError(f"bad status code {parts[1][:10]!r}")
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise HttpWireError(f"bad header line {line[:80]!r}")
        key = name.lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return int(parts[1]), parts[0], headers


def _content_length(value: str) -> int:
    values = {v.strip() for v in value.split(",")}  # a repeated, identical header is allowed
    if len(values) != 1 or not next(iter(values)).isdigit():
        raise HttpWireError(f"bad Content-Length {value[:40]!r}")
    return int(values.pop())
