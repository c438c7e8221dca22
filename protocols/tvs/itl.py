"""ITL trust-list files (``ITLFile.tlv``): the Cisco TLV format, built and parsed.

The phone learns which certificates to trust for TFTP, CCM and TVS from this file; it is signed
with the SAST (ITL-recovery) key, RSA PKCS#1 v1.5 over the whole file minus the SIGNATURE TLV.
Layout facts come from the project's research notes (cisco-protocols.md sections 5 and 16).

Framing: ``tag:u8, length:u16 big-endian, value``; PADDING (13) is a bare byte. The header is
shared with ``.sgn`` files (see :mod:`callboard.protocols.tvs.sgn`), so the header helpers here
(:func:`tlv`, :func:`signer_info`, :func:`signature_info`, :func:`lay_out_header`,
:func:`read_header`) are public and used by both.

ITL header, in order: VERSION 1.2; HEADER_LENGTH; SIGNER_VERSION (tag 28, the "ITL version":
1.0, or 1.1 = EC keys and HTTPS provisioning on 6971); SIGNER_INFO (signer name, issuer, serial
of the SAST certificate); SIGNATURE_INFO (hash, algorithm 0 = RSA, modulus index); SIGNATURE;
FILENAME; TIMESTAMP; PADDING to a 4-byte boundary. Then one record per (role, certificate).

Each record: RECORD_LENGTH, SUBJECT_NAME, ROLE, ISSUER_NAME, SERIAL_NUMBER, PUBLIC_KEY (RSA:
PKCS#1 DER; EC: X9.62 uncompressed point), SIGNATURE (the certificate's own), CERTIFICATE (DER),
then CERTIFICATE_HASH (11) and HASH_ALGORITHM (12): the digest of the DER certificate and its
algorithm code (1 SHA-1, 2 SHA-256, 3 SHA-512). The notes name tags 11/12 but not their content;
hashing the DER certificate with SHA-1 by default is our choice (every ITL-capable firmware
handles SHA-1; ``record_hash`` picks another or leaves them out). The key type of a record is
not a field of its own: it is the certificate's key (:attr:`ITLRecord.key_type`).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa


class Role(IntEnum):
    SAST = 0
    CCM = 1
    CCM_TFTP = 2
    TFTP = 3
    CAPF = 4
    APP_SERVER = 7
    TVS = 21


TFTP_ROLES = frozenset({Role.CCM_TFTP, Role.TFTP})
"""Roles that make a phone ask for signed files (and trust a provisioning server)."""


class HashAlgorithm(IntEnum):
    SHA1 = 1
    SHA256 = 2
    SHA512 = 3


class KeyType(StrEnum):
    RSA = "RSA"
    EC = "EC"


# Header tags
H_VERSION = 1
H_HEADER_LENGTH = 2
H_SIGNER_INFO = 3
H_SIGNER_NAME = 4
H_SERIAL_NUMBER = 5
H_ISSUER_NAME = 6
H_SIGNATURE_INFO = 7
H_HASH_ALGORITHM = 8
H_SIGNATURE_ALGORITHM_INFO = 9
H_SIGNATURE_ALGORITHM = 10
H_SIGNATURE_MODULUS = 11
H_SIGNATURE = 12
H_PADDING = 13
H_FILENAME = 14
H_TIMESTAMP = 15
H_SIGNER_VERSION = 28

# Record tags
R_RECORD_LENGTH = 1
R_DNS_NAME = 2
R_SUBJECT_NAME = 3
R_ROLE = 4
R_ISSUER_NAME = 5
R_SERIAL_NUMBER = 6
R_PUBLIC_KEY = 7
R_SIGNATURE = 8
R_CERTIFICATE = 9
R_IP_ADDRESS = 10
R_CERTIFICATE_HASH = 11
R_HASH_ALGORITHM = 12

ITL_VERSION = (1, 2)
SIGNATURE_ALGORITHM_RSA = 0
MODULUS_SIZES = (64, 128, 256, 512)
"""SIGNATURE_MODULUS is an index into this list: the signature length in bytes."""

_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    HashAlgorithm.SHA1: hashes.SHA1,
    HashAlgorithm.SHA256: hashes.SHA256,
    HashAlgorithm.SHA512: hashes.SHA512,
}
_HEADER_CONTAINERS = frozenset({H_SIGNER_INFO, H_SIGNATURE_INFO, H_SIGNATURE_ALGORITHM_INFO})


class ITLError(ValueError):
    """The bytes are not a well-formed, correctly signed Cisco TLV file (ITL, or a .sgn)."""


# Encoding helpers (shared with .sgn) ---------------------------------------------------------


def name_string(name: x509.Name) -> str:
    """RDNs in certificate order, each RFC 4514-formatted, joined with ','."""
    return ",".join(rdn.rfc4514_string() for rdn in name.rdns)


def serial_bytes(serial: int) -> bytes:
    """The serial number as minimal big-endian bytes."""
    return serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big")


def same_serial(a: bytes, b: bytes) -> bool:
    """Serial numbers compared as numbers (a DER sign byte or none on either side)."""
    return a.lstrip(b"\x00") == b.lstrip(b"\x00")


def tlv(tag: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ITLError(f"TLV {tag} too long")
    return struct.pack(">BH", tag, len(value)) + value


def cstr(text: str) -> bytes:
    """A NUL-terminated UTF-8 string value (names, file names)."""
    if "\x00" in text:
        raise ITLError("string values cannot contain NUL")
    return text.encode("utf-8") + b"\x00"


def hash_class(algorithm: int) -> type[hashes.HashAlgorithm]:
    try:
        return _HASHES[algorithm]
    except KeyError:
        raise ITLError(f"unknown hash algorithm {algorithm}") from None


def key_type(cert: x509.Certificate) -> KeyType:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return KeyType.RSA
    if isinstance(key, ec.EllipticCurvePublicKey):
        return KeyType.EC
    raise ITLError("only RSA and EC certificates can go in a Cisco TLV file")


def signature_length(cert: x509.Certificate) -> int:
    """Bytes of an RSA PKCS#1 v1.5 signature by ``cert``'s key; the format allows 64..512."""
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise ITLError("the signer certificate must be RSA")
    length = (key.key_size + 7) // 8
    if length not in MODULUS_SIZES:
        raise ITLError(f"unsupported signer key size {key.key_size}")
    return length


