"""ITL version 1.1: which record carries which role, key type and hash, checked independently.

The reader here follows the published layout (cisco-protocols.md sections 5 and 16) without
importing ``callboard.protocols.tvs``; key types and hashes are checked with ``openssl x509``.
Expected records of the daemon's ITL:

| role           | code | key | certificate             | CERTIFICATE_HASH         |
|----------------|------|-----|-------------------------|--------------------------|
| SAST           | 0    | RSA | ``certs/sast.pem``      | SHA-1 of the DER (alg 1) |
| CCM+TFTP       | 2    | RSA | ``certs/ccm-tftp.pem``  | SHA-1 of the DER (alg 1) |
| TVS            | 21   | EC  | ``certs/tvs.pem``       | SHA-1 of the DER (alg 1) |
| TFTP (HTTPS)   | 3    | EC  | ``certs/https-tftp.pem``| SHA-1 of the DER (alg 1) |

(TVS is EC with the default ``--key-type ec``, RSA with ``rsa``.)
"""

from __future__ import annotations

import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from callboard.daemon import certs
from callboard.protocols.tvs.itl import (
    HashAlgorithm,
    ITLError,
    KeyType,
    Role,
    build_itl,
    parse_itl,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from .conftest import Pki  # type: ignore[import-not-found]

TS = 1_764_000_000


@dataclass
class Rec:
    tags: list[int]
    fields: dict[int, bytes]

    @property
    def role(self) -> int:
        return int(struct.unpack(">H", self.fields[4])[0])

    @property
    def der(self) -> bytes:
        return self.fields[9]


@dataclass
class Itl:
    header_tags: list[int]
    version: tuple[int, int]
    signer_version: tuple[int, int]
    header_length: int
    signature: bytes
    hash_algorithm: int
    without_signature: bytes
    records: list[Rec]


def read_itl(data: bytes) -> Itl:
    """Header TLVs (containers 3, 7, 9 opened), then records each opened by RECORD_LENGTH."""
    tags: list[int] = []
    found: dict[int, bytes] = {}
    sig = (0, 0)
    i, header_length = 0, None
    while header_length is None or i < header_length:
        tag = data[i]
        tags.append(tag)
        if tag == 13:
            i += 1
            continue
        (length,) = struct.unpack_from(">H", data, i + 1)
        if tag in (3, 7, 9):
            i += 3
            continue
        value = data[i + 3 : i + 3 + length]
        found[tag] = value
        if tag == 2:
            (header_length,) = struct.unpack(">H", value)
        if tag == 12:
            sig = (i, i + 3 + length)
        i += 3 + length
    assert i == header_length and header_length % 4 == 0
    records = []
    while i < len(data):
        start = i
        assert data[i : i + 3] == b"\x01\x00\x02", "a record starts with RECORD_LENGTH"
        (rec_len,) = struct.unpack_from(">H", data, i + 3)
        i += 5
        rec_tags: list[int] = []
        fields: dict[int, bytes] = {}
        while i < start + rec_len:
            tag = data[i]
            (length,) = struct.unpack_from(">H", data, i + 1)
            rec_tags.append(tag)
            fields[tag] = data[i + 3 : i + 3 + length]
            i += 3 + length
        assert i == start + rec_len
        records.append(Rec(rec_tags, fields))
    return Itl(
        header_tags=tags,
        version=(found[1][0], found[1][1]),
        signer_version=(found[28][0], found[28][1]),
        header_length=header_length,
        signature=found[12],
        hash_algorithm=found[8][0],
        without_signature=data[: sig[0]] + data[sig[1] :],
        records=records,
    )


def openssl_x509(der: bytes, tmp: Path, *args: str) -> str:
    (tmp / "cert.der").write_bytes(der)
    return subprocess.run(
        ["openssl", "x509", "-inform", "DER", "-in", str(tmp / "cert.der"), "-noout", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout


def openssl_key_type(der: bytes, tmp: Path) -> str:
    text = openssl_x509(der, tmp, "-text")
    if "Public Key Algorithm: id-ecPublicKey" in text:
        return "EC"
    if "Public Key Algorithm: rsaEncryption" in text:
        return "RSA"
    raise AssertionError(text)


def openssl_fingerprint(der: bytes, tmp: Path, digest: str) -> bytes:
    line = openssl_x509(der, tmp, "-fingerprint", f"-{digest}").strip()
    return bytes.fromhex(line.split("=", 1)[1].replace(":", ""))


@pytest.fixture(scope="module")
def itl_bytes(pki: Pki) -> bytes:
    return pki.server.build_itl(timestamp=TS)


def test_daemon_itl_is_version_1_1_with_the_published_header(itl_bytes: bytes) -> None:
    itl = read_itl(itl_bytes)
    assert itl.version == (1, 2)  # file-format version of a .tlv
    assert itl.signer_version == (1, 1)  # EC support + HTTPS provisioning
    pad = itl.header_tags.count(13)
    assert itl.header_tags == [1, 2, 28, 3, 4, 6, 5, 7, 8, 9, 10, 11, 12, 14, 15] + [13] * pad


def test_records_roles_key_types_and_hashes(pki: Pki, itl_bytes: bytes, tmp_path: Path) -> None:
    itl = read_itl(itl_bytes)
    table = [
        (r.role, openssl_key_type(r.der, tmp_path), r.fields[12], len(r.fields[11]))
        for r in itl.records
    ]
    assert table == [
        (0, "RSA", b"\x01", 20),
        (2, "RSA", b"\x01", 20),
        (21, "EC", b"\x01", 20),
        (3, "EC", b"\x01", 20),
    ]
    for rec in itl.records:
        assert rec.tags == [3, 4, 5, 6, 7, 8, 9, 11, 12]
        assert rec.fields[11] == openssl_fingerprint(rec.der, tmp_path, "sha1")
        cert = x509.load_der_x509_certificate(rec.der)
        assert int.from_bytes(rec.fields[6], "big") == cert.serial_number
        assert rec.fields[8] == cert.signature
        key = cert.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey):
            assert rec.fields[7][0] == 4 and len(rec.fields[7]) == 65  # X9.62 uncompressed P-256
        else:
            assert isinstance(key, rsa.RSAPublicKey)
            assert rec.fields[7] == key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.PKCS1
            )
    on_disk = {
        role: (pki.state_dir / "certs" / f"{stem}.pem").read_bytes()
        for role, stem in [(0, "sast"), (2, "ccm-tftp"), (21, "tvs"), (3, "https-tftp")]
    }
    for rec in itl.records:
        pem = x509.load_pem_x509_certificate(on_disk[rec.role])
        assert rec.der == pem.public_bytes(serialization.Encoding.DER)


def test_openssl_checks_the_itl_signature_with_the_sast_record(
    itl_bytes: bytes, tmp_path: Path
) -> None:
    itl = read_itl(itl_bytes)
    sast = next(r for r in itl.records if r.role == 0)
    (tmp_path / "pub.pem").write_text(openssl_x509(sast.der, tmp_path, "-pubkey"))
    (tmp_path / "sig.bin").write_bytes(itl.signature)
    (tmp_path / "data.bin").write_bytes(itl.without_signature)
    assert itl.hash_algorithm == 3
    result = subprocess.run(
        ["openssl", "dgst", "-sha512", "-verify", "pub.pem", "-signature", "sig.bin", "data.bin"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0 and "Verified OK" in result.stdout


def test_parser_exposes_role_key_type_and_hash(pki: Pki, itl_bytes: bytes) -> None:
    itl = parse_itl(itl_bytes)
    assert [(r.role, r.key_type, r.hash_algorithm) for r in itl.records] == [
        (Role.SAST, KeyType.RSA, HashAlgorithm.SHA1),
        (Role.CCM_TFTP, KeyType.RSA, HashAlgorithm.SHA1),
        (Role.TVS, KeyType.EC, HashAlgorithm.SHA1),
        (Role.TFTP, KeyType.EC, HashAlgorithm.SHA1),
    ]
    for record in itl.records:
        assert record.certificate_hash == record.certificate.fingerprint(hashes.SHA1())
    assert itl.tftp_certificates(KeyType.RSA) == [pki.server.ccm_tftp.cert]  # signs .sgn
    assert itl.tftp_certificates(KeyType.EC) == [pki.server.https_tftp.cert]  # HTTPS 6971
    assert itl.wants_signed_files and itl.https_provisioning


def test_without_ec_the_builder_writes_version_1_0(pki: Pki) -> None:
    key = pki.server.sast.key
    assert isinstance(key, rsa.RSAPrivateKey)
    records = [(Role.SAST, pki.server.sast.cert), (Role.CCM_TFTP, pki.server.ccm_tftp.cert)]
    itl = parse_itl(build_itl(pki.server.sast.cert, key, records, timestamp=TS))
    assert itl.signer_version == (1, 0)
    assert itl.wants_signed_files and not itl.https_provisioning
    sast_only = parse_itl(
        build_itl(pki.server.sast.cert, key, records[:1], timestamp=TS, record_hash=None)
    )
    assert not sast_only.wants_signed_files
    assert sast_only.records[0].certificate_hash == b""
    assert sast_only.records[0].hash_algorithm is None


def test_record_hash_algorithm_is_selectable(pki: Pki, tmp_path: Path) -> None:
    key = pki.server.sast.key
    assert isinstance(key, rsa.RSAPrivateKey)
    records = [(Role.SAST, pki.server.sast.cert), (Role.TFTP, pki.server.https_tftp.cert)]
    data = build_itl(
        pki.server.sast.cert, key, records, timestamp=TS, record_hash=HashAlgorithm.SHA256
    )
    rec = read_itl(data).records[1]
    assert rec.fields[12] == b"\x02"
    assert rec.fields[11] == openssl_fingerprint(rec.der, tmp_path, "sha256")


def _resign(pki: Pki, data: bytes) -> bytes:
    """Re-sign an edited ITL with the real SAST key, so only the record check can object."""
    itl = read_itl(data)
    start = data.index(itl.signature) - 3
    key = pki.server.sast.key
    assert isinstance(key, rsa.RSAPrivateKey)
    signature = key.sign(itl.without_signature, padding.PKCS1v15(), hashes.SHA512())
    return data[:start] + data[start : start + 3] + signature + data[start + 3 + len(signature) :]


def test_a_record_hash_that_does_not_match_is_refused(pki: Pki, itl_bytes: bytes) -> None:
    last_hash = itl_bytes.rindex(bytes([11, 0, 20]))
    edited = bytearray(itl_bytes)
    edited[last_hash + 3] ^= 0x01
    resigned = _resign(pki, bytes(edited))
    assert parse_itl(resigned, verify=False).records  # well-formed ...
    with pytest.raises(ITLError, match="TFTP record: CERTIFICATE_HASH does not match"):
        parse_itl(resigned)  # ... but the TFTP record's hash is not its certificate's
    with pytest.raises(ITLError, match="signature does not verify"):
        parse_itl(bytes(edited))  # without re-signing, the signature check fails first


# certs: the EC HTTPS certificate in the server set ---------------------------------------------


def test_init_creates_the_https_pair_and_force_rotates_it(tmp_path: Path) -> None:
    first = certs.init_certs(tmp_path)
    assert (tmp_path / "certs" / "https-tftp.key").stat().st_mode & 0o777 == 0o600
    assert isinstance(first.https_tftp.key, ec.EllipticCurvePrivateKey)
    assert isinstance(first.ccm_tftp.key, rsa.RSAPrivateKey)
    again = certs.init_certs(tmp_path)
    assert again.https_tftp.cert == first.https_tftp.cert
    rotated = certs.init_certs(tmp_path, force=True)
    assert rotated.https_tftp.cert != first.https_tftp.cert
    itl = parse_itl(rotated.build_itl(timestamp=TS))  # the ITL follows the rotation
    assert itl.tftp_certificates(KeyType.EC) == [rotated.https_tftp.cert]
    assert itl.tftp_certificates(KeyType.RSA) == [rotated.ccm_tftp.cert]
    cert, key = rotated.sgn_signer()
    assert cert == rotated.ccm_tftp.cert and isinstance(key, rsa.RSAPrivateKey)


def test_rsa_key_type_keeps_the_https_certificate_ec(tmp_path: Path) -> None:
    server = certs.init_certs(tmp_path, key_type="rsa")
    assert isinstance(server.tvs.key, rsa.RSAPrivateKey)
    assert isinstance(server.https_tftp.key, ec.EllipticCurvePrivateKey)
    assert parse_itl(server.build_itl(timestamp=TS)).signer_version == (1, 1)


def _ec_ccm_tftp(like: x509.Certificate) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CCM+TFTP pair as versions before .sgn made it with the default --key-type ec."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(like.subject)
        .issuer_name(like.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(like.not_valid_before_utc)
        .not_valid_after(like.not_valid_after_utc)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def test_an_older_state_dir_is_upgraded_at_first_start(tmp_path: Path) -> None:
    """Before .sgn: CCM+TFTP followed --key-type (EC by default) and there was no HTTPS pair."""
    first = certs.init_certs(tmp_path)
    d = tmp_path / "certs"
    certs.write_pair(d, "ccm-tftp", *_ec_ccm_tftp(first.ccm_tftp.cert))
    for ext in ("pem", "key"):
        (d / f"https-tftp.{ext}").unlink()
    assert not certs.certs_present(tmp_path)  # so the daemon runs init_certs at start
    upgraded = certs.init_certs(tmp_path)
    assert isinstance(upgraded.ccm_tftp.key, rsa.RSAPrivateKey)
    assert isinstance(upgraded.https_tftp.key, ec.EllipticCurvePrivateKey)
    assert upgraded.sast.cert == first.sast.cert  # the ITL signer is kept: phones stay trusting
    assert upgraded.tvs.cert == first.tvs.cert


def test_an_ec_signer_left_in_place_is_a_clear_error(tmp_path: Path) -> None:
    first = certs.init_certs(tmp_path)
    certs.write_pair(tmp_path / "certs", "ccm-tftp", *_ec_ccm_tftp(first.ccm_tftp.cert))
    with pytest.raises(certs.CertError, match=r"CCM\+TFTP key must be RSA"):
        certs.load_server_certs(tmp_path)


def test_cli_init_lists_the_https_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert certs.main(["certs", "init", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    labels = [line.split()[0] for line in out.splitlines()[1:]]
    assert labels == ["SAST", "TVS", "CCM+TFTP", "HTTPS"]
    fingerprint = certs.load_server_certs(tmp_path).https_tftp.cert.fingerprint(hashes.SHA256())
    assert f"sha256={fingerprint.hex()}" in out
