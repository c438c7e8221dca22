"""HTTP Digest for SIP (RFC 2617, RFC 7616 algorithms as profiled for SIP by RFC 8760).

Server side (:class:`DigestAuthenticator`): nonces are stateless, ``base64url(timestamp ||
random || HMAC-SHA256(secret, timestamp || random || realm))``, so any number of phones can be
challenged without the registrar remembering anything; an expired but authentic nonce gets
``stale=true`` so the phone retries with the same password without asking the user. Replay
within the nonce lifetime is not prevented (no nonce-count state): the lifetime is the bound.

Client side (:func:`parse_challenge`, :func:`build_authorization`) is used by the emulated
phone. Both sides compute with :func:`digest_response`. Passwords never leave this module in
logs or exceptions.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from enum import Enum

from callboard.protocols.sip.message import SIPParseError, quote, split_unquoted, unquote

ALGORITHMS: dict[str, str] = {"MD5": "md5", "SHA-256": "sha256"}


def _h(algorithm: str, data: str) -> str:
    name = ALGORITHMS.get(algorithm.upper())
    if name is None:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    return hashlib.new(name, data.encode("utf-8")).hexdigest()


def digest_response(
    *,
    algorithm: str,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    qop: str | None,
    nc: str | None,
    cnonce: str | None,
) -> str:
    """The ``response`` value (RFC 2617 §3.2.2.1; without qop, the RFC 2069 form)."""
    ha1 = _h(algorithm, f"{username}:{realm}:{password}")
    ha2 = _h(algorithm, f"{method}:{uri}")
    if qop:
        return _h(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return _h(algorithm, f"{ha1}:{nonce}:{ha2}")


def parse_auth_params(value: str) -> tuple[str, dict[str, str]]:
    """``Digest a="b", c=d`` → ("digest", {"a": "b", "c": "d"}); names lower-cased."""
    scheme, _, rest = value.strip().partition(" ")
    params: dict[str, str] = {}
    for piece in split_unquoted(rest, ","):
        piece = piece.strip()
        if not piece:
            continue
        name, sep, val = piece.partition("=")
        if not sep:
            raise SIPParseError("bad auth parameter")
        params[name.strip().lower()] = unquote(val.strip())
    return scheme.lower(), params


class Verdict(Enum):
    OK = "ok"
    MISSING = "missing"  # no credentials for our realm: challenge
    STALE = "stale"  # authentic nonce past its lifetime: challenge with stale=true
    BAD_NONCE = "bad-nonce"  # not ours (or forged): challenge
    WRONG = "wrong"  # our nonce, wrong response or user: refuse
    MALFORMED = "malformed"  # unreadable Authorization: 400


@dataclass(frozen=True)
class DigestAuthenticator:
    """Challenges and checks digest credentials for one realm."""

    realm: str
    secret: bytes
    lifetime: float = 300.0
    algorithms: tuple[str, ...] = ("MD5",)  # Cisco phones speak MD5 only

    def make_nonce(self, now: float) -> str:
        ts = struct.pack(">d", now)
        rand = os.urandom(8)
        mac = hmac.new(self.secret, ts + rand + self.realm.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(ts + rand + mac[:16]).decode("ascii").rstrip("=")

    def _nonce_time(self, nonce: str) -> float | None:
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (ValueError, TypeError):
            return None
        if len(raw) != 32:
            return None
        body, mac = raw[:16], raw[16:]
        expected = hmac.new(self.secret, body + self.realm.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected[:16]):
            return None
        ts: float = struct.unpack(">d", body[:8])[0]
        return ts

    def challenges(self, now: float, stale: bool = False) -> list[str]:
        """One ``WWW-Authenticate`` value per algorithm, preferred first (RFC 8760 §2.4)."""
        nonce = self.make_nonce(now)
        out = []
        for alg in self.algorithms:
            value = (
                f"Digest realm={quote(self.realm)}, nonce={quote(nonce)}, "
                f'algorithm={alg}, qop="auth"'
            )
            if stale:
                value += ", stale=true"
            out.append(value)
        return out

    def verify(
        self,
        authorizations: list[str],
        *,
        method: str,
        username: str,
        password: str,
        now: float,
    ) -> Verdict:
        """Check the Authorization values of a request against one user's password."""
        mine: dict[str, str] | None = None
        for value in authorizations:
            try:
                scheme, params = parse_auth_params(value)
            except SIPParseError:
                return Verdict.MALFORMED
            if scheme == "digest" and params.get("realm") == self.realm:
                mine = params
                break
        if mine is None:
            return Verdict.MISSING
        nonce = mine.get("nonce", "")
        uri = mine.get("uri")
        response = mine.get("response")
        algorithm = mine.get("algorithm", "MD5")
        if uri is None or response is None or "username" not in mine:
            return Verdict.MALFORMED
        if algorithm.upper() not in ALGORITHMS:
            return Verdict.BAD_NONCE
        issued = self._nonce_time(nonce)
        if issued is None:
            return Verdict.BAD_NONCE
        qop = mine.get("qop")
        nc = mine.get("nc")
        cnonce = mine.get("cnonce")
        if qop is not None and (qop.lower() != "auth" or not nc or cnonce is None):
            return Verdict.MALFORMED
        expected = digest_response(
            algorithm=algorithm,
            username=username,
            realm=self.realm,
            password=password,
            method=method,
            uri=uri,
            nonce=nonce,
            qop=qop,
            nc=nc,
            cnonce=cnonce,
        )
        if mine["username"] != username or not hmac.compare_digest(
            expected.encode(), response.lower().encode()
        ):
            return Verdict.WRONG
        if not 0 <= now - issued <= self.lifetime:
            return Verdict.STALE
        return Verdict.OK


