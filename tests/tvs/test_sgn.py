"""Signed files (.sgn): built by the project, checked by a parser written here and by openssl.

The parser in this file follows the published format (cisco-protocols.md sections 5 and 16)
and does not import ``callboard.protocols.tvs``: header TLVs in order VERSION 1.0,
HEADER_LENGTH, SIGNER_INFO (4 name, 6 issuer, 5 serial), SIGNATURE_INFO (8 hash, 9 -> 10
algorithm, 11 modulus index), 12 SIGNATURE, 14 FILENAME ``<name>.sgn``, 15 TIMESTAMP, 13 padding
to a 4-byte boundary; then the original bytes. The signer certificate for openssl is taken
from the ITL (the RSA record with the CCM+TFTP role), as a phone would.
"""

from __future__ import annotations

import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_twisted
from callboard.protocols.tvs import sgn
from callboard.protocols.tvs.itl import HashAlgorithm, parse_itl
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import threads

from .conftest import Pki  # type: ignore[import-not-found]

TS = 1_764_000_000
NAME = "SEP00AABBCCDDEE.cnf.xml"
CONFIG = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<device><fullConfig>true</fullConfig>'
    b"<deviceProtocol>SIP</deviceProtocol></device>\n"
)


# An independent reader of the published format ------------------------------------------------


@dataclass
class Published:
    order: list[int] = field(default_factory=list)  # top-level header tags, padding included
    version: tuple[int, int] = (0, 0)
    header_length: int = 0
    signer: list[tuple[int, bytes]] = field(default_factory=list)
    signature_info_length: int = 0
    hash_algorithm: int = -1
    signature_algorithm: int = -1
    modulus_index: int = -1
    signature: bytes = b""
    filename: bytes = b""
    timestamp: int = -1
    padding: bytes = b""
    body: bytes = b""
    without_signature: bytes = b""


