"""A TVS client for the emulated phone and the tests.

It connects with TLS, optionally presents a MIC, pins the TVS certificate taken from the ITL
(the server's leaf must equal the pinned DER, checked before any request leaves, so a code is
never sent to an impostor), then exchanges frames.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import Any

from callboard.protocols import tls
from callboard.protocols.tvs import codec
from callboard.protocols.tvs.codec import (
    ActivateRequest,
    ActivateResponse,
    DeviceName,
    Frame,
    VerifyRequest,
    VerifyResponse,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import defer, endpoints, ssl
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

try:
    from twisted.internet.interfaces import IHandshakeListener
except ImportError:  # pragma: no cover - very old Twisted
    IHandshakeListener = None  # type: ignore[assignment,misc]

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class PinMismatch(Exception):
    """The server's certificate is not the TVS certificate pinned from the ITL."""


class ConnectionClosed(Exception):
    """The server closed the connection before answering."""


@implementer(IHandshakeListener)
class TVSClientProtocol(Protocol):
    """Sends frames in order; each ``request`` fires with the next response frame."""

    def __init__(self, pinned_der: bytes | None) -> None:
        self.pinned_der = pinned_der
        self.ready: defer.Deferred[TVSClientProtocol] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self._waiting: deque[defer.Deferred[Frame]] = deque()
        self._buffer = bytearray()
        self.frames: list[Frame] = []
        self.peer_der: bytes | None = None

    def handshakeCompleted(self) -> None:
        transport: Any = self.transport
        conn = transport.getHandle()
        peer = conn.get_peer_certificate(as_cryptography=True) if conn is not None else None
        self.peer_der = peer.public_bytes(serialization.Encoding.DER) if peer else None
        if self.pinned_der is not None and self.peer_der != self.pinned_der:
            transport.abortConnection()
            self.ready.errback(PinMismatch("server certificate does not match the ITL's TVS"))
            return
        self.ready.callback(self)

    def send_raw(self, data: bytes) -> defer.Deferred[Frame]:
        assert self.transport is not None
        d: defer.Deferred[Frame] = defer.Deferred()
        self._waiting.append(d)
        self.transport.write(data)
        return d

    def request(self, data: bytes) -> defer.Deferred[Frame]:
        return self.send_raw(data)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while True:
            try:
                frame, used = codec.decode_frame(self._buffer)
            except codec.IncompleteFrame:
                return
            except codec.CodecError as exc:
                self._fail_all(exc)
                assert self.transport is not None
                self.transport.loseConnection()
                return
            del self._buffer[:used]
            self.frames.append(frame)
            if self._waiting:
                self._waiting.popleft().callback(frame)

    def _fail_all(self, exc: Exception) -> None:
        while self._waiting:
            self._waiting.popleft().errback(exc)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.ready.called:
            self.ready.errback(reason)
        self._fail_all(ConnectionClosed(str(reason.value)))
        self.closed.callback(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


def connect(
    reactor: Any,
    host: str,
    port: int,
    *,
    pinned_der: bytes | None,
    mic: tuple[x509.Certificate, PrivateKey] | None = None,
    extra_chain: tuple[x509.Certificate, ...] = (),
    timeout: float = 30.0,
    context: ssl.CertificateOptions | None = None,
) -> defer.Deferred[TVSClientProtocol]:
    """Connect, complete TLS and check the pin; fires with a ready ``TVSClientProtocol``.

    ``pinned_der=None`` disables pinning (trust on first use); callers must opt in explicitly.
    """
    options = context if context is not None else tls.client_options(mic, extra_chain)
    endpoint = endpoints.SSL4ClientEndpoint(reactor, host, port, options, timeout=timeout)
    proto = TVSClientProtocol(pinned_der)
    connected: defer.Deferred[Any] = endpoint.connect(Factory.forProtocol(lambda: proto))

    def wait_ready(_: object) -> defer.Deferred[TVSClientProtocol]:
        return proto.ready

    d: defer.Deferred[TVSClientProtocol] = connected.addCallback(wait_ready)
    d.addTimeout(timeout, reactor)
    return d


def new_session_id() -> int:
    return int.from_bytes(os.urandom(4), "big")


def _one_shot(
    reactor: IReactorTime,
    host: str,
    port: int,
    payload: bytes,
    parse: Callable[[Frame], Any],
    *,
    pinned_der: bytes | None,
    mic: tuple[x509.Certificate, PrivateKey] | None,
    timeout: float,
    context: ssl.CertificateOptions | None,
) -> defer.Deferred[Any]:
    async def run() -> Any:
        proto = await connect(
            reactor, host, port, pinned_der=pinned_der, mic=mic, timeout=timeout, context=context
        )
        try:
            d = proto.request(payload)
            d.addTimeout(timeout, reactor)
            frame = await d
        finally:
            proto.close()
        return parse(frame)

    return defer.ensureDeferred(run())


def activate(
    reactor: IReactorTime,
    host: str,
    port: int,
    *,
    device: DeviceName,
    code: str,
    pinned_der: bytes | None,
    mic: tuple[x509.Certificate, PrivateKey] | None = None,
    session_id: int | None = None,
    timeout: float = 30.0,
    context: ssl.CertificateOptions | None = None,
) -> defer.Deferred[ActivateResponse]:
    """One ACTIVATE exchange on a fresh connection."""
    sid = new_session_id() if session_id is None else session_id
    payload = ActivateRequest(sid, device, code).encode()
    return _one_shot(
        reactor,
        host,
        port,
        payload,
        ActivateResponse.from_frame,
        pinned_der=pinned_der,
        mic=mic,
        timeout=timeout,
        context=context,
    )


def verify(
    reactor: IReactorTime,
    host: str,
    port: int,
    *,
    certificate_der: bytes,
    device_name: str | None,
    pinned_der: bytes | None,
    mic: tuple[x509.Certificate, PrivateKey] | None = None,
    session_id: int | None = None,
    timeout: float = 30.0,
    context: ssl.CertificateOptions | None = None,
) -> defer.Deferred[VerifyResponse]:
    """One VERIFY exchange on a fresh connection (as a real phone does)."""
    sid = new_session_id() if session_id is None else session_id
    payload = VerifyRequest(sid, device_name, certificate_der).encode()
    return _one_shot(
        reactor,
        host,
        port,
        payload,
        VerifyResponse.from_frame,
        pinned_der=pinned_der,
        mic=mic,
        timeout=timeout,
        context=context,
    )
