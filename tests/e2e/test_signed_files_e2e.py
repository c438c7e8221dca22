"""Signed files (.sgn) and HTTPS 6971 against a running ``callboard serve``, with outside tools.

Everything here is read with independent code: the ``.sgn`` header and the ITL are walked by
the small readers below, written from the published format (cisco-protocols.md sections 5 and
16), never with ``callboard.protocols.tvs``; signatures and certificates are checked with
``openssl``; files are fetched with ``curl``, tftp-hpa's ``tftp`` and ``atftp``.

The daemon's ITL (version 1.1), as these tests find it:

| role          | code | key | certificate              | CERTIFICATE_HASH (alg)   |
|---------------|------|-----|--------------------------|--------------------------|
| SAST          | 0    | RSA | ``certs/sast.pem``       | SHA-1 of the DER (1)     |
| CCM+TFTP      | 2    | RSA | ``certs/ccm-tftp.pem``   | SHA-1 of the DER (1)     |
| TVS           | 21   | EC  | ``certs/tvs.pem``        | SHA-1 of the DER (1)     |
| TFTP          | 3    | EC  | ``certs/https-tftp.pem`` | SHA-1 of the DER (1)     |

The CCM+TFTP record signs every ``.sgn``; the TFTP (EC) record is the HTTPS 6971 certificate.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from callboard.phone.http_client import HttpFetcher, PinMismatch
from e2e.phone_e2e_support import boot, make_lab, mic_files
from support.harness import Daemon, run_cli
from twisted.internet import reactor

MAC = "00AABBCC0901"
WITHHELD_MAC = "00AABBCC0902"
UNKNOWN_MAC = "00AABBCC09FF"
HTTPS = "endpoints.https=tcp:0:interface=127.0.0.1"


# -- an independent reader of the published TLV format ----------------------------------------


def tlv(data: bytes, i: int) -> tuple[int, bytes, int]:
    tag, length = struct.unpack_from(">BH", data, i)
    return tag, data[i + 3 : i + 3 + length], i + 3 + length


@dataclass
class Sgn:
    order: list[int]  # every header tag in wire order (containers and padding included)
    fields: dict[int, bytes]
    header_length: int
    signature_span: tuple[int, int]
    blob: bytes

    @property
    def body(self) -> bytes:
        return self.blob[self.header_length :]

    @property
    def without_signature(self) -> bytes:
        start, end = self.signature_span
        return self.blob[:start] + self.blob[end:]


def read_sgn(blob: bytes) -> Sgn:
    """VERSION, HEADER_LENGTH, then TLVs up to HEADER_LENGTH; containers 3, 7, 9 opened."""
    order: list[int] = []
    fields: dict[int, bytes] = {}
    tag, value, i = tlv(blob, 0)
    assert tag == 1, "a .sgn starts with VERSION"
    order.append(tag)
    fields[tag] = value
    tag, value, i = tlv(blob, i)
    assert tag == 2, "VERSION is followed by HEADER_LENGTH"
    order.append(tag)
    fields[tag] = value
    (header_length,) = struct.unpack(">H", value)
    span = (0, 0)
    while i < header_length:
        tag = blob[i]
        order.append(tag)
        if tag == 13:  # PADDING: a bare byte
            i += 1
            continue
        start = i
        tag, value, end = tlv(blob, i)
        fields.setdefault(tag, value)
        if tag in (3, 7, 9):
            i = start + 3
            continue
        if tag == 12:
            span = (start, end)
        i = end
    assert i == header_length
    return Sgn(order, fields, header_length, span, blob)


@dataclass
class Record:
    role: int
    der: bytes
    serial: bytes
    cert_hash: bytes
    hash_algorithm: int


def read_itl(blob: bytes) -> tuple[tuple[int, int], list[Record]]:
    """The ITL's SIGNER_VERSION (tag 28) and its records (RECORD_LENGTH first in each)."""
    head = read_sgn(blob)
    signer_version = (head.fields[28][0], head.fields[28][1])
    records = []
    i = head.header_length
    while i < len(blob):
        tag, value, j = tlv(blob, i)
        assert tag == 1
        end = i + struct.unpack(">H", value)[0]
        rf: dict[int, bytes] = {}
        while j < end:
            tag, value, j = tlv(blob, j)
            rf[tag] = value
        records.append(
            Record(
                struct.unpack(">H", rf[4])[0], rf[9], rf[6], rf.get(11, b""), rf.get(12, b"\0")[0]
            )
        )
        i = end
    return signer_version, records


