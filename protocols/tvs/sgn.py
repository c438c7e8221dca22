"""Signed files (``<name>.sgn``): a Cisco TLV header, then the original bytes, untouched.

Once a phone's trust list holds a certificate with a TFTP role it asks for ``<name>.sgn`` for
every file it fetches and checks the header's RSA signature against that certificate
(cisco-protocols.md sections 5 and 16). The framing is the ITL's (``tag:u8, length:u16 BE,
value``; PADDING is a bare byte) and the helpers come from :mod:`callboard.protocols.tvs.itl`.

Header, in this order:

- ``VERSION`` (1): two bytes, major and minor: 1.0 for ``.sgn`` (ITLs say 1.2).
- ``HEADER_LENGTH`` (2): u16, the header's total length, SIGNATURE TLV and padding included;
  the original file starts at this offset.
- ``SIGNER_INFO`` (3), a container of the signer certificate's identity:
  ``SIGNER_NAME`` (4, its subject), ``ISSUER_NAME`` (6, its issuer), both NUL-terminated RDN
  strings (each RDN RFC 4514-formatted, joined with ``,`` in certificate order), and
  ``SERIAL_NUMBER`` (5, big-endian bytes).
- ``SIGNATURE_INFO`` (7), a container: ``HASH_ALGORITHM`` (8: 1 SHA-1, 3 SHA-512; we sign with
  SHA-512) and ``SIGNATURE_ALGORITHM_INFO`` (9) holding ``SIGNATURE_ALGORITHM`` (10: 0, RSA) and
  ``SIGNATURE_MODULUS`` (11: index into 64/128/256/512, the signature length in bytes).
- ``SIGNATURE`` (12): RSA PKCS#1 v1.5 over the whole file without this TLV (the header before
  and after it, then the body).
- ``FILENAME`` (14): the signed file's own name, ``<name>.sgn``, NUL-terminated.
- ``TIMESTAMP`` (15): u32 Unix seconds when signed.
- ``PADDING`` (13): bare bytes up to a 4-byte boundary. No SIGNER_VERSION (28) in ``.sgn``.

The signer is the RSA certificate with the CCM+TFTP role (CUCM's "CallManager" certificate);
EC keys cannot sign ``.sgn`` files. RSA signing is slow, so building is split:
:func:`prepare` (pure, cheap) → :func:`sign` (the RSA private-key operation: run it off the
reactor thread) → :func:`finish` (pure, checks the signature before emitting the file).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .itl import (
    H_FILENAME,
    H_HASH_ALGORITHM,
    H_ISSUER_NAME,
    H_SERIAL_NUMBER,
    H_SIGNATURE,
    H_SIGNATURE_ALGORITHM,
    H_SIGNATURE_MODULUS,
    H_SIGNER_NAME,
    H_SIGNER_VERSION,
    H_TIMESTAMP,
    MODULUS_SIZES,
    SIGNATURE_ALGORITHM_RSA,
    HashAlgorithm,
    ITLError,
    ITLFile,
    KeyType,
    cstr,
    cstring,
    hash_class,
    lay_out_header,
    name_string,
    read_header,
    same_serial,
    serial_bytes,
    signature_info,
    signature_length,
    signer_info,
    tlv,
)

SGN_VERSION = (1, 0)
SGN_SUFFIX = ".sgn"
SGN_HASHES = (HashAlgorithm.SHA1, HashAlgorithm.SHA512)
"""The hash codes phones accept in a ``.sgn``; we write SHA-512."""


class SgnError(ITLError):
    """A ``.sgn`` file is malformed, signed by someone else, or its signature is bad."""


def signed_name(name: str) -> str:
    """``SEP001122334455.cnf.xml`` → ``SEP001122334455.cnf.xml.sgn``."""
    return name + SGN_SUFFIX


def unsigned_name(name: str) -> str | None:
    """The file a ``.sgn`` request is for, or None when ``name`` is not a ``.sgn`` name."""
    if name.endswith(SGN_SUFFIX) and len(name) > len(SGN_SUFFIX):
        return name[: -len(SGN_SUFFIX)]
    return None


# Build ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToSign:
    """A ``.sgn`` laid out around the missing signature; :meth:`signed_bytes` is what to sign."""

    before_signature: bytes
    after_signature: bytes
    body: bytes
    hash_algorithm: HashAlgorithm
    signature_length: int
    signer: x509.Certificate

    def signed_bytes(self) -> bytes:
        """The input of the RSA signature: the whole file without the SIGNATURE TLV."""
        return self.before_signature + self.after_signature + self.body

    def hash(self) -> hashes.HashAlgorithm:
        return hash_class(self.hash_algorithm)()


def prepare(
    data: bytes,
    filename: str,
    signer: x509.Certificate,
    timestamp: int,
    *,
    hash_algorithm: HashAlgorithm = HashAlgorithm.SHA512,
) -> ToSign:
    """Lay out the header for ``data`` (the unsigned file the phone knows as ``filename``).

    Pure and cheap: no private key. ``timestamp`` is injected (Unix seconds); the header's
    FILENAME is ``filename + ".sgn"``.
    """
    if hash_algorithm not in SGN_HASHES:
        raise SgnError("phones accept SHA-1 or SHA-512 .sgn signatures only")
    if not filename:
        raise SgnError("a .sgn needs the name of the file it signs")
    if not 0 <= timestamp <= 0xFFFFFFFF:
        raise SgnError(f"timestamp {timestamp} does not fit in 32 bits")
    try:
        sig_len = signature_length(signer)
        before, after = lay_out_header(
            SGN_VERSION,
            signer_info(signer) + signature_info(hash_algorithm, sig_len),
            tlv(H_FILENAME, cstr(signed_name(filename)))
            + tlv(H_TIMESTAMP, struct.pack(">I", timestamp)),
            sig_len,
        )
    except SgnError:
        raise
    except ITLError as exc:
        raise SgnError(str(exc)) from None
    return ToSign(before, after, bytes(data), hash_algorithm, sig_len, signer)


def sign(to_sign: ToSign, key: rsa.RSAPrivateKey) -> bytes:
    """The RSA PKCS#1 v1.5 signature: the slow step, safe to run in a worker thread."""
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SgnError("the .sgn signer key must be RSA")
    return key.sign(to_sign.signed_bytes(), padding.PKCS1v15(), to_sign.hash())


