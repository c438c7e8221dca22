"""ITL trust-list files (``ITLFile.tlv``): the Cisco TLV format, built and parsed.

The phone learns which certificates to trust for TFTP, CCM and TVS from this file; it is signed
with the SAST (ITL-recovery) key, RSA PKCS#1 v1.5 over the whole file minus the SIGNATURE TLV.
Layout facts come from the project's research notes (cisco-protocols.md section 5).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

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


class HashAlgorithm(IntEnum):
    SHA1 = 1
    SHA256 = 2
    SHA512 = 3


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

_MODULUS_SIZES = (64, 128, 256, 512)
_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    HashAlgorithm.SHA1: hashes.SHA1,
    HashAlgorithm.SHA256: hashes.SHA256,
    HashAlgorithm.SHA512: hashes.SHA512,
}


class ITLError(ValueError):
    """The bytes are not a well-formed, correctly signed ITL file."""


def name_string(name: x509.Name) -> str:
    """RDNs in certificate order, each RFC 4514-formatted, joined with ','."""
    return ",".join(rdn.rfc4514_string() for rdn in name.rdns)


def _serial_bytes(serial: int) -> bytes:
    return serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big")


def _tlv(tag: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ITLError(f"TLV {tag} too long")
    return struct.pack(">BH", tag, len(value)) + value


def _cstr(text: str) -> bytes:
    return text.encode("utf-8") + b"\x00"


def _public_key_bytes(cert: x509.Certificate) -> bytes:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    raise ITLError("only RSA and EC certificates can go in an ITL")


def _record(role: int, cert: x509.Certificate) -> bytes:
    body = b"".join(
        [
            _tlv(R_SUBJECT_NAME, _cstr(name_string(cert.subject))),
            _tlv(R_ROLE, struct.pack(">H", role)),
            _tlv(R_ISSUER_NAME, _cstr(name_string(cert.issuer))),
            _tlv(R_SERIAL_NUMBER, _serial_bytes(cert.serial_number)),
            _tlv(R_PUBLIC_KEY, _public_key_bytes(cert)),
            _tlv(R_SIGNATURE, cert.signature),
            _tlv(R_CERTIFICATE, cert.public_bytes(serialization.Encoding.DER)),
        ]
    )
    total = 5 + len(body)  # RECORD_LENGTH counts from the record's first byte
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
) -> bytes:
    """Build and sign an ITL. ``records`` must include ``sast_cert`` with role SAST.

    ``signer_version`` defaults to 1.1 when any record holds an EC key (phones need 1.1 to
    accept EC), else 1.0. ``timestamp`` is injected (Unix seconds) so builds are reproducible.
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
    sig_len = sast_key.key_size // 8
    if sig_len not in _MODULUS_SIZES:
        raise ITLError(f"unsupported SAST key size {sast_key.key_size}")
    if signer_version is None:
        has_ec = any(isinstance(c.public_key(), ec.EllipticCurvePublicKey) for _, c in records)
        signer_version = (1, 1) if has_ec else (1, 0)

    signer_info = b"".join(
        [
            _tlv(H_SIGNER_NAME, _cstr(name_string(sast_cert.subject))),
            _tlv(H_SERIAL_NUMBER, _serial_bytes(sast_cert.serial_number)),
            _tlv(H_ISSUER_NAME, _cstr(name_string(sast_cert.issuer))),
        ]
    )
    sig_alg_info = _tlv(H_SIGNATURE_ALGORITHM, b"\x00") + _tlv(
        H_SIGNATURE_MODULUS, bytes([_MODULUS_SIZES.index(sig_len)])
    )
    sig_info = _tlv(H_HASH_ALGORITHM, bytes([hash_algorithm])) + _tlv(
        H_SIGNATURE_ALGORITHM_INFO, sig_alg_info
    )
    before_sig = b"".join(
        [
            _tlv(H_VERSION, b"\x01\x02"),
            _tlv(H_HEADER_LENGTH, b"\x00\x00"),  # patched below
            _tlv(H_SIGNER_VERSION, bytes(signer_version)),
            _tlv(H_SIGNER_INFO, signer_info),
            _tlv(H_SIGNATURE_INFO, sig_info),
        ]
    )
    after_sig = _tlv(H_FILENAME, _cstr(filename)) + _tlv(H_TIMESTAMP, struct.pack(">I", timestamp))
    sig_tlv_len = 3 + sig_len
    unpadded = len(before_sig) + sig_tlv_len + len(after_sig)
    after_sig += bytes([H_PADDING]) * (-unpadded % 4)
    header_length = unpadded + (-unpadded % 4)
    before_sig = before_sig[:8] + struct.pack(">H", header_length) + before_sig[10:]

    body = b"".join(_record(role, cert) for role, cert in records)
    signed = before_sig + after_sig + body
    signature = sast_key.sign(signed, padding.PKCS1v15(), _HASHES[hash_algorithm]())
    return before_sig + _tlv(H_SIGNATURE, signature) + after_sig + body


@dataclass(frozen=True)
class ITLRecord:
    role: int
    certificate: x509.Certificate
    subject_name: str
    issuer_name: str
    serial_number: bytes
    public_key: bytes


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


def _read_tlv(data: bytes, i: int, limit: int) -> tuple[int, bytes, int]:
    if i + 3 > limit:
        raise ITLError(f"truncated TLV at offset {i}")
    tag, length = struct.unpack_from(">BH", data, i)
    if i + 3 + length > limit:
        raise ITLError(f"TLV {tag} at offset {i} overruns its container")
    return tag, data[i + 3 : i + 3 + length], i + 3 + length


