"""Twisted adapters for the registrar: UDP, TCP and TLS on one :class:`Registrar`.

Wiring (what the daemon does)::

    registrar = Registrar(
        policy, RegistrarSettings(realm="callboard"), now=reactor.seconds, wall_now=time.time
    )
    service = SIPRegistrarService(
        registrar, reactor,
        udp=[ListenerSpec.datagram("192.0.2.10", 5060, receive_buffer=4 << 20)],
        tcp=[ListenerSpec.stream("192.0.2.10", 5060)],
        tls=[ListenerSpec.stream("192.0.2.10", 5061)],
        tls_options=make_tls_server_options(cert_pem, key_pem),
    )
    service.setServiceParent(parent)

The service owns the listeners and the binding-expiry sweep (a ``TimerService`` on the
reactor). The pieces stand alone too: ``make_udp_protocol(registrar)`` and
``make_stream_factory(registrar, "tcp" | "tls")`` (the latter inside a
``TLSMemoryBIOFactory`` for TLS).

The adapters only move bytes: framing (Content-Length on streams; a framing error is answered
and closes the stream), the client certificate fingerprint on TLS, and the reply's destination
on UDP. A reply may come later (a Deferred, when the registration policy writes): a stream
answers its messages in order and stops reading meanwhile. Any exception below them is logged
and the message dropped, so one bad packet never takes a listener down.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from callboard.protocols import tls
from callboard.protocols.listening import (
    AtomicMultiService,
    Bind,
    Kind,
    ListenerService,
    ListenerSpec,
    listeners_in,
)
from callboard.protocols.settings import check_range
from callboard.protocols.sip.message import Message, SIPParseError, StreamFramer
from callboard.protocols.sip.registrar import Registrar, Reply, Source
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from twisted.application.internet import TimerService
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

log = Logger(namespace="callboard.sip.transports")


_KEEPALIVE_BYTES = b"\r\n\x00 "  # all a keep-alive datagram holds

#: Seconds a stream message may take from its first byte to its last (64*T1, RFC 3261's
#: transaction timeout): a Content-Length larger than what is sent, or a header section that
#: never ends, is then answered 400 (when its head was read) and the connection closed,
#: instead of holding it forever. A new connection has as long for its first message (or
#: keep-alive) to arrive, so one that never says anything (nor finishes its TLS handshake)
#: is closed too. An idle connection between messages is never timed out.
MESSAGE_TIMEOUT = 32.0
#: Bytes read of each datagram: any UDP payload whole (a larger message is then refused 513).
UDP_READ_SIZE = 65536


class SIPDatagramProtocol(DatagramProtocol):
    """SIP over UDP: one datagram is one message; replies follow Via received/rport."""

    def __init__(self, registrar: Registrar) -> None:
        self.registrar = registrar

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        host, port = addr[0], addr[1]
        if datagram[:1] in _KEEPALIVE_BYTES and not datagram.strip(_KEEPALIVE_BYTES):
            return  # keep-alive (CRLF or NAT-binding junk); a message is not copied to know
        try:
            source = Source("udp", host, port, send=self._send)
            answer = self.registrar.handle_bytes(datagram, source)
        except Exception:
            log.failure("SIP/UDP message from {host}:{port} dropped", host=host, port=port)
            return
        if isinstance(answer, Deferred):
            answer.addCallbacks(self._send, self._failed, errbackArgs=(host, port))
        elif answer is not None:
            self._send(answer)

    def _send(self, reply: Reply) -> None:
        """Straight to the socket when there is one: the reply goes back to an address the
        kernel gave us, so Twisted's ``Port.write`` checks of it (a third of a send's cost)
        are not needed. As there, a refused port is no error worth a line."""
        transport = self.transport
        if transport is None:
            return
        sock = getattr(transport, "socket", None)
        try:
            if sock is not None:
                sock.sendto(reply.data, (reply.host, reply.port))
            else:
                transport.write(reply.data, (reply.host, reply.port))
        except ConnectionRefusedError:
            pass
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

    def __init__(
        self,
        registrar: Registrar,
        transport_name: str,
        clock: IReactorTime | None = None,
        message_timeout: float = MESSAGE_TIMEOUT,
    ) -> None:
        self.registrar = registrar
        self.transport_name = transport_name
        self.framer = StreamFramer(registrar.settings.max_message_size)
        self._clock = clock
        self._message_timeout = message_timeout
        self._deadline: IDelayedCall | None = None  # for the message that has begun arriving
        self._heard = False  # anything at all has arrived
        self._source: Source | None = None
        self._inbox: deque[Message] = deque()
        self._framing_error: SIPParseError | None = None
        self._awaiting = False  # a reply is being awaited: the inbox waits
        self._working = False  # inside _work (a Deferred that fired at once must not recurse)
        self._closed = False  # closing or lost: nothing more is processed or sent

    def connectionMade(self) -> None:
        self._arm_deadline()  # for the first message
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
            certs: tuple[Any, ...] = ()
            if ISSLTransport.providedBy(self.transport):
                cert = self.transport.getPeerCertificate()
                if cert is not None:
                    fingerprint, subject = certificate_identity(cert)
                    certs = _peer_certificates(self.transport, cert)
            self._source = Source(
                self.transport_name, host, port, fingerprint, subject, send=self._send,
                client_certs=certs,
            )  # fmt: skip
        return self._source

    def dataReceived(self, data: bytes) -> None:
        self._heard = True
        if not self._closed:
            self._guarded(self._receive, data)

    def _receive(self, data: bytes) -> None:
        messages, error = self.framer.messages(data)
        self._inbox.extend(messages)
        self._framing_error = error
        self._watch_incomplete(restart=bool(messages))
        self._work()

    def _watch_incomplete(self, restart: bool) -> None:
        """Time the message that has begun arriving (``restart``: a new one, the one before
        completed); none arriving, no timer."""
        if not self.framer.incomplete:
            self._cancel_deadline()
            return
        if self._deadline is not None and not restart:
            return
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        clock: Any = self._clock
        if clock is None:
            from twisted.internet import reactor as clock
        self._deadline = clock.callLater(self._message_timeout, self._message_overdue)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _message_overdue(self) -> None:
        self._deadline = None
        if self._closed:
            return
        if self._awaiting:  # the wait is ours (a reply being prepared), not the client's
            self._watch_incomplete(restart=True)
            return
        if self._heard:
            why = f"incomplete message after {self._message_timeout:g} s"
        else:
            why = f"nothing received in {self._message_timeout:g} s"
        self._framing_error = self.framer.give_up(why)
        self._guarded(self._work)

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
        """A framing error: answer it (400, 513, 505: its status) when possible, then close."""
        status = error.status  # 400; 513 when too large, 505 for another SIP version
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
        self._cancel_deadline()
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
        self._cancel_deadline()


class SIPStreamFactory(Factory):
    """Builds :class:`SIPStreamProtocol`; works plain (TCP) or wrapped in TLS."""

    def __init__(
        self,
        registrar: Registrar,
        transport_name: str = "tcp",
        clock: IReactorTime | None = None,
        message_timeout: float = MESSAGE_TIMEOUT,
    ) -> None:
        if transport_name not in ("tcp", "tls"):
            raise ValueError("transport_name is 'tcp' or 'tls'")
        self.registrar = registrar
        self.transport_name = transport_name
        self.clock = clock
        self.message_timeout = message_timeout

    def buildProtocol(self, addr: Any) -> SIPStreamProtocol:
        p = SIPStreamProtocol(self.registrar, self.transport_name, self.clock, self.message_timeout)
        p.factory = self
        return p


def make_udp_protocol(registrar: Registrar) -> SIPDatagramProtocol:
    return SIPDatagramProtocol(registrar)


def make_stream_factory(
    registrar: Registrar,
    transport: str = "tcp",
    clock: IReactorTime | None = None,
    message_timeout: float = MESSAGE_TIMEOUT,
) -> SIPStreamFactory:
    return SIPStreamFactory(registrar, transport, clock, message_timeout)


def certificate_identity(cert: Any) -> tuple[str, str | None]:
    """(SHA-256 fingerprint hex, subject CN) of a pyOpenSSL or Twisted certificate."""
    x509 = cert.original if isinstance(cert, ssl.Certificate) else cert

    c = x509.to_cryptography()
    fingerprint = c.fingerprint(hashes.SHA256()).hex()
    cns = c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else None
    return fingerprint, (cn if isinstance(cn, str) else None)


def _peer_certificates(transport: Any, cert: Any) -> tuple[Any, ...]:
    """The client's leaf then the chain it sent (OpenSSL leaves the leaf out server-side)."""
    leaf = (cert.original if isinstance(cert, ssl.Certificate) else cert).to_cryptography()
    handle = getattr(transport, "getHandle", lambda: None)()
    chain = getattr(handle, "get_peer_cert_chain", lambda **_: None)(as_cryptography=True)
    return (leaf, *(c for c in chain or () if c != leaf))


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


