"""Twisted adapters for the registrar: UDP, TCP and TLS on one :class:`Registrar`.

Wiring (what the daemon does)::

    registrar = Registrar(policy, RegistrarSettings(realm="callboard"), clock=reactor.seconds)
    service = SIPRegistrarService(
        registrar, reactor, udp_port=5060, tcp_port=5060, tls_port=5061,
        tls_options=make_tls_server_options(cert_pem, key_pem),
    )
    service.setServiceParent(parent)

or piecemeal: ``reactor.listenUDP(5060, make_udp_protocol(registrar))``,
``reactor.listenTCP(5060, make_stream_factory(registrar, "tcp"))``, and for TLS either
``reactor.listenSSL(5061, make_stream_factory(registrar, "tls"), opts)``,
``serverFromString(reactor, "ssl:5061:...").listen(make_stream_factory(registrar, "tls"))`` or
``TLSMemoryBIOFactory(opts, False, make_stream_factory(registrar, "tls"))``; plus
``start_sweeper(registrar, reactor)`` for binding expiry (the service does it itself).

The adapters only move bytes: framing (Content-Length on streams), the client certificate
fingerprint on TLS, and the reply's destination on UDP. Any exception below them is logged and
the message dropped, so one bad packet never takes a listener down.
"""

from __future__ import annotations

import socket
from typing import Any

from callboard.protocols.sip.message import MessageTooLarge, SIPParseError, StreamFramer
from callboard.protocols.sip.registrar import Registrar, Source
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.defer import DeferredList, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IReactorTime, ISSLTransport
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="callboard.sip.transports")


class SIPDatagramProtocol(DatagramProtocol):
    """SIP over UDP: one datagram is one message; replies follow Via received/rport."""

    def __init__(self, registrar: Registrar) -> None:
        self.registrar = registrar

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        host, port = addr[0], addr[1]
        if not datagram.strip(b"\r\n\x00 "):
            return  # keep-alive (CRLF or NAT-binding junk)
        try:
            reply = self.registrar.handle_bytes(datagram, Source("udp", host, port))
        except Exception:
            log.failure("SIP/UDP message from {host}:{port} dropped", host=host, port=port)
            return
        if reply is not None and self.transport is not None:
            try:
                self.transport.write(reply.data, (reply.host, reply.port))
            except OSError as exc:
                log.warn("SIP/UDP send to {host} failed: {err}", host=reply.host, err=exc)


class SIPStreamProtocol(Protocol):
    """SIP over TCP or TLS: Content-Length framing, replies on the same connection."""

    def __init__(self, registrar: Registrar, transport_name: str) -> None:
        self.registrar = registrar
        self.transport_name = transport_name
        self.framer = StreamFramer(registrar.settings.max_message_size)
        self._source: Source | None = None

    def connectionMade(self) -> None:
        # Each reply is one write the phone waits for: do not let Nagle hold it back.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)

    def _get_source(self) -> Source:
        if self._source is None:
            assert self.transport is not None
            peer = self.transport.getPeer()
            host = str(getattr(peer, "host", "?"))
            port = int(getattr(peer, "port", 0))
            fingerprint = subject = None
            if ISSLTransport.providedBy(self.transport):
                cert = self.transport.getPeerCertificate()
                if cert is not None:
                    fingerprint, subject = certificate_identity(cert)
            self._source = Source(self.transport_name, host, port, fingerprint, subject)
        return self._source

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            source = self._get_source()
            try:
                messages = self.framer.feed(data)
            except SIPParseError as exc:
                status = 513 if isinstance(exc, MessageTooLarge) else 400
                reply = self.registrar.error_reply(exc.partial, status, source, exc.reason)
                if reply is not None:
                    self.transport.write(reply.data)
                log.info(
                    "SIP/{t} stream from {source} closed: {why}",
                    t=self.transport_name,
                    source=source.address,
                    why=exc.reason,
                )
                self.transport.loseConnection()
                return
            for message in messages:
                reply = self.registrar.handle_bytes(message, source)
                if reply is not None:
                    self.transport.write(reply.data)
                    if reply.close:
                        self.transport.loseConnection()
                        return
        except Exception:
            log.failure("SIP/{t} stream error; closing", t=self.transport_name)
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._source = None


class SIPStreamFactory(Factory):
    """Builds :class:`SIPStreamProtocol`; works plain (TCP) or wrapped in TLS."""

    def __init__(self, registrar: Registrar, transport_name: str = "tcp") -> None:
        if transport_name not in ("tcp", "tls"):
            raise ValueError("transport_name is 'tcp' or 'tls'")
        self.registrar = registrar
        self.transport_name = transport_name

    def buildProtocol(self, addr: Any) -> SIPStreamProtocol:
        p = SIPStreamProtocol(self.registrar, self.transport_name)
        p.factory = self
        return p


