"""Certificate tooling: the server's own certificates, the manufacturing trust store, lab CAs/MICs.

Daemon-side (it reads and writes files). The protocols get parsed objects from here:
``load_server_certs`` for the SAST/TVS/CCM+TFTP/HTTPS-TFTP pairs, ``load_trust_store`` for the
MIC roots.
Private keys are written owner-only and never printed or logged.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from callboard.protocols.tvs.activation import ManufacturingTrust
from callboard.protocols.tvs.itl import HashAlgorithm, Role, build_itl
from callboard.protocols.tvs.labpki import (
    LAB_CA_FILES,
    LAB_ROOT_FILES,
    CertError,
    CertKeyPair,
    LabCA,
    PrivateKey,
    issue_mic,
    load_certificate,
    load_lab_ca,
    load_private_key,
    make_lab_ca,
    new_key,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .config import DEFAULT_STATE_DIR

__all__ = [
    "BundleError",
    "CertError",
    "CertKeyPair",
    "LabCA",
    "ServerCertificates",
    "certs_present",
    "init_certs",
    "issue_mic",
    "load_lab_ca",
    "load_server_certs",
    "load_trust_store",
    "make_lab_ca",
    "register_cli",
    "write_lab_ca",
    "write_mic",
    "write_pair",
]

CERTS_SUBDIR = "certs"
SAST_NAME = "sast"
TVS_NAME = "tvs"
CCM_TFTP_NAME = "ccm-tftp"
HTTPS_TFTP_NAME = "https-tftp"
# Keys whose type the role fixes, whatever ``--key-type`` says: RSA signs ITLs and ``.sgn``
# files; the HTTPS 6971 certificate must be EC (ITL version 1.1).
_ROLE_KEY_TYPES = {SAST_NAME: "rsa", CCM_TFTP_NAME: "rsa", HTTPS_TFTP_NAME: "ec"}
ITL_VERSION_HTTPS = (1, 1)

TRUST_SUFFIXES = (".pem", ".crt", ".cer")


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


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


# Server certificates -------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerCertificates:
    """The role pairs: SAST (ITL signer, RSA), TVS, CCM+TFTP (RSA: signs ``.sgn`` files, SIP
    TLS), HTTPS-TFTP (EC, TFTP role: the HTTPS 6971 server certificate)."""

    sast: CertKeyPair
    tvs: CertKeyPair
    ccm_tftp: CertKeyPair
    https_tftp: CertKeyPair

    def itl_records(self) -> list[tuple[int, x509.Certificate]]:
        return [
            (Role.SAST, self.sast.cert),
            (Role.CCM_TFTP, self.ccm_tftp.cert),
            (Role.TVS, self.tvs.cert),
            (Role.TFTP, self.https_tftp.cert),
        ]

    def itl_timestamp(self) -> int:
        """The ITL's timestamp, from the certificates alone: every node of a cluster holding
        the same identity (``certs import``) then signs byte-identical ITL files."""
        return int(max(c.not_valid_before_utc for _role, c in self.itl_records()).timestamp())

    def sgn_signer(self) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
        """The CCM+TFTP pair that signs ``.sgn`` files (see ``protocols.tvs.sgn``)."""
        return self.ccm_tftp.cert, _rsa_key(self.ccm_tftp, "CCM+TFTP")

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
            signer_version=ITL_VERSION_HTTPS,
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
    HTTPS_TFTP_NAME: ("HTTPS TFTP", True),
}


def init_certs(
    state_dir: str | os.PathLike[str],
    *,
    key_type: str = "ec",
    force: bool = False,
    now: dt.datetime | None = None,
) -> ServerCertificates:
    """Create the SAST, TVS, CCM+TFTP and HTTPS-TFTP pairs under ``<state_dir>/certs``.

    SAST and CCM+TFTP are RSA 2048, HTTPS-TFTP is EC P-256; ``key_type`` is the TVS key's.
    Existing keys are kept unless ``force`` (or of the wrong type for their role); a missing
    certificate is reissued from its key. Files: ``sast``, ``tvs``, ``ccm-tftp``,
    ``https-tftp`` ``.{pem,key}``; dir 0700, keys 0600.
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
        if key_path.exists() and not force and _kept_key_fits(stem, key_path):
            os.chmod(key_path, 0o600)
            if cert_path.exists():
                continue
            key = load_private_key(key_path)
        else:
            key = new_key(_ROLE_KEY_TYPES.get(stem, key_type))
        cert = _self_signed(key, f"{stem.upper()}-{host}", ou, when, server=server)
        write_pair(directory, stem, cert, key)
    return load_server_certs(state_dir)


def load_server_certs(state_dir: str | os.PathLike[str]) -> ServerCertificates:
    directory = Path(state_dir) / CERTS_SUBDIR

    def pair(stem: str) -> CertKeyPair:
        cert = load_certificate(directory / f"{stem}.pem")
        key = load_private_key(directory / f"{stem}.key")
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
    return _check_role_keys(
        ServerCertificates(
            sast=sast,
            tvs=pair(TVS_NAME),
            ccm_tftp=pair(CCM_TFTP_NAME),
            https_tftp=pair(HTTPS_TFTP_NAME),
        )
    )


def _kept_key_fits(stem: str, key_path: Path) -> bool:
    """An existing key of the type its role needs (an EC ``ccm-tftp`` from before .sgn is not)."""
    wanted = _ROLE_KEY_TYPES.get(stem)
    if wanted is None:
        return True
    key = load_private_key(key_path)
    return isinstance(key, rsa.RSAPrivateKey if wanted == "rsa" else ec.EllipticCurvePrivateKey)


