"""Certificate tooling: init_certs files and modes, lab CA, MIC layout, the CLI hook."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path

import pytest
from callboard.daemon import certs
from callboard.protocols.tvs import labpki
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_certs_files_modes_and_no_overwrite(tmp_path: Path) -> None:
    first = certs.init_certs(tmp_path)
    d = tmp_path / "certs"
    assert _mode(d) == 0o700
    for stem in ("sast", "tvs", "ccm-tftp", "https-tftp"):
        assert _mode(d / f"{stem}.key") == 0o600
        assert (d / f"{stem}.pem").exists()
    assert isinstance(first.sast.key, rsa.RSAPrivateKey) and first.sast.key.key_size == 2048
    assert isinstance(first.tvs.key, ec.EllipticCurvePrivateKey)
    assert isinstance(first.ccm_tftp.key, rsa.RSAPrivateKey)  # it signs .sgn files
    assert isinstance(first.https_tftp.key, ec.EllipticCurvePrivateKey)  # HTTPS 6971
    again = certs.init_certs(tmp_path, key_type="rsa")  # no force: nothing replaced
    assert again.tvs.cert == first.tvs.cert
    forced = certs.init_certs(tmp_path, key_type="rsa", force=True)
    assert forced.tvs.cert != first.tvs.cert
    assert isinstance(forced.tvs.key, rsa.RSAPrivateKey)
    assert certs.load_server_certs(tmp_path).tvs.cert == forced.tvs.cert
    assert certs.certs_present(tmp_path)


def test_missing_certificate_is_reissued_from_kept_key(tmp_path: Path) -> None:
    first = certs.init_certs(tmp_path)
    (tmp_path / "certs" / "tvs.pem").unlink()
    second = certs.init_certs(tmp_path)
    assert second.tvs.cert != first.tvs.cert
    assert second.tvs.cert.public_key() == first.tvs.key.public_key()


def test_mic_layout_like_real_mics(tmp_path: Path) -> None:
    lab = labpki.make_lab_ca()
    assert "Callboard Lab" in lab.root.subject.rfc4514_string()
    mic = labpki.issue_mic(lab, model="CP-8841", mac="00:aa:bb:cc:dd:ee", serial="LAB12345678")
    subject = mic.cert.subject
    oids = [a.oid for a in subject]
    assert oids == [
        NameOID.SERIAL_NUMBER,
        NameOID.ORGANIZATION_NAME,
        NameOID.ORGANIZATIONAL_UNIT_NAME,
        NameOID.COMMON_NAME,
    ]
    assert (
        subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value
        == "PID:CP-8841 SN:LAB12345678"
    )
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "CP-8841-SEP00AABBCCDDEE"
    assert mic.cert.issuer == lab.ca.subject
    with pytest.raises(x509.ExtensionNotFound):
        mic.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    with pytest.raises(x509.ExtensionNotFound):
        mic.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    sha1 = labpki.issue_mic(lab, model="8841", mac="00AABBCCDDEE", sha1=True)
    assert isinstance(sha1.cert.signature_hash_algorithm, hashes.SHA1)
    with pytest.raises(labpki.CertError):
        labpki.issue_mic(lab, model="8841", mac="nothex")


def test_daemon_and_phone_share_one_lab_pki(tmp_path: Path) -> None:
    assert certs.issue_mic is labpki.issue_mic and certs.CertError is labpki.CertError
    lab = labpki.make_lab_ca()
    certs.write_lab_ca(tmp_path, lab)
    issuer = labpki.load_issuing_ca(tmp_path)  # what `callboard phone storm --lab-ca` reads
    assert issuer.ca == lab.ca and issuer.ca_key.public_key() == lab.ca_key.public_key()
    assert labpki.load_lab_ca(tmp_path).root == lab.root
    mic = labpki.issue_mic(issuer, model="8841", mac="0A0000000001", serial="STORM0A1B2C")
    mic.cert.verify_directly_issued_by(lab.ca)
    lab.ca.verify_directly_issued_by(lab.root)
    cn = mic.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "CP-8841-SEP0A0000000001"
    assert mic.cert.subject == labpki.mic_subject("8841", "0A0000000001", "STORM0A1B2C")


def test_lab_pki_errors_are_one_line_and_name_no_key(tmp_path: Path) -> None:
    with pytest.raises(labpki.CertError, match="cannot load certificate"):
        labpki.load_issuing_ca(tmp_path)
    (tmp_path / "lab-ca.pem").write_bytes(b"junk")
    with pytest.raises(labpki.CertError, match="cannot load certificate"):
        labpki.load_issuing_ca(tmp_path)
    with pytest.raises(labpki.CertError, match="model"):
        labpki.issue_mic(labpki.make_lab_ca(), model="88-41", mac="00AABBCCDDEE")
    with pytest.raises(labpki.CertError, match="key type"):
        labpki.new_key("dsa")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callboard")
    certs.register_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_lab_ca_issue_mic_and_trust_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = _parser()
    lab_dir = tmp_path / "lab"
    args = parser.parse_args(["certs", "lab-ca", str(lab_dir)])
    assert args.func(args) == 0
    assert _mode(lab_dir / "lab-root.key") == 0o600 and _mode(lab_dir / "lab-ca.key") == 0o600
    out = tmp_path / "phones"
    args = parser.parse_args(
        [
            "certs",
            "issue-mic",
            "--ca",
            str(lab_dir),
            "--model",
            "8841",
            "--mac",
            "00AABBCCDDEE",
            "--out",
            str(out),
            "--expired",
        ]
    )
    assert args.func(args) == 0
    mic = x509.load_pem_x509_certificate((out / "CP-8841-SEP00AABBCCDDEE.pem").read_bytes())
    assert _mode(out / "CP-8841-SEP00AABBCCDDEE.key") == 0o600
    trust = certs.load_trust_store(lab_dir)
    assert len(trust) == 2
    import datetime as dt

    verdict = trust.check(mic, [], dt.datetime.now(dt.UTC), allow_sha1=False)
    assert not verdict.ok and "expired" in verdict.reason
    # errors: one line on stderr, non-zero exit
    args = parser.parse_args(["certs", "lab-ca", str(lab_dir)])
    assert args.func(args) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds" in err
    args = parser.parse_args(
        [
            "certs",
            "issue-mic",
            "--ca",
            str(tmp_path / "nope"),
            "--model",
            "8841",
            "--mac",
            "00AABBCCDDEE",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) != 0


def test_cli_init(tmp_path: Path) -> None:
    args = _parser().parse_args(
        ["certs", "init", "--state-dir", str(tmp_path), "--key-type", "rsa"]
    )
    assert args.func(args) == 0
    assert isinstance(certs.load_server_certs(tmp_path).tvs.key, rsa.RSAPrivateKey)


def test_trust_store_rejects_garbage(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"
    )
    with pytest.raises(certs.CertError):
        certs.load_trust_store(tmp_path)
    with pytest.raises(certs.CertError):
        certs.load_trust_store(tmp_path / "missing")
