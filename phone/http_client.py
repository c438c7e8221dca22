"""HTTP provisioning fetches (port 6970, and HTTPS 6971 pinned by the ITL) for the emulated phone.

Current Cisco firmware tries HTTP on 6970 before TFTP. A 404 means "no such file" (the phone
moves on), so it resolves to ``None``; any other status or a connection failure raises, which
the boot driver reads as "this server/transport is not answering". One :class:`HttpFetcher`
(one pool of keep-alive connections per server) serves every phone of a storm.

A phone only GETs files, so this is a small HTTP/1.1 client of its own (the wire format in
:mod:`callboard.phone.http_wire`) rather than ``twisted.web``'s Agent: in a storm the Agent's
machinery per request (a name resolution in a thread even for an address, a connection pool
of Deferreds, a body-delivery protocol) cost more CPU than the phone's TLS handshakes.
Connections are made as :mod:`callboard.phone.endpoints` makes them (an address directly).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import quote

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from .endpoints import client_endpoint, connect_protocol
from .http_wire import BodyTooLarge, HttpResponse, HttpWireError, ResponseReader, get_request
from .tls_client import PinnedConnections

DEFAULT_MAX_SIZE = 16 * 1024 * 1024


class HTTPStatusError(Exception):
    """The server answered, but with a status other than 200 or 404."""

    def __init__(self, status: int, url: str) -> None:
        super().__init__(f"HTTP {status} for {url}")
        self.status = status
        self.url = url


class PinMismatch(Exception):
    """The HTTPS server's certificate hashes to none of the ITL's pins."""


class _Stale(Exception):
    """A kept-alive connection closed before answering: the request may go on a new one."""


class _HttpConnection(Protocol):
    """One connection to a server; one GET at a time on it."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.reader: ResponseReader | None = None
        self.waiting: defer.Deferred[HttpResponse] | None = None
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.open = False
        self.reused = False  # it already answered a request (so it may have gone stale)

    def connectionMade(self) -> None:
        self.open = True

    def request(self, raw: bytes) -> defer.Deferred[HttpResponse]:
        assert self.transport is not None and self.waiting is None
        self.reader = ResponseReader(self.max_size)
        self.waiting = defer.Deferred(lambda _: self._abandon())
        self.transport.write(raw)
        return self.waiting

    def _abandon(self) -> None:
        """The caller gave up (timeout): drop the connection, the answer would come too late."""
        self.waiting = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _answer(self, outcome: HttpResponse | Exception) -> None:
        waiting, self.waiting = self.waiting, None
        if waiting is None:
            return
        if isinstance(outcome, Exception):
            waiting.errback(outcome)
        else:
            waiting.callback(outcome)

    def dataReceived(self, data: bytes) -> None:
        if self.waiting is None or self.reader is None:
            self.close()  # bytes nobody asked for: this connection is not reusable
            return
        try:
            response = self.reader.feed(data)
        except HttpWireError as exc:
            self.close()
            self._answer(exc)
            return
        if response is not None:
            if not response.keep_alive:
                self.close()
            self._answer(response)

    def close(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.open = False
        if self.waiting is not None and self.reader is not None:
            if self.reused and not self.reader.received:
                self._answer(_Stale())
            else:
                try:
                    self._answer(self.reader.closed())
                except HttpWireError as exc:
                    self._answer(exc)
        self.lost.callback(None)


class HttpFetcher:
    """GET files from provisioning servers; 200 → bytes, 404 → None, anything else raises."""

    def __init__(
        self,
        reactor: Any,
        *,
        connect_timeout: float = 5.0,
        persistent: bool = True,
        max_per_host: int = 64,
        user_agent: str = "Cisco-CP8841/emulated",
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.persistent = persistent
        self.max_per_host = max_per_host
        self.user_agent = user_agent
        self.max_size = max_size
        self._idle: dict[tuple[str, int], list[_HttpConnection]] = {}

    @staticmethod
    def url(host: str, port: int, name: str) -> str:
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/{quote(name.lstrip('/'))}"

    def fetch(
        self, host: str, port: int, name: str, *, timeout: float = 10.0
    ) -> defer.Deferred[bytes | None]:
        """Fetch ``name``; the whole exchange (connect, headers, body) is bounded by ``timeout``."""
        url = self.url(host, port, name)
        raw = get_request(host, port, name, self.user_agent, keep_alive=self.persistent)

        async def run() -> bytes | None:
            return _outcome(await self._exchange(host, port, raw, url), url)

        d = defer.Deferred.fromCoroutine(run())
        d.addTimeout(timeout, self.reactor)
        return d

    def fetch_pinned(
        self,
        host: str,
        port: int,
        name: str,
        pins: Sequence[tuple[int, bytes]],
        *,
        timeout: float = 10.0,
        sessions: SecureSessions | None = None,
    ) -> defer.Deferred[bytes | None]:
        """Fetch ``name`` over HTTPS from a server pinned by ``pins`` (an ITL's records).

        Raises :class:`PinMismatch` when the server's certificate is not one of them. With
        ``sessions`` (one phone's), the connection is kept for that phone's next fetch and its
        TLS session resumed when the server closed it meanwhile; without, one connection and
        one full handshake per fetch, closed after it.
        """
        shown = f"[{host}]" if ":" in host else host
        url = f"https://{shown}:{port}/{quote(name.lstrip('/'))}"
        raw = get_request(host, port, name, self.user_agent, keep_alive=sessions is not None)
        key: SessionKey = (host, port, tuple(pins))

        async def run() -> bytes | None:
            if sessions is not None:
                kept = await sessions.on_kept(key, lambda conn: self._answer(conn, raw, url))
                if kept is not None:
                    return _outcome(kept, url)
            pinned = PinnedConnections(pins, sessions.session(key) if sessions else None)
            endpoint = wrapClientTLS(pinned, client_endpoint(self.reactor, host, port, timeout))
            try:
                conn = await connect_protocol(endpoint, _HttpConnection(self.max_size))
                try:
                    response = await self._answer(conn, raw, url)
                except BaseException:
                    conn.close()
                    raise
            except Exception:
                if pinned.refused is not None:
                    raise PinMismatch(f"{url}: {pinned.refused}") from None
                raise
            if sessions is None:
                conn.close()
            else:
                sessions.keep(key, conn, response, pinned)
            return _outcome(response, url)

        d = defer.Deferred.fromCoroutine(run())
        d.addTimeout(timeout, self.reactor)
        return d

    async def _exchange(self, host: str, port: int, raw: bytes, url: str) -> HttpResponse:
        """One GET on a kept-alive connection to ``host:port``, else on a new one."""
        key = (host, port)
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.open:
                continue
            try:
                response = await self._answer(conn, raw, url)
            except _Stale:
                break  # the server closed it meanwhile: a new connection, as Agent retried
            self._keep(key, conn, response)
            return response
        endpoint = client_endpoint(self.reactor, host, port, self.connect_timeout)
        conn = await connect_protocol(endpoint, _HttpConnection(self.max_size))
        response = await self._answer(conn, raw, url)
        self._keep(key, conn, response)
        return response

    async def _answer(self, conn: _HttpConnection, raw: bytes, url: str) -> HttpResponse:
        try:
            return await conn.request(raw)
        except BodyTooLarge:
            raise HTTPStatusError(413, url) from None

    def _keep(self, key: tuple[str, int], conn: _HttpConnection, response: HttpResponse) -> None:
        """Keep ``conn`` for the next request to ``key`` if it may carry one, else close it."""
        idle = self._idle.setdefault(key, [])
        if self.persistent and response.keep_alive and conn.open and len(idle) < self.max_per_host:
            conn.reused = True
            idle.append(conn)
        else:
            conn.close()

    def close(self) -> defer.Deferred[Any]:
        """Close the kept-alive connections (tests and the CLI call it before the reactor stops)."""
        idle = [conn for conns in self._idle.values() for conn in conns]
        self._idle.clear()
        for conn in idle:
            conn.close()
        return defer.DeferredList([conn.lost for conn in idle])


SessionKey = tuple[str, int, tuple[tuple[int, bytes], ...]]
"""(host, port, pins): what one phone's HTTPS connections and TLS sessions are kept under."""


class SecureSessions:
    """One phone's HTTPS between its fetches: its kept-alive connection and its TLS session.

    A phone asks 6971 for its config twice in one boot (before activation: 404; after: the
    file). As a real phone, it keeps the connection open for the second request, and when the
    server closed it meanwhile, it resumes the TLS session on the new one (an abbreviated
    handshake: no certificate sent, no signature made). Both are kept per server *and pins*:
    a resumed handshake shows no certificate, so a session verified under one set of pins is
    never offered under another. Not shared between phones; :meth:`close` ends the boot.
    """

    def __init__(self) -> None:
        self._idle: dict[SessionKey, _HttpConnection] = {}
        self._sessions: dict[SessionKey, SSL.Session] = {}
        self.handshakes = 0  # full handshakes (the server's certificate checked)
        self.resumed = 0  # resumed handshakes
        self.reused = 0  # requests on a kept-alive connection

    def session(self, key: SessionKey) -> SSL.Session | None:
        return self._sessions.get(key)

    async def on_kept(
        self,
        key: SessionKey,
        ask: Callable[[_HttpConnection], Awaitable[HttpResponse]],
    ) -> HttpResponse | None:
        """The answer on the kept connection for ``key``, or None (none, or it went stale)."""
        conn = self._idle.pop(key, None)
        if conn is None or not conn.open:
            return None
        try:
            response = await ask(conn)
        except _Stale:
            return None  # the server closed it meanwhile: a new connection (resumed)
        except BaseException:
            conn.close()
            raise
        self.reused += 1
        self._keep_open(key, conn, response)
        return response

    def keep(
        self, key: SessionKey, conn: _HttpConnection, response: HttpResponse,
        pinned: PinnedConnections,
    ) -> None:  # fmt: skip
        """After a new connection's answer: remember its session, keep it if it may carry more."""
        if pinned.resumed:
            self.resumed += 1
        else:
            self.handshakes += 1
        if pinned.connection is not None:
            # Read after the answer: TLS 1.3 tickets come after the handshake, before the data.
            session = pinned.connection.get_session()
            if session is not None:
                self._sessions[key] = session
        self._keep_open(key, conn, response)

    def _keep_open(self, key: SessionKey, conn: _HttpConnection, response: HttpResponse) -> None:
        if response.keep_alive and conn.open:
            conn.reused = True
            old = self._idle.pop(key, None)
            if old is not None:
                old.close()
            self._idle[key] = conn
        else:
            conn.close()

    def close(self) -> defer.Deferred[Any]:
        """Close the kept connections (the phone's boot is over)."""
        idle = list(self._idle.values())
        self._idle.clear()
        self._sessions.clear()
        for conn in idle:
            conn.close()
        return defer.DeferredList([conn.lost for conn in idle])


def _outcome(response: HttpResponse, url: str) -> bytes | None:
    if response.status == 404:
        return None
    if response.status != 200:
        raise HTTPStatusError(response.status, url)
    return response.body


class _Collector(Protocol):
    """Collect a body up to ``limit`` bytes; beyond it, stop reading and fail."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
            if not self.done.called:
                self.done.errback(HTTPStatusError(413, "body larger than allowed"))
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)
