"""A phone's HTTPS between its fetches: the connection kept, else the TLS session resumed.

Real loopback servers with the daemon's resumable server options (``resumable=True``, as the
HTTPS provisioning listener uses them). A resumed handshake shows no certificate, so the tests
also pin that a session is offered only under the pins it was verified with.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import pytest_twisted
from callboard.phone.http_client import HttpFetcher, PinMismatch, SecureSessions
from callboard.protocols import tls
from callboard.protocols.tvs import labpki
from cryptography.hazmat.primitives import serialization
from support.waiting import until
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory, Protocol

reactor: Any = _reactor

KEEP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CLOSE = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"


class _Raw(Protocol):
    def __init__(self, owner: _Server) -> None:
        self.owner = owner

    def connectionMade(self) -> None:
        self.owner.connections += 1

    def dataReceived(self, data: bytes) -> None:
        self.owner.requests.append(data)
        assert self.transport is not None
        self.transport.write(self.owner.answer)
        if self.owner.answer is CLOSE:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.owner.lost += 1


class _Server(Factory):
    noisy = False

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.connections = 0
        self.lost = 0
        self.requests: list[bytes] = []

    def buildProtocol(self, addr: Any) -> Protocol:
        return _Raw(self)


@pytest.fixture(scope="module")
def pair() -> labpki.CertKeyPair:
    lab = labpki.make_lab_ca("ec")
    return labpki.issue_mic(lab, model="8841", mac="00AABBCC0001", serial="T0001")


def _serve(
    pair: labpki.CertKeyPair, answer: bytes, *, resumable: bool = True
) -> tuple[Any, _Server]:
    factory = _Server(answer)
    options = tls.server_options(pair.cert, pair.key, resumable=resumable)
    return reactor.listenSSL(0, factory, options, interface="127.0.0.1"), factory


def _pins(pair: labpki.CertKeyPair) -> list[tuple[int, bytes]]:
    der = pair.cert.public_bytes(serialization.Encoding.DER)
    return [(2, hashlib.sha256(der).digest())]


async def _fetch_twice(
    port: int, pins: list[tuple[int, bytes]], sessions: SecureSessions | None
) -> list[bytes | None]:
    http = HttpFetcher(reactor)
    got = [
        await http.fetch_pinned("127.0.0.1", port, f"f{i}", pins, timeout=5, sessions=sessions)
        for i in range(2)
    ]
    if sessions is not None:
        await sessions.close()
    return got


@pytest_twisted.ensureDeferred
async def test_the_phone_keeps_its_https_connection_for_its_next_fetch(
    pair: labpki.CertKeyPair,
) -> None:
    listening, server = _serve(pair, KEEP)
    sessions = SecureSessions()
    try:
        assert await _fetch_twice(listening.getHost().port, _pins(pair), sessions) == [b"ok"] * 2
    finally:
        await listening.stopListening()
    assert server.connections == 1
    assert (sessions.handshakes, sessions.resumed, sessions.reused) == (1, 0, 1)
    assert all(b"\r\nConnection: keep-alive\r\n" in r for r in server.requests)
    await until(lambda: server.lost == 1)  # closed when the phone's boot ends


@pytest_twisted.ensureDeferred
async def test_a_closed_connection_is_followed_by_a_resumed_session(
    pair: labpki.CertKeyPair,
) -> None:
    listening, server = _serve(pair, CLOSE)
    sessions = SecureSessions()
    try:
        assert await _fetch_twice(listening.getHost().port, _pins(pair), sessions) == [b"ok"] * 2
    finally:
        await listening.stopListening()
    assert server.connections == 2
    assert (sessions.handshakes, sessions.resumed, sessions.reused) == (1, 1, 0)


@pytest_twisted.ensureDeferred
async def test_a_server_that_keeps_no_sessions_gets_a_full_handshake_with_the_pin_check(
    pair: labpki.CertKeyPair,
) -> None:
    listening, _server = _serve(pair, CLOSE, resumable=False)
    sessions = SecureSessions()
    try:
        assert await _fetch_twice(listening.getHost().port, _pins(pair), sessions) == [b"ok"] * 2
    finally:
        await listening.stopListening()
    assert (sessions.handshakes, sessions.resumed) == (2, 0)


@pytest_twisted.ensureDeferred
async def test_a_session_is_never_offered_under_other_pins(pair: labpki.CertKeyPair) -> None:
    listening, _server = _serve(pair, CLOSE)
    port = listening.getHost().port
    http = HttpFetcher(reactor)
    sessions = SecureSessions()
    good = _pins(pair)
    try:
        assert await http.fetch_pinned("127.0.0.1", port, "a", good, sessions=sessions) == b"ok"
        with pytest.raises(PinMismatch):  # a full handshake: the certificate is checked
            await http.fetch_pinned(
                "127.0.0.1", port, "a", [(2, b"\0" * 32)], timeout=5, sessions=sessions
            )
        wider = [*good, (1, b"\0" * 20)]  # other pins, even if they include the good one
        assert await http.fetch_pinned("127.0.0.1", port, "a", wider, sessions=sessions) == b"ok"
    finally:
        await sessions.close()
        await listening.stopListening()
    assert (sessions.handshakes, sessions.resumed) == (2, 0)


@pytest_twisted.ensureDeferred
async def test_without_sessions_every_fetch_is_a_new_connection_asking_to_close(
    pair: labpki.CertKeyPair,
) -> None:
    listening, server = _serve(pair, KEEP)
    try:
        assert await _fetch_twice(listening.getHost().port, _pins(pair), None) == [b"ok"] * 2
    finally:
        await listening.stopListening()
    assert server.connections == 2
    assert all(b"\r\nConnection: close\r\n" in r for r in server.requests)
