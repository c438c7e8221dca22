"""Twisted adapters for the registrar: UDP, TCP and TLS on one :class:`Registrar`.

Wiring (what the daemon does)::

    registrar = Registrar(
        policy, RegistrarSettings(realm="callboard"), now=reactor.seconds, wall_now=time.time
    )
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

The adapters only move bytes: framing (Content-Length on streams; a framing error is answered
and closes the stream), the client certificate fingerprint on TLS, and the reply's destination
on UDP. A reply may come later (a Deferred, when the registration policy writes): a stream
answers its messages in order and stops reading meanwhile. Any exception below them is logged
and the message dropped, so one bad packet never takes a listener down.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from callboard.protocols import tls
from callboard.protocols.sip.message import Message, MessageTooLarge, SIPParseError, StreamFramer
from callboard.protocols.sip.registrar import Registrar, Reply, Source
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IPushProducer, IReactorTime, ISSLTransport
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
            answer = self.registrar.handle_bytes(datagram, Source("udp", host, port))
        except Exception:
            log.failure("SIP/UDP message from {host}:{port} dropped", host=host, port=port)
            return
        if isinstance(answer, Deferred):
            answer.addCallbacks(self._send, self._failed, errbackArgs=(host, port))
        elif answer is not None:
            self._send(answer)

    def _send(self, reply: Reply) -> None:
        if self.transport is None:
            return
        try:
            self.transport.write(reply.data, (reply.host, reply.port))
        except OSError as exc:
            log.warn("SIP/UDP send to {host} failed: {err}", host=reply.host, err=exc)

    def _failed(self, failure: Failure, host: str, port: int) -> None:
        log.failure("SIP/UDP message from {host}:{port} dropped", failure, host=host, port=port)


class SIPStreamProtocol(Protocol):
    """SIP over TCP or TLS: Content-Length framing, replies on the same connection.

    Messages are answered one at a time, in order: while the registrar works on one
    asynchronously (a Deferred), the rest wait and the transport stops reading. A framing
    error is answered (when the message is readable enough) after everything before it, and
    the connection is then closed: nothing after it can be trusted to be a message.
    """

    def __init__(self, registrar: Registrar, transport_name: str) -> None:
        self.registrar = registrar
        self.transport_name = transport_name
        self.framer = StreamFramer(registrar.settings.max_message_size)
        self._source: Source | None = None
        self._inbox: deque[Message] = deque()
        self._framing_error: SIPParseError | None = None
        self._awaiting = False  # a reply is being awaited: the inbox waits
        self._working = False  # inside _work (a Deferred that fired at once must not recurse)
        self._closed = False  # closing or lost: nothing more is processed or sent

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
        if not self._closed:
            self._guarded(self._receive, data)

    def _receive(self, data: bytes) -> None:
        messages, error = self.framer.messages(data)
        self._inbox.extend(messages)
        self._framing_error = error
        self._work()

    def _work(self) -> None:
        """Answer what is in the inbox, in order, until one reply has to be awaited."""
        if self._working:
            return  # the loop below goes on by itself
        self._working = True
        try:
            self._answer_inbox(self._get_source())
        finally:
            self._working = False

    def _answer_inbox(self, source: Source) -> None:
        while not self._awaiting and not self._closed:
            if not self._inbox:
                if self._framing_error is not None:
                    self._refuse_stream(self._framing_error, source)
                return
            answer = self.registrar.handle_message(self._inbox.popleft(), source)
            if isinstance(answer, Deferred):
                self._await(answer)
            elif answer is not None:
                self._send(answer)

    def _await(self, answer: Deferred[Reply]) -> None:
        self._awaiting = True
        self._pause(True)
        answer.addCallback(self._send)
        answer.addErrback(self._failed)
        answer.addBoth(self._resume)

    def _resume(self, _: object) -> None:
        self._awaiting = False
        if not self._closed:
            self._pause(False)
            self._guarded(self._work)

    def _send(self, reply: Reply) -> None:
        if self._closed or self.transport is None:
            return
        self.transport.write(reply.data)
        if reply.close:
            self._close()

    def _failed(self, failure: Failure) -> None:
        log.failure("SIP/{t} message dropped", failure, t=self.transport_name)

    def _refuse_stream(self, error: SIPParseError, source: Source) -> None:
        """A framing error: answer 400 (513 when too large) when possible, then close."""
        status = 513 if isinstance(error, MessageTooLarge) else 400
        reply = self.registrar.error_reply(error.partial, status, source, error.reason)
        if reply is not None and self.transport is not None:
            self.transport.write(reply.data)
        log.info(
            "SIP/{t} stream from {source} closed: {why}",
            t=self.transport_name,
            source=source.address,
            why=error.reason,
        )
        self._close()

    def _close(self) -> None:
        self._closed = True
        self._inbox.clear()
        if self.transport is not None:
            self.transport.loseConnection()

    def _pause(self, paused: bool) -> None:
        """Stop (or restart) reading while a reply is awaited: the inbox stays bounded.

        The reader is the connection itself, or for TLS the connection under the TLS wrapper
        (which is no producer itself).
        """
        reader: Any = self.transport
        while reader is not None and not IPushProducer.providedBy(reader):
            reader = getattr(reader, "transport", None)
        if reader is not None:
            reader.pauseProducing() if paused else reader.resumeProducing()

    def _guarded(self, step: Callable[..., None], *args: Any) -> None:
        try:
            step(*args)
        except Exception:
            log.failure("SIP/{t} stream error; closing", t=self.transport_name)
            self._closed = True
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closed = True
        self._inbox.clear()
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


def make_tls_server_options(
    certificate_pem: bytes,
    private_key_pem: bytes,
    extra_chain_pem: tuple[bytes, ...] = (),
) -> ssl.CertificateOptions:
    """Server TLS options for 5061 that request (not require) a client certificate.

    The phone's certificate is recorded, not trusted: chains are checked, if at all, by the
    policy (which sees the fingerprint), so a self-signed or unknown MIC never fails the
    handshake.
    """
    cert = x509.load_pem_x509_certificate(certificate_pem)
    chain = [x509.load_pem_x509_certificate(p) for p in extra_chain_pem]
    return tls.server_options(cert, tls.private_key_from_pem(private_key_pem), chain)


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