def signer_info(cert: x509.Certificate) -> bytes:
    """SIGNER_INFO container: signer name, issuer name, serial number (the notes' order)."""
    return tlv(
        H_SIGNER_INFO,
        tlv(H_SIGNER_NAME, cstr(name_string(cert.subject)))
        + tlv(H_ISSUER_NAME, cstr(name_string(cert.issuer)))
        + tlv(H_SERIAL_NUMBER, serial_bytes(cert.serial_number)),
    )


def signature_info(hash_algorithm: HashAlgorithm, sig_len: int) -> bytes:
    """SIGNATURE_INFO container (15 bytes of value): hash, RSA, modulus index."""
    algorithm = tlv(H_SIGNATURE_ALGORITHM, bytes([SIGNATURE_ALGORITHM_RSA])) + tlv(
        H_SIGNATURE_MODULUS, bytes([MODULUS_SIZES.index(sig_len)])
    )
    return tlv(
        H_SIGNATURE_INFO,
        tlv(H_HASH_ALGORITHM, bytes([hash_algorithm])) + tlv(H_SIGNATURE_ALGORITHM_INFO, algorithm),
    )


def lay_out_header(
    version: tuple[int, int], leading: bytes, trailing: bytes, sig_len: int
) -> tuple[bytes, bytes]:
    """The header around the SIGNATURE TLV: ``(before, after)``.

    ``before`` is VERSION, HEADER_LENGTH (counting the SIGNATURE TLV and the padding), then
    ``leading``; ``after`` is ``trailing`` then PADDING bytes up to a 4-byte boundary.
    """
    head = tlv(H_VERSION, bytes(version))
    unpadded = len(head) + 5 + len(leading) + 3 + sig_len + len(trailing)
    pad = -unpadded % 4
    length = unpadded + pad
    if length > 0xFFFF:
        raise ITLError("header too long")
    before = head + tlv(H_HEADER_LENGTH, struct.pack(">H", length)) + leading
    return before, trailing + bytes([H_PADDING]) * pad


# Decoding helpers (shared with .sgn) ---------------------------------------------------------


def read_tlv(data: bytes, i: int, limit: int) -> tuple[int, bytes, int]:
    """``(tag, value, next offset)`` of the TLV at ``i``; it must end by ``limit``."""
    if i + 3 > limit:
        raise ITLError(f"truncated TLV at offset {i}")
    tag, length = struct.unpack_from(">BH", data, i)
    if i + 3 + length > limit:
        raise ITLError(f"TLV {tag} at offset {i} overruns its container")
    return tag, data[i + 3 : i + 3 + length], i + 3 + length


def cstring(value: bytes) -> str:
    if not value.endswith(b"\x00"):
        raise ITLError("string is not NUL-terminated")
    try:
        return value[:-1].decode("utf-8")
    except UnicodeDecodeError:
        raise ITLError("string is not UTF-8") from None


