# mypy: allow-untyped-calls
# (twisted.web.server and twisted.web.http are not annotated upstream.)
"""HTTP provisioning (TCP 6970) over the same :class:`FileSource` as TFTP.

Phones try HTTP on 6970 before falling back to TFTP, so the two must agree on every name:
both go through :func:`normalise_name` and map the same errors (not found -> 404, access
violation -> 403). Files are streamed from ``read_at`` by a pull producer, never read whole.

Wiring (the daemon)::

    site = provisioning_site(source)          # a twisted.web Site, access log off
    endpoint = serverFromString(reactor, "tcp:6970:interface=127.0.0.1")
    StreamServerEndpointService(endpoint, site).setServiceParent(parent)
"""

from __future__ import annotations

import functools
import mimetypes
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from callboard.protocols.filesource import (
    AccessViolation,
    FileBody,
    FileNotFound,
    FileSource,
    Requester,
    normalise_name,
    printable_name,
)
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IPullProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.http import (
    FORBIDDEN,
    INTERNAL_SERVER_ERROR,
    NOT_ALLOWED,
    NOT_FOUND,
    OK,
    PARTIAL_CONTENT,
    REQUESTED_RANGE_NOT_SATISFIABLE,
)
from zope.interface import implementer

from .channel import bounded
from .plain import PlainFront

__all__ = ["ProvisioningResource", "provisioning_site"]

log = Logger(namespace="callboard.http")

CHUNK = 64 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str, size: int) -> tuple[int, int] | bool | None:
    """One ``bytes=`` range as (first, last) inclusive.

    Returns None when the header should be ignored (malformed, several ranges: RFC 9110
    lets a server send the whole file), False when it is unsatisfiable (416).
    """
    match = _RANGE.match(header.strip().replace(" ", ""))
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text and not last_text:
        return None
    if not first_text:  # suffix: the last N bytes
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            return False
        return max(0, size - suffix), size - 1
    first = int(first_text)
    if first >= size:
        return False
    last = int(last_text) if last_text else size - 1
    if last < first:
        return None
    return first, min(last, size - 1)


def content_type(name: str) -> bytes:
    """The Content-Type for a file name, as ``mimetypes.guess_type`` decides it.

    ``guess_type`` looks only at the extensions, but every phone asks for names of its own
    (``ITLSEP<MAC>.tlv``): a plain stem before the first dot is replaced by ``x``, so that
    one cached answer serves every phone's name of that shape.
    """
    stem, dot, extensions = name.partition(".")
    if dot and stem and not any(c in stem for c in "/:\\"):
        return _content_type_of("x." + extensions)
    return _content_type_of(name)


@functools.lru_cache(maxsize=256)
def _content_type_of(name: str) -> bytes:
    return (mimetypes.guess_type(name)[0] or "application/octet-stream").encode()


def _client(request: server.Request) -> tuple[str, int]:
    peer = request.getClientAddress()
    return getattr(peer, "host", "?"), getattr(peer, "port", 0)


@implementer(IPullProducer)
class _BodyProducer:
    """Writes ``[offset, end)`` of a body in chunks as the transport asks for more."""

    def __init__(
        self,
        request: server.Request,
        body: FileBody,
        offset: int,
        end: int,
        done: Callable[[Failure | None], None],
    ) -> None:
        self._request = request
        self._body = body
        self._offset = offset
        self._end = end
        self._done = done
        self.sent = 0
        self._stopped = False

    def resumeProducing(self) -> None:
        if self._stopped:
            return
        want = min(CHUNK, self._end - self._offset)
        data = self._body.read_at(self._offset, want) if want > 0 else b""
        if not data:
            self._stopped = True
            self._request.unregisterProducer()
            self._done(None)
            return
        self._offset += len(data)
        self.sent += len(data)
        self._request.write(data)

    def stopProducing(self) -> None:
        self._stopped = True


class ProvisioningResource(resource.Resource):
    """Serve every path from the file source: GET and HEAD, single byte ranges.

    ``transport`` is what the file source is told the request came over (``http`` on 6970,
    ``https`` on 6971, where a phone asking for ``SEP<MAC>.cnf.xml.sgn`` wants the unsigned
    file). A file the source prepares off the reactor (a Deferred) is answered when ready.
    """

    isLeaf = True

    def __init__(self, source: FileSource, transport: str = "http") -> None:
        super().__init__()
        self._source = source
        self._transport = transport
        # Told of every answered request once (metrics): path, status, seconds, bytes sent.
        self.on_finish: Callable[[str, int, float, int], None] | None = None

    def render(self, request: server.Request) -> bytes | int:
        exchange = _Exchange(request, self._transport, self.on_finish)
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return exchange.plain(NOT_ALLOWED, b"method not allowed\n")
        try:
            normalised = normalise_name(exchange.name)
            opened = self._source.open(
                normalised, Requester(exchange.host, exchange.port, self._transport)
            )
        except Exception as exc:
            return exchange.refused(exc)
        if isinstance(opened, Deferred):
            gone: list[Failure] = []
            request.notifyFinish().addErrback(gone.append)

            def ready(body: FileBody) -> None:
                if gone:
                    body.close()
                    return
                exchange.finish_now(exchange.respond(body, normalised))

            def failed(failure: Failure) -> None:
                if not gone:
                    exchange.finish_now(exchange.refused(failure.value or Exception("failed")))

            opened.addCallbacks(ready, failed).addErrback(
                lambda f: log.failure("http: answer failed", f)
            )
            return server.NOT_DONE_YET
        return exchange.respond(opened, normalised)


