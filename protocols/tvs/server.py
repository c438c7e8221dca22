"""The TVS listener: a Twisted Protocol under TLS that frames bytes for ``TVSHandler``.

The TLS layer requests a client certificate but accepts any (the handshake proves the phone
holds the key); the MIC chain is judged in application code (``ManufacturingTrust``), so a bad
MIC gets status 2 and a log line saying why instead of an opaque handshake failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from callboard.protocols import tls
from callboard.protocols.tvs import codec
from callboard.protocols.tvs.activation import (
    ActivationAuthority,
    ManufacturingTrust,
    Outcome,
    PeerContext,
    TVSHandler,
    TVSSettings,
)
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

__all__ = ["TVSFactory", "TVSProtocol", "TVSSettings", "make_server_context", "make_tvs_factory"]

log = Logger(namespace="callboard.tvs")

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def make_server_context(
    cert: x509.Certificate, key: PrivateKey, chain: Iterable[x509.Certificate] = ()
) -> ssl.CertificateOptions:
    """TLS >= 1.2 options presenting ``cert``; requests (not requires) a client certificate."""
    return tls.server_options(cert, key, chain)


class TVSProtocol(Protocol):
    """One phone connection: buffer, frame, answer, close on idle/oversize/malformed."""

    def __init__(self, factory: TVSFactory) -> None:
        self.factory = factory
        self._buffer = bytearray()
        self._idle: IDelayedCall | None = None
        self._peer: PeerContext | None = None
        self._closing = False
        self._waiting = False  # an answer from the authority is pending
        self._draining = False

    def connectionMade(self) -> None:
        # Request/response over TLS: without TCP_NODELAY the answer can sit behind Nagle
        # until the phone ACKs the TLS 1.3 session tickets sent just before it.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self._arm_idle()

    def _arm_idle(self) -> None:
        timeout = self.factory.settings.idle_timeout
        if self._idle is not None and self._idle.active():
            self._idle.reset(timeout)
        else:
            self._idle = self.factory.reactor.callLater(timeout, self._on_idle)

    def _on_idle(self) -> None:
        self._idle = None
        log.debug("TVS idle timeout, closing {source}", source=self._source())
        self._close()

    def _source(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        host = getattr(peer, "host", None)
        return str(host) if host is not None else "unknown"

    def _peer_context(self) -> PeerContext:
        """Read the client's certificates once per connection (after the handshake)."""
        if self._peer is None:
            leaf: x509.Certificate | None = None
            chain: list[x509.Certificate] = []
            transport = self.transport
            handle = getattr(transport, "getHandle", None)
            conn = handle() if handle is not None else None
            if isinstance(conn, SSL.Connection):
                leaf = conn.get_peer_certificate(as_cryptography=True)
                chain = list(conn.get_peer_cert_chain(as_cryptography=True) or [])
            self._peer = PeerContext(source=self._source(), leaf=leaf, chain=chain)
        return self._peer

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._arm_idle()
        self._buffer += data
        if self._waiting and len(self._buffer) > self.factory.settings.max_message:
            log.info("TVS peer {source} floods while awaiting an answer", source=self._source())
            self._close()
            return
        self._drain()

    def _drain(self) -> None:
        """Answer buffered frames in order; wait while an answer is still pending."""
        if self._draining:
            return  # an answer that arrived at once: the loop below carries on
        self._draining = True
        try:
            while self._buffer and not self._closing and not self._waiting:
                if not self._next_frame():
                    return
        finally:
            self._draining = False

    def _next_frame(self) -> bool:
        """Decode and answer one frame; False when the buffer holds only part of one."""
        max_frame = self.factory.settings.max_message
        try:
            frame, used = codec.decode_frame(self._buffer, max_frame)
        except codec.IncompleteFrame:
            return False
        except codec.CodecError as exc:
            command, session_id = _best_effort_ids(self._buffer)
            log.info(
                "TVS malformed frame from {source}: {why}", source=self._source(), why=str(exc)
            )
            self._send(self.factory.handler.malformed(command, session_id, str(exc)))
            self._close()
            return True
        del self._buffer[:used]
        answer = self.factory.handler.handle(frame, self._peer_context(), self.factory.clock())
        if isinstance(answer, Outcome):
            self._send(answer)
            return True
        # The authority is asked: nothing more is read from this phone until it answers
        # (an activation is answered only once it is durable).
        self._waiting = True
        answer.addCallback(self._answered)
        return True

    def _answered(self, outcome: Outcome) -> None:
        self._waiting = False
        if self._closing or self.transport is None:
            return  # the phone left (or timed out) while the authority was working
        self._send(outcome)
        self._arm_idle()
        self._drain()

    def _send(self, outcome: Outcome) -> None:
        if self.factory.on_response is not None:
            self.factory.on_response(outcome.response)
        if self.transport is not None:
            self.transport.write(outcome.response)
        if outcome.close:
            self._close()

    def _close(self) -> None:
        self._closing = True
        self._buffer = bytearray()
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        self.factory.connection_closed()