@dataclass(frozen=True)
class Header:
    """A signed header walked flat: containers opened, each leaf tag once."""

    version: tuple[int, int]
    header_length: int
    fields: Mapping[int, bytes]
    signature_span: tuple[int, int]

    def required(self, *tags: int) -> None:
        for tag in tags:
            if tag not in self.fields:
                raise ITLError(f"header lacks tag {tag}")

    def byte(self, tag: int) -> int:
        value = self.fields[tag]
        if len(value) != 1:
            raise ITLError(f"header tag {tag} is not one byte")
        return value[0]

    def signed_bytes(self, data: bytes) -> bytes:
        """What the signature covers: the whole file minus the SIGNATURE TLV."""
        start, end = self.signature_span
        return data[:start] + data[end:]


def read_header(data: bytes) -> Header:
    """Walk VERSION, HEADER_LENGTH and the header TLVs up to HEADER_LENGTH."""
    tag, value, i = read_tlv(data, 0, len(data))
    if tag != H_VERSION or len(value) != 2:
        raise ITLError("file does not start with VERSION")
    version = (value[0], value[1])
    tag, value, i = read_tlv(data, i, len(data))
    if tag != H_HEADER_LENGTH or len(value) != 2:
        raise ITLError("VERSION is not followed by HEADER_LENGTH")
    (header_length,) = struct.unpack(">H", value)
    if header_length > len(data):
        raise ITLError("HEADER_LENGTH beyond end of file")

    fields: dict[int, bytes] = {}
    span = (-1, -1)
    while i < header_length:
        if data[i] == H_PADDING:
            i += 1
            continue
        start = i
        tag, value, end = read_tlv(data, i, header_length)
        if tag in _HEADER_CONTAINERS:
            i = start + 3  # walk into the container: its children are siblings on the wire
            continue
        if tag in fields or tag in (H_VERSION, H_HEADER_LENGTH):
            raise ITLError(f"header repeats tag {tag}")
        if tag == H_SIGNATURE:
            span = (start, end)
        fields[tag] = value
        i = end
    if span[0] < 0:
        raise ITLError(f"header lacks tag {H_SIGNATURE}")
    return Header(version, header_length, fields, span)


# ITL build -----------------------------------------------------------------------------------


def _public_key_bytes(cert: x509.Certificate) -> bytes:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    raise ITLError("only RSA and EC certificates can go in an ITL")


def certificate_hash(cert: x509.Certificate, algorithm: HashAlgorithm) -> bytes:
    """The digest of the DER certificate, as CERTIFICATE_HASH carries it."""
    return cert.fingerprint(hash_class(algorithm)())


def _rsa_numbers(cert: x509.Certificate) -> rsa.RSAPublicNumbers | None:
    key = cert.public_key()
    return key.public_numbers() if isinstance(key, rsa.RSAPublicKey) else None


def _record(role: int, cert: x509.Certificate, record_hash: HashAlgorithm | None) -> bytes:
    parts = [
        tlv(R_SUBJECT_NAME, cstr(name_string(cert.subject))),
        tlv(R_ROLE, struct.pack(">H", role)),
        tlv(R_ISSUER_NAME, cstr(name_string(cert.issuer))),
        tlv(R_SERIAL_NUMBER, serial_bytes(cert.serial_number)),
        tlv(R_PUBLIC_KEY, _public_key_bytes(cert)),
        tlv(R_SIGNATURE, cert.signature),
        tlv(R_CERTIFICATE, cert.public_bytes(serialization.Encoding.DER)),
    ]
    if record_hash is not None:
        parts.append(tlv(R_CERTIFICATE_HASH, certificate_hash(cert, record_hash)))
        parts.append(tlv(R_HASH_ALGORITHM, bytes([record_hash])))
    body = b"".join(parts)
    total = 5 + len(body)  # RECORD_LENGTH counts from the record's first byte
    if total > 0xFFFF:
        raise ITLError("ITL record too long")
    return struct.pack(">BHH", R_RECORD_LENGTH, 2, total) + body