class _Exchange:
    """One request's answer: status lines, the log line, the streamed body."""

    def __init__(
        self,
        request: server.Request,
        transport: str,
        on_finish: Callable[[str, int, float, int], None] | None = None,
    ) -> None:
        self.request = request
        self.on_finish = on_finish
        self.started = time.monotonic()
        self.host, self.port = _client(request)
        self.transport = transport
        raw_path = request.path or b"/"
        self.name = unquote_to_bytes(raw_path.split(b"?", 1)[0]).decode("utf-8", "surrogateescape")

    def finish(self, status: int, sent: int) -> None:
        if self.on_finish is not None:
            self.on_finish(self.name, status, time.monotonic() - self.started, sent)
        log.info(
            "{transport} {client_host}:{client_port} {method} {file} {status} {bytes} bytes",
            transport=self.transport,
            client_host=self.host,
            client_port=self.port,
            method=(self.request.method or b"").decode("ascii", "replace"),
            file=printable_name(self.name),
            status=status,
            bytes=sent,
            duration=time.monotonic() - self.started,
        )

    def plain(self, status: int, text: bytes) -> bytes:
        request = self.request
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Content-Length", str(len(text)).encode())
        self.finish(status, 0)
        return b"" if request.method == b"HEAD" else text

    def refused(self, exc: BaseException) -> bytes:
        if isinstance(exc, FileNotFound):
            return self.plain(NOT_FOUND, b"not found\n")
        if isinstance(exc, AccessViolation):
            return self.plain(FORBIDDEN, b"forbidden\n")
        log.failure(
            "http: file source failed for {file}", Failure(exc), file=printable_name(self.name)
        )
        return self.plain(INTERNAL_SERVER_ERROR, b"internal error\n")

    def finish_now(self, answer: bytes | int) -> None:
        """Send what :meth:`respond` or :meth:`refused` returned, after NOT_DONE_YET."""
        if answer is server.NOT_DONE_YET:
            return
        assert isinstance(answer, bytes)
        if answer:
            self.request.write(answer)
        self.request.finish()

    def respond(self, body: FileBody, normalised: str) -> bytes | int:
        request = self.request
        size = body.size
        first, last = 0, size - 1
        status = OK
        range_header = request.getHeader(b"Range")
        if range_header is not None:
            wanted = parse_range(range_header.decode("latin-1"), size)
            if wanted is False:
                body.close()
                request.setHeader(b"Content-Range", f"bytes */{size}".encode())
                return self.plain(REQUESTED_RANGE_NOT_SATISFIABLE, b"range not satisfiable\n")
            if isinstance(wanted, tuple):
                first, last = wanted
                status = PARTIAL_CONTENT
                request.setHeader(b"Content-Range", f"bytes {first}-{last}/{size}".encode())
        length = last - first + 1
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", content_type(normalised))
        request.setHeader(b"Content-Length", str(length).encode())
        request.setHeader(b"Accept-Ranges", b"bytes")
        if request.method == b"HEAD" or length == 0:
            body.close()
            self.finish(status, 0)
            return b""
        if length <= CHUNK:
            return self._whole(body, first, length, status)
        return self._stream(body, first, last, status)

    def _whole(self, body: FileBody, first: int, length: int, status: int) -> bytes:
        """A body of one chunk (every config and trust list): sent with the headers at once.

        Twisted writes the headers and the returned bytes in one go; a pull producer would
        take another reactor turn, a Cooperator task and a second send for the same bytes.
        """
        try:
            data = body.read_at(first, length)
        finally:
            body.close()
        self.finish(status, len(data))
        return data

    def _stream(self, body: FileBody, first: int, last: int, status: int) -> int:
        """A larger body, read and written chunk by chunk as the transport drains."""
        request = self.request

        def done(result: Failure | None) -> None:
            body.close()
            self.finish(status if result is None else 499, producer.sent)  # 499: went away
            if result is None:
                request.finish()

        def lost(reason: Failure) -> None:
            producer.stopProducing()
            done(reason)

        producer = _BodyProducer(request, body, first, last + 1, done)
        request.notifyFinish().addErrback(lost)
        request.registerProducer(producer, False)
        return server.NOT_DONE_YET


class _QuietSite(server.Site):
    """A Site without the combined access log: the resource logs each request itself.

    Its connections answer plain GETs without twisted.web's request machinery
    (:class:`~callboard.protocols.http.plain.PlainFront`); twisted.web takes the rest.
    """

    def log(self, request: http.Request) -> None:
        pass

    def buildProtocol(self, addr: IAddress | None) -> Any:
        inner = super().buildProtocol(addr)
        if inner is None:
            return None
        return PlainFront(inner, self.resource.render)


#: Bytes of a request body read before it is refused 413: phones only GET, and any other
#: method is refused 405 (after a small body is read, so the answer can say so).
MAX_BODY = 64 * 1024


def provisioning_site(
    source: FileSource, timeout: float = 60.0, *, transport: str = "http"
) -> server.Site:
    """The Site to listen on TCP 6970 with (``timeout`` closes idle connections).

    The same Site serves HTTPS 6971 behind a TLS listener with ``transport="https"``.
    """
    site = _QuietSite(ProvisioningResource(source, transport), timeout=timeout)
    bounded(site, max_body=MAX_BODY)
    site.displayTracebacks = False
    site.noisy = False
    return site
