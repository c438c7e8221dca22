"""HTTP provisioning fetches (port 6970) for the emulated phone, with ``twisted.web`` Agent.

Current Cisco firmware tries HTTP on 6970 before TFTP. A 404 means "no such file" (the phone
moves on), so it resolves to ``None``; any other status or a connection failure raises, which
the boot driver reads as "this server/transport is not answering". One :class:`HttpFetcher`
(one persistent connection pool) serves every phone of a storm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from callboard.protocols import tls
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import SSL, crypto
from twisted.internet import defer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS, IResponse
from zope.interface import implementer

DEFAULT_MAX_SIZE = 16 * 1024 * 1024


class HTTPStatusError(Exception):
    """The server answered, but with a status other than 200 or 404."""

    def __init__(self, status: int, url: str) -> None:
        super().__init__(f"HTTP {status} for {url}")
        self.status = status
        self.url = url


class PinMismatch(Exception):
    """The HTTPS server's certificate hashes to none of the ITL's pins."""


_PIN_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    1: hashes.SHA1,
    2: hashes.SHA256,
    3: hashes.SHA512,
}


@implementer(IPolicyForHTTPS)
class PinnedPolicy:
    """Accept only a server whose leaf certificate hashes to one of ``pins``.

    ``pins`` are (hash algorithm code, hash) pairs as an ITL record carries them (1 SHA-1,
    2 SHA-256, 3 SHA-512). The check runs inside the handshake, so nothing is sent to a server
    that fails it; ``refused`` then says why.
    """

    def __init__(self, pins: Sequence[tuple[int, bytes]]) -> None:
        self.pins = tuple(pins)
        self.refused: str | None = None

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        options = tls.client_options()
        options.getContext().set_verify(SSL.VERIFY_PEER, self._verify)
        return options

    def _verify(
        self, _conn: SSL.Connection, cert: crypto.X509, _errno: int, depth: int, _ok: int
    ) -> bool:
        if depth != 0:
            return True  # the leaf decides; chain certificates are not pinned
        der = cert.to_cryptography().public_bytes(serialization.Encoding.DER)
        for algorithm, expected in self.pins:
            hash_type = _PIN_HASHES.get(algorithm)
            if hash_type is not None and _digest(hash_type(), der) == expected:
                return True
        self.refused = "server certificate is not the ITL's TFTP-role EC certificate"
        return False


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


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
        self.pool = HTTPConnectionPool(reactor, persistent=persistent)
        self.pool.maxPersistentPerHost = max_per_host
        self.pool.retryAutomatically = True
        self.agent = Agent(reactor, connectTimeout=connect_timeout, pool=self.pool)
        self.user_agent = user_agent
        self.max_size = max_size

    @staticmethod
    def url(host: str, port: int, name: str) -> str:
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/{quote(name.lstrip('/'))}"

    def fetch(
        self, host: str, port: int, name: str, *, timeout: float = 10.0
    ) -> defer.Deferred[bytes | None]:
        """Fetch ``name``; the whole exchange (connect, headers, body) is bounded by ``timeout``."""
        url = self.url(host, port, name)

        async def run() -> bytes | None:
            headers = Headers({b"User-Agent": [self.user_agent.encode("ascii")]})
            response: IResponse = await self.agent.request(b"GET", url.encode("ascii"), headers)
            if isinstance(response.length, int) and response.length > self.max_size:
                response.deliverBody(_Collector(0))
                raise HTTPStatusError(413, url)
            collector = _Collector(self.max_size)
            response.deliverBody(collector)
            body = await collector.done
            if response.code == 404:
                return None
            if response.code != 200:
                raise HTTPStatusError(response.code, url)
            return body

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
    ) -> defer.Deferred[bytes | None]:
        """Fetch ``name`` over HTTPS from a server pinned by ``pins`` (an ITL's records).

        Raises :class:`PinMismatch` when the server's certificate is not one of them.
        """
        shown = f"[{host}]" if ":" in host else host
        url = f"https://{shown}:{port}/{quote(name.lstrip('/'))}"
        policy = PinnedPolicy(pins)
        agent = Agent(
            self.reactor,
            contextFactory=policy,
            connectTimeout=timeout,
            pool=HTTPConnectionPool(self.reactor, persistent=False),
        )

        async def run() -> bytes | None:
            headers = Headers({b"User-Agent": [self.user_agent.encode("ascii")]})
            try:
                response: IResponse = await agent.request(b"GET", url.encode("ascii"), headers)
            except Exception:
                if policy.refused is not None:
                    raise PinMismatch(f"{url}: {policy.refused}") from None
                raise
            collector = _Collector(self.max_size)
            response.deliverBody(collector)
            body = await collector.done
            if response.code == 404:
                return None
            if response.code != 200:
                raise HTTPStatusError(response.code, url)
            return body

        d = defer.Deferred.fromCoroutine(run())
        d.addTimeout(timeout, self.reactor)
        return d

    def close(self) -> defer.Deferred[Any]:
        """Close the pooled connections (tests and the CLI call it before the reactor stops)."""
        d: defer.Deferred[Any] = self.pool.closeCachedConnections()
        return d


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