def build_itl(
    sast_cert: x509.Certificate,
    sast_key: rsa.RSAPrivateKey,
    records: Sequence[tuple[int, x509.Certificate]],
    *,
    timestamp: int,
    hash_algorithm: HashAlgorithm = HashAlgorithm.SHA512,
    filename: str = "ITLFile.tlv",
    signer_version: tuple[int, int] | None = None,
    record_hash: HashAlgorithm | None = HashAlgorithm.SHA1,
) -> bytes:
    """Build and sign an ITL. ``records`` must include ``sast_cert`` with role SAST.

    ``signer_version`` defaults to 1.1 when any record holds an EC key (phones need 1.1 to
    accept EC, and then use HTTPS 6971 with the EC TFTP-role certificate), else 1.0.
    ``timestamp`` is injected (Unix seconds) so builds are reproducible. ``record_hash`` is the
    algorithm of each record's CERTIFICATE_HASH (None: no hash TLVs).
    """
    if not isinstance(sast_key, rsa.RSAPrivateKey):
        raise ITLError("the SAST key must be RSA")
    if hash_algorithm not in (HashAlgorithm.SHA1, HashAlgorithm.SHA512):
        raise ITLError("phones accept SHA-1 or SHA-512 ITL signatures only")
    if not any(
        role == Role.SAST and cert.serial_number == sast_cert.serial_number
        for role, cert in records
    ):
        raise ITLError("the SAST signer must appear as a SAST record")
    sig_len = signature_length(sast_cert)
    if sast_key.public_key().public_numbers() != _rsa_numbers(sast_cert):
        raise ITLError("the SAST key does not belong to the SAST certificate")
    if signer_version is None:
        has_ec = any(key_type(cert) == KeyType.EC for _, cert in records)
        signer_version = (1, 1) if has_ec else (1, 0)

    before, after = lay_out_header(
        ITL_VERSION,
        tlv(H_SIGNER_VERSION, bytes(signer_version))
        + signer_info(sast_cert)
        + signature_info(hash_algorithm, sig_len),
        tlv(H_FILENAME, cstr(filename)) + tlv(H_TIMESTAMP, struct.pack(">I", timestamp)),
        sig_len,
    )
    body = b"".join(_record(role, cert, record_hash) for role, cert in records)
    signature = sast_key.sign(
        before + after + body, padding.PKCS1v15(), hash_class(hash_algorithm)()
    )
    return before + tlv(H_SIGNATURE, signature) + after + body


# ITL parse -----------------------------------------------------------------------------------


def role_name(role: int) -> str:
    """``CCM_TFTP`` for 2, the number itself for roles we do not know."""
    try:
        return Role(role).name
    except ValueError:
        return str(role)


@dataclass(frozen=True)
class ITLRecord:
    role: int
    certificate: x509.Certificate
    subject_name: str
    issuer_name: str
    serial_number: bytes
    public_key: bytes
    certificate_hash: bytes = b""
    hash_algorithm: int | None = None

    @property
    def key_type(self) -> KeyType:
        return key_type(self.certificate)

    @property
    def has_tftp_role(self) -> bool:
        return self.role in TFTP_ROLES


@dataclass(frozen=True)
class ITLFile:
    version: tuple[int, int]
    header_length: int
    signer_version: tuple[int, int]
    signer_name: str
    issuer_name: str
    serial_number: bytes
    hash_algorithm: int
    signature: bytes
    filename: str
    timestamp: int
    records: tuple[ITLRecord, ...]

    def certificates(self, role: int) -> list[x509.Certificate]:
        return [r.certificate for r in self.records if r.role == role]

    def tftp_certificates(self, key: KeyType | None = None) -> list[x509.Certificate]:
        """Certificates with a TFTP role (CCM+TFTP or TFTP), optionally of one key type.

        RSA ones sign ``.sgn`` files; EC ones serve HTTPS on 6971 (with ITL version 1.1).
        """
        return [
            r.certificate
            for r in self.records
            if r.has_tftp_role and (key is None or r.key_type == key)
        ]

    @property
    def wants_signed_files(self) -> bool:
        """A phone holding this ITL asks for ``.sgn`` files (a TFTP-role record is present)."""
        return any(r.has_tftp_role for r in self.records)

    @property
    def https_provisioning(self) -> bool:
        """Version 1.1 with an EC TFTP-role certificate: the phone tries HTTPS 6971 first."""
        return self.signer_version >= (1, 1) and bool(self.tftp_certificates(KeyType.EC))