def finish(to_sign: ToSign, signature: bytes) -> bytes:
    """The ``.sgn`` bytes; the signature is checked with the signer certificate first.

    A wrong key or a damaged signature raises here rather than reaching a phone, which would
    refuse the file and keep asking for it.
    """
    if len(signature) != to_sign.signature_length:
        raise SgnError(
            f"signature is {len(signature)} bytes; the signer's key makes "
            f"{to_sign.signature_length}"
        )
    _check_signature(to_sign.signer, signature, to_sign.signed_bytes(), to_sign.hash_algorithm)
    return b"".join(
        [
            to_sign.before_signature,
            tlv(H_SIGNATURE, signature),
            to_sign.after_signature,
            to_sign.body,
        ]
    )


def build_signed(
    data: bytes,
    filename: str,
    signer: x509.Certificate,
    key: rsa.RSAPrivateKey,
    timestamp: int,
    *,
    hash_algorithm: HashAlgorithm = HashAlgorithm.SHA512,
) -> bytes:
    """prepare → sign → finish in one call (tools and tests; the daemon signs off the reactor)."""
    to_sign = prepare(data, filename, signer, timestamp, hash_algorithm=hash_algorithm)
    return finish(to_sign, sign(to_sign, key))


# Parse and verify ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedFile:
    """A parsed ``.sgn``: every header element, the body, and what the signature covers."""

    version: tuple[int, int]
    header_length: int
    signer_name: str
    issuer_name: str
    serial_number: bytes
    hash_algorithm: int
    signature_algorithm: int
    signature_modulus: int
    signature: bytes
    filename: str
    timestamp: int
    body: bytes
    signed_data: bytes

    @property
    def unsigned_filename(self) -> str | None:
        return unsigned_name(self.filename)


def parse_sgn(blob: bytes) -> SignedFile:
    """Parse the header and split off the body; no signature check (see :func:`verify_sgn`)."""
    blob = bytes(blob)
    try:
        return _parse(blob)
    except SgnError:
        raise
    except ITLError as exc:
        raise SgnError(f"not a .sgn file: {exc}") from None