def make_udp_protocol(registrar: Registrar) -> SIPDatagramProtocol:
    return SIPDatagramProtocol(registrar)


def make_stream_factory(registrar: Registrar, transport: str = "tcp") -> SIPStreamFactory:
    return SIPStreamFactory(registrar, transport)


def certificate_identity(cert: Any) -> tuple[str, str | None]:
    """(SHA-256 fingerprint hex, subject CN) of a pyOpenSSL or Twisted certificate."""
    x509 = cert.original if isinstance(cert, ssl.Certificate) else cert

    c = x509.to_cryptography()
    fingerprint = c.fingerprint(hashes.SHA256()).hex()
    cns = c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else None
    return fingerprint, (cn if isinstance(cn, str) else None)


class _ClientCertRequestingOptions(ssl.CertificateOptions):
    """Asks the client for a certificate but accepts any (or none).

    The phone's certificate is recorded, not trusted: chains are checked, if at all, by the
    policy (which sees the fingerprint), so a self-signed or unknown MIC never fails the
    handshake.
    """

    def getContext(self) -> SSL.Context:
        ctx = super().getContext()
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _accept_any)
        return ctx


def _accept_any(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
    return True


def make_tls_server_options(
    certificate_pem: bytes,
    private_key_pem: bytes,
    extra_chain_pem: tuple[bytes, ...] = (),
) -> ssl.CertificateOptions:
    """Server TLS options for 5061 that request (not require) a client certificate."""
    cert = ssl.Certificate.loadPEM(certificate_pem)
    key = ssl.KeyPair.load(private_key_pem, crypto.FILETYPE_PEM)
    chain = [ssl.Certificate.loadPEM(p).original for p in extra_chain_pem]
    return _ClientCertRequestingOptions(
        privateKey=key.original,
        certificate=cert.original,
        extraCertChain=chain,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def set_receive_buffer(port: Any, size: int) -> None:
    """Ask for a larger UDP receive buffer so a burst (a boot storm) queues instead of dropping.

    The kernel caps it at ``net.core.rmem_max``; failure is harmless.
    """
    sock = getattr(port, "socket", None)
    if sock is None or size <= 0:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    except OSError as exc:
        log.warn("SIP/UDP receive buffer not enlarged: {err}", err=exc)


def start_sweeper(registrar: Registrar, reactor: IReactorTime) -> LoopingCall:
    """One periodic sweep for every binding (not a timer per binding)."""
    loop = LoopingCall(registrar.sweep)
    loop.clock = reactor
    loop.start(registrar.settings.sweep_interval, now=False)
    return loop


class SIPRegistrarService(Service):
    """Listens on UDP/TCP (and TLS when options are given) and runs the expiry sweep.

    A port of ``None`` disables that listener; 0 picks a free port (tests). After
    ``startService`` the ``udp_port``/``tcp_port``/``tls_port`` attributes hold the bound port
    numbers.
    """

    def __init__(
        self,
        registrar: Registrar,
        reactor: Any,
        *,
        udp_port: int | None = 5060,
        tcp_port: int | None = 5060,
        tls_port: int | None = 5061,
        interface: str = "",
        tls_options: ssl.CertificateOptions | None = None,
        udp_receive_buffer: int = 4 * 1024 * 1024,
    ) -> None:
        self.udp_receive_buffer = udp_receive_buffer
        self.registrar = registrar
        self.reactor = reactor
        self.interface = interface
        self.tls_options = tls_options
        self.udp_port = udp_port
        self.tcp_port = tcp_port
        self.tls_port = tls_port if tls_options is not None else None
        self._listeners: list[IListeningPort] = []
        self._sweeper: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        r = self.reactor
        if self.udp_port is not None:
            p = r.listenUDP(self.udp_port, make_udp_protocol(self.registrar), self.interface)
            set_receive_buffer(p, self.udp_receive_buffer)
            self._listeners.append(p)
            self.udp_port = p.getHost().port
        if self.tcp_port is not None:
            f = make_stream_factory(self.registrar, "tcp")
            p = r.listenTCP(self.tcp_port, f, interface=self.interface)
            self._listeners.append(p)
            self.tcp_port = p.getHost().port
        if self.tls_port is not None and self.tls_options is not None:
            f = make_stream_factory(self.registrar, "tls")
            p = r.listenSSL(self.tls_port, f, self.tls_options, interface=self.interface)
            self._listeners.append(p)
            self.tls_port = p.getHost().port
        self._sweeper = start_sweeper(self.registrar, r)
        log.info(
            "SIP registrar listening udp={udp} tcp={tcp} tls={tls}",
            udp=self.udp_port,
            tcp=self.tcp_port,
            tls=self.tls_port,
        )

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        listeners, self._listeners = self._listeners, []
        return DeferredList([maybeDeferred(p.stopListening) for p in listeners])
