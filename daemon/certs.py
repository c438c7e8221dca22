"""Certificate tooling: the server's own certificates, the manufacturing trust store, lab CAs/MICs.

Daemon-side (it reads and writes files). The protocols get parsed objects from here:
``load_server_certs`` for the SAST/TVS/CCM+TFTP pairs, ``load_trust_store`` for the MIC roots.
Private keys are written owner-only and never printed or logged.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import string
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from callboard.protocols.models import normalise_mac
from callboard.protocols.tvs.activation import ManufacturingTrust
from callboard.protocols.tvs.itl import HashAlgorithm, Role, build_itl
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .config import DEFAULT_STATE_DIR

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

CERTS_SUBDIR = "certs"
SAST_NAME = "sast"
TVS_NAME = "tvs"
CCM_TFTP_NAME = "ccm-tftp"

LAB_ROOT_CN = "Callboard Lab Manufacturing Root"
LAB_CA_CN = "Callboard Lab Manufacturing CA"
LAB_ORG = "Callboard Lab"
LAB_ROOT_FILES = ("lab-root.pem", "lab-root.key")
LAB_CA_FILES = ("lab-ca.pem", "lab-ca.key")

TRUST_SUFFIXES = (".pem", ".crt", ".cer")


class CertError(Exception):
    """A certificate operation failed; the message is safe to show (no key material)."""


# Files ---------------------------------------------------------------------------------------


def _ensure_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with ``mode`` from the first byte (no window where a key is readable)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_pair(directory: Path, stem: str, cert: x509.Certificate, key: PrivateKey) -> None:
    """``<stem>.pem`` (0644) and ``<stem>.key`` (0600)."""
    _write(directory / f"{stem}.key", _key_pem(key), 0o600)
    _write(directory / f"{stem}.pem", _cert_pem(cert), 0o644)


def _load_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CertError(f"cannot load private key {path}: {type(exc).__name__}") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise CertError(f"{path}: only RSA and EC keys are supported")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CertError(f"cannot load certificate {path}: {exc}") from None


def _new_key(key_type: str) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise CertError(f"unknown key type {key_type!r} (use ec or rsa)")


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


# Server certificates -------------------------------------------------------------------------


@dataclass(frozen=True)
class CertKeyPair:
    cert: x509.Certificate
    key: PrivateKey


@dataclass(frozen=True)
class ServerCertificates:
    """The three role pairs: SAST (ITL signer, RSA), TVS, CCM+TFTP."""

    sast: CertKeyPair
    tvs: CertKeyPair
    ccm_tftp: CertKeyPair

    def itl_records(self) -> list[tuple[int, x509.Certificate]]:
        return [
            (Role.SAST, self.sast.cert),
            (Role.CCM_TFTP, self.ccm_tftp.cert),
            (Role.TVS, self.tvs.cert),
        ]

    def build_itl(
        self,
        *,
        timestamp: int,
        hash_algorithm: HashAlgorithm = HashAlgorithm.SHA512,
        filename: str = "ITLFile.tlv",
    ) -> bytes:
        """``ITLFile.tlv``; serve the same bytes for ``ITLSEP<MAC>.tlv``."""
        key = self.sast.key
        if not isinstance(key, rsa.RSAPrivateKey):
            raise CertError("the SAST key must be RSA")
        return build_itl(
            self.sast.cert,
            key,
            self.itl_records(),
            timestamp=timestamp,
            hash_algorithm=hash_algorithm,
            filename=filename,
        )


def _self_signed(
    key: PrivateKey, common_name: str, role_ou: str, now: dt.datetime, *, server: bool
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role_ou),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Callboard"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(key, hashes.SHA256())


_ROLES = {
    SAST_NAME: ("ITL Recovery (SAST)", False),
    TVS_NAME: ("TVS", True),
    CCM_TFTP_NAME: ("CallManager TFTP", True),
}


def init_certs(
    state_dir: str | os.PathLike[str],
    *,
    key_type: str = "ec",
    force: bool = False,
    now: dt.datetime | None = None,
) -> ServerCertificates:
    """Create the SAST (RSA 2048), TVS and CCM+TFTP pairs under ``<state_dir>/certs``.

    Existing keys are kept unless ``force``; a missing certificate is reissued from its key.
    Files: ``sast.{pem,key}``, ``tvs.{pem,key}``, ``ccm-tftp.{pem,key}``; dir 0700, keys 0600.
    """
    if key_type not in ("ec", "rsa"):
        raise CertError(f"unknown key type {key_type!r} (use ec or rsa)")
    directory = Path(state_dir) / CERTS_SUBDIR
    _ensure_private_dir(directory)
    when = _now(now)
    host = os.uname().nodename
    for stem, (ou, server) in _ROLES.items():
        key_path = directory / f"{stem}.key"
        cert_path = directory / f"{stem}.pem"
        if key_path.exists() and not force:
            os.chmod(key_path, 0o600)
            if cert_path.exists():
                continue
            key = _load_key(key_path)
        else:
            key = _new_key("rsa" if stem == SAST_NAME else key_type)
        cert = _self_signed(key, f"{stem.upper()}-{host}", ou, when, server=server)
        write_pair(directory, stem, cert, key)
    return load_server_certs(state_dir)


def load_server_certs(state_dir: str | os.PathLike[str]) -> ServerCertificates:
    directory = Path(state_dir) / CERTS_SUBDIR

    def pair(stem: str) -> CertKeyPair:
        cert = _load_cert(directory / f"{stem}.pem")
        key = _load_key(directory / f"{stem}.key")
        if cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise CertError(f"{directory / stem}.pem does not match its key")
        return CertKeyPair(cert, key)

    sast = pair(SAST_NAME)
    if not isinstance(sast.key, rsa.RSAPrivateKey):
        raise CertError("the SAST key must be RSA (ITL signatures are RSA PKCS#1 v1.5)")
    return ServerCertificates(sast=sast, tvs=pair(TVS_NAME), ccm_tftp=pair(CCM_TFTP_NAME))


def certs_present(state_dir: str | os.PathLike[str]) -> bool:
    directory = Path(state_dir) / CERTS_SUBDIR
    return all((directory / f"{s}.{ext}").exists() for s in _ROLES for ext in ("pem", "key"))


# Manufacturing trust store -------------------------------------------------------------------


def load_trust_store(directory: str | os.PathLike[str]) -> ManufacturingTrust:
    """Parse every PEM certificate in ``directory`` (roots and intermediates) once.

    The daemon calls it again on SIGHUP and hands the result to ``TVSTLSFactory.set_trust``.
    """
    path = Path(directory)
    if not path.is_dir():
        raise CertError(f"trust store {path} is not a directory")
    certs: list[x509.Certificate] = []
    for entry in sorted(path.iterdir()):
        if entry.suffix.lower() not in TRUST_SUFFIXES or not entry.is_file():
            continue
        data = entry.read_bytes()
        try:
            if b"-----BEGIN" in data:
                certs.extend(x509.load_pem_x509_certificates(data))
            else:
                certs.append(x509.load_der_x509_certificate(data))
        except ValueError as exc:
            raise CertError(f"trust store file {entry}: {exc}") from None
    return ManufacturingTrust(certs)


# Lab CA and MICs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LabCA:
    root: x509.Certificate
    root_key: PrivateKey
    ca: x509.Certificate
    ca_key: PrivateKey

    @property
    def certificates(self) -> list[x509.Certificate]:
        return [self.root, self.ca]


def _ca_cert(
    subject: x509.Name,
    issuer: x509.Name,
    key: PrivateKey,
    signer: PrivateKey,
    now: dt.datetime,
    days: int,
    *,
    path_length: int | None,
    legacy: bool,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
    )
    if legacy:
        # Built "the old way": basicConstraints without pathlen, no keyUsage, no AKI/SKI.
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), False)
    else:
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        )
        if subject != issuer:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
            )
    return builder.sign(signer, hashes.SHA256())


def make_lab_ca(
    key_type: str = "ec",
    *,
    now: dt.datetime | None = None,
    legacy: bool = False,
    root_cn: str = LAB_ROOT_CN,
    ca_cn: str = LAB_CA_CN,
) -> LabCA:
    """A lab manufacturing root and intermediate (in memory). Lab certificates, not a vendor's."""
    when = _now(now)
    root_key = _new_key(key_type)
    ca_key = _new_key(key_type)
    root_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, LAB_ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, root_cn),
        ]
    )
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, LAB_ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, ca_cn),
        ]
    )
    root = _ca_cert(
        root_name, root_name, root_key, root_key, when, 7300, path_length=1, legacy=legacy
    )
    ca = _ca_cert(ca_name, root_name, ca_key, root_key, when, 7300, path_length=0, legacy=legacy)
    return LabCA(root=root, root_key=root_key, ca=ca, ca_key=ca_key)


