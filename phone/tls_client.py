"""Client TLS for many emulated phones in one process: one OpenSSL context, per-connection
identity and pins.

Building an ``SSL_CTX`` (Twisted's ``CertificateOptions``: cipher list, curves, options) costs
about as much CPU as a phone's whole HTTP exchange, and a storm made one per TVS activation
and one per HTTPS fetch. The settings never differ between phones, only the MIC presented and
the pins checked do, and OpenSSL takes both per connection (``SSL_use_certificate``,
``SSL_set_verify``). So every connection here is made on one process-wide context built by
:func:`callboard.protocols.tls.client_options` (TLS 1.2 or later, any server accepted: the
caller pins), and gets its MIC or its pin check on its own ``SSL.Connection``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from callboard.protocols import tls
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

__all__ = ["MicClientOptions", "PinnedConnections", "shared_client_context"]

_shared: SSL.Context | None = None


def shared_client_context() -> SSL.Context:
    """The process's client context (no certificate of its own; any server accepted)."""
    global _shared
    if _shared is None:
        _shared = tls.client_options().getContext()
    return _shared


class MicClientOptions(ssl.CertificateOptions):
    """Present ``cert``/``key`` (a phone's MIC) on the shared context, one connection at a time.

    A :class:`~twisted.internet.ssl.CertificateOptions`, so it goes wherever client options
    do; Twisted asks it for connections (``clientConnectionForTLS``). :meth:`getContext`, for
    callers that want a context of their own, is the general path: a context holding the MIC.
    """

    def __init__(
        self,
        cert: x509.Certificate,
        key: tls.PrivateKey,
        chain: Sequence[x509.Certificate] = (),
    ) -> None:
        super().__init__(raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
        self.mic = (cert, key)
        self.chain = tuple(chain)
        self._own: ssl.CertificateOptions | None = None

    def getContext(self) -> SSL.Context:
        if self._own is None:
            self._own = tls.client_options(self.mic, self.chain)
        return self._own.getContext()

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        if self.chain:  # a chain is a context setting: such a phone gets its own context
            return SSL.Connection(self.getContext(), None)
        connection = SSL.Connection(shared_client_context(), None)
        connection.use_certificate(self.mic[0])
        connection.use_privatekey(self.mic[1])
        return connection


_PIN_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    1: hashes.SHA1,
    2: hashes.SHA256,
    3: hashes.SHA512,
}


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


@implementer(IOpenSSLClientConnectionCreator)
class PinnedConnections:
    """Accept only a server whose leaf certificate hashes to one of ``pins``.

    ``pins`` are (hash algorithm code, hash) pairs as an ITL record carries them (1 SHA-1,
    2 SHA-256, 3 SHA-512). The check runs inside the handshake, so nothing is sent to a server
    that fails it; ``refused`` then says why.


    ``session`` (a :class:`SSL.Session` from an earlier connection made under the *same*
    pins) is offered for resumption: a resumed handshake shows no certificate, and needs
    none, since only a server that passed these pins holds that session's secret. The caller
    keys sessions by pins; a server that declines gets a full handshake and the pin check.
    """

    def __init__(
        self, pins: Sequence[tuple[int, bytes]], session: SSL.Session | None = None
    ) -> None:
        self.pins = tuple(pins)
        self.refused: str | None = None
        self.session = session
        self.connection: SSL.Connection | None = None
        self.leaf_checked = False  # a full handshake: the server's leaf passed the pins

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(shared_client_context(), None)
        connection.set_verify(SSL.VERIFY_PEER, self._verify)
        if self.session is not None:
            connection.set_session(self.session)
        self.connection = connection
        return connection

    @property
    def resumed(self) -> bool:
        """The handshake resumed the offered session (no certificate was shown)."""
        return self.session is not None and self.connection is not None and not self.leaf_checked

    def _verify(
        self, _conn: SSL.Connection, cert: crypto.X509, _errno: int, depth: int, _ok: int
    ) -> bool:
        if depth != 0:
            return True  # the leaf decides; chain certificates are not pinned
        der = cert.to_cryptography().public_bytes(serialization.Encoding.DER)
        for algorithm, expected in self.pins:
            hash_type = _PIN_HASHES.get(algorithm)
            if hash_type is not None and _digest(hash_type(), der) == expected:
                self.leaf_checked = True
                return True
        self.refused = "server certificate is not the ITL's TFTP-role EC certificate"
        return False
