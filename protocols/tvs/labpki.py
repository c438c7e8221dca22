"""A lab manufacturing PKI: a root, an issuing CA, and MICs laid out like a factory's.

A MIC's layout is a protocol fact that the TVS relies on: ``CN=CP-<model>-SEP<MAC>`` names
the device and ``serialNumber=PID:CP-<model> SN:<serial>`` its product, with no SAN and no
EKU. The daemon's ``callboard certs`` tooling (files on disk) and the emulated phone's boot
storm (MICs in memory, thousands at a time) both issue them here. These are lab certificates,
never a vendor's.

    lab = make_lab_ca("ec")                                  # root + intermediate, in memory
    mic = issue_mic(lab, model="8841", mac="00AABBCCDDEE")   # CertKeyPair
    issuer = load_issuing_ca(directory)                      # lab-ca.{pem,key} from `certs lab-ca`
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from callboard.protocols.models import model_key
from callboard.protocols.models import normalise_mac as _normalise_mac
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

__all__ = [
    "LAB_CA_CN",
    "LAB_CA_FILES",
    "LAB_ORG",
    "LAB_ROOT_CN",
    "LAB_ROOT_FILES",
    "CertError",
    "CertKeyPair",
    "Issuer",
    "IssuingCA",
    "LabCA",
    "PrivateKey",
    "issue_mic",
    "load_certificate",
    "load_issuing_ca",
    "load_lab_ca",
    "load_private_key",
    "make_lab_ca",
    "mic_subject",
    "new_key",
    "normalise_mac",
    "normalise_model",
]

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

LAB_ROOT_CN = "Callboard Lab Manufacturing Root"
LAB_CA_CN = "Callboard Lab Manufacturing CA"
LAB_ORG = "Callboard Lab"
MIC_ORG = "Callboard Lab Phones"
MIC_OU = "Lab MIC"
# The files `callboard certs lab-ca` writes and `callboard phone storm --lab-ca` reads.
LAB_ROOT_FILES = ("lab-root.pem", "lab-root.key")
LAB_CA_FILES = ("lab-ca.pem", "lab-ca.key")


class CertError(Exception):
    """A certificate operation failed; the message is safe to show (no key material)."""


@dataclass(frozen=True)
class CertKeyPair:
    cert: x509.Certificate
    key: PrivateKey


class Issuer(Protocol):
    """What signs MICs: the issuing CA's certificate and key."""

    @property
    def ca(self) -> x509.Certificate: ...
    @property
    def ca_key(self) -> PrivateKey: ...


@dataclass(frozen=True)
class IssuingCA:
    """Just the issuing CA (all a factory line needs to issue MICs)."""

    ca: x509.Certificate
    ca_key: PrivateKey


@dataclass(frozen=True)
class LabCA:
    """The lab root and the intermediate that issues MICs; both belong in the trust store."""

    root: x509.Certificate
    root_key: PrivateKey
    ca: x509.Certificate
    ca_key: PrivateKey

    @property
    def certificates(self) -> list[x509.Certificate]:
        return [self.root, self.ca]


# Names and keys ------------------------------------------------------------------------------


def normalise_mac(mac: str) -> str:
    """``00:aa:bb:cc:dd:ee`` → ``00AABBCCDDEE``; :class:`CertError` if it is not 12 hex digits."""
    try:
        return _normalise_mac(mac)
    except ValueError as exc:
        raise CertError(str(exc)) from None


def normalise_model(model: str) -> str:
    """``CP-8841`` or ``Cisco 8841`` → ``8841``; :class:`CertError` unless 1-8 alphanumerics."""
    text = model_key(model)
    if not text or len(text) > 8 or not text.isalnum():
        raise CertError(f"model {model!r} is not like 8841, 8865NR or 7965G")
    return text


