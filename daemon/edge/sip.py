"""SIP over TLS with bearer tokens (RFC 8898): the registration policy of the OAuth listener.

A REGISTER without a token is challenged ``401`` with ``WWW-Authenticate: Bearer realm,
scope, authz_server``. A token (``Authorization: Bearer <token>``, or Cisco's
``Proxy-Authorization: Bearer token="<token>"``) must verify (signature, issuer, audience,
expiry), be bound to this connection's client certificate (``cnf``), belong to a device that
still holds it (not revoked), and the AoR must be one of that device's lines. The binding
lasts at most as long as the token.
"""

from __future__ import annotations

from collections.abc import Callable

from callboard.protocols.oauth import bearer_challenge, bearer_from_sip
from callboard.protocols.sip.registrar import PolicyDecision, RegistrationRequest

from ..logs import get_logger
from ..registry.registry import Registry
from .tokens import SCOPE, TokenRejected, TokenService, current_device

log = get_logger("callboard.edge")


class BearerPolicy:
    """:class:`~callboard.protocols.sip.registrar.RegistrationPolicy` for bearer tokens."""

    def __init__(
        self,
        *,
        tokens: TokenService,
        registry: Registry,
        realm: str,
        authz_server: Callable[[], str],
        remote_enabled: Callable[[], bool],
        now: Callable[[], float],
    ) -> None:
        self._tokens = tokens
        self._registry = registry
        self._realm = realm
        self._authz_server = authz_server
        self._remote_enabled = remote_enabled
        self._now = now

    def decide(self, request: RegistrationRequest) -> PolicyDecision:
        token = bearer_from_sip(request.authorization)
        proxy = any(name == "proxy-authorization" for name, _ in request.authorization)
        if token is None:
            return self._challenge(request, proxy, None, "no bearer token")
        now = self._now()
        try:
            claims = self._tokens.check_access(token, request.client_cert_fingerprint, now)
            device = current_device(claims, self._registry, remote_enabled=self._remote_enabled())
        except TokenRejected as exc:
            return self._challenge(request, proxy, "invalid_token", str(exc))
        if request.aor_user not in {ln.directory_number for ln in device.lines}:
            return PolicyDecision.refuse(403, f"{request.aor_user} is not a line of {device.name}")
        return PolicyDecision(
            True, device_name=device.name, max_expires=int(claims.expires_at - now)
        )

    def _challenge(
        self, request: RegistrationRequest, proxy: bool, error: str | None, why: str
    ) -> PolicyDecision:
        """401 with ``WWW-Authenticate`` (RFC 8898), or 407 with ``Proxy-Authenticate``
        to a client that spoke Cisco's ``Proxy-Authorization`` form."""
        value = bearer_challenge(
            self._realm,
            scope=SCOPE if error is None else None,
            authz_server=self._authz_server(),
            error=error,
        )
        header = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        log.info("edge SIP bearer refused", aor=request.aor_user, source=request.source, reason=why)
        return PolicyDecision.challenge_with(407 if proxy else 401, why, ((header, value),))
