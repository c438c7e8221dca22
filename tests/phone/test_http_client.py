"""The phone's HTTP client and client TLS against real loopback servers.

twisted.web serves the plain files (Content-Length and chunked bodies, keep-alive); small raw
servers play the misbehaving ones (a kept-alive connection closed under a request, silence,
no answer at all); TLS servers with the daemon's server options check the pins and the MIC a
phone presents on the shared client context.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from callboard.phone.endpoints import client_endpoint, connect_protocol
from callboard.phone.http_client import HttpFetcher, HTTPStatusError, PinMismatch
from callboard.phone.http_wire import HttpWireError
from callboard.phone.tls_client import MicClientOptions
from callboard.protocols import tls
from callboard.protocols.tvs import labpki
from cryptography.hazmat.primitives import serialization
from support.waiting import until
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.web import resource, server

reactor: Any = _reactor


class _Files(resource.Resource):
    """A few files, one streamed without a length (chunked), one failing, the rest 404."""

    isLeaf = True
    files = {b"/SEP0A.cnf.xml": b"<device/>", b"/big.bin": b"x" * 100}

    def render_GET(self, request: Any) -> Any:
        if request.path == b"/chunked.xml":
            request.write(b"<chunk1/>")  # no Content-Length: HTTP/1.1 chunked encoding
            request.write(b"<chunk2/>")
            request.finish()
            return server.NOT_DONE_YET
        if request.path == b"/fails":
            request.setResponseCode(500)
            return b"no"
        if request.path not in self.files:
            request.setResponseCode(404)
            return b"not found"
        return self.files[request.path]


class _Counting(server.Site):
    connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        type(self).connections += 1
        return super().buildProtocol(addr)


@pytest.fixture
def web() -> Iterator[tuple[int, type[_Counting]]]:
    site = type("Site", (_Counting,), {"connections": 0})(_Files())
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    yield port.getHost().port, type(site)
    port.stopListening()


@pytest_twisted.ensureDeferred
async def test_files_404_and_errors_on_one_kept_alive_connection(
    web: tuple[int, type[_Counting]],
) -> None:
    port, site = web
    http = HttpFetcher(reactor)
    try:
        assert await http.fetch("127.0.0.1", port, "SEP0A.cnf.xml") == b"<device/>"
        assert await http.fetch("127.0.0.1", port, "missing.xml") is None
        assert await http.fetch("127.0.0.1", port, "chunked.xml") == b"<chunk1/><chunk2/>"
        with pytest.raises(HTTPStatusError) as failed:
            await http.fetch("127.0.0.1", port, "fails")
        assert failed.value.status == 500
        assert await http.fetch("127.0.0.1", port, "SEP0A.cnf.xml") == b"<device/>"
    finally:
        await http.close()
    assert site.connections == 1  # every request after the first reused the connection


@pytest_twisted.ensureDeferred
async def test_a_body_past_the_limit_is_413(web: tuple[int, type[_Counting]]) -> None:
    port, _site = web
    http = HttpFetcher(reactor, max_size=10)
    try:
        with pytest.raises(HTTPStatusError) as failed:
            await http.fetch("127.0.0.1", port, "big.bin")
        assert failed.value.status == 413
        assert await http.fetch("127.0.0.1", port, "SEP0A.cnf.xml") == b"<device/>"
    finally:
        await http.close()


@pytest_twisted.ensureDeferred
async def test_not_persistent_means_a_connection_per_request(
    web: tuple[int, type[_Counting]],
) -> None:
    port, site = web
    http = HttpFetcher(reactor, persistent=False)
    for _ in range(3):
        assert await http.fetch("127.0.0.1", port, "SEP0A.cnf.xml") == b"<device/>"
    await http.close()
    assert site.connections == 3


# Misbehaving servers ---------------------------------------------------------------------


class _Raw(Protocol):
    """Answers per ``script``: the Nth request on a connection gets script(N) (None: close)."""

    def __init__(self, owner: _RawServer) -> None:
        self.owner = owner
        self.requests = 0

    def connectionMade(self) -> None:
        self.owner.connections += 1

    def dataReceived(self, data: bytes) -> None:
        self.owner.received += data
        if not data.endswith(b"\r\n\r\n"):
            return
        self.requests += 1
        answer = self.owner.script(self.requests)
        assert self.transport is not None
        if answer is None:
            self.transport.loseConnection()
        elif answer:
            self.transport.write(answer)

    def connectionLost(self, reason: Any = None) -> None:
        self.owner.lost += 1


class _RawServer(Factory):
    noisy = False

    def __init__(self, script: Callable[[int], bytes | None]) -> None:
        self.script = script
        self.connections = 0
        self.lost = 0
        self.received = b""

    def buildProtocol(self, addr: Any) -> Protocol:
        return _Raw(self)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def raw_server(script: Callable[[int], bytes | None]) -> tuple[Any, _RawServer]:
    factory = _RawServer(script)
    return reactor.listenTCP(0, factory, interface="127.0.0.1"), factory


@pytest_twisted.ensureDeferred
async def test_a_kept_alive_connection_closed_under_a_request_is_retried_on_a_new_one() -> None:
    listening, raw = raw_server(lambda n: OK if n == 1 else None)
    port = listening.getHost().port
    http = HttpFetcher(reactor)
    try:
        assert await http.fetch("127.0.0.1", port, "a") == b"ok"
        assert await http.fetch("127.0.0.1", port, "b") == b"ok"  # 1st closed: asked again
    finally:
        await http.close()
        await listening.stopListening()
    assert raw.connections == 2


@pytest_twisted.ensureDeferred
async def test_a_new_connection_closed_without_an_answer_is_an_error_not_a_retry() -> None:
    listening, raw = raw_server(lambda n: None)
    http = HttpFetcher(reactor)
    try:
        with pytest.raises(HttpWireError, match="closed before"):
            await http.fetch("127.0.0.1", listening.getHost().port, "a")
    finally:
        await http.close()
        await listening.stopListening()
    assert raw.connections == 1


@pytest_twisted.ensureDeferred
async def test_a_silent_server_times_out_and_the_connection_is_dropped() -> None:
    listening, raw = raw_server(lambda n: b"")
    http = HttpFetcher(reactor)
    try:
        with pytest.raises(defer.TimeoutError):
            await http.fetch("127.0.0.1", listening.getHost().port, "a", timeout=0.3)
        await until(lambda: raw.lost == 1)
    finally:
        await http.close()
        await listening.stopListening()


# TLS: pins and the MIC on the shared context ---------------------------------------------


@pytest.fixture(scope="module")
def lab() -> labpki.LabCA:
    return labpki.make_lab_ca("ec")


def _mic(lab: labpki.LabCA, mac: str) -> labpki.CertKeyPair:
    return labpki.issue_mic(lab, model="8841", mac=mac, serial=f"T{mac[-6:]}")


class _TLSRaw(_Raw):
    def connectionMade(self) -> None:
        super().connectionMade()
        self.owner.peers.append(self)  # type: ignore[attr-defined]

    def peer_chain_der(self) -> list[bytes]:
        assert self.transport is not None
        conn: Any = self.transport.getHandle()  # type: ignore[attr-defined]
        leaf = conn.get_peer_certificate(as_cryptography=True)
        chain = conn.get_peer_cert_chain(as_cryptography=True) or []  # server side: no leaf
        return [c.public_bytes(serialization.Encoding.DER) for c in [leaf, *chain]]


class _TLSServer(_RawServer):
    def __init__(self, script: Callable[[int], bytes | None]) -> None:
        super().__init__(script)
        self.peers: list[_TLSRaw] = []

    def buildProtocol(self, addr: Any) -> Protocol:
        return _TLSRaw(self)


@pytest.fixture
def tls_server(lab: labpki.LabCA) -> Iterator[tuple[int, _TLSServer, bytes]]:
    """An HTTPS server presenting a lab certificate; yields (port, server, its DER)."""
    pair = _mic(lab, "00AABBCC0001")
    factory = _TLSServer(lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    listening = reactor.listenSSL(
        0, factory, tls.server_options(pair.cert, pair.key), interface="127.0.0.1"
    )
    yield listening.getHost().port, factory, pair.cert.public_bytes(serialization.Encoding.DER)
    listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_https_pinned_answers_only_from_the_pinned_certificate(
    tls_server: tuple[int, _TLSServer, bytes],
) -> None:
    port, raw, der = tls_server
    http = HttpFetcher(reactor)
    good = [(1, b"\0" * 20), (2, hashlib.sha256(der).digest())]
    assert await http.fetch_pinned("127.0.0.1", port, "SEP0A.cnf.xml", good) == b"ok"
    assert raw.received.startswith(b"GET /SEP0A.cnf.xml HTTP/1.1\r\n")
    raw.received = b""
    for pins in ([(2, hashlib.sha256(b"other").digest())], [(1, hashlib.sha256(der).digest())]):
        with pytest.raises(PinMismatch, match="not the ITL's"):
            await http.fetch_pinned("127.0.0.1", port, "SEP0A.cnf.xml", pins, timeout=5)
    await until(lambda: raw.lost == raw.connections)
    assert raw.received == b""  # the handshake failed: not a byte of the request was sent
    await http.close()


@pytest_twisted.ensureDeferred
async def test_each_phone_presents_its_own_mic_on_the_shared_context(
    tls_server: tuple[int, _TLSServer, bytes], lab: labpki.LabCA
) -> None:
    port, raw, _der = tls_server
    mics = [_mic(lab, f"00AABBCC01{i:02X}") for i in range(3)]
    presented: list[list[bytes]] = []
    for i, mic in enumerate(mics):
        chain = (lab.ca,) if i == 2 else ()  # a chain: its own context (the general path)
        options = MicClientOptions(mic.cert, mic.key, chain)
        endpoint = wrapClientTLS(options, client_endpoint(reactor, "127.0.0.1", port, 5))
        proto = await connect_protocol(endpoint, Protocol())
        assert proto.transport is not None
        proto.transport.write(b"GET / HTTP/1.1\r\n\r\n")  # handshake done once the server reads
        await until(lambda n=i: len(raw.peers) > n and raw.received.count(b"GET") > n)
        presented.append(raw.peers[i].peer_chain_der())
        proto.transport.loseConnection()
    ders = [m.cert.public_bytes(serialization.Encoding.DER) for m in mics]
    assert [p[0] for p in presented] == ders
    assert presented[2][1:] == [lab.ca.public_bytes(serialization.Encoding.DER)]