def write_lab_ca(directory: str | os.PathLike[str], lab: LabCA, *, force: bool = False) -> None:
    """``lab-root.{pem,key}`` and ``lab-ca.{pem,key}``; the dir doubles as a trust store."""
    path = Path(directory)
    _ensure_private_dir(path)
    if not force and any((path / n).exists() for n in (*LAB_ROOT_FILES, *LAB_CA_FILES)):
        raise CertError(f"{path} already holds a lab CA (use --force to replace it)")
    write_pair(path, "lab-root", lab.root, lab.root_key)
    write_pair(path, "lab-ca", lab.ca, lab.ca_key)


def load_lab_ca(directory: str | os.PathLike[str]) -> LabCA:
    path = Path(directory)
    return LabCA(
        root=_load_cert(path / LAB_ROOT_FILES[0]),
        root_key=_load_key(path / LAB_ROOT_FILES[1]),
        ca=_load_cert(path / LAB_CA_FILES[0]),
        ca_key=_load_key(path / LAB_CA_FILES[1]),
    )


def _normalise_mac(mac: str) -> str:
    try:
        return normalise_mac(mac)
    except ValueError as exc:
        raise CertError(str(exc)) from None


def normalise_model(model: str) -> str:
    text = model.upper().removeprefix("CP-")
    if not text or len(text) > 8 or not text.isalnum():
        raise CertError(f"model {model!r} is not like 8841, 8865NR or 7965G")
    return text