def _parse_record(data: bytes, rec_start: int) -> tuple[ITLRecord, int]:
    tag, value, i = read_tlv(data, rec_start, len(data))
    if tag != R_RECORD_LENGTH or len(value) != 2:
        raise ITLError(f"record at offset {rec_start} does not start with RECORD_LENGTH")
    (rec_len,) = struct.unpack(">H", value)
    rec_end = rec_start + rec_len
    if rec_len < 5 or rec_end > len(data):
        raise ITLError(f"record at offset {rec_start} has a bad length")
    rf: dict[int, bytes] = {}
    while i < rec_end:
        tag, value, i = read_tlv(data, i, rec_end)
        rf.setdefault(tag, value)
    if R_CERTIFICATE not in rf or R_ROLE not in rf or len(rf[R_ROLE]) != 2:
        raise ITLError(f"record at offset {rec_start} lacks CERTIFICATE or ROLE")
    try:
        cert = x509.load_der_x509_certificate(rf[R_CERTIFICATE])
    except ValueError:
        raise ITLError(f"record at offset {rec_start} holds an invalid certificate") from None
    hash_alg = rf.get(R_HASH_ALGORITHM)
    if hash_alg is not None and len(hash_alg) != 1:
        raise ITLError(f"record at offset {rec_start}: HASH_ALGORITHM is not one byte")
    record = ITLRecord(
        role=struct.unpack(">H", rf[R_ROLE])[0],
        certificate=cert,
        subject_name=cstring(rf.get(R_SUBJECT_NAME, b"\x00")),
        issuer_name=cstring(rf.get(R_ISSUER_NAME, b"\x00")),
        serial_number=rf.get(R_SERIAL_NUMBER, b""),
        public_key=rf.get(R_PUBLIC_KEY, b""),
        certificate_hash=rf.get(R_CERTIFICATE_HASH, b""),
        hash_algorithm=hash_alg[0] if hash_alg is not None else None,
    )
    return record, rec_end


def parse_itl(data: bytes, *, verify: bool = True) -> ITLFile:
    """Parse an ITL; with ``verify`` check the signature with the SAST record matching the signer.

    ``verify`` also checks that each record's PUBLIC_KEY and CERTIFICATE_HASH match its
    certificate. Raises ITLError on any malformation or a bad signature.
    """
    data = bytes(data)
    header = read_header(data)
    header.required(H_SIGNER_NAME, H_SERIAL_NUMBER, H_HASH_ALGORITHM, H_FILENAME)
    fields = header.fields
    signer_version_raw = fields.get(H_SIGNER_VERSION, b"\x01\x00")
    timestamp_raw = fields.get(H_TIMESTAMP, b"\x00\x00\x00\x00")
    if len(signer_version_raw) != 2 or len(timestamp_raw) != 4:
        raise ITLError("bad SIGNER_VERSION or TIMESTAMP length")

    records: list[ITLRecord] = []
    i = header.header_length
    while i < len(data):
        record, i = _parse_record(data, i)
        records.append(record)

    itl = ITLFile(
        version=header.version,
        header_length=header.header_length,
        signer_version=(signer_version_raw[0], signer_version_raw[1]),
        signer_name=cstring(fields[H_SIGNER_NAME]),
        issuer_name=cstring(fields.get(H_ISSUER_NAME, b"\x00")),
        serial_number=fields[H_SERIAL_NUMBER],
        hash_algorithm=header.byte(H_HASH_ALGORITHM),
        signature=fields[H_SIGNATURE],
        filename=cstring(fields[H_FILENAME]),
        timestamp=struct.unpack(">I", timestamp_raw)[0],
        records=tuple(records),
    )
    if verify:
        _verify(itl, header.signed_bytes(data))
        for record in itl.records:
            _check_record(record)
    return itl


def _check_record(record: ITLRecord) -> None:
    """The record's own fields agree with the certificate it carries."""
    where = role_name(record.role)
    if record.public_key and record.public_key != _public_key_bytes(record.certificate):
        raise ITLError(f"{where} record: PUBLIC_KEY does not match its certificate")
    if record.certificate_hash or record.hash_algorithm is not None:
        if record.hash_algorithm is None:
            raise ITLError(f"{where} record: CERTIFICATE_HASH without HASH_ALGORITHM")
        expected = record.certificate.fingerprint(hash_class(record.hash_algorithm)())
        if record.certificate_hash != expected:
            raise ITLError(f"{where} record: CERTIFICATE_HASH does not match its certificate")


def _verify(itl: ITLFile, signed: bytes) -> None:
    signer = next(
        (
            r.certificate
            for r in itl.records
            if r.role == Role.SAST and same_serial(r.serial_number, itl.serial_number)
        ),
        None,
    )
    if signer is None:
        raise ITLError("no SAST record matches the signer serial number")
    key = signer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise ITLError("SAST certificate is not RSA")
    try:
        key.verify(itl.signature, signed, padding.PKCS1v15(), hash_class(itl.hash_algorithm)())
    except InvalidSignature:
        raise ITLError("ITL signature does not verify with its SAST certificate") from None