def _children(value: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i < len(value):
        (length,) = struct.unpack_from(">H", value, i + 1)
        out.append((value[i], value[i + 3 : i + 3 + length]))
        i += 3 + length
    assert i == len(value), "container children do not fill the container exactly"
    return out


def read_published(blob: bytes) -> Published:
    p = Published()
    i = 0
    while True:
        tag = blob[i]
        if tag == 13:  # PADDING: one bare byte, no length
            p.order.append(13)
            p.padding += blob[i : i + 1]
            i += 1
        else:
            (length,) = struct.unpack_from(">H", blob, i + 1)
            value = blob[i + 3 : i + 3 + length]
            assert len(value) == length, f"TLV {tag} runs past the end"
            p.order.append(tag)
            if tag == 1:
                p.version = (value[0], value[1])
            elif tag == 2:
                (p.header_length,) = struct.unpack(">H", value)
            elif tag == 3:
                p.signer = _children(value)
            elif tag == 7:
                p.signature_info_length = length
                (hash_tlv, alg_info) = _children(value)
                assert hash_tlv[0] == 8 and len(hash_tlv[1]) == 1
                p.hash_algorithm = hash_tlv[1][0]
                assert alg_info[0] == 9 and len(alg_info[1]) == 8
                (alg, modulus) = _children(alg_info[1])
                assert alg[0] == 10 and modulus[0] == 11
                p.signature_algorithm, p.modulus_index = alg[1][0], modulus[1][0]
            elif tag == 12:
                p.signature = value
                p.without_signature = blob[:i] + blob[i + 3 + length :]
            elif tag == 14:
                p.filename = value
            elif tag == 15:
                (p.timestamp,) = struct.unpack(">I", value)
            i += 3 + length
        if p.header_length and i >= p.header_length:
            break
    assert i == p.header_length, "the header does not end at HEADER_LENGTH"
    p.body = blob[i:]
    return p


def rdn_string(name: x509.Name) -> str:
    """The published rule: RDNs in certificate order, RFC 4514 each, joined with ','."""
    return ",".join(rdn.rfc4514_string() for rdn in name.rdns)


def itl_record_certificate(itl: bytes, role: int) -> bytes:
    """DER of the first ITL record with ``role``, walked by hand (records follow the header)."""
    assert itl[5] == 2  # HEADER_LENGTH follows the 5-byte VERSION TLV
    (header_length,) = struct.unpack_from(">H", itl, 8)
    i = header_length
    while i < len(itl):
        (rec_len,) = struct.unpack_from(">H", itl, i + 3)
        fields: dict[int, bytes] = {}
        j = i + 5
        while j < i + rec_len:
            (length,) = struct.unpack_from(">H", itl, j + 1)
            fields.setdefault(itl[j], itl[j + 3 : j + 3 + length])
            j += 3 + length
        if struct.unpack(">H", fields[4])[0] == role:
            return fields[9]
        i += rec_len
    raise AssertionError(f"no role {role} record in the ITL")


# openssl -------------------------------------------------------------------------------------


def openssl_verify(tmp: Path, cert_der: bytes, p: Published, digest: str = "sha512") -> bool:
    (tmp / "signer.der").write_bytes(cert_der)
    pub = subprocess.run(
        ["openssl", "x509", "-inform", "DER", "-in", str(tmp / "signer.der"), "-pubkey", "-noout"],
        check=True,
        capture_output=True,
        timeout=30,
    ).stdout
    (tmp / "pub.pem").write_bytes(pub)
    (tmp / "sig.bin").write_bytes(p.signature)
    (tmp / "data.bin").write_bytes(p.without_signature)
    result = subprocess.run(
        [
            "openssl",
            "dgst",
            f"-{digest}",
            "-verify",
            str(tmp / "pub.pem"),
            "-signature",
            str(tmp / "sig.bin"),
            str(tmp / "data.bin"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ("Verified OK" in result.stdout) == (result.returncode == 0), result
    return result.returncode == 0


@pytest.fixture(scope="module")
def itl(pki: Pki) -> bytes:
    return pki.server.build_itl(timestamp=TS)


@pytest.fixture(scope="module")
def signed(pki: Pki) -> bytes:
    cert, key = pki.server.sgn_signer()
    return sgn.build_signed(CONFIG, NAME, cert, key, TS)


# The format ----------------------------------------------------------------------------------


def test_every_header_element_matches_the_published_format(pki: Pki, signed: bytes) -> None:
    p = read_published(signed)
    signer = pki.server.ccm_tftp.cert
    pad = len(p.padding)
    assert p.order == [1, 2, 3, 7, 12, 14, 15] + [13] * pad
    assert 28 not in p.order  # no SIGNER_VERSION in a .sgn
    assert p.version == (1, 0)
    assert p.header_length % 4 == 0 and 0 <= pad < 4 and p.padding == b"\x0d" * pad
    assert [tag for tag, _ in p.signer] == [4, 6, 5]
    values = dict(p.signer)
    assert values[4] == rdn_string(signer.subject).encode() + b"\x00"
    assert values[6] == rdn_string(signer.issuer).encode() + b"\x00"
    assert int.from_bytes(values[5], "big") == signer.serial_number
    assert p.signature_info_length == 15
    assert p.hash_algorithm == 3  # SHA-512
    assert p.signature_algorithm == 0  # RSA
    assert [64, 128, 256, 512][p.modulus_index] == len(p.signature) == 256
    assert p.filename == b"SEP00AABBCCDDEE.cnf.xml.sgn\x00"
    assert p.timestamp == TS
    assert p.body == CONFIG  # the original bytes, untouched, right after the header
    assert len(signed) == p.header_length + len(CONFIG)


def test_openssl_verifies_with_the_tftp_certificate_from_the_itl(
    signed: bytes, itl: bytes, tmp_path: Path
) -> None:
    p = read_published(signed)
    signer_der = itl_record_certificate(itl, 2)  # CCM+TFTP
    assert openssl_verify(tmp_path, signer_der, p)
    tampered = bytearray(p.without_signature)
    tampered[-1] ^= 0x01
    p.without_signature = bytes(tampered)
    assert not openssl_verify(tmp_path, signer_der, p)


def test_sha1_variant_verifies_with_openssl(pki: Pki, itl: bytes, tmp_path: Path) -> None:
    cert, key = pki.server.sgn_signer()
    blob = sgn.build_signed(CONFIG, NAME, cert, key, TS, hash_algorithm=HashAlgorithm.SHA1)
    p = read_published(blob)
    assert p.hash_algorithm == 1
    assert openssl_verify(tmp_path, itl_record_certificate(itl, 2), p, digest="sha1")
    assert sgn.verify_sgn(blob, cert) == CONFIG


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 200_000])
def test_any_body_length_round_trips(pki: Pki, size: int) -> None:
    cert, key = pki.server.sgn_signer()
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    blob = sgn.build_signed(body, "ringlist.xml", cert, key, TS)
    p = read_published(blob)
    assert p.body == body and p.filename == b"ringlist.xml.sgn\x00"
    assert sgn.verify_sgn(blob, cert, filename="ringlist.xml.sgn") == body


def test_parse_sgn_agrees_with_the_independent_reader(pki: Pki, signed: bytes) -> None:
    p = read_published(signed)
    parsed = sgn.parse_sgn(signed)
    assert parsed.version == p.version == (1, 0)
    assert parsed.header_length == p.header_length
    assert parsed.signer_name == rdn_string(pki.server.ccm_tftp.cert.subject)
    assert parsed.issuer_name == rdn_string(pki.server.ccm_tftp.cert.issuer)
    assert int.from_bytes(parsed.serial_number, "big") == pki.server.ccm_tftp.cert.serial_number
    assert parsed.hash_algorithm == 3 and parsed.signature_algorithm == 0
    assert parsed.signature_modulus == p.modulus_index
    assert parsed.signature == p.signature
    assert parsed.filename == "SEP00AABBCCDDEE.cnf.xml.sgn"
    assert parsed.unsigned_filename == NAME
    assert parsed.timestamp == TS
    assert parsed.body == CONFIG
    assert parsed.signed_data == p.without_signature


# Verification and tampering ------------------------------------------------------------------


def test_verify_returns_the_body_and_finds_the_signer_in_the_itl(
    pki: Pki, signed: bytes, itl: bytes
) -> None:
    certificate = sgn.find_signer(parse_itl(itl), sgn.parse_sgn(signed))
    assert certificate == pki.server.ccm_tftp.cert
    assert sgn.verify_sgn(signed, certificate, filename=NAME + ".sgn") == CONFIG


def _flip(blob: bytes, at: int) -> bytes:
    out = bytearray(blob)
    out[at] ^= 0x01
    return bytes(out)


def test_tampering_anywhere_is_detected(pki: Pki, signed: bytes) -> None:
    cert = pki.server.ccm_tftp.cert
    p = read_published(signed)
    sig_at = signed.index(p.signature)
    name_at = signed.index(b"SEP00AABBCCDDEE.cnf.xml.sgn")
    for at, why in [
        (len(signed) - 1, "signature does not verify"),  # body
        (p.header_length, "signature does not verify"),  # first body byte
        (sig_at + 10, "signature does not verify"),  # signature
        (name_at + 3, "signature does not verify"),  # header file name
        (len(signed) - len(CONFIG) - len(p.padding) - 1, "signature does not verify"),  # time
    ]:
        with pytest.raises(sgn.SgnError, match=why):
            sgn.verify_sgn(_flip(signed, at), cert)


def test_malformed_files_get_a_clear_error(pki: Pki, signed: bytes) -> None:
    cert = pki.server.ccm_tftp.cert
    for cut in (0, 1, 3, 10, 40, 300):
        with pytest.raises(sgn.SgnError, match=r"not a \.sgn file"):
            sgn.parse_sgn(signed[:cut])
    with pytest.raises(sgn.SgnError, match=r"not a \.sgn file"):
        sgn.verify_sgn(CONFIG, cert)  # an unsigned file
    with pytest.raises(sgn.SgnError, match="SIGNER_VERSION"):
        sgn.parse_sgn(pki.server.build_itl(timestamp=TS))  # an ITL is not a .sgn
    wrong_version = bytearray(signed)
    wrong_version[4] = 2  # VERSION 1.2
    with pytest.raises(sgn.SgnError, match=r"version 1\.2 is not 1\.0"):
        sgn.verify_sgn(bytes(wrong_version), cert)


def test_another_certificate_or_name_is_refused(pki: Pki, signed: bytes) -> None:
    with pytest.raises(sgn.SgnError, match="not by the given certificate"):
        sgn.verify_sgn(signed, pki.server.sast.cert)
    with pytest.raises(sgn.SgnError, match="not by the given certificate"):
        sgn.verify_sgn(signed, pki.server.https_tftp.cert)
    with pytest.raises(sgn.SgnError, match="not the requested"):
        sgn.verify_sgn(signed, pki.server.ccm_tftp.cert, filename="SEP00AABBCCDDFF.cnf.xml.sgn")
    # A file that claims the TFTP certificate as signer but was signed by another key.
    rogue = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    prep = sgn.prepare(CONFIG, NAME, pki.server.ccm_tftp.cert, TS)
    rogue_signature = sgn.sign(prep, rogue)
    forged = (
        prep.before_signature
        + struct.pack(">BH", 12, len(rogue_signature))
        + rogue_signature
        + prep.after_signature
        + CONFIG
    )
    assert read_published(forged).body == CONFIG
    with pytest.raises(sgn.SgnError, match="does not verify"):
        sgn.verify_sgn(forged, pki.server.ccm_tftp.cert)
    with pytest.raises(sgn.SgnError, match="does not verify"):
        sgn.finish(prep, rogue_signature)


# The prepare / sign / finish split -----------------------------------------------------------


def test_prepare_is_pure_and_lays_out_everything_but_the_signature(pki: Pki) -> None:
    cert = pki.server.ccm_tftp.cert
    first = sgn.prepare(CONFIG, NAME, cert, TS)
    assert first == sgn.prepare(CONFIG, NAME, cert, TS)  # deterministic, no key involved
    assert first.signature_length == 256 and first.hash_algorithm == HashAlgorithm.SHA512
    _, key = pki.server.sgn_signer()
    blob = sgn.finish(first, sgn.sign(first, key))
    p = read_published(blob)
    assert first.signed_bytes() == p.without_signature
    assert blob == sgn.build_signed(CONFIG, NAME, cert, key, TS)  # PKCS#1 v1.5 is deterministic
    assert blob.startswith(first.before_signature)
    assert blob.endswith(first.after_signature + CONFIG)


def test_finish_checks_the_signature_before_emitting(pki: Pki) -> None:
    prep = sgn.prepare(CONFIG, NAME, pki.server.ccm_tftp.cert, TS)
    _, key = pki.server.sgn_signer()
    good = sgn.sign(prep, key)
    with pytest.raises(sgn.SgnError, match="256"):
        sgn.finish(prep, good[:-1])
    with pytest.raises(sgn.SgnError, match="does not verify"):
        sgn.finish(prep, _flip(good, 0))
    other = sgn.prepare(CONFIG + b" ", NAME, pki.server.ccm_tftp.cert, TS)
    with pytest.raises(sgn.SgnError, match="does not verify"):
        sgn.finish(other, good)  # a signature of other bytes


def test_prepare_refuses_what_phones_cannot_check(pki: Pki) -> None:
    with pytest.raises(sgn.SgnError, match="must be RSA"):
        sgn.prepare(CONFIG, NAME, pki.server.https_tftp.cert, TS)  # EC cannot sign .sgn
    with pytest.raises(sgn.SgnError, match="SHA-1 or SHA-512"):
        sgn.prepare(CONFIG, NAME, pki.server.ccm_tftp.cert, TS, hash_algorithm=HashAlgorithm.SHA256)
    with pytest.raises(sgn.SgnError, match="32 bits"):
        sgn.prepare(CONFIG, NAME, pki.server.ccm_tftp.cert, 1 << 32)
    with pytest.raises(sgn.SgnError, match="name"):
        sgn.prepare(CONFIG, "", pki.server.ccm_tftp.cert, TS)
    with pytest.raises(sgn.SgnError, match="NUL"):
        sgn.prepare(CONFIG, "a\x00b", pki.server.ccm_tftp.cert, TS)


def test_signing_runs_in_worker_threads(pki: Pki) -> None:
    cert, key = pki.server.sgn_signer()
    files = {f"SK{i}.xml": b"<softKeyCfg>%d</softKeyCfg>" % i for i in range(8)}
    prepared = {name: sgn.prepare(data, name, cert, TS) for name, data in files.items()}
    with ThreadPoolExecutor(max_workers=4) as pool:
        signatures = dict(
            zip(prepared, pool.map(lambda t: sgn.sign(t, key), prepared.values()), strict=True)
        )
    for name, to_sign in prepared.items():
        blob = sgn.finish(to_sign, signatures[name])
        assert sgn.verify_sgn(blob, cert, filename=name + ".sgn") == files[name]


@pytest_twisted.ensureDeferred
async def test_sign_off_the_reactor_then_finish_on_it(pki: Pki) -> None:
    from twisted.internet import reactor

    cert, key = pki.server.sgn_signer()
    to_sign = sgn.prepare(CONFIG, NAME, cert, TS)
    d = threads.deferToThread(sgn.sign, to_sign, key)
    d.addTimeout(30, reactor)
    signature = await d
    assert sgn.verify_sgn(sgn.finish(to_sign, signature), cert) == CONFIG


def test_names() -> None:
    assert sgn.signed_name(NAME) == NAME + ".sgn"
    assert sgn.unsigned_name(NAME + ".sgn") == NAME
    assert sgn.unsigned_name(NAME) is None
    assert sgn.unsigned_name(".sgn") is None
