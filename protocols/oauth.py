"""OAuth 2.0 on the wire, sans-I/O: the token endpoint's requests and answers, bearer headers.

What a remote phone and the edge exchange (``docs/REMOTE.md`` is the open specification):

- the token request (RFC 6749 §3.2, form-encoded): the activation-code extension grant
  (RFC 6749 §4.5) or ``refresh_token`` (§6); client authentication is the TLS client
  certificate (RFC 8705 ``tls_client_auth``), so no ``client_secret`` is read;
- the answers: §5.1 success, §5.2 errors (:class:`OAuthError` carries the whole reply);
- authorization-server metadata (RFC 8414);
- bearer tokens in HTTP (RFC 6750) and SIP (RFC 8898, and Cisco's
  ``Proxy-Authorization: Bearer token="…"``), and the ``x5t#S256`` certificate thumbprint
  that binds a token to a certificate (RFC 8705 §3).

Nothing here holds a key, a clock or a socket.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

__all__ = [
    "ACTIVATION_GRANT",
    "FORM_TYPE",
    "REFRESH_GRANT",
    "ActivationGrant",
    "OAuthError",
    "RefreshGrant",
    "TokenRequest",
    "bearer_challenge",
    "bearer_from_http",
    "bearer_from_sip",
    "metadata",
    "parse_token_request",
    "thumbprint_hex",
    "token_response",
    "x5t_s256",
]

ACTIVATION_GRANT = "urn:callboard:params:oauth:grant-type:activation-code"
REFRESH_GRANT = "refresh_token"
FORM_TYPE = "application/x-www-form-urlencoded"
MAX_BODY = 8192
# RFC 6750 §2.1 b64token.
_B64TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
_NO_STORE = (("Cache-Control", "no-store"), ("Pragma", "no-cache"))


@dataclass(frozen=True)
class OAuthError(Exception):
    """A refusal with the reply to send (RFC 6749 §5.2): status, JSON body, headers.

    ``description`` goes to the client, so it must stay neutral; the detail belongs in the
    log. ``retry_after`` (seconds) makes a ``Retry-After`` header (a 429).
    """

    status: int
    error: str
    description: str = ""
    retry_after: int | None = None
    extra_headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> bytes:
        doc = {"error": self.error}
        if self.description:
            doc["error_description"] = self.description
        return json.dumps(doc).encode()

    def headers(self) -> list[tuple[str, str]]:
        out = [("Content-Type", "application/json"), *_NO_STORE, *self.extra_headers]
        if self.retry_after is not None:
            out.append(("Retry-After", str(max(1, self.retry_after))))
        return out

    @classmethod
    def invalid_request(cls, description: str) -> OAuthError:
        return cls(400, "invalid_request", description)

    @classmethod
    def invalid_grant(cls, description: str) -> OAuthError:
        return cls(400, "invalid_grant", description)

    @classmethod
    def invalid_client(cls, description: str) -> OAuthError:
        return cls(401, "invalid_client", description)

    @classmethod
    def unauthorized_client(cls, description: str) -> OAuthError:
        return cls(400, "unauthorized_client", description)

    @classmethod
    def throttled(cls, seconds: float) -> OAuthError:
        wait = int(seconds) + 1
        return cls(429, "slow_down", f"too many failed attempts; retry in {wait} s", wait)

    @classmethod
    def server_error(cls) -> OAuthError:
        return cls(503, "temporarily_unavailable", "activation service unavailable", 5)


@dataclass(frozen=True)
class ActivationGrant:
    code: str = field(repr=False)


@dataclass(frozen=True)
class RefreshGrant:
    refresh_token: str = field(repr=False)


TokenRequest = ActivationGrant | RefreshGrant


def parse_token_request(
    method: str, content_type: str | None, body: bytes, query: bytes = b""
) -> TokenRequest:
    """Read a token request; :class:`OAuthError` (``invalid_request``…) when it is not one.

    Parameters must be in the form body (RFC 6749 §3.2), never in the query string, and none
    may repeat (§3.1).
    """
    if method != "POST":
        raise OAuthError(405, "invalid_request", "use POST", extra_headers=(("Allow", "POST"),))
    if query:
        raise OAuthError.invalid_request("parameters belong in the request body")
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != FORM_TYPE:
        raise OAuthError.invalid_request(f"the body must be {FORM_TYPE}")
    if len(body) > MAX_BODY:
        raise OAuthError.invalid_request("request body too large")
    try:
        pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise OAuthError.invalid_request("the body is not form-encoded") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            raise OAuthError.invalid_request(f"parameter {key} repeated")
        params[key] = value
    grant = params.get("grant_type")
    if not grant:
        raise OAuthError.invalid_request("grant_type is required")
    if grant == ACTIVATION_GRANT:
        code = params.get("code", "")
        if not code:
            raise OAuthError.invalid_request("code is required")
        return ActivationGrant(code)
    if grant == REFRESH_GRANT:
        token = params.get("refresh_token", "")
        if not token:
            raise OAuthError.invalid_request("refresh_token is required")
        return RefreshGrant(token)
    raise OAuthError(400, "unsupported_grant_type", "grant_type not supported")


def token_response(
    access_token: str,
    expires_in: int,
    refresh_token: str | None = None,
    scope: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[int, list[tuple[str, str]], bytes]:
    """RFC 6749 §5.1: (status, headers, body)."""
    doc: dict[str, Any] = {
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": expires_in,
    }
    if refresh_token is not None:
        doc["refresh_token"] = refresh_token
    if scope:
        doc["scope"] = scope
    doc.update(extra or {})
    headers = [("Content-Type", "application/json"), *_NO_STORE]
    return 200, headers, json.dumps(doc).encode()


def metadata(issuer: str, *, scopes: Iterable[str], signing_algorithms: Iterable[str]) -> bytes:
    """RFC 8414 authorization-server metadata for an issuer ``https://host:port``."""
    doc = {
        "issuer": issuer,
        "token_endpoint": f"{issuer}/oauth/token",
        "jwks_uri": f"{issuer}/.well-known/jwks.json",
        "grant_types_supported": [ACTIVATION_GRANT, REFRESH_GRANT],
        "response_types_supported": [],
        "token_endpoint_auth_methods_supported": ["tls_client_auth"],
        "tls_client_certificate_bound_access_tokens": True,
        "scopes_supported": list(scopes),
        "access_token_signing_alg_values_supported": list(signing_algorithms),
        "callboard_config_endpoint": f"{issuer}/config/",
    }
    return json.dumps(doc, indent=2).encode()