# -- helpers ------------------------------------------------------------------------------------


def curl(*args: str) -> bytes:
    return subprocess.run(
        ["curl", "-sf", *args], capture_output=True, check=True, timeout=30
    ).stdout


def http_status(url: str, *extra: str) -> str:
    return subprocess.run(
        ["curl", "-s", *extra, "-o", "/dev/null", "-w", "%{http_code}", url],
        capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip


def tftp_hpa(port: int, name: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["tftp", "-m", "binary", "127.0.0.1", str(port), "-c", "get", name, str(out)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def atftp(port: int, name: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["atftp", "--get", "-r", name, "-l", str(out), "--option", "blksize 1468",
         "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def openssl(*args: str, stdin: bytes = b"") -> bytes:
    return subprocess.run(
        ["openssl", *args], input=stdin, capture_output=True, check=True, timeout=30
    ).stdout


def counters(daemon: Daemon) -> dict[str, int]:
    return dict(daemon.json("status")["counters"])


# -- the daemon -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("signed")
    lab_dir = base / "lab"
    make_lab(lab_dir)
    state = base / "state"
    (state / "tftp").mkdir(parents=True)
    (state / "tftp" / "softkeys.xml").write_bytes(b"<softKeyCfg/>\n")
    daemon = Daemon(
        state, "--manufacturing-trust", str(lab_dir), "--set", HTTPS,
        "--set", "loads.8841=sip88xx.14-2-1-0001-14", "--set", "phones.softkey_file=softkeys.xml",
    ).start()  # fmt: skip
    try:
        daemon.json("device", "add", "--model", "8841", "--mac", MAC, "--line", "3001:Desk",
                    "--password", "pw-3001", "--no-require-activation")  # fmt: skip
        daemon.json(
            "device",
            "add",
            "--model",
            "8841",
            "--mac",
            WITHHELD_MAC,
            "--line",
            "3002",
            "--password",
            "pw-3002",
        )  # fmt: skip (awaits activation)
        yield daemon
    finally:
        if daemon.proc is not None:
            daemon.stop()


@pytest.fixture(scope="module")
def itl(served: Daemon) -> tuple[tuple[int, int], list[Record]]:
    return read_itl(curl(f"http://127.0.0.1:{served.port('http')}/ITLFile.tlv"))


def record(itl: tuple[tuple[int, int], list[Record]], role: int) -> Record:
    [found] = [r for r in itl[1] if r.role == role]
    return found


def pem(der: bytes) -> bytes:
    return openssl("x509", "-inform", "DER", "-outform", "PEM", stdin=der)


# -- the tests ------------------------------------------------------------------------------------


def test_itl_records_roles_key_types_and_hashes(served: Daemon, itl: tuple) -> None:  # type: ignore[type-arg]
    signer_version, records = itl
    assert signer_version == (1, 1)
    by_role = {r.role: r for r in records}
    assert sorted(by_role) == [0, 2, 3, 21]
    expected_keys = {
        0: "rsaEncryption",
        2: "rsaEncryption",
        3: "id-ecPublicKey",
        21: "id-ecPublicKey",
    }
    files = {0: "sast", 2: "ccm-tftp", 3: "https-tftp", 21: "tvs"}
    for role, rec in by_role.items():
        text = openssl("x509", "-inform", "DER", "-noout", "-text", stdin=rec.der).decode()
        assert f"Public Key Algorithm: {expected_keys[role]}" in text, role
        fingerprint = openssl("x509", "-inform", "DER", "-noout", "-fingerprint", "-sha1",
                              stdin=rec.der).decode()  # fmt: skip
        assert rec.hash_algorithm == 1
        assert rec.cert_hash.hex().upper() == fingerprint.split("=", 1)[1].strip().replace(":", "")
        on_disk = (served.state_dir / "certs" / f"{files[role]}.pem").read_bytes()
        assert pem(rec.der) == on_disk, files[role]


def test_sgn_fetched_identically_by_curl_tftp_hpa_and_atftp(served: Daemon, tmp_path: Path) -> None:
    name = f"SEP{MAC}.cnf.xml.sgn"
    via_http = curl(f"http://127.0.0.1:{served.port('http')}/{name}")
    via_curl_tftp = curl(f"tftp://127.0.0.1:{served.port('tftp')}/{name}")
    hpa = tftp_hpa(served.port("tftp"), name, tmp_path / "hpa")
    at = atftp(served.port("tftp"), name, tmp_path / "atftp")
    assert hpa.returncode == 0 and at.returncode == 0, hpa.stderr + at.stderr
    assert via_http == via_curl_tftp == (tmp_path / "hpa").read_bytes()
    assert via_http == (tmp_path / "atftp").read_bytes()
    unsigned = curl(f"http://127.0.0.1:{served.port('http')}/SEP{MAC}.cnf.xml")
    assert read_sgn(via_http).body == unsigned  # the original bytes, untouched


def test_every_header_element_and_the_signature_checked_with_openssl(
    served: Daemon,
    itl: tuple,
    tmp_path: Path,  # type: ignore[type-arg]
) -> None:
    before = time.time()
    for name in (f"SEP{MAC}.cnf.xml", "XMLDefault.cnf.xml", "softkeys.xml"):
        blob = curl(f"http://127.0.0.1:{served.port('http')}/{name}.sgn")
        sgn = read_sgn(blob)
        f = sgn.fields
        # Order: VERSION, HEADER_LENGTH, SIGNER_INFO{4,6,5}, SIGNATURE_INFO{8, 9{10, 11}},
        # SIGNATURE, FILENAME, TIMESTAMP, then PADDING to a 4-byte boundary. No tag 28.
        tags = [t for t in sgn.order if t != 13]
        assert tags == [1, 2, 3, 4, 6, 5, 7, 8, 9, 10, 11, 12, 14, 15], tags
        assert all(t == 13 for t in sgn.order[len(tags) :])
        assert sgn.header_length % 4 == 0 and 28 not in f
        assert f[1] == b"\x01\x00"
        assert len(f[7]) == 15 and len(f[9]) == 8
        assert f[8] == b"\x03" and f[10] == b"\x00" and f[11] == b"\x02"  # SHA-512, RSA, 256 B
        assert len(f[12]) == 256
        assert f[14] == f"{name}.sgn".encode() + b"\0"
        assert before - 600 <= struct.unpack(">I", f[15])[0] <= time.time() + 1

        signer = record(itl, 2)  # CCM+TFTP
        assert f[5].lstrip(b"\0") == signer.serial.lstrip(b"\0")
        subject = openssl("x509", "-inform", "DER", "-noout", "-subject", "-nameopt", "RFC2253",
                          stdin=signer.der).decode().split("=", 1)[1].strip()  # fmt: skip
        # RFC 2253 lists RDNs last-first; the header lists them in certificate order.
        assert f[4] == ",".join(reversed(subject.split(","))).encode() + b"\0"
        assert f[6] == f[4]  # self-signed: issuer = subject

        cert = tmp_path / "signer.pem"
        cert.write_bytes(pem(signer.der))
        pub = tmp_path / "signer.pub"
        pub.write_bytes(openssl("x509", "-in", str(cert), "-noout", "-pubkey"))
        (tmp_path / "data").write_bytes(sgn.without_signature)
        (tmp_path / "sig").write_bytes(f[12])
        verified = subprocess.run(
            ["openssl", "dgst", "-sha512", "-verify", str(pub), "-signature",
             str(tmp_path / "sig"), str(tmp_path / "data")],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert verified.returncode == 0 and "Verified OK" in verified.stdout, verified.stderr
        # A flipped body byte breaks it (the check can fail).
        (tmp_path / "data").write_bytes(sgn.without_signature[:-1] + b"\0")
        broken = subprocess.run(
            ["openssl", "dgst", "-sha512", "-verify", str(pub), "-signature",
             str(tmp_path / "sig"), str(tmp_path / "data")],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert broken.returncode != 0


def test_withheld_and_unknown_sgn_are_not_found(served: Daemon, tmp_path: Path) -> None:
    http, tftp, https = served.port("http"), served.port("tftp"), served.port("https")
    for name in (
        f"SEP{WITHHELD_MAC}.cnf.xml.sgn",
        f"SEP{UNKNOWN_MAC}.cnf.xml.sgn",
        "nothing-here.xml.sgn",
        "ITLFile.tlv.sgn",
        f"SEP{MAC}.cnf.xml.enc.sgn",
    ):
        assert http_status(f"http://127.0.0.1:{http}/{name}") == "404", name
        assert http_status(f"https://127.0.0.1:{https}/{name}", "-k") == "404", name
        hpa = tftp_hpa(tftp, name, tmp_path / "x")
        assert "Error code 1" in hpa.stdout + hpa.stderr, (name, hpa.stdout, hpa.stderr)


def test_https_6971_serves_the_ec_certificate_of_the_itl_and_the_unsigned_config(
    served: Daemon,
    itl: tuple,  # type: ignore[type-arg]
) -> None:
    port = served.port("https")
    shown = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-showcerts"],
        input=b"", capture_output=True, timeout=30,
    ).stdout  # fmt: skip
    leaf = shown.split(b"-----BEGIN CERTIFICATE-----", 1)[1].split(b"-----END CERTIFICATE-----")[0]
    der = openssl("x509", "-outform", "DER", stdin=b"-----BEGIN CERTIFICATE-----" + leaf
                  + b"-----END CERTIFICATE-----\n")  # fmt: skip
    tftp_ec = record(itl, 3)
    assert hashlib.sha1(der).digest() == tftp_ec.cert_hash
    assert b"id-ecPublicKey" in openssl("x509", "-inform", "DER", "-noout", "-text", stdin=der)

    unsigned = curl(f"http://127.0.0.1:{served.port('http')}/SEP{MAC}.cnf.xml")
    assert curl("-k", f"https://127.0.0.1:{port}/SEP{MAC}.cnf.xml.sgn") == unsigned
    # Everything else behaves as on 6970: XMLDefault.sgn is signed, the ITL is the ITL.
    for name in ("XMLDefault.cnf.xml.sgn", "ITLFile.tlv", f"SEP{MAC}.cnf.xml"):
        assert curl("-k", f"https://127.0.0.1:{port}/{name}") == curl(
            f"http://127.0.0.1:{served.port('http')}/{name}"
        ), name


def test_signed_output_is_cached_until_the_file_changes(served: Daemon) -> None:
    http = served.port("http")
    (served.state_dir / "tftp" / "dialplan.xml").write_bytes(b"<DIALTEMPLATE/>\n")
    first = counters(served)
    one = curl(f"http://127.0.0.1:{http}/dialplan.xml.sgn")
    two = curl(f"tftp://127.0.0.1:{served.port('tftp')}/dialplan.xml.sgn")
    after = counters(served)
    assert one == two
    assert after["sgn_signed"] == first["sgn_signed"] + 1  # the second fetch did not sign
    assert after["sgn_cache_hits"] == first["sgn_cache_hits"] + 1
    (served.state_dir / "tftp" / "dialplan.xml").write_bytes(
        b"<DIALTEMPLATE>changed</DIALTEMPLATE>\n"
    )
    three = curl(f"http://127.0.0.1:{http}/dialplan.xml.sgn")
    assert counters(served)["sgn_signed"] == after["sgn_signed"] + 1
    assert read_sgn(three).body == b"<DIALTEMPLATE>changed</DIALTEMPLATE>\n"


def test_a_missing_firmware_load_is_a_warning_in_status_and_the_log(served: Daemon) -> None:
    status = served.cli("status")
    assert "warning: firmware load sip88xx.14-2-1-0001-14" in status.stdout, status.stdout
    assert any(
        "sip88xx.14-2-1-0001-14.loads is not in the TFTP root" in line
        for line in served.log().splitlines()
    )


@pytest_twisted.ensureDeferred
async def test_the_phone_pins_6971_to_the_itl_tftp_ec_record(
    served: Daemon,
    itl: tuple,  # type: ignore[type-arg]
) -> None:
    fetcher = HttpFetcher(reactor)
    port, name = served.port("https"), f"SEP{MAC}.cnf.xml.sgn"
    tftp_ec = record(itl, 3)
    try:
        with pytest.raises(PinMismatch):
            await fetcher.fetch_pinned("127.0.0.1", port, name, [(1, b"\0" * 20)], timeout=10)
        with pytest.raises(PinMismatch):  # the RSA CCM+TFTP certificate is not the EC one
            await fetcher.fetch_pinned(
                "127.0.0.1", port, name, [(1, record(itl, 2).cert_hash)], timeout=10
            )
        data = await fetcher.fetch_pinned(
            "127.0.0.1", port, name, [(tftp_ec.hash_algorithm, tftp_ec.cert_hash)], timeout=10
        )
    finally:
        await fetcher.close()
    assert data == curl(f"http://127.0.0.1:{served.port('http')}/SEP{MAC}.cnf.xml")


def test_phone_boots_with_signed_files_and_https(served: Daemon, tmp_path: Path) -> None:
    lab = make_lab(tmp_path / "lab2")  # the daemon trusts another lab: no activation needed here
    mic = mic_files(lab, tmp_path / "mics", model="8841", mac=MAC)
    result = boot(served, mic, model="8841", mac=MAC,
                  extra=("--https-port", str(served.port("https"))))  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "TFTP role: signed files, ITL 1.1: HTTPS" in out
    assert f"[https] SEP{MAC}.cnf.xml.sgn:" in out and "server pinned by ITL" in out
    assert "[sip] REGISTER to tcp:127.0.0.1:" in out and "3001=200" in out


def test_phone_without_https_fetches_and_checks_the_sgn_over_http(
    served: Daemon, tmp_path: Path
) -> None:
    lab = make_lab(tmp_path / "lab3")
    mic = mic_files(lab, tmp_path / "mics", model="8841", mac=MAC)
    result = boot(served, mic, model="8841", mac=MAC, extra=("--https-port", "0"))
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    line = next(ln for ln in out.splitlines() if ln.startswith(f"[http] SEP{MAC}.cnf.xml.sgn:"))
    assert "signature ok (" in line and "CN=CCM-TFTP-" in line, line
    assert "[https]" not in out


def test_certs_init_force_rotates_the_signer_and_the_itl_follows(tmp_path: Path) -> None:
    state = tmp_path / "state"
    serials = []
    for rotate in (False, True):
        if rotate:
            run_cli("certs", "init", "--force", "--state-dir", str(state), check=True)
        daemon = Daemon(state).start()
        try:
            _version, records = read_itl(
                curl(f"http://127.0.0.1:{daemon.port('http')}/ITLFile.tlv")
            )
            signer = next(r for r in records if r.role == 2)
            blob = curl(f"http://127.0.0.1:{daemon.port('http')}/XMLDefault.cnf.xml.sgn")
            assert read_sgn(blob).fields[5].lstrip(b"\0") == signer.serial.lstrip(b"\0")
            assert pem(signer.der) == (state / "certs" / "ccm-tftp.pem").read_bytes()
            serials.append(signer.serial)
        finally:
            daemon.stop()
    assert serials[0] != serials[1]
