"""The pinned MIC: how a stock phone, which has no OAuth token, uses the edge after activation.

Every activation records the SHA-256 of the certificate that proved the phone (``mic_sha256``
on the device: TVS, the OAuth grant, and keypad activation over the edge's SIP over TLS). A
connection to the edge whose client certificate chains to the manufacturing trust (the TVS
chain rules), names ``SEP<MAC>`` of an active device that may be used remotely, and whose
fingerprint is the one recorded on that device, speaks for that device without a token:

- ``GET /config/<file>`` serves exactly what the bearer path serves (``web.ConfigResource``);
- a REGISTER of one of its lines on the SIP over TLS port is the LAN registrar's
  (:class:`~callboard.daemon.sip_policy.RegistryPolicy`: the line's digest credentials, which
  the registrar checks), with the device fixed by the certificate (:class:`PinnedMicPolicy`);
  a line without a SIP password needs a token, as before (two factors on the internet).

``device revoke-tokens`` and blanking the MAC clear the pin (``Registry.revoke_tokens``,
``Registry.set_mac``); re-activation records a new one. Anything else goes the token way.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import replace

from callboard.protocols.models import MODELS
from callboard.protocols.oauth import bearer_from_sip
from callboard.protocols.sip.registrar import (
    PolicyDecision,
    RegistrationPolicy,
    RegistrationRequest,
)
from callboard.protocols.tvs.activation import ManufacturingTrust, MicVerdict
from callboard.protocols.tvs.codec import BadElements, DeviceName
from cryptography import x509
from twisted.internet.defer import Deferred

from ..logs import get_logger
from ..registry.model import Device, DeviceState
from ..registry.registry import Registry

log = get_logger("callboard.edge")


class NotPinned(Exception):
    """The connection's certificate does not speak for a device; the message is for the log."""


class PinnedMic:
    """Finds the device a connection's client certificate is pinned to."""

    def __init__(
        self,
        *,
        registry: Registry,
        trust: Callable[[], ManufacturingTrust],
        remote_enabled: Callable[[], bool],
        allow_sha1: Callable[[], bool],
        now: Callable[[], float],
    ) -> None:
        self._registry = registry
        self._trust = trust
        self._remote_enabled = remote_enabled
        self._allow_sha1 = allow_sha1
        self._now = now

    def verdict(
        self, leaf: x509.Certificate | None, chain: Sequence[x509.Certificate]
    ) -> MicVerdict:
        """The TVS chain check of the certificate, now."""
        when = dt.datetime.fromtimestamp(self._now(), dt.UTC)
        return self._trust().check(leaf, chain, when, allow_sha1=self._allow_sha1())

    def device(self, verdict: MicVerdict) -> Device:
        """The active, remote-allowed device whose recorded MIC is this very certificate."""
        if not self._remote_enabled():
            raise NotPinned("remote access is disabled")
        if not verdict.ok:
            raise NotPinned(f"client certificate refused: {verdict.reason}")
        try:
            named = DeviceName.parse(verdict.common_name or "")
        except BadElements:
            raise NotPinned(f"client certificate names {verdict.common_name!r}") from None
        device = self._registry.find(named.sep_name)
        if device is None:
            raise NotPinned(f"no device {named.sep_name}")
        if not device.mic_sha256 or device.mic_sha256.lower() != (verdict.sha256 or "").lower():
            raise NotPinned(f"{device.name} has no MIC pinned, or another one")
        if not device.allow_remote:
            raise NotPinned(f"{device.name} may not be used remotely")
        if device.state is not DeviceState.ACTIVE or not device.may_fetch_config:
            raise NotPinned(f"{device.name} is {device.state.value}")
        return device


class PinnedMicPolicy:
    """The edge's REGISTER policy for connections with a pinned MIC and no bearer token: the
    LAN's policy (``lan``, whose credentials the registrar checks by digest) for the device
    the certificate names; every other REGISTER goes to ``inner`` (the bearer policy, whose
    challenge stays ``Bearer``)."""

    def __init__(
        self, inner: RegistrationPolicy, lan: RegistrationPolicy, pinned: PinnedMic
    ) -> None:
        self.inner = inner
        self._lan = lan
        self._pinned = pinned

    def decide(self, request: RegistrationRequest) -> PolicyDecision | Deferred[PolicyDecision]:
        if not request.client_certs or bearer_from_sip(request.authorization) is not None:
            return self.inner.decide(request)
        certs = request.client_certs
        try:
            device = self._pinned.device(self._pinned.verdict(certs[0], certs[1:]))
        except NotPinned as exc:
            log.debug("edge REGISTER: no pinned MIC", source=request.source, reason=str(exc))
            return self.inner.decide(request)
        if request.aor_user not in {ln.directory_number for ln in device.lines}:
            return PolicyDecision.refuse(403, f"{request.aor_user} is not a line of {device.name}")
        asked = request
        if request.device_name is None and not request.is_removal:
            # The certificate names the device; a phone that sent no Cisco parameters is it.
            asked = replace(
                request,
                device_name=device.name,
                mac=(device.mac or "").lower(),
                model_id=MODELS[device.model].model_id,
            )
        decision = self._lan.decide(asked)
        if isinstance(decision, Deferred):
            return decision.addCallback(self._for_device, device, request)
        return self._for_device(decision, device, request)

    def _for_device(
        self, decision: PolicyDecision, device: Device, request: RegistrationRequest
    ) -> PolicyDecision | Deferred[PolicyDecision]:
        """The LAN policy's answer, when it is about the device the certificate is pinned to
        and asks for digest: a line without a SIP password is the token's alone."""
        if not decision.allowed:
            return decision
        if (decision.device_name or "").upper() != device.name:
            return PolicyDecision.refuse(403, f"the client certificate is {device.name}'s")
        if decision.credentials is None:
            return self.inner.decide(request)
        return decision