def _resign_sha1(cert: x509.Certificate, key: PrivateKey) -> x509.Certificate:
    """cryptography refuses to sign with SHA-1; pyOpenSSL still can (old-phone tests only)."""
    from OpenSSL import crypto

    legacy = crypto.X509.from_cryptography(cert)
    legacy.sign(crypto.PKey.from_cryptography_key(key), "sha1")
    return legacy.to_cryptography()


def issue_mic(
    lab: LabCA,
    *,
    model: str,
    mac: str,
    key_type: str = "ec",
    days: int = 3650,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    sha1: bool = False,
    serial: str | None = None,
    now: dt.datetime | None = None,
) -> CertKeyPair:
    """A MIC with the real layout: ``serialNumber=PID:CP-<model> SN:<sn>, O, OU, CN``.

    No SAN, no EKU, like real MICs. ``not_after`` in the past makes an expired MIC.
    """
    model = normalise_model(model)
    mac = _normalise_mac(mac)
    when = _now(now)
    sn = serial or "LAB" + "".join(
        secrets.choice(string.ascii_uppercase + string.digits) for _ in range(8)
    )
    key = _new_key(key_type)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.SERIAL_NUMBER, f"PID:CP-{model} SN:{sn}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Callboard Lab Phones"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Lab MIC"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"CP-{model}-SEP{mac}"),
        ]
    )
    start = not_before or (when - dt.timedelta(days=1))
    end = not_after or (when + dt.timedelta(days=days))
    if end <= start:
        start = end - dt.timedelta(days=365)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(lab.ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .sign(lab.ca_key, hashes.SHA256())
    )
    if sha1:
        cert = _resign_sha1(cert, lab.ca_key)
    return CertKeyPair(cert, key)