# Bearer tokens ------------------------------------------------------------------------------


def bearer_from_http(header: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (RFC 6750 §2.1); None if absent or not
    a bearer credential. A malformed bearer credential is returned as is (it will not verify)."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return rest.strip() or None


def bearer_from_sip(headers: Iterable[tuple[str, str]]) -> str | None:
    """The token of a SIP request's credentials, given (lower-case name, value) pairs.

    ``Authorization: Bearer <token>`` (RFC 8898 §2.3) and Cisco's
    ``Proxy-Authorization: Bearer token="<token>"`` (after a 407) are both read.
    """
    for _name, value in headers:
        scheme, _, rest = value.strip().partition(" ")
        if scheme.lower() != "bearer":
            continue
        rest = rest.strip()
        m = re.match(r'^token\s*=\s*"([^"]*)"\s*$', rest, re.IGNORECASE)
        if m:
            return m.group(1) or None
        if _B64TOKEN.match(rest):
            return rest
        return rest or None
    return None


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def bearer_challenge(
    realm: str,
    *,
    error: str | None = None,
    description: str | None = None,
    scope: str | None = None,
    authz_server: str | None = None,
) -> str:
    """A ``WWW-Authenticate: Bearer`` value (RFC 6750 §3; RFC 8898 §2.2 adds ``authz_server``)."""
    params = [f"realm={_quoted(realm)}"]
    if scope is not None:
        params.append(f"scope={_quoted(scope)}")
    if authz_server is not None:
        params.append(f"authz_server={_quoted(authz_server)}")
    if error is not None:
        params.append(f"error={_quoted(error)}")
    if description is not None:
        params.append(f"error_description={_quoted(description)}")
    return "Bearer " + ", ".join(params)


def x5t_s256(certificate_der: bytes) -> str:
    """RFC 8705 §3.1: base64url (no padding) of the SHA-256 of the DER certificate."""
    digest = hashlib.sha256(certificate_der).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def thumbprint_hex(x5t: str) -> str | None:
    """An ``x5t#S256`` value as lower-case hex (how fingerprints are stored); None if bad."""
    try:
        raw = base64.urlsafe_b64decode(x5t + "=" * (-len(x5t) % 4))
    except (ValueError, TypeError):
        return None
    return raw.hex() if len(raw) == 32 else None
