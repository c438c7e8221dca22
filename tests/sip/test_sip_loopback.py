"""The registrar's rules over real loopback sockets: UDP, TCP and TLS (port 0, 127.0.0.1)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_twisted
from callboard.protocols.sip.digest import build_authorization, parse_challenge
from callboard.protocols.sip.message import Response, StreamFramer, parse_message
from callboard.protocols.sip.registrar import Registrar, RegistrarSettings
from callboard.protocols.sip.transports import SIPRegistrarService, make_tls_server_options
from OpenSSL import crypto
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import DatagramProtocol, Protocol

from .conftest import smuggling  # type: ignore[import-not-found]

TIMEOUT = 5


class UDPClient(DatagramProtocol):
    def __init__(self) -> None:
        self.queue: defer.DeferredQueue[bytes] = defer.DeferredQueue()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.queue.put(datagram)


class StreamClient(Protocol):
    def __init__(self) -> None:
        self.framer = StreamFramer()
        self.queue: defer.DeferredQueue[bytes] = defer.DeferredQueue()
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        for m in self.framer.feed(data):
            self.queue.put(m)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


class Peer:
    """One client socket of a given transport, talking to the registrar under test."""

    def __init__(self, transport: str, port: int) -> None:
        self.transport = transport
        self.port = port
        self.udp: UDPClient | None = None
        self.stream: StreamClient | None = None
        self.local_port = 0

    async def open(self, client_cert: tuple[bytes, bytes] | None = None) -> None:
        if self.transport == "udp":
            self.udp = UDPClient()
            self._listener = reactor.listenUDP(0, self.udp, interface="127.0.0.1")  # type: ignore[attr-defined]
            self.local_port = self._listener.getHost().port
            return
        self.stream = StreamClient()
        if self.transport == "tcp":
            ep: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        else:
            kw: dict[str, Any] = {}
            if client_cert is not None:
                kw["certificate"] = crypto.load_certificate(crypto.FILETYPE_PEM, client_cert[0])
                kw["privateKey"] = crypto.load_privatekey(crypto.FILETYPE_PEM, client_cert[1])
            ep = SSL4ClientEndpoint(
                reactor, "127.0.0.1", self.port, ssl.CertificateOptions(verify=False, **kw)
            )
        await connectProtocol(ep, self.stream)
        assert self.stream.transport is not None
        self.local_port = self.stream.transport.getHost().port

    def send(self, data: bytes) -> None:
        if self.udp is not None:
            assert self.udp.transport is not None
            self.udp.transport.write(data, ("127.0.0.1", self.port))
        else:
            assert self.stream is not None and self.stream.transport is not None
            self.stream.transport.write(data)

    async def recv(self) -> Response:
        q = self.udp.queue if self.udp is not None else self.stream.queue  # type: ignore[union-attr]
        d = q.get()
        d.addTimeout(TIMEOUT, reactor)
        msg = parse_message(await d)
        assert isinstance(msg, Response)
        return msg

    async def request(self, data: bytes) -> Response:
        self.send(data)
        return await self.recv()

    async def close(self) -> None:
        if self.udp is not None:
            await defer.maybeDeferred(self._listener.stopListening)
        elif self.stream is not None and self.stream.transport is not None:
            self.stream.transport.loseConnection()
            d = self.stream.closed
            d.addTimeout(TIMEOUT, reactor)
            await d


@pytest_twisted.async_yield_fixture
async def server(
    policy: Any, server_cert: tuple[bytes, bytes]
) -> AsyncIterator[SIPRegistrarService]:
    registrar = Registrar(
        policy,
        RegistrarSettings(max_message_size=4096),
        now=reactor.seconds,  # type: ignore[attr-defined]
        wall_now=time.time,
    )
    svc = SIPRegistrarService(
        registrar,
        reactor,
        udp_port=0,
        tcp_port=0,
        tls_port=0,
        interface="127.0.0.1",
        tls_options=make_tls_server_options(*server_cert),
    )
    svc.startService()
    yield svc
    await svc.stopService()


def port_of(svc: SIPRegistrarService, transport: str) -> int:
    port = {"udp": svc.udp_port, "tcp": svc.tcp_port, "tls": svc.tls_port}[transport]
    assert port is not None
    return port


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
@pytest_twisted.ensureDeferred
async def test_register_rules(
    server: SIPRegistrarService, transport: str, make_register: Callable[..., bytes]
) -> None:
    peer = Peer(transport, port_of(server, transport))
    await peer.open()
    T = transport.upper()
    host = f"127.0.0.1:{peer.local_port}"

    def reg(**kw: Any) -> bytes:
        return make_register(transport=T, contact_host=host, **kw)

    try:
        r = await peer.request(reg(cseq=1))
        assert r.status == 200 and r.headers.get("expires") == "120"
        assert r.headers.values("contact")[0].endswith(";expires=3600;x-cisco-newreg")
        [b] = server.registrar.bindings_for_device("SEP001122334455")
        assert b.transport == transport and b.source == host
        assert (await peer.request(reg(cseq=1))).status == 400  # CSeq not higher
        assert (await peer.request(reg(cseq=2, expires=10))).status == 423
        r = await peer.request(reg(cseq=3, contacts=[]))  # query
        assert r.status == 200 and len(r.headers.values("contact")) == 1
        r = await peer.request(reg(device="SEP0000000000AA", mac="0000000000aa"))
        assert r.status == 404 and r.headers.get("warning", "").startswith("399 ")
        r = await peer.request(reg(device="SEP00AABBCCDDEE", mac="00aabbccddee", user="2001"))
        assert r.status == 403
        # Digest on the line with a password.
        r = await peer.request(reg(user="1002", call_id="l2", cseq=1))
        assert r.status == 401
        ch = parse_challenge(r.headers.get_all("www-authenticate"))
        auth = build_authorization(
            ch, method="REGISTER", uri="sip:192.0.2.10", username="a1002", password="pw"
        )
        r = await peer.request(
            reg(user="1002", call_id="l2", cseq=2, extra=(f"Authorization: {auth}",))
        )
        assert r.status == 200 and "x-cisco-newreg" not in r.headers.values("contact")[0]
        assert len(server.registrar.bindings_for_device("SEP001122334455")) == 2
        assert (await peer.request(reg(max_forwards=0))).status == 483
        r = await peer.request(reg(method="OPTIONS"))
        assert r.status == 200 and r.headers.get("allow") == "REGISTER, OPTIONS, REFER"
        assert (await peer.request(reg(method="SUBSCRIBE"))).status == 405
        bad = reg(cseq=9).replace(b"CSeq: 9 REGISTER", b"CSeq: nine REGISTER")
        assert (await peer.request(bad)).status == 400
        # Unregister with '*'.
        r = await peer.request(reg(contacts=["*"], expires=0, cseq=20))
        assert r.status == 200 and r.headers.values("contact") == []
        assert len(server.registrar.bindings_for_device("SEP001122334455")) == 1
        r = await peer.request(
            reg(user="1002", call_id="l2", cseq=3, expires=0, extra=(f"Authorization: {auth}",))
        )
        assert r.status == 200
        assert server.registrar.bindings_for_device("SEP001122334455") == []
    finally:
        await peer.close()


@pytest_twisted.ensureDeferred
async def test_udp_retransmission_and_rport(
    server: SIPRegistrarService, make_register: Callable[..., bytes]
) -> None:
    peer = Peer("udp", port_of(server, "udp"))
    await peer.open()
    try:
        via = "Via: SIP/2.0/UDP 10.9.9.9:5099;branch=z9hG4bKretx;rport"
        data = make_register(via=via, contact_host=f"127.0.0.1:{peer.local_port}")
        first = await peer.request(data)
        second = await peer.request(data)
        assert first.status == 200 and second.to_bytes() == first.to_bytes()
        assert first.headers.values("via")[0].endswith(
            f";received=127.0.0.1;rport={peer.local_port}"
        )
        assert server.registrar.counters.retransmissions == 1
        # Junk and keep-alives are dropped without killing the listener.
        peer.send(b"\r\n\r\n")
        peer.send(b"\x00\xff garbage")
        # Without rport the reply goes to the source address and the Via sent-by port.
        r = await peer.request(
            make_register(method="OPTIONS", contact_host=f"127.0.0.1:{peer.local_port}")
        )
        assert r.status == 200
    finally:
        await peer.close()


@pytest.mark.parametrize("transport", ["tcp", "tls"])
@pytest_twisted.ensureDeferred
async def test_stream_framing(
    server: SIPRegistrarService, transport: str, make_register: Callable[..., bytes]
) -> None:
    peer = Peer(transport, port_of(server, transport))
    await peer.open()
    try:
        # Keep-alives, then two requests in one write, then one split over writes.
        a = make_register(method="OPTIONS")
        b = make_register(cseq=1)
        peer.send(b"\r\n\r\n" + a + b)
        assert (await peer.recv()).status == 200
        assert (await peer.recv()).status == 200
        c = make_register(method="OPTIONS")
        peer.send(c[:20])
        peer.send(c[20:])
        assert (await peer.recv()).status == 200
        # Oversized (limit 4096 here): 513 then close.
        big = make_register(extra=("X-Pad: " + "a" * 5000,))
        r = await peer.request(big)
        assert r.status == 513
        assert peer.stream is not None
        d = peer.stream.closed
        d.addTimeout(TIMEOUT, reactor)
        await d
    finally:
        await peer.close() if peer.stream and not peer.stream.closed.called else None


@pytest_twisted.ensureDeferred
async def test_tcp_request_smuggling_closes_the_stream(
    server: SIPRegistrarService, make_register: Callable[..., bytes]
) -> None:
    """``Content-Length: 0`` then ``Content-Length: N``: one 400, then the stream is closed, and
    the body is never read as a second request."""
    peer = Peer("tcp", port_of(server, "tcp"))
    await peer.open()
    assert peer.stream is not None
    peer.send(smuggling(contact_host=f"127.0.0.1:{peer.local_port}"))
    answer = await peer.recv()
    assert answer.status == 400 and "Content-Length" in answer.headers.get("warning", "")
    closed = peer.stream.closed
    closed.addTimeout(TIMEOUT, reactor)
    await closed
    assert peer.stream.queue.pending == []  # no answer to a smuggled request
    assert server.registrar.bindings_for_device("SEP001122334455") == []
    assert server.registrar.counters.requests == 0


@pytest_twisted.ensureDeferred
async def test_tls_client_certificate_recorded(
    server: SIPRegistrarService,
    make_register: Callable[..., bytes],
    phone_cert: tuple[bytes, bytes],
    policy: Any,
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    expected = x509.load_pem_x509_certificate(phone_cert[0]).fingerprint(hashes.SHA256()).hex()
    peer = Peer("tls", port_of(server, "tls"))
    await peer.open(client_cert=phone_cert)
    try:
        r = await peer.request(make_register(transport="TLS"))
        assert r.status == 200
        [b] = server.registrar.bindings_for_device("SEP001122334455")
        assert b.client_cert_fingerprint == expected and b.transport == "tls"
        assert policy.seen[-1].client_cert_fingerprint == expected
    finally:
        await peer.close()