@dataclass(frozen=True)
class Challenge:
    realm: str
    nonce: str
    algorithm: str
    qop: str | None
    opaque: str | None
    stale: bool


def parse_challenge(values: list[str]) -> Challenge:
    """Pick the strongest supported challenge from ``WWW-Authenticate`` values."""
    best: Challenge | None = None
    for value in values:
        scheme, params = parse_auth_params(value)
        if scheme != "digest" or "nonce" not in params or "realm" not in params:
            continue
        alg = params.get("algorithm", "MD5").upper()
        if alg not in ALGORITHMS:
            continue
        qops = [q.strip().lower() for q in params.get("qop", "").split(",") if q.strip()]
        ch = Challenge(
            params["realm"],
            params["nonce"],
            alg,
            "auth" if "auth" in qops else None,
            params.get("opaque"),
            params.get("stale", "").lower() == "true",
        )
        if best is None or (ch.algorithm == "SHA-256" and best.algorithm != "SHA-256"):
            best = ch
    if best is None:
        raise SIPParseError("no usable digest challenge")
    return best


def build_authorization(
    challenge: Challenge,
    *,
    method: str,
    uri: str,
    username: str,
    password: str,
    nc: int = 1,
    cnonce: str | None = None,
) -> str:
    """An ``Authorization`` value answering ``challenge``."""
    cnonce = cnonce if cnonce is not None else os.urandom(8).hex()
    nc_s = f"{nc:08x}"
    resp = digest_response(
        algorithm=challenge.algorithm,
        username=username,
        realm=challenge.realm,
        password=password,
        method=method,
        uri=uri,
        nonce=challenge.nonce,
        qop=challenge.qop,
        nc=nc_s if challenge.qop else None,
        cnonce=cnonce if challenge.qop else None,
    )
    parts = [
        f"username={quote(username)}",
        f"realm={quote(challenge.realm)}",
        f"nonce={quote(challenge.nonce)}",
        f"uri={quote(uri)}",
        f"response={quote(resp)}",
        f"algorithm={challenge.algorithm}",
    ]
    if challenge.qop:
        parts += [f"qop={challenge.qop}", f"nc={nc_s}", f"cnonce={quote(cnonce)}"]
    if challenge.opaque is not None:
        parts.append(f"opaque={quote(challenge.opaque)}")
    return "Digest " + ", ".join(parts)