def _parse(blob: bytes) -> SignedFile:
    header = read_header(blob)
    header.required(
        H_SIGNER_NAME,
        H_ISSUER_NAME,
        H_SERIAL_NUMBER,
        H_HASH_ALGORITHM,
        H_SIGNATURE_ALGORITHM,
        H_SIGNATURE_MODULUS,
        H_FILENAME,
        H_TIMESTAMP,
    )
    fields = header.fields
    if H_SIGNER_VERSION in fields:
        raise SgnError("a .sgn header has no SIGNER_VERSION (is this an ITL?)")
    if len(fields[H_TIMESTAMP]) != 4:
        raise SgnError("TIMESTAMP is not 4 bytes")
    if header.header_length % 4:
        raise SgnError("header is not padded to a 4-byte boundary")
    return SignedFile(
        version=header.version,
        header_length=header.header_length,
        signer_name=cstring(fields[H_SIGNER_NAME]),
        issuer_name=cstring(fields[H_ISSUER_NAME]),
        serial_number=fields[H_SERIAL_NUMBER],
        hash_algorithm=header.byte(H_HASH_ALGORITHM),
        signature_algorithm=header.byte(H_SIGNATURE_ALGORITHM),
        signature_modulus=header.byte(H_SIGNATURE_MODULUS),
        signature=fields[H_SIGNATURE],
        filename=cstring(fields[H_FILENAME]),
        timestamp=struct.unpack(">I", fields[H_TIMESTAMP])[0],
        body=blob[header.header_length :],
        signed_data=header.signed_bytes(blob),
    )


def signed_by(signed: SignedFile, certificate: x509.Certificate) -> bool:
    """The header names ``certificate`` as its signer (serial and issuer)."""
    return same_serial(
        signed.serial_number, serial_bytes(certificate.serial_number)
    ) and signed.issuer_name == name_string(certificate.issuer)


def find_signer(itl: ITLFile, signed: SignedFile) -> x509.Certificate:
    """The RSA TFTP-role certificate of ``itl`` that the header names as its signer."""
    for certificate in itl.tftp_certificates(KeyType.RSA):
        if signed_by(signed, certificate):
            return certificate
    raise SgnError(
        f"{signed.filename or 'file'} is signed by {signed.signer_name!r}, "
        "which is not a TFTP-role certificate in the trust list"
    )


def verify_sgn(blob: bytes, certificate: x509.Certificate, *, filename: str | None = None) -> bytes:
    """Check a ``.sgn`` against the signer ``certificate``; return the original file's bytes.

    ``filename``, when given, is the name the phone asked for (``<name>.sgn``): the header must
    carry it, so one validly signed file cannot stand in for another. Raises SgnError with the
    reason otherwise.
    """
    signed = parse_sgn(blob)
    if signed.version != SGN_VERSION:
        raise SgnError(f"version {signed.version[0]}.{signed.version[1]} is not 1.0")
    if not signed.filename.endswith(SGN_SUFFIX):
        raise SgnError(f"header file name {signed.filename!r} does not end with .sgn")
    if filename is not None and signed.filename != filename:
        raise SgnError(f"header names {signed.filename!r}, not the requested {filename!r}")
    if signed.hash_algorithm not in SGN_HASHES:
        raise SgnError(f"hash algorithm {signed.hash_algorithm} is not SHA-1 or SHA-512")
    if signed.signature_algorithm != SIGNATURE_ALGORITHM_RSA:
        raise SgnError(f"signature algorithm {signed.signature_algorithm} is not RSA (0)")
    if not signed_by(signed, certificate):
        raise SgnError(
            f"signed by {signed.signer_name!r} (serial {signed.serial_number.hex()}), "
            "not by the given certificate"
        )
    try:
        expected = signature_length(certificate)
    except ITLError as exc:
        raise SgnError(str(exc)) from None
    if (
        signed.signature_modulus >= len(MODULUS_SIZES)
        or MODULUS_SIZES[signed.signature_modulus] != expected
        or len(signed.signature) != expected
    ):
        raise SgnError("signature length does not match SIGNATURE_MODULUS and the signer key")
    _check_signature(
        certificate, signed.signature, signed.signed_data, HashAlgorithm(signed.hash_algorithm)
    )
    return signed.body


def _check_signature(
    certificate: x509.Certificate, signature: bytes, data: bytes, algorithm: HashAlgorithm
) -> None:
    key = certificate.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise SgnError("the .sgn signer certificate must be RSA")
    try:
        key.verify(signature, data, padding.PKCS1v15(), hash_class(algorithm)())
    except InvalidSignature:
        raise SgnError("signature does not verify with the signer certificate") from None
