"""The cluster identity as one encrypted file: ``callboard certs export`` / ``certs import``.

Every node of a cluster must present the same SAST, TVS, CCM+TFTP and HTTPS-TFTP
certificates and serve the same signed ITL, or a phone that moves to another node refuses
it (an ITL mismatch). Rather than keeping private keys in the shared database, the operator
carries them from node to node in a bundle: the keys never sit in PostgreSQL, its backups or
its replication stream, and a node's identity changes only when someone imports on purpose.

The construction (cryptography's primitives, nothing home-made):

- a passphrase (read from stdin, never argv) through **scrypt** (RFC 7914; N=2**17, r=8,
  p=1, a 16-byte random salt): memory-hard, so guessing is expensive;
- **AES-256-GCM** with a random 96-bit nonce over a JSON map of the PEM files; the header
  (magic, version, scrypt parameters, salt, nonce) is the additional data, so any change to
  the file, and a wrong passphrase alike, fail authentication before anything is written.

PKCS#12 was the other candidate; cryptography writes one private key per PKCS#12 file and the
identity has four to six, so it would be several files or a container around them.

File layout: ``CBIDENT`` ``\\x01`` | log2(N) r p (3 bytes) | salt (16) | nonce (12) |
ciphertext+tag.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from . import certs
from .certs import BundleError
from .lock import AlreadyRunning, acquire_state_lock

__all__ = [
    "IDENTITY_FILES",
    "OPTIONAL_FILES",
    "BundleError",
    "decrypt_bundle",
    "encrypt_bundle",
    "export_identity",
    "import_identity",
]

MAGIC = b"CBIDENT\x01"
SALT_BYTES = 16
NONCE_BYTES = 12
SCRYPT_LOG2_N = 17
SCRYPT_R = 8
SCRYPT_P = 1
MAX_LOG2_N = 20  # a crafted header must not make the importer allocate gigabytes
MIN_PASSPHRASE = 8
MAX_BUNDLE_BYTES = 1024 * 1024
_HEADER = len(MAGIC) + 3 + SALT_BYTES + NONCE_BYTES

#: The four role pairs every node needs (``<stem>.pem`` and ``<stem>.key``).
IDENTITY_FILES = tuple(
    f"{stem}.{ext}"
    for stem in (certs.SAST_NAME, certs.TVS_NAME, certs.CCM_TFTP_NAME, certs.HTTPS_TFTP_NAME)
    for ext in ("pem", "key")
)
#: Carried when present: the edge's HTTPS pair and its OAuth token-signing key.
OPTIONAL_FILES = ("edge.pem", "edge.key", "edge-token.key")


@dataclass(frozen=True)
class Imported:
    directory: Path
    names: tuple[str, ...]


def _kdf(salt: bytes, log2_n: int, r: int, p: int) -> Scrypt:
    return Scrypt(salt=salt, length=32, n=1 << log2_n, r=r, p=p)


def encrypt_bundle(files: dict[str, bytes], passphrase: str) -> bytes:
    """Seal ``files`` (name → PEM bytes) under ``passphrase``."""
    salt = secrets.token_bytes(SALT_BYTES)
    nonce = secrets.token_bytes(NONCE_BYTES)
    header = MAGIC + bytes((SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P)) + salt + nonce
    key = _kdf(salt, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P).derive(passphrase.encode("utf-8"))
    payload = json.dumps(
        {"format": 1, "files": {n: d.decode("ascii") for n, d in sorted(files.items())}}
    ).encode("ascii")
    return header + AESGCM(key).encrypt(nonce, payload, header)


def decrypt_bundle(blob: bytes, passphrase: str) -> dict[str, bytes]:
    """The files in ``blob``; :class:`BundleError` for a wrong passphrase or a damaged file."""
    if len(blob) <= _HEADER + 16 or not blob.startswith(MAGIC):
        raise BundleError("not a Callboard identity bundle")
    log2_n, r, p = blob[len(MAGIC) : len(MAGIC) + 3]
    if not (10 <= log2_n <= MAX_LOG2_N and 1 <= r <= 32 and 1 <= p <= 16):
        raise BundleError("not a Callboard identity bundle (unsupported parameters)")
    start = len(MAGIC) + 3
    salt = blob[start : start + SALT_BYTES]
    nonce = blob[start + SALT_BYTES : _HEADER]
    key = _kdf(salt, log2_n, r, p).derive(passphrase.encode("utf-8"))
    try:
        payload = AESGCM(key).decrypt(nonce, blob[_HEADER:], blob[:_HEADER])
    except InvalidTag:
        raise BundleError("wrong passphrase, or the bundle is damaged") from None
    try:
        data = json.loads(payload)
        files = {str(n): str(t).encode("ascii") for n, t in data["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BundleError("the bundle's contents are not readable") from None
    unknown = sorted(set(files) - set(IDENTITY_FILES) - set(OPTIONAL_FILES))
    missing = sorted(set(IDENTITY_FILES) - set(files))
    if unknown or missing:
        raise BundleError(
            "the bundle does not hold a cluster identity"
            + (f" (unknown files: {', '.join(unknown)})" if unknown else "")
            + (f" (missing: {', '.join(missing)})" if missing else "")
        )
    return files


def _read_identity(directory: Path) -> dict[str, bytes]:
    """The identity files of ``<state-dir>/certs``, checked to load as a working set."""
    try:
        certs.load_server_certs(directory.parent)
    except (certs.CertError, OSError, ValueError) as exc:
        raise BundleError(f"no usable identity in {directory}: {_first_line(exc)}") from None
    files = {name: (directory / name).read_bytes() for name in IDENTITY_FILES}
    edge = ("edge.pem", "edge.key")
    if all((directory / n).is_file() for n in edge):
        files.update((n, (directory / n).read_bytes()) for n in edge)
    if (directory / "edge-token.key").is_file():
        files["edge-token.key"] = (directory / "edge-token.key").read_bytes()
    return files


def export_identity(
    state_dir: Path, out: Path, passphrase: str, *, force: bool = False
) -> tuple[str, ...]:
    """Write the bundle of ``<state_dir>/certs`` to ``out`` (0600); the names it holds."""
    if len(passphrase) < MIN_PASSPHRASE:
        raise BundleError(f"the passphrase must be at least {MIN_PASSPHRASE} characters")
    if out.exists() and not force:
        raise BundleError(f"{out} already exists (use --force to replace it)")
    files = _read_identity(state_dir / certs.CERTS_SUBDIR)
    blob = encrypt_bundle(files, passphrase)
    try:
        certs._write(out, blob, 0o600)
    except OSError as exc:
        raise BundleError(f"cannot write {out}: {exc.strerror or exc}") from None
    return tuple(sorted(files))


def read_bundle_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            blob = fh.read(MAX_BUNDLE_BYTES + 1)
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(blob) > MAX_BUNDLE_BYTES:
        raise BundleError(f"{path} is too large to be an identity bundle")
    return blob


def import_identity(state_dir: Path, bundle: Path, passphrase: str) -> Imported:
    """Install the bundle's identity into ``<state_dir>/certs``, all checked before any write.

    Refuses while a daemon runs on ``state_dir`` (it holds the state lock, and it reads the
    certificates only at start): stop it, import, start it.
    """
    files = decrypt_bundle(read_bundle_file(bundle), passphrase)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        lock = acquire_state_lock(state_dir)
    except AlreadyRunning as exc:
        raise BundleError(f"{exc}; stop it, import, then start it again") from None
    try:
        directory = state_dir / certs.CERTS_SUBDIR
        certs._ensure_private_dir(directory)
        staging = directory / f".import-{secrets.token_hex(4)}"
        certs._ensure_private_dir(staging / certs.CERTS_SUBDIR)
        try:
            _stage(staging / certs.CERTS_SUBDIR, files.items())
            try:
                certs.load_server_certs(staging)
            except (certs.CertError, ValueError) as exc:
                raise BundleError(f"the bundle's certificates: {_first_line(exc)}") from None
            _install(staging / certs.CERTS_SUBDIR, directory, sorted(files))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        lock.release()
    return Imported(directory, tuple(sorted(files)))


def _stage(directory: Path, files: Iterable[tuple[str, bytes]]) -> None:
    for name, data in files:
        certs._write(directory / name, data, 0o600 if name.endswith(".key") else 0o644)


def _install(staging: Path, directory: Path, names: list[str]) -> None:
    """Rename each staged file over its old one: keys first, so a certificate never names a
    key that is not there yet; then flush the directory."""
    for name in sorted(names, key=lambda n: not n.endswith(".key")):
        os.replace(staging / name, directory / name)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0]