def new_key(key_type: str) -> PrivateKey:
    """EC P-256 (``ec``) or RSA 2048 (``rsa``)."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise CertError(f"unknown key type {key_type!r} (use ec or rsa)")


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


# The lab CA ----------------------------------------------------------------------------------


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


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
        return builder.sign(signer, hashes.SHA256())
    builder = (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), True)
        .add_extension(_CA_KEY_USAGE, True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if subject != issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
        )
    return builder.sign(signer, hashes.SHA256())


def _lab_name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, LAB_ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_lab_ca(
    key_type: str = "ec",
    *,
    now: dt.datetime | None = None,
    legacy: bool = False,
    root_cn: str = LAB_ROOT_CN,
    ca_cn: str = LAB_CA_CN,
) -> LabCA:
    """A lab manufacturing root and intermediate (in memory), twenty years each."""
    when = _now(now)
    root_key = new_key(key_type)
    ca_key = new_key(key_type)
    root_name, ca_name = _lab_name(root_cn), _lab_name(ca_cn)
    root = _ca_cert(
        root_name, root_name, root_key, root_key, when, 7300, path_length=1, legacy=legacy
    )
    ca = _ca_cert(ca_name, root_name, ca_key, root_key, when, 7300, path_length=0, legacy=legacy)
    return LabCA(root=root, root_key=root_key, ca=ca, ca_key=ca_key)


# MICs ----------------------------------------------------------------------------------------


def mic_subject(model: str, mac: str, serial: str) -> x509.Name:
    """The real MIC layout, in this order: ``serialNumber=PID:CP-<model> SN:<serial>``, O, OU,
    ``CN=CP-<model>-SEP<MAC>``. ``model`` and ``mac`` must already be normalised.
    """
    return x509.Name(
        [
            x509.NameAttribute(NameOID.SERIAL_NUMBER, f"PID:CP-{model} SN:{serial}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, MIC_ORG),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, MIC_OU),
            x509.NameAttribute(NameOID.COMMON_NAME, f"CP-{model}-SEP{mac}"),
        ]
    )


def _lab_serial() -> str:
    return "LAB" + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(8))


def _resign_sha1(cert: x509.Certificate, key: PrivateKey) -> x509.Certificate:
    """cryptography refuses to sign with SHA-1; pyOpenSSL still can (old-phone tests only)."""
    from OpenSSL import crypto

    legacy = crypto.X509.from_cryptography(cert)
    legacy.sign(crypto.PKey.from_cryptography_key(key), "sha1")
    return legacy.to_cryptography()


def issue_mic(
    issuer: Issuer,
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
    """A MIC for ``model``/``mac`` signed by ``issuer`` (see :func:`mic_subject`).

    Valid from a day ago for ``days`` unless ``not_before``/``not_after`` say otherwise;
    ``not_after`` in the past makes an expired MIC. ``serial`` defaults to ``LAB`` + 8
    random characters. Raises :class:`CertError` for a bad model, MAC or key type.
    """
    model = normalise_model(model)
    mac = normalise_mac(mac)
    when = _now(now)
    key = new_key(key_type)
    start = not_before or (when - dt.timedelta(days=1))
    end = not_after or (when + dt.timedelta(days=days))
    if end <= start:
        start = end - dt.timedelta(days=365)
    cert = (
        x509.CertificateBuilder()
        .subject_name(mic_subject(model, mac, serial or _lab_serial()))
        .issuer_name(issuer.ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .sign(issuer.ca_key, hashes.SHA256())
    )
    if sha1:
        cert = _resign_sha1(cert, issuer.ca_key)
    return CertKeyPair(cert, key)


# Reading the lab CA back ---------------------------------------------------------------------


def load_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    """An unencrypted PEM RSA or EC key; :class:`CertError` (naming no key material) if not."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CertError(f"cannot load private key {path}: {type(exc).__name__}") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise CertError(f"{path}: only RSA and EC keys are supported")
    return key


def load_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    """The first PEM certificate in ``path``; :class:`CertError` if unreadable."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise CertError(f"cannot load certificate {path}: {exc}") from None


def load_issuing_ca(directory: str | os.PathLike[str]) -> IssuingCA:
    """``lab-ca.pem`` and ``lab-ca.key`` from a directory made by ``callboard certs lab-ca``."""
    path = Path(directory)
    return IssuingCA(
        ca=load_certificate(path / LAB_CA_FILES[0]),
        ca_key=load_private_key(path / LAB_CA_FILES[1]),
    )


def load_lab_ca(directory: str | os.PathLike[str]) -> LabCA:
    """The root and the issuing CA from a directory made by ``callboard certs lab-ca``."""
    path = Path(directory)
    issuing = load_issuing_ca(path)
    return LabCA(
        root=load_certificate(path / LAB_ROOT_FILES[0]),
        root_key=load_private_key(path / LAB_ROOT_FILES[1]),
        ca=issuing.ca,
        ca_key=issuing.ca_key,
    )