def _rsa_key(pair: CertKeyPair, label: str) -> rsa.RSAPrivateKey:
    if not isinstance(pair.key, rsa.RSAPrivateKey):
        raise CertError(f"the {label} key must be RSA (run `callboard certs init`)")
    return pair.key


def _check_role_keys(server: ServerCertificates) -> ServerCertificates:
    """CCM+TFTP must be RSA (it signs .sgn files), HTTPS-TFTP EC (phones need EC on 6971)."""
    _rsa_key(server.ccm_tftp, "CCM+TFTP")
    if not isinstance(server.https_tftp.key, ec.EllipticCurvePrivateKey):
        raise CertError("the HTTPS-TFTP key must be EC (run `callboard certs init --force`)")
    return server


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


# Lab CA and MICs (made in callboard.protocols.tvs.labpki) --------------------------------


def write_lab_ca(directory: str | os.PathLike[str], lab: LabCA, *, force: bool = False) -> None:
    """``lab-root.{pem,key}`` and ``lab-ca.{pem,key}``; the dir doubles as a trust store."""
    path = Path(directory)
    _ensure_private_dir(path)
    if not force and any((path / n).exists() for n in (*LAB_ROOT_FILES, *LAB_CA_FILES)):
        raise CertError(f"{path} already holds a lab CA (use --force to replace it)")
    write_pair(path, "lab-root", lab.root, lab.root_key)
    write_pair(path, "lab-ca", lab.ca, lab.ca_key)


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
    for label, pair in (
        ("SAST", certs.sast),
        ("TVS", certs.tvs),
        ("CCM+TFTP", certs.ccm_tftp),
        ("HTTPS", certs.https_tftp),
    ):
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


def _passphrase(prompt: str) -> str:
    """One line from stdin (never argv, never logged); without echo on a terminal."""
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    try:
        line = sys.stdin.readline()
    except UnicodeDecodeError:
        raise CertError("the passphrase on stdin is not valid text") from None
    if not line:
        raise CertError("no passphrase on stdin (give it as one line)")
    return line.rstrip("\r\n")


def _cmd_export(args: argparse.Namespace) -> int:
    from .bundle import export_identity

    state_dir = Path(getattr(args, "state_dir", None) or DEFAULT_STATE_DIR)
    passphrase = _passphrase("bundle passphrase: ")
    if sys.stdin.isatty() and _passphrase("again: ") != passphrase:
        raise CertError("the passphrases differ")
    names = export_identity(state_dir, Path(args.file), passphrase, force=args.force)
    print(f"cluster identity ({', '.join(names)}) written to {args.file} (encrypted)")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from .bundle import import_identity

    state_dir = Path(getattr(args, "state_dir", None) or DEFAULT_STATE_DIR)
    imported = import_identity(state_dir, Path(args.file), _passphrase("bundle passphrase: "))
    print(f"cluster identity ({', '.join(imported.names)}) installed in {imported.directory}")
    return 0


class BundleError(Exception):
    """An identity bundle that cannot be written or read (:mod:`.bundle`); one line, no
    secret in it. Defined here so the CLI guard needs no import cycle."""


def _guard(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """One-line message on stderr and exit 1 for expected failures (never a traceback)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (CertError, OSError, BundleError) as exc:
            print(f"callboard certs: {exc}", file=sys.stderr)
            return 1

    return run


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``certs {init,lab-ca,issue-mic,export,import}``; each parser sets ``func`` (an
    exit code)."""
    certs = subparsers.add_parser("certs", help="server certificates, lab CA and lab MICs")
    sub = certs.add_subparsers(dest="certs_command", required=True)

    p = sub.add_parser("init", help="create the SAST, TVS, CCM+TFTP and HTTPS certificates")
    # SUPPRESS: without the flag, `callboard --state-dir DIR certs init` keeps DIR.
    p.add_argument(
        "--state-dir",
        default=argparse.SUPPRESS,
        help="the daemon's state directory (default /var/lib/callboard)",
    )
    p.add_argument(
        "--key-type",
        choices=("ec", "rsa"),
        default="ec",
        help="the TVS key (SAST and CCM+TFTP are RSA, HTTPS is EC)",
    )
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

    state_help = "the daemon's state directory (default /var/lib/callboard)"
    p = sub.add_parser(
        "export",
        help="write the cluster identity (all server keys) to an encrypted bundle",
        description="Write the SAST, TVS, CCM+TFTP, HTTPS-TFTP (and edge) keys and "
        "certificates to FILE, encrypted (scrypt + AES-256-GCM) with a passphrase read as "
        "one line from stdin.",
    )
    p.add_argument("file")
    p.add_argument("--state-dir", default=argparse.SUPPRESS, help=state_help)
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(func=_guard(_cmd_export))

    p = sub.add_parser(
        "import",
        help="install a cluster identity bundle (the daemon must be stopped)",
        description="Install the keys and certificates of a bundle made by `certs export` "
        "into <state-dir>/certs (passphrase: one line on stdin). Refused while a daemon "
        "runs on the state directory: stop it, import, start it.",
    )
    p.add_argument("file")
    p.add_argument("--state-dir", default=argparse.SUPPRESS, help=state_help)
    p.set_defaults(func=_guard(_cmd_import))


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry for ``python -m callboard.daemon.certs``."""
    parser = argparse.ArgumentParser(prog="callboard")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