@dataclass(frozen=True)
class SIPTransportSettings:
    """Socket knobs of the SIP listeners (the transport part of the [sip] section)."""

    # SO_RCVBUF of each SIP/UDP socket, so a boot storm's burst of REGISTERs queues instead
    # of being dropped; the kernel caps it at net.core.rmem_max. 0: the kernel's default.
    udp_receive_buffer: int = 4 * 1024 * 1024

    def validate(self) -> None:
        check_range("udp_receive_buffer", self.udp_receive_buffer, 0, 1 << 30)


class _FollowingUDPListener(ListenerService):
    """SIP over UDP bound to port 0 takes the port SIP over TCP got on the same address.

    Phones are told one SIP port for every transport, so with ports picked by the kernel
    (tests, ``--sip-port 0``) UDP follows TCP.
    """

    def __init__(self, spec: ListenerSpec, protocol: SIPDatagramProtocol, reactor: Any) -> None:
        super().__init__("sip-udp", spec, protocol, reactor)
        self.leader: ListenerService | None = None

    def spec_to_listen(self) -> ListenerSpec:
        source = self.spec.source
        leader = self.leader
        if not isinstance(source, Bind) or source.port != 0 or leader is None:
            return self.spec
        bound = leader.address()
        if bound is None:
            return self.spec
        return replace(self.spec, source=Bind(source.host, bound[1]))