def _best_effort_ids(buffer: bytes | bytearray) -> tuple[int | None, int]:
    """Command and session id from a broken frame, so the status-4 answer can echo them."""
    if len(buffer) >= 8 and buffer[0] == codec.PROTOCOL_ID:
        return buffer[2], int.from_bytes(buffer[4:8], "big")
    return None, 0


class TVSFactory(Factory):
    """Builds ``TVSProtocol``s sharing one ``TVSHandler``; not TLS-wrapped by itself."""

    protocol = TVSProtocol
    noisy = False

    def __init__(
        self,
        handler: TVSHandler,
        settings: TVSSettings,
        reactor: IReactorTime,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.handler = handler
        self.settings = settings
        self.reactor = reactor
        self.clock: Callable[[], float] = clock or reactor.seconds
        self.active = 0
        # Observers (metrics): a connection accepted; every response frame sent.
        self.on_connection: Callable[[], None] | None = None
        self.on_response: Callable[[bytes], None] | None = None

    def buildProtocol(self, addr: IAddress | None) -> TVSProtocol:
        self.active += 1
        if self.on_connection is not None:
            self.on_connection()
        return TVSProtocol(self)

    def connection_closed(self) -> None:
        self.active -= 1

    def set_trust(self, trust: ManufacturingTrust) -> None:
        self.handler.set_trust(trust)


class TVSTLSFactory(TLSMemoryBIOFactory):
    """The listening factory: TLS around ``TVSFactory``; refuses connections over the cap."""

    noisy = False

    def __init__(self, options: ssl.CertificateOptions, tvs: TVSFactory) -> None:
        super().__init__(options, False, tvs)
        self.tvs = tvs

    def buildProtocol(self, addr: IAddress | None) -> TLSMemoryBIOProtocol | None:  # type: ignore[override]
        cap = self.tvs.settings.max_connections
        if self.tvs.active >= cap:
            log.warn("TVS connection cap {cap} reached; refusing {addr}", cap=cap, addr=addr)
            return None
        return super().buildProtocol(addr)

    def set_trust(self, trust: ManufacturingTrust) -> None:
        """Swap in a reloaded manufacturing trust store (the daemon calls this on SIGHUP)."""
        self.tvs.set_trust(trust)

    @property
    def handler(self) -> TVSHandler:
        return self.tvs.handler


def make_tvs_factory(
    tvs_cert: x509.Certificate,
    tvs_key: PrivateKey,
    trust: ManufacturingTrust,
    authority: ActivationAuthority,
    role_certs: Iterable[tuple[int, x509.Certificate]],
    settings: TVSSettings,
    reactor: IReactorTime,
    *,
    clock: Callable[[], float] | None = None,
) -> TVSTLSFactory:
    """The TLS-wrapped factory to hand to ``serverFromString(reactor, "tcp:2445:...").listen``.

    ``role_certs`` are this server's own (role, certificate) pairs, the ones VERIFY vouches for.
    ``clock`` (seconds since the epoch) drives the throttle and MIC validity; default the reactor.
    """
    handler = TVSHandler(trust=trust, authority=authority, role_certs=role_certs, settings=settings)
    tvs = TVSFactory(handler, settings, reactor, clock)
    return TVSTLSFactory(make_server_context(tvs_cert, tvs_key), tvs)
