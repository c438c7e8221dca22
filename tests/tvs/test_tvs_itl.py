"""ITL build/parse round trips, plus an independent walker written from the format notes."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from callboard.protocols.tvs.itl import HashAlgorithm, ITLError, Role, build_itl, parse_itl
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from .conftest import Pki  # type: ignore[import-not-found]

TS = 1_700_000_000


def _independent_parse(data: bytes) -> dict[str, Any]:
    """Walk the TLVs per cisco-protocols.md section 5, without importing the itl module."""
    out: dict[str, Any] = {"records": []}
    i = 0
    header_len = None
    sig_at = None
    while header_len is None or i < header_len:
        tag = data[i]
        if tag == 13:  # PADDING: a bare byte
            out.setdefault("padding", 0)
            out["padding"] += 1
            i += 1
            continue
        (length,) = struct.unpack_from(">H", data, i + 1)
        value = data[i + 3 : i + 3 + length]
        if tag in (3, 7, 9):  # containers: descend
            i += 3
            continue
        if tag == 1:
            out["version"] = tuple(value)
        elif tag == 2:
            (header_len,) = struct.unpack(">H", value)
        elif tag == 28:
            out["signer_version"] = tuple(value)
        elif tag == 5:
            out["serial"] = int.from_bytes(value, "big")
        elif tag == 8:
            out["hash"] = value[0]
        elif tag == 11:
            out["modulus_index"] = value[0]
        elif tag == 12:
            sig_at = (i, i + 3 + length)
            out["signature"] = value
        elif tag == 14:
            out["filename"] = value
        elif tag == 15:
            (out["timestamp"],) = struct.unpack(">I", value)
        i += 3 + length
    assert header_len is not None and header_len % 4 == 0 and i == header_len
    while i < len(data):
        start = i
        assert data[i] == 1
        (rec_len,) = struct.unpack_from(">H", data, i + 3)
        i += 5
        rec: dict[int, bytes] = {}
        while i < start + rec_len:
            tag = data[i]
            (length,) = struct.unpack_from(">H", data, i + 1)
            rec[tag] = data[i + 3 : i + 3 + length]
            i += 3 + length
        assert i == start + rec_len
        out["records"].append(rec)
    assert sig_at is not None
    out["signed"] = data[: sig_at[0]] + data[sig_at[1] :]
    return out


@pytest.mark.parametrize("algo", [HashAlgorithm.SHA512, HashAlgorithm.SHA1])
def test_itl_round_trip_and_independent_check(pki: Pki, algo: HashAlgorithm) -> None:
    data = pki.server.build_itl(timestamp=TS, hash_algorithm=algo)
    itl = parse_itl(data)
    assert itl.version == (1, 2)
    assert itl.signer_version == (1, 1)  # EC records need 1.1
    assert itl.filename == "ITLFile.tlv"
    assert itl.timestamp == TS
    assert itl.hash_algorithm == algo
    assert [r.role for r in itl.records] == [Role.SAST, Role.CCM_TFTP, Role.TVS, Role.TFTP]
    assert itl.certificates(Role.TVS) == [pki.server.tvs.cert]

    ind = _independent_parse(data)
    assert ind["version"] == (1, 2) and ind["filename"] == b"ITLFile.tlv\x00"
    assert ind["hash"] == int(algo) and ind["modulus_index"] == 2 and len(ind["signature"]) == 256
    roles = [struct.unpack(">H", r[4])[0] for r in ind["records"]]
    assert roles == [0, 2, 21, 3]
    sast = x509.load_der_x509_certificate(ind["records"][0][9])
    assert sast.serial_number == ind["serial"]
    h = hashes.SHA512() if algo == HashAlgorithm.SHA512 else hashes.SHA1()
    sast.public_key().verify(ind["signature"], ind["signed"], padding.PKCS1v15(), h)  # type: ignore[union-attr, call-arg, arg-type]


def test_itlsep_filename_and_tamper_detection(pki: Pki) -> None:
    data = pki.server.build_itl(timestamp=TS, filename="ITLFile.tlv")
    tampered = bytearray(data)
    tampered[-5] ^= 0x01
    with pytest.raises(ITLError):
        parse_itl(bytes(tampered))
    assert parse_itl(bytes(tampered), verify=False).records
    for cut in (0, 3, 20, len(data) // 2, len(data) - 1):
        with pytest.raises(ITLError):
            parse_itl(data[:cut])


def test_builder_requires_the_signer_as_sast_record(pki: Pki) -> None:
    key = pki.server.sast.key
    with pytest.raises(ITLError):
        build_itl(pki.server.sast.cert, key, [(Role.TVS, pki.server.tvs.cert)], timestamp=TS)  # type: ignore[arg-type]
    with pytest.raises(ITLError):
        build_itl(
            pki.server.sast.cert,
            key,
            [(Role.SAST, pki.server.sast.cert)],  # type: ignore[arg-type]
            timestamp=TS,
            hash_algorithm=HashAlgorithm.SHA256,
        )
