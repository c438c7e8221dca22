"""SIP over TLS with bearer tokens (RFC 8898): the registration policy of the OAuth listener.

A REGISTER without a token is challenged ``401`` with ``WWW-Authenticate: Bearer realm,
scope, authz_server``. A token (``Authorization: Bearer <token>``, or Cisco's
``Proxy-Authorization: Bearer token="<token>"``) must verify (signature, issuer, audience,
expiry), be bound to this connection's client certificate (``cnf``), belong to a device that
still holds it (not revoked), and the AoR must be one of that device's lines. The binding
lasts at most as long as the token.

Stock phones activating by voice (issue 14) through the edge compose on top of it: a
REGISTER of a bootstrap account (``bootstrap-<mac>``) goes to the IVR's
:class:`~callboard.daemon.ivr.BootstrapPolicy` (digest with the account's secret) with the MIC
always required (it must chain to the manufacturing trust and name that MAC), behind
:class:`EdgeBootstrapGate` (remote activation enabled and allowed for the device); every other
REGISTER is the bearer policy's, unchanged. :class:`EdgeCallGate` puts the same MIC check in
front of the IVR's dialog server for the activation call; the call itself is the IVR's.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from callboard.protocols.oauth import bearer_challenge, bearer_from_sip
from callboard.protocols.sip.message import (
    Request,
    Response,
    SIPParseError,
    parse_name_addr,
    parse_uri,
    quote,
    response_to,
)
from callboard.protocols.sip.registrar import (
    PolicyDecision,
    RegistrationPolicy,
    RegistrationRequest,
    RequestHandler,
    Source,
)
from twisted.internet.defer import Deferred

from ..ivr import BOOTSTRAP_PREFIX, BootstrapAccount, BootstrapAccounts
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


# --- activation by voice through the edge ------------------------------------------------


def edge_bootstrap_refusal(account: BootstrapAccount, *, remote_enabled: bool) -> str | None:
    """Why a bootstrap account may not be used through the edge, or None: the enterprise
    switch, and a known device's own permission (``--allow-remote``), as for a token."""
    if not remote_enabled:
        return "remote activation is disabled"
    if account.device is not None and not account.device.allow_remote:
        return f"remote activation not allowed for {account.device.name}"
    return None


def _is_bootstrap(user: str | None) -> bool:
    return (user or "").lower().startswith(BOOTSTRAP_PREFIX)


class EdgeBootstrapGate:
    """The edge's policy once voice activation is on: bootstrap REGISTERs must pass
    :func:`edge_bootstrap_refusal`, then ``inner`` decides (a ``BootstrapPolicy`` requiring
    the MIC, wrapping the :class:`BearerPolicy` for every other AoR)."""

    def __init__(
        self,
        inner: RegistrationPolicy,
        accounts: BootstrapAccounts,
        remote_enabled: Callable[[], bool],
    ) -> None:
        self.inner = inner
        self._accounts = accounts
        self._remote_enabled = remote_enabled

    def decide(self, request: RegistrationRequest) -> PolicyDecision | Deferred[PolicyDecision]:
        if _is_bootstrap(request.aor_user):
            account = self._accounts.by_user(request.aor_user)
            why = None
            if account is not None:  # none: the bootstrap policy's 403
                why = edge_bootstrap_refusal(account, remote_enabled=self._remote_enabled())
            if why is not None:
                log.info("edge bootstrap REGISTER refused", aor=request.aor_user,
                         source=request.source, reason=why)  # fmt: skip
                return PolicyDecision.refuse(403, why)
        return self.inner.decide(request)


class EdgeCallGate:
    """The edge's requests other than REGISTER, OPTIONS and REFER, in front of the IVR's
    dialog server (a :class:`~callboard.protocols.sip.registrar.RequestHandler`).

    A new call from a bootstrap account needs this connection's MIC to prove the account's
    MAC (the edge requires it whatever ``ivr.require_mic`` says) and the account to pass
    :func:`edge_bootstrap_refusal`; the IVR then applies its own rules (the activation
    number only, from the registered flow) and redeems the code as a remote activation
    (the device, or the BAT record a BAT code names, must allow it). A bootstrap account's
    request of a method the dialog server does not take is 403, as every other request of it.
    """

    def __init__(
        self,
        dialogs: RequestHandler,
        accounts: BootstrapAccounts,
        remote_enabled: Callable[[], bool],
        *,
        remote_calls: set[tuple[str, str]],
        warning_host: str = "callboard",
    ) -> None:
        self.dialogs = dialogs
        self._remote_calls = remote_calls  # the IVR's: calls taken here are redeemed as remote
        self.allow = dialogs.allow
        self._accounts = accounts
        self._remote_enabled = remote_enabled
        self._warning_host = warning_host
        self._taken = {m.strip().upper() for m in dialogs.allow.split(",")}

    def handle_request(
        self, req: Request, source: Source, respond: Callable[[Response], None]
    ) -> Response | None:
        method = req.method.upper()
        try:
            caller = parse_uri(parse_name_addr(req.headers.get("from") or "").uri).user
            to_tag = parse_name_addr(req.headers.get("to") or "").param("tag")
        except SIPParseError:
            return self.dialogs.handle_request(req, source, respond)  # it answers 400
        if _is_bootstrap(caller) and method not in self._taken:
            return self._forbidden(req, source, f"a bootstrap account may not send {method}")
        if method == "INVITE" and not to_tag and _is_bootstrap(caller):
            why = self._call_refusal(caller or "", source)
            if why is not None:
                return self._forbidden(req, source, why)
            answer = self.dialogs.handle_request(req, source, respond)
            if answer is None:  # taken (ringing): a refusal is answered at once
                call_id = (req.headers.get("call-id") or "").strip()
                self._remote_calls.add((call_id, source.address))
            return answer
        return self.dialogs.handle_request(req, source, respond)

    def handle_response(self, resp: Response, source: Source) -> None:
        self.dialogs.handle_response(resp, source)

    def _call_refusal(self, caller: str, source: Source) -> str | None:
        account = self._accounts.by_user(caller)
        if account is None:
            return "no bootstrap account (nothing to activate)"
        return self._accounts.mic_refusal(account, source.client_certs) or edge_bootstrap_refusal(
            account, remote_enabled=self._remote_enabled()
        )

    def _forbidden(self, req: Request, source: Source, why: str) -> Response:
        log.info("edge bootstrap request refused", method=req.method, source=source.address,
                 reason=why)  # fmt: skip
        resp = response_to(req, 403, "Forbidden", to_tag=os.urandom(4).hex())
        resp.headers.add("Warning", f"399 {self._warning_host} {quote(why)}")
        return resp