def write_mic(out_dir: str | os.PathLike[str], mic: CertKeyPair) -> tuple[Path, Path]:
    """``CP-<model>-SEP<MAC>.pem`` and ``.key`` (0600) in ``out_dir``."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    cn = mic.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    stem = cn if isinstance(cn, str) else cn.decode()
    write_pair(path, stem, mic.cert, mic.key)
    return path / f"{stem}.pem", path / f"{stem}.key"


# CLI -----------------------------------------------------------------------------------------


def _cmd_init(args: argparse.Namespace) -> int:
    state_dir = getattr(args, "state_dir", None) or DEFAULT_STATE_DIR
    certs = init_certs(state_dir, key_type=args.key_type, force=args.force)
    directory = Path(state_dir) / CERTS_SUBDIR
    print(f"certificates in {directory}:")
    for label, pair in (("SAST", certs.sast), ("TVS", certs.tvs), ("CCM+TFTP", certs.ccm_tftp)):
        fp = pair.cert.fingerprint(hashes.SHA256()).hex()
        print(f"  {label:9} {pair.cert.subject.rfc4514_string()}  sha256={fp}")
    return 0


def _cmd_lab_ca(args: argparse.Namespace) -> int:
    lab = make_lab_ca(args.key_type, legacy=args.legacy)
    write_lab_ca(args.dir, lab, force=args.force)
    print(f"lab CA written to {args.dir} (lab-root.pem, lab-ca.pem; keys are owner-only)")
    print("for labs only: copy lab-root.pem and lab-ca.pem into the daemon's trust store")
    return 0


def _cmd_issue_mic(args: argparse.Namespace) -> int:
    lab = load_lab_ca(args.ca)
    now = dt.datetime.now(dt.UTC)
    not_after = now - dt.timedelta(days=1) if args.expired else None
    mic = issue_mic(
        lab,
        model=args.model,
        mac=args.mac,
        key_type=args.key_type,
        days=args.days,
        not_after=not_after,
        sha1=args.sha1,
    )
    cert_path, _ = write_mic(args.out, mic)
    print(f"MIC {mic.cert.subject.rfc4514_string()} written to {cert_path}")
    return 0


def _guard(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """One-line message on stderr and exit 1 for expected failures (never a traceback)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (CertError, OSError) as exc:
            print(f"callboard certs: {exc}", file=sys.stderr)
            return 1

    return run


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``certs {init,lab-ca,issue-mic}``; each parser sets ``func`` returning an exit code."""
    certs = subparsers.add_parser("certs", help="server certificates, lab CA and lab MICs")
    sub = certs.add_subparsers(dest="certs_command", required=True)

    p = sub.add_parser("init", help="create the SAST, TVS and CCM+TFTP certificates")
    # SUPPRESS: without the flag, `callboard --state-dir DIR certs init` keeps DIR.
    p.add_argument(
        "--state-dir",
        default=argparse.SUPPRESS,
        help="the daemon's state directory (default /var/lib/callboard)",
    )
    p.add_argument("--key-type", choices=("ec", "rsa"), default="ec")
    p.add_argument("--force", action="store_true", help="replace existing keys")
    p.set_defaults(func=_guard(_cmd_init))

    p = sub.add_parser("lab-ca", help="create a lab manufacturing root and CA (labs only)")
    p.add_argument("dir")
    p.add_argument("--key-type", choices=("ec", "rsa"), default="ec")
    p.add_argument("--legacy", action="store_true", help="old-style CA extensions")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_guard(_cmd_lab_ca))

    p = sub.add_parser("issue-mic", help="issue a lab MIC for an emulated phone")
    p.add_argument("--ca", required=True, help="directory made by `certs lab-ca`")
    p.add_argument("--model", required=True, help="e.g. 8841")
    p.add_argument("--mac", required=True, help="12 hex digits")
    p.add_argument("--out", required=True)
    p.add_argument("--key-type", choices=("ec", "rsa"), default="ec")
    p.add_argument("--days", type=int, default=3650)
    p.add_argument("--expired", action="store_true", help="already expired (for tests)")
    p.add_argument("--sha1", action="store_true", help="SHA-1 signature (for old-phone tests)")
    p.set_defaults(func=_guard(_cmd_issue_mic))


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry for ``python -m callboard.daemon.certs``."""
    parser = argparse.ArgumentParser(prog="callboard")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
