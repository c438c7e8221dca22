"""The TVS activation authority: redeeming a code is the registry's durable ``redeem``.

The phone is answered only when the Deferred fires, that is once the redemption is on disk.
The detailed reason goes to the log; the phone hears one neutral sentence for every
refusal, so that a guesser learns nothing from it.
"""

from __future__ import annotations

from callboard.protocols.tvs.activation import Redemption
from twisted.internet.defer import Deferred

from .logs import get_logger
from .registry.registry import Redeemed, Registry

log = get_logger("callboard.activation")


class RegistryAuthority:
    """:class:`~callboard.protocols.tvs.activation.ActivationAuthority` over the registry."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def redeem(
        self, *, mac: str, model: str, code: str, mic_sha256: str, remote: bool = False
    ) -> Deferred[Redemption]:
        """``remote``: the edge asks (the device must allow remote activation)."""

        def outcome(result: Redeemed) -> Redemption:
            if result.ok and result.device is not None:
                log.info(
                    "device activated",
                    device=result.device.name,
                    model=model,
                    mic_sha256=mic_sha256,
                    remote=remote,
                )
                return Redemption(True, result.device.name, "activated")
            log.info(
                "activation refused", mac=mac, model=model, reason=result.reason, remote=remote
            )
            return Redemption(False, None, "activation code not accepted")

        d = self._registry.redeem(
            mac=mac, model=model, code=code, mic_sha256=mic_sha256, remote=remote
        )
        return d.addCallback(outcome)