def _cstring(value: bytes) -> str:
    if not value.endswith(b"\x00"):
        raise ITLError("string is not NUL-terminated")
    try:
        return value[:-1].decode("utf-8")
    except UnicodeDecodeError:
        raise ITLError("string is not UTF-8") from None


def parse_itl(data: bytes, *, verify: bool = True) -> ITLFile:
    """Parse an ITL; with ``verify`` check the signature with the SAST record matching the signer.

    Raises ITLError on any malformation or a bad signature.
    """
    data = bytes(data)
    tag, value, i = _read_tlv(data, 0, len(data))
    if tag != H_VERSION or len(value) != 2:
        raise ITLError("file does not start with VERSION")
    version = (value[0], value[1])
    tag, value, i = _read_tlv(data, i, len(data))
    if tag != H_HEADER_LENGTH or len(value) != 2:
        raise ITLError("VERSION is not followed by HEADER_LENGTH")
    (header_length,) = struct.unpack(">H", value)
    if header_length > len(data):
        raise ITLError("HEADER_LENGTH beyond end of file")

    fields: dict[int, bytes] = {}
    sig_start = sig_end = -1
    containers = {H_SIGNER_INFO, H_SIGNATURE_INFO, H_SIGNATURE_ALGORITHM_INFO}
    while i < header_length:
        if data[i] == H_PADDING:
            i += 1
            continue
        start = i
        tag, value, end = _read_tlv(data, i, header_length)
        if tag in containers:
            i = start + 3  # walk into the container: its children are siblings on the wire
            continue
        if tag == H_SIGNATURE:
            sig_start, sig_end = start, end
        fields[tag] = value
        i = end
    for required in (H_SIGNER_NAME, H_SERIAL_NUMBER, H_HASH_ALGORITHM, H_SIGNATURE, H_FILENAME):
        if required not in fields:
            raise ITLError(f"header lacks tag {required}")
    if len(fields[H_HASH_ALGORITHM]) != 1:
        raise ITLError("HASH_ALGORITHM is not one byte")
    hash_algorithm = fields[H_HASH_ALGORITHM][0]
    signer_version_raw = fields.get(H_SIGNER_VERSION, b"\x01\x00")
    timestamp_raw = fields.get(H_TIMESTAMP, b"\x00\x00\x00\x00")
    if len(signer_version_raw) != 2 or len(timestamp_raw) != 4:
        raise ITLError("bad SIGNER_VERSION or TIMESTAMP length")

    records: list[ITLRecord] = []
    i = header_length
    while i < len(data):
        rec_start = i
        tag, value, i = _read_tlv(data, i, len(data))
        if tag != R_RECORD_LENGTH or len(value) != 2:
            raise ITLError(f"record at offset {rec_start} does not start with RECORD_LENGTH")
        (rec_len,) = struct.unpack(">H", value)
        rec_end = rec_start + rec_len
        if rec_len < 5 or rec_end > len(data):
            raise ITLError(f"record at offset {rec_start} has a bad length")
        rf: dict[int, bytes] = {}
        while i < rec_end:
            tag, value, i = _read_tlv(data, i, rec_end)
            rf.setdefault(tag, value)
        if R_CERTIFICATE not in rf or R_ROLE not in rf or len(rf[R_ROLE]) != 2:
            raise ITLError(f"record at offset {rec_start} lacks CERTIFICATE or ROLE")
        try:
            cert = x509.load_der_x509_certificate(rf[R_CERTIFICATE])
        except ValueError:
            raise ITLError(f"record at offset {rec_start} holds an invalid certificate") from None
        records.append(
            ITLRecord(
                role=struct.unpack(">H", rf[R_ROLE])[0],
                certificate=cert,
                subject_name=_cstring(rf.get(R_SUBJECT_NAME, b"\x00")),
                issuer_name=_cstring(rf.get(R_ISSUER_NAME, b"\x00")),
                serial_number=rf.get(R_SERIAL_NUMBER, b""),
                public_key=rf.get(R_PUBLIC_KEY, b""),
            )
        )

    itl = ITLFile(
        version=version,
        header_length=header_length,
        signer_version=(signer_version_raw[0], signer_version_raw[1]),
        signer_name=_cstring(fields[H_SIGNER_NAME]),
        issuer_name=_cstring(fields.get(H_ISSUER_NAME, b"\x00")),
        serial_number=fields[H_SERIAL_NUMBER],
        hash_algorithm=hash_algorithm,
        signature=fields[H_SIGNATURE],
        filename=_cstring(fields[H_FILENAME]),
        timestamp=struct.unpack(">I", timestamp_raw)[0],
        records=tuple(records),
    )
    if verify:
        _verify(itl, data[:sig_start] + data[sig_end:])
    return itl


def _verify(itl: ITLFile, signed: bytes) -> None:
    serial = itl.serial_number.lstrip(b"\x00")
    signer = next(
        (
            r.certificate
            for r in itl.records
            if r.role == Role.SAST and r.serial_number.lstrip(b"\x00") == serial
        ),
        None,
    )
    if signer is None:
        raise ITLError("no SAST record matches the signer serial number")
    key = signer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise ITLError("SAST certificate is not RSA")
    hash_cls = _HASHES.get(itl.hash_algorithm)
    if hash_cls is None:
        raise ITLError(f"unknown hash algorithm {itl.hash_algorithm}")
    try:
        key.verify(itl.signature, signed, padding.PKCS1v15(), hash_cls())
    except InvalidSignature:
        raise ITLError("ITL signature does not verify with its SAST certificate") from None
