"""The token endpoint's decisions: the activation-code grant and the refresh grant.

The TVS rules, reached over OAuth: the MIC is judged by the same ``ManufacturingTrust``
(the device name and model come from its CN, never from the request), failures count in the
TVS throttles themselves (one budget whichever door a guesser uses), and the code is
redeemed by the same :class:`~callboard.daemon.activation.RegistryAuthority`, with the edge's
extra condition that the device allows remote activation. The client hears the TVS's one
neutral sentence for every refused code; the log has the reason, never the code.

Tokens are issued right after the redemption's commit, from the committed device (its
generation and refresh serial): nothing more needs storing, and a token can never exist for
an activation that did not reach the disk.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

from callboard.protocols.oauth import (
    ActivationGrant,
    OAuthError,
    RefreshGrant,
    TokenRequest,
    token_response,
    x5t_s256,
)
from callboard.protocols.tvs.activation import (
    GENERIC_REJECTION,
    ManufacturingTrust,
    PeerContext,
    Redemption,
    ThrottleStore,
    TVSSettings,
)
from callboard.protocols.tvs.codec import BadElements, DeviceName
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from ..activation import RegistryAuthority
from ..logs import get_logger
from ..registry.model import Device, RegistryError
from ..registry.registry import Registry
from .tokens import SCOPE, TokenRejected, TokenService, current_device

log = get_logger("callboard.edge")

HTTPReply = tuple[int, list[tuple[str, str]], bytes]


class TokenEndpoint:
    """Answers ``POST /oauth/token`` for one edge (shared by its connections)."""

    def __init__(
        self,
        *,
        trust: Callable[[], ManufacturingTrust],
        authority: RegistryAuthority,
        registry: Registry,
        tokens: TokenService,
        tvs_settings: TVSSettings,
        device_throttle: ThrottleStore,
        source_throttle: ThrottleStore,
        remote_enabled: Callable[[], bool],
        describe: Callable[[Device], Mapping[str, Any]],
    ) -> None:
        self._trust = trust
        self._authority = authority
        self._registry = registry
        self._tokens = tokens
        self._tvs = tvs_settings
        self._device_throttle = device_throttle
        self._source_throttle = source_throttle
        self._remote_enabled = remote_enabled
        self._describe = describe

    def handle(self, request: TokenRequest, peer: PeerContext, now: float) -> Deferred[HTTPReply]:
        """The reply for one parsed token request; the Deferred never fails."""
        try:
            if isinstance(request, ActivationGrant):
                d = self._activate(request, peer, now)
            else:
                d = self._refresh(request, peer, now)
        except OAuthError as exc:
            d = fail(exc)
        return d.addErrback(self._error_reply, peer)

    # -- the activation-code grant --------------------------------------------------------

    def _activate(
        self, grant: ActivationGrant, peer: PeerContext, now: float
    ) -> Deferred[HTTPReply]:
        src_key = f"src:{peer.source}"
        if not self._remote_enabled():
            self._log("activate", peer, None, "refused", "remote activation is disabled")
            raise OAuthError.unauthorized_client("remote activation is not enabled")
        wait = self._source_throttle.locked_for(src_key, now)
        if wait > 0:
            self._log("activate", peer, None, "rate_limited", "source locked out")
            raise OAuthError.throttled(wait)
        device = self._client(peer, now, src_key)
        dev_key = f"dev:{device.name}"
        wait = self._device_throttle.locked_for(dev_key, now)
        if wait > 0:
            self._log("activate", peer, device.name, "rate_limited", "device locked out")
            raise OAuthError.throttled(wait)
        assert peer.verdict is not None and peer.verdict.sha256 is not None
        pending = self._authority.redeem(
            mac=device.mac,
            model=device.model,
            code=grant.code,
            mic_sha256=peer.verdict.sha256,
            remote=True,
        )

        def answer(result: Redemption) -> HTTPReply:
            committed = self._registry.find(result.device_name or "")
            if not result.activated or committed is None:
                self._fail(src_key, dev_key, now)
                self._log("activate", peer, device.name, "refused", "see activation refused")
                raise OAuthError.invalid_grant(GENERIC_REJECTION)
            self._log("activate", peer, device.name, "activated", committed.name)
            return self._tokens_for(committed, peer, now)

        return pending.addCallback(answer)

    # -- the refresh grant ------------------------------------------------------------------

    def _refresh(self, grant: RefreshGrant, peer: PeerContext, now: float) -> Deferred[HTTPReply]:
        src_key = f"src:{peer.source}"
        wait = self._source_throttle.locked_for(src_key, now)
        if wait > 0:
            raise OAuthError.throttled(wait)
        self._client(peer, now, src_key)
        mic_sha256 = peer.verdict.sha256 if peer.verdict is not None else None
        try:
            claims = self._tokens.check_refresh(grant.refresh_token, mic_sha256, now)
            current_device(claims, self._registry, remote_enabled=self._remote_enabled())
        except TokenRejected as exc:
            self._source_throttle.failure(src_key, now)
            self._log("refresh", peer, None, "refused", str(exc))
            raise OAuthError.invalid_grant("refresh token not accepted") from None
        assert claims.refresh_serial is not None
        d = self._registry.rotate_refresh(
            claims.device_name, generation=claims.generation, serial=claims.refresh_serial
        )

        def rotated(device: Device) -> HTTPReply:
            self._log("refresh", peer, device.name, "refreshed", f"serial {device.refresh_serial}")
            return self._tokens_for(device, peer, now)

        def lost(failure: Failure) -> Failure:
            if isinstance(failure.value, RegistryError):
                self._source_throttle.failure(src_key, now)
                self._log("refresh", peer, claims.device_name, "refused", str(failure.value))
                return Failure(OAuthError.invalid_grant("refresh token not accepted"))
            return failure

        return d.addCallbacks(rotated, lost)

    # -- shared steps ---------------------------------------------------------------------

    def _client(self, peer: PeerContext, now: float, src_key: str) -> DeviceName:
        """Client authentication (RFC 8705 tls_client_auth): a MIC chaining to the
        manufacturing trust, named ``CP-<model>-SEP<MAC>``; the device is read from it."""
        if peer.verdict is None:
            peer.verdict = self._trust().check(
                peer.leaf,
                peer.chain,
                dt.datetime.fromtimestamp(now, dt.UTC),
                allow_sha1=self._tvs.allow_sha1_mic,
            )
        verdict = peer.verdict
        reason = verdict.reason
        name: DeviceName | None = None
        if verdict.ok:
            try:
                name = DeviceName.parse(verdict.common_name or "")
            except BadElements as exc:
                reason = f"MIC CN {verdict.common_name!r}: {exc}"
        if name is None or verdict.sha256 is None:
            if peer.leaf is not None:
                self._source_throttle.failure(src_key, now)
            self._log("client", peer, None, "invalid_client", reason)
            raise OAuthError.invalid_client("client certificate not accepted")
        return name

    def _tokens_for(self, device: Device, peer: PeerContext, now: float) -> HTTPReply:
        assert peer.leaf is not None
        der = peer.leaf.public_bytes(serialization.Encoding.DER)
        issued = self._tokens.issue(device, x5t_s256(der), now)
        return token_response(
            issued.access_token,
            issued.expires_in,
            issued.refresh_token,
            SCOPE,
            {"device_name": device.name, **self._describe(device)},
        )

    def _fail(self, src_key: str, dev_key: str, now: float) -> None:
        self._source_throttle.failure(src_key, now)
        self._device_throttle.failure(dev_key, now)

    def _error_reply(self, failure: Failure, peer: PeerContext) -> HTTPReply:
        error = failure.value
        if not isinstance(error, OAuthError):
            log.error(
                "edge token endpoint failed",
                source=peer.source,
                error_type=type(error).__name__,
            )
            error = OAuthError.server_error()
        return error.status, error.headers(), error.body()

    @staticmethod
    def _log(
        grant: str, peer: PeerContext, device: DeviceName | str | None, outcome: str, reason: str
    ) -> None:
        name = device.name if isinstance(device, DeviceName) else device
        log.info(
            "edge token request",
            grant=grant,
            device=name,
            source=peer.source,
            outcome=outcome,
            reason=reason,
        )
