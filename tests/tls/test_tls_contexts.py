"""protocols/tls: real loopback handshakes, with our own other side and with openssl as peer.

The server side asks for a client certificate and accepts any or none; the client side accepts
any server certificate; both leave the judging to the application, which reads the peer's
certificate after the handshake. A refused certificate must never end the handshake.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from callboard.protocols import tls
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from support.ports import free_port
from twisted.internet import defer, endpoints, protocol
from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.utils import getProcessOutputAndValue
from zope.interface import implementer

reactor: Any = _reactor


def self_signed(cn: str, key: Any = None) -> tuple[x509.Certificate, Any]:
    """A certificate no CA vouches for: exactly what the helpers must let through."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert, key


def der(cert: x509.Certificate | None) -> bytes | None:
    return None if cert is None else cert.public_bytes(serialization.Encoding.DER)


def write_pem(directory: Path, stem: str, cert: x509.Certificate, key: Any) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@implementer(IHandshakeListener)
class PeerRecorder(protocol.Protocol):
    """Records the peer's certificate (leaf and chain) once the handshake completes."""

    def __init__(self) -> None:
        self.done: defer.Deferred[tuple[bytes | None, list[bytes]]] = defer.Deferred()

    def handshakeCompleted(self) -> None:
        conn = self.transport.getHandle()  # type: ignore[union-attr]
        assert isinstance(conn, SSL.Connection)
        leaf = conn.get_peer_certificate(as_cryptography=True)
        chain = conn.get_peer_cert_chain(as_cryptography=True) or []
        self.done.callback((der(leaf), [c.public_bytes(serialization.Encoding.DER) for c in chain]))
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.errback(reason)


SERVER = self_signed("tls-test-server")
CLIENT = self_signed("CP-8841-SEP00AABBCCDDEE")


@pytest.fixture
def server() -> Iterator[tuple[int, list[PeerRecorder]]]:
    """A loopback TLS listener with :func:`tls.server_options`, recording each client."""
    seen: list[PeerRecorder] = []

    def build() -> PeerRecorder:
        seen.append(PeerRecorder())
        return seen[-1]

    factory = protocol.Factory.forProtocol(build)
    port = reactor.listenSSL(0, factory, tls.server_options(*SERVER), interface="127.0.0.1")
    yield port.getHost().port, seen
    port.stopListening()


async def connect(port: int, options: Any) -> PeerRecorder:
    endpoint = endpoints.SSL4ClientEndpoint(reactor, "127.0.0.1", port, options, timeout=10)
    client = PeerRecorder()
    d = endpoint.connect(protocol.Factory.forProtocol(lambda: client))
    d.addTimeout(10, reactor)
    await d
    return client


async def outcome(recorder: PeerRecorder) -> tuple[bytes | None, list[bytes]]:
    d = recorder.done
    d.addTimeout(10, reactor)
    return await d


@pytest_twisted.ensureDeferred
async def test_our_client_and_server_see_each_others_unvouched_certificates(
    server: tuple[int, list[PeerRecorder]],
) -> None:
    port, seen = server
    intermediate, _ = self_signed("some chain member")
    client = await connect(port, tls.client_options(CLIENT, [intermediate]))
    assert (await outcome(client))[0] == der(SERVER[0])
    leaf, chain = await outcome(seen[0])
    assert leaf == der(CLIENT[0])
    assert der(intermediate) in chain  # the chain travels for the application to judge


@pytest_twisted.ensureDeferred
async def test_a_client_without_a_certificate_is_still_served(
    server: tuple[int, list[PeerRecorder]],
) -> None:
    port, seen = server
    client = await connect(port, tls.client_options())
    assert (await outcome(client))[0] == der(SERVER[0])
    assert await outcome(seen[0]) == (None, [])


async def s_client(port: int, *extra: str) -> tuple[bytes, bytes, int]:
    args = ["s_client", "-connect", f"127.0.0.1:{port}", "-brief", *extra]
    d = getProcessOutputAndValue("openssl", args, env={"PATH": "/usr/bin:/bin"}, reactor=reactor)
    d.addTimeout(30, reactor)
    result: tuple[bytes, bytes, int] = await d
    return result


@pytest_twisted.ensureDeferred
async def test_openssl_client_with_an_unknown_certificate_completes_the_handshake(
    server: tuple[int, list[PeerRecorder]], tmp_path: Path
) -> None:
    port, seen = server
    rsa_client = self_signed("rsa client", rsa.generate_private_key(65537, 2048))
    cert_path, key_path = write_pem(tmp_path, "client", *rsa_client)
    _, err, _ = await s_client(port, "-cert", str(cert_path), "-key", str(key_path))
    assert b"CONNECTION ESTABLISHED" in err, err
    assert (await outcome(seen[0]))[0] == der(rsa_client[0])


@pytest_twisted.ensureDeferred
async def test_openssl_client_below_tls_1_2_is_refused(
    server: tuple[int, list[PeerRecorder]],
) -> None:
    port, seen = server
    # SECLEVEL=0 lets this openssl offer TLS 1.1 at all; our side must still refuse it.
    _, err, code = await s_client(port, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
    assert code != 0 and b"CONNECTION ESTABLISHED" not in err, err
    with pytest.raises(SSL.Error, match="unsupported protocol"):
        await outcome(seen[0])
    _, err, _ = await s_client(port, "-tls1_2")
    assert b"Protocol version: TLSv1.2" in err, err
    assert await outcome(seen[1]) == (None, [])


class _Lines(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"ACCEPT" in self.output and not self.ready.called:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.ready.called:
            self.ready.errback(reason)
        self.ended.callback(None)


@pytest_twisted.ensureDeferred
async def test_our_client_against_openssl_server_presents_its_certificate(
    tmp_path: Path,
) -> None:
    server_cert, server_key = self_signed("openssl server")
    cert_path, key_path = write_pem(tmp_path, "server", server_cert, server_key)
    port = free_port()
    peer = _Lines()
    args = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "1"]
    args += ["-cert", str(cert_path), "-key", str(key_path), "-verify", "1"]
    process = reactor.spawnProcess(peer, "/usr/bin/openssl", args, env={})
    try:
        peer.ready.addTimeout(10, reactor)
        await peer.ready
        client = await connect(port, tls.client_options(CLIENT))
        assert (await outcome(client))[0] == der(server_cert)
        peer.ended.addTimeout(10, reactor)
        await peer.ended  # -naccept 1: it exits after our connection
    finally:
        if process.pid is not None:
            process.signalProcess("TERM")
    # s_server prints the subject of the client certificate it was given (and could not verify).
    assert b"depth=0 CN = CP-8841-SEP00AABBCCDDEE" in peer.output, peer.output


def test_private_key_from_pem_accepts_signing_keys_only() -> None:
    _, key = CLIENT
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert isinstance(tls.private_key_from_pem(pem), ec.EllipticCurvePrivateKey)
    from cryptography.hazmat.primitives.asymmetric import x25519

    exchange_only = x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError, match="unsupported"):
        tls.private_key_from_pem(exchange_only)
