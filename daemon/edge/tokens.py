"""OAuth tokens of the edge: JWTs signed by the cluster key, bound to the phone's MIC.

Every token is derived from committed device state, so nothing about tokens is stored beyond
two counters on the device record:

- the access token (RFC 9068, ``typ`` ``at+jwt``) names the device (``sub``, ``cb_did``),
  its token generation (``cb_gen``) and the MIC it is bound to (``cnf`` ``x5t#S256``,
  RFC 8705 §3); it is short-lived;
- the refresh token (``typ`` ``rt+jwt``, audience the token endpoint only) carries the same
  plus the serial of the device's one live refresh token (``cb_rsn``).

A token is good only while the device still has that id, name, generation (``device
revoke-tokens``, blanking the MAC, re-activation and withdrawing remote permission all move
it on), MIC and permission. Signing is ES256 (P-256: well under a millisecond, unlike RSA);
time is injected, so PyJWT's own clock checks are off and done here.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from callboard.protocols.oauth import thumbprint_hex
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from ..registry.model import Device
from ..registry.registry import Registry

ALGORITHM = "ES256"
ACCESS_TYP = "at+jwt"
REFRESH_TYP = "rt+jwt"
SCOPE = "config sip"
TOKEN_KEY_NAME = "edge-token.key"


class TokenRejected(Exception):
    """A token that does not hold; the message is for the log (the client hears less)."""


@dataclass(frozen=True)
class Claims:
    """The checked claims of one token."""

    device_id: str
    device_name: str
    generation: int
    thumbprint: str  # hex SHA-256 of the certificate the token is bound to
    expires_at: float
    refresh_serial: int | None = None


@dataclass(frozen=True)
class Issued:
    access_token: str
    refresh_token: str
    expires_in: int


def load_or_create_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The cluster's token-signing key (EC P-256, PEM, 0600), created on first use."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path}: the token-signing key must be an EC P-256 key")
        return key
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return key


def key_id(key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 thumbprint of the public JWK (base64url SHA-256)."""
    jwk = json.loads(ECAlgorithm.to_jwk(key))
    canonical = json.dumps(
        {k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(canonical.encode())
    return jwt.utils.base64url_encode(digest.finalize()).decode()


class TokenService:
    """Issues and checks the edge's tokens. ``issuer`` is called for the current issuer URL
    (its port is known once the edge listens)."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        issuer: Callable[[], str],
        *,
        access_ttl: int,
        refresh_ttl: int,
    ) -> None:
        self._key = key
        self._public = key.public_key()
        self.kid = key_id(self._public)
        self.issuer = issuer
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl

    def jwks(self) -> bytes:
        jwk = json.loads(ECAlgorithm.to_jwk(self._public))
        jwk.update(kid=self.kid, use="sig", alg=ALGORITHM)
        return json.dumps({"keys": [jwk]}).encode()

    # -- issuing ---------------------------------------------------------------------------

    def issue(self, device: Device, thumbprint_x5t: str, now: float) -> Issued:
        """Access and refresh tokens for ``device`` as committed, bound to the certificate."""
        issuer = self.issuer()
        common = {
            "iss": issuer,
            "sub": device.name,
            "client_id": device.name,
            "iat": int(now),
            "cnf": {"x5t#S256": thumbprint_x5t},
            "cb_did": device.id,
            "cb_gen": device.token_generation,
        }
        access = {
            **common,
            "aud": issuer,
            "exp": int(now) + self.access_ttl,
            "jti": secrets.token_urlsafe(16),
            "scope": SCOPE,
        }
        refresh = {
            **common,
            "aud": f"{issuer}/oauth/token",
            "exp": int(now) + self.refresh_ttl,
            "jti": secrets.token_urlsafe(16),
            "cb_rsn": device.refresh_serial,
        }
        return Issued(
            self._sign(access, ACCESS_TYP), self._sign(refresh, REFRESH_TYP), self.access_ttl
        )

    def _sign(self, claims: dict[str, Any], typ: str) -> str:
        return jwt.encode(
            claims, self._key, algorithm=ALGORITHM, headers={"typ": typ, "kid": self.kid}
        )

    # -- checking --------------------------------------------------------------------------

    def check_access(self, token: str, cert_sha256: str | None, now: float) -> Claims:
        issuer = self.issuer()
        return self._check(token, ACCESS_TYP, issuer, cert_sha256, now)

    def check_refresh(self, token: str, cert_sha256: str | None, now: float) -> Claims:
        issuer = self.issuer()
        claims = self._check(token, REFRESH_TYP, f"{issuer}/oauth/token", cert_sha256, now)
        if claims.refresh_serial is None:
            raise TokenRejected("refresh token without a serial")
        return claims

    def _check(
        self, token: str, typ: str, audience: str, cert_sha256: str | None, now: float
    ) -> Claims:
        try:
            decoded = jwt.api_jwt.decode_complete(
                token,
                self._public,
                algorithms=[ALGORITHM],
                audience=audience,
                issuer=self.issuer(),
                options={
                    "verify_exp": False,  # checked below against the injected clock
                    "verify_iat": False,
                    "verify_nbf": False,
                    "require": ["exp", "iat", "iss", "aud", "sub", "cnf", "cb_did", "cb_gen"],
                },
            )
        except jwt.InvalidTokenError as exc:
            raise TokenRejected(f"token does not verify: {type(exc).__name__}") from None
        if decoded["header"].get("typ") != typ:
            raise TokenRejected(f"not a {typ} token")
        payload = decoded["payload"]
        exp = payload["exp"]
        if not isinstance(exp, int | float) or now >= exp:
            raise TokenRejected("token expired")
        cnf = payload["cnf"]
        x5t = cnf.get("x5t#S256") if isinstance(cnf, dict) else None
        bound = thumbprint_hex(x5t) if isinstance(x5t, str) else None
        if bound is None:
            raise TokenRejected("token has no certificate binding")
        if cert_sha256 is None or cert_sha256.lower() != bound:
            raise TokenRejected("token is bound to another certificate")
        serial = payload.get("cb_rsn")
        try:
            return Claims(
                device_id=str(payload["cb_did"]),
                device_name=str(payload["sub"]),
                generation=int(payload["cb_gen"]),
                thumbprint=bound,
                expires_at=float(exp),
                refresh_serial=int(serial) if serial is not None else None,
            )
        except (TypeError, ValueError):
            raise TokenRejected("token claims of the wrong type") from None


def current_device(claims: Claims, registry: Registry, *, remote_enabled: bool) -> Device:
    """The device a checked token speaks for, if it still may: same record, name,
    generation and MIC, still allowed remote access, config-fetching state."""
    if not remote_enabled:
        raise TokenRejected("remote access is disabled")
    device = registry.find(claims.device_name)
    if device is None or device.id != claims.device_id:
        raise TokenRejected(f"no device {claims.device_name} with this id")
    if device.token_generation != claims.generation:
        raise TokenRejected(f"tokens of {device.name} were revoked")
    if not device.allow_remote:
        raise TokenRejected(f"{device.name} may not be used remotely")
    if not device.may_fetch_config:
        raise TokenRejected(f"{device.name} is {device.state.value}")
    if (device.mic_sha256 or "").lower() != claims.thumbprint:
        raise TokenRejected(f"{device.name} was activated with another certificate")
    return device
