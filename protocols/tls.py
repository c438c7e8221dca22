"""TLS contexts for peers that we judge ourselves, after the handshake, not in it.

Phones present self-signed or lab MICs and servers present certificates pinned from an ITL,
so neither side can rely on a CA bundle. The TLS layer therefore only proves that the peer
holds the key of the certificate it sent; the application then decides what that
certificate is worth (the TVS judges the MIC chain and answers with a status, SIP records the
fingerprint, the phone compares the server's leaf with its pin before sending anything).
A refused certificate thus gets a clear answer and a log line instead of an opaque handshake
alert. Both sides require TLS 1.2 or later.

    server_options(cert, key, chain)  # asks the client for a certificate, accepts any or none
    server_options(cert, key, resumable=True)  # and lets a client resume its session
    client_options((mic, key), chain)  # presents a certificate if given, accepts any server's
"""

from __future__ import annotations

from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto
from twisted.internet import ssl

__all__ = ["PrivateKey", "client_options", "private_key_from_pem", "server_options"]

# The key types OpenSSL (through pyOpenSSL) can present in a handshake.
PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | dsa.DSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    dsa.DSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


def _accept_any(
    _conn: SSL.Connection, _cert: crypto.X509, _errno: int, _depth: int, _ok: int
) -> bool:
    """OpenSSL's verdict is ignored: the application checks the peer after the handshake."""
    return True


def _options(
    identity: tuple[x509.Certificate, PrivateKey] | None, chain: Iterable[x509.Certificate]
) -> ssl.CertificateOptions:
    if identity is None:
        return ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    cert, key = identity
    return ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(cert),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain] or None,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


RESUMABLE_SECONDS = 300
"""How long a resumable listener keeps a session: a phone's boot, not a working day."""


def server_options(
    cert: x509.Certificate,
    key: PrivateKey,
    chain: Iterable[x509.Certificate] = (),
    *,
    resumable: bool = False,
) -> ssl.CertificateOptions:
    """Present ``cert`` (and ``chain``); ask the client for a certificate but accept any or none.

    Read the client's certificates from the connection once the handshake is done.

    ``resumable`` keeps sessions (in this context's cache, for :data:`RESUMABLE_SECONDS`) so
    that a client's next connection can resume one: an abbreviated handshake, no certificate
    sent either way. Only for a listener that relies on no client certificate (HTTPS
    provisioning). Never for the TVS, which judges the MIC on every connection: its sessions
    are not cached, so a phone offering one gets a full handshake and shows its MIC again.
    The cache holds two sessions per connection (TLS 1.3 sends two tickets), about 0.9 KB,
    up to OpenSSL's default of 20,480 sessions; keeping them costs no measurable CPU.
    """
    options = _options((cert, key), chain)
    # getContext() builds the context once and caches it, so the settings hold for every
    # connection made with these options.
    context = options.getContext()
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _accept_any)
    if resumable:
        context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        context.set_timeout(RESUMABLE_SECONDS)
    else:
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)  # Twisted's default, stated
    return options


def client_options(
    identity: tuple[x509.Certificate, PrivateKey] | None = None,
    chain: Iterable[x509.Certificate] = (),
) -> ssl.CertificateOptions:
    """Present ``identity`` (certificate, key) and ``chain`` if given; accept any server.

    The caller must check the server's certificate (a pin) before it sends anything secret.
    """
    options = _options(identity, chain)
    options.getContext().set_verify(SSL.VERIFY_PEER, _accept_any)
    return options


def private_key_from_pem(pem: bytes) -> PrivateKey:
    """An unencrypted PEM private key of a type that can sign a certificate; ValueError if not."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, _KEY_TYPES):
        raise ValueError(f"unsupported private key type {type(key).__name__}")
    return key