class SIPRegistrarService(AtomicMultiService):
    """SIP over UDP, TCP and TLS on one :class:`Registrar`, plus its expiry sweep.

    Every listener comes from a :class:`~callboard.protocols.listening.ListenerSpec` (bound or
    adopted); TLS listeners wrap the stream protocol in ``tls_options``. For tests and tools,
    ``interface`` with ``udp_port``/``tcp_port``/``tls_port`` (None: no such listener; 0: a
    free port) is short for one spec of each. TCP listeners start first, so UDP on port 0
    can take TCP's port; after ``startService`` the ``udp_port``/``tcp_port``/``tls_port``
    attributes hold the first bound port of each transport.
    """

    def __init__(
        self,
        registrar: Registrar,
        reactor: Any,
        *,
        udp: Sequence[ListenerSpec] = (),
        tcp: Sequence[ListenerSpec] = (),
        tls: Sequence[ListenerSpec] = (),
        tls_options: IOpenSSLServerConnectionCreator | None = None,
        interface: str = "",
        udp_port: int | None = None,
        tcp_port: int | None = None,
        tls_port: int | None = None,
        udp_receive_buffer: int = SIPTransportSettings.udp_receive_buffer,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.registrar = registrar
        self.reactor = reactor
        udp = [
            # Read whole: Twisted reads 8 KiB of a datagram by default and drops the rest, so a
            # larger message was parsed cut short as if it were whole (or refused for the cut).
            spec.with_options(max_packet_size=max(spec.max_packet_size, UDP_READ_SIZE))
            for spec in [*udp, *_shorthand("datagram", interface, udp_port, udp_receive_buffer)]
        ]
        tcp = [*tcp, *_shorthand("stream", interface, tcp_port)]
        tls = [*tls, *_shorthand("stream", interface, tls_port)]
        if tls and tls_options is None:
            raise ValueError("SIP over TLS needs tls_options")
        tcp_listeners = [
            self._add("sip", spec, make_stream_factory(registrar, "tcp", reactor)) for spec in tcp
        ]
        for spec in udp:
            listener = _FollowingUDPListener(spec, make_udp_protocol(registrar), reactor)
            listener.leader = _same_host(spec, tcp_listeners)
            listener.setServiceParent(self)  # type: ignore[no-untyped-call]
        for spec in tls:
            assert tls_options is not None
            stream = make_stream_factory(registrar, "tls", reactor)
            factory = TLSMemoryBIOFactory(tls_options, False, stream)
            self._add("sip-tls", spec, factory)
        # Bindings expire through one periodic sweep, not a timer per binding.
        sweeper = TimerService(registrar.settings.sweep_interval, registrar.sweep)
        sweeper.clock = reactor
        sweeper.setServiceParent(self)
        self.udp_port: int | None = None
        self.tcp_port: int | None = None
        self.tls_port: int | None = None

    def _add(self, label: str, spec: ListenerSpec, factory: IProtocolFactory) -> ListenerService:
        factory.noisy = False  # type: ignore[attr-defined]  # a line per connection is noise
        listener = ListenerService(label, spec, factory, self.reactor)
        listener.setServiceParent(self)  # type: ignore[no-untyped-call]
        return listener

    def startService(self) -> None:
        super().startService()
        self.udp_port = self._first_port("sip-udp")
        self.tcp_port = self._first_port("sip")
        self.tls_port = self._first_port("sip-tls")
        log.info(
            "SIP registrar listening udp={udp} tcp={tcp} tls={tls}",
            udp=self.udp_port,
            tcp=self.tcp_port,
            tls=self.tls_port,
        )

    def _first_port(self, label: str) -> int | None:
        for listener in listeners_in(self):
            address = listener.address()
            if listener.label == label and address is not None:
                return address[1]
        return None


def _shorthand(
    kind: Kind, interface: str, port: int | None, receive_buffer: int = 0
) -> list[ListenerSpec]:
    if port is None:
        return []
    return [ListenerSpec(kind, Bind(interface, port), receive_buffer=receive_buffer)]


def _same_host(spec: ListenerSpec, listeners: Sequence[ListenerService]) -> ListenerService | None:
    if not isinstance(spec.source, Bind):
        return None
    for listener in listeners:
        other = listener.spec.source
        if isinstance(other, Bind) and other.host == spec.source.host:
            return listener
    return None
