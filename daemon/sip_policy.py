"""Who may register: the registrar's policy, answered from the device registry.

A phone registers only as a device that exists and is active (activated, or needing no
code), with the MAC in ``+sip.instance`` and the model ID agreeing with the record, and for
an address-of-record that is one of the device's directory numbers. Unknown phones of a
model whose default onboarding method is auto-registration are created on the spot with
the next free number of the configured range, as CUCM does.

Decisions come from memory and are plain values, except an auto-registration: it writes a
device, so its decision is a Deferred that fires once the record is durable (the
registrar answers the phone then). A second REGISTER from the same phone while that write
is in flight waits for it and is then decided like any known phone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from callboard.protocols.models import MODELS
from callboard.protocols.settings import SettingError, config_key
from callboard.protocols.sip.registrar import PolicyDecision, RegistrationRequest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from .logs import get_logger
from .registry.model import Device, DeviceState, Line, Onboarding, RegistryError
from .registry.registry import Registry

log = get_logger("callboard.sip.policy")

_BY_MODEL_ID: dict[str, list[str]] = {}
for _name, _info in MODELS.items():
    _BY_MODEL_ID.setdefault(_info.model_id, []).append(_name)


@dataclass(frozen=True)
class AutoRegistration:
    """The directory-number range auto-registered phones draw from (inclusive).

    Also the auto-registration part of the [sip] configuration section; empty: off.
    """

    first: str = field(default="", metadata=config_key("autoregistration_first"))
    last: str = field(default="", metadata=config_key("autoregistration_last"))

    @property
    def enabled(self) -> bool:
        return bool(self.first)

    def validate(self) -> None:
        first, last = self.first, self.last
        if bool(first) != bool(last):
            raise SettingError("first", "autoregistration_first and _last are set together")
        if first and not (
            first.isdigit()
            and last.isdigit()
            and len(first) == len(last)
            and int(first) <= int(last)
        ):
            raise SettingError("first", "first..last must be a range of equal-length numbers")

    def numbers(self) -> list[str]:
        width = len(self.first)
        return [str(n).zfill(width) for n in range(int(self.first), int(self.last) + 1)]


Decision = PolicyDecision | Deferred[PolicyDecision]


class RegistryPolicy:
    """:class:`~callboard.protocols.sip.registrar.RegistrationPolicy` over the registry."""

    def __init__(self, registry: Registry, autoregistration: AutoRegistration | None) -> None:
        self._registry = registry
        self._autoregistration = autoregistration
        self._creating: dict[str, list[Deferred[None]]] = {}  # device name -> waiters

    def decide(self, request: RegistrationRequest) -> Decision:
        name = request.device_name
        if name is None:
            if request.is_removal and request.bound_devices:
                # `Contact: *` carries no Cisco parameters: the bound device answers for it.
                name = request.bound_devices[0]
            else:
                return PolicyDecision.refuse(404, "no +u.sip!devicename.ccm.cisco.com parameter")
        device = self._registry.find(name)
        if self._registry.shared and not _settled(device):
            # Activated or added through another worker or node a moment ago, perhaps:
            # read the change feed before telling a phone it is unknown or not active.
            return self._registry.settled().addCallback(
                lambda _: self._decide(name, self._registry.find(name), request)
            )
        return self._decide(name, device, request)

    def _decide(self, name: str, device: Device | None, request: RegistrationRequest) -> Decision:
        if device is None:
            if name.upper() in self._creating:
                return self._after_creation(name.upper(), request)
            return self._unknown(name, request)
        return self._known(device, request)

    def _known(self, device: Device, request: RegistrationRequest) -> PolicyDecision:
        if device.state is DeviceState.AWAITING_ACTIVATION or device.is_placeholder:
            return PolicyDecision.refuse(403, f"{device.name} is awaiting activation")
        if request.device_name is not None:
            if not _mac_matches(device, request.mac):
                return PolicyDecision.refuse(403, f"+sip.instance MAC does not match {device.name}")
            if request.model_id != MODELS[device.model].model_id:
                return PolicyDecision.refuse(
                    403, f"model {request.model_id} does not match {device.name} ({device.model})"
                )
        for line in device.lines:
            if line.directory_number == request.aor_user:
                credentials = (
                    (line.auth_name or line.directory_number, line.auth_password)
                    if line.auth_password
                    else None
                )
                return PolicyDecision.allow(device.name, credentials)
        return PolicyDecision.refuse(
            403, f"{request.aor_user} is not a directory number of {device.name}"
        )

    def _unknown(self, name: str, request: RegistrationRequest) -> Decision:
        models = _BY_MODEL_ID.get(request.model_id or "", [])
        auto = [m for m in models if self._registry.onboarding(m) is Onboarding.AUTOREGISTRATION]
        if not auto or self._autoregistration is None:
            return PolicyDecision.refuse(404, f"{name} is not a known device")
        if request.mac is None or name.upper() != "SEP" + request.mac.upper():
            return PolicyDecision.refuse(403, "auto-registration needs matching devicename and MAC")
        number = next(
            (
                n
                for n in self._autoregistration.numbers()
                if not self._registry.directory_number_in_use(n)
            ),
            None,
        )
        if number is None:
            log.warning("auto-registration range exhausted", device=name, source=request.source)
            return PolicyDecision.refuse(403, "auto-registration range exhausted")
        return self._autoregister(name.upper(), request.mac, auto[0], number, request)

    def _autoregister(
        self, name: str, mac: str, model: str, number: str, request: RegistrationRequest
    ) -> Deferred[PolicyDecision]:
        """Write the new device; decide once it is durable (the registry claims the number
        meanwhile, so concurrent phones draw different ones)."""
        self._creating[name] = []

        def created(device: Device) -> PolicyDecision:
            log.info("device auto-registered", device=device.name, model=device.model,
                     directory_number=number, source=request.source)  # fmt: skip
            return PolicyDecision.allow(device.name)

        def refused(failure: Failure) -> PolicyDecision:
            if isinstance(failure.value, RegistryError):
                return PolicyDecision.refuse(403, str(failure.value))
            log.error("auto-registration failed", device=name, error=str(failure.value))
            return PolicyDecision.refuse(403, "auto-registration failed")

        def wake_waiters(result: PolicyDecision) -> PolicyDecision:
            for waiter in self._creating.pop(name, []):
                waiter.callback(None)
            return result

        d = self._registry.autoregister(mac=mac, model=model, line=Line(number, f"Auto {number}"))
        return d.addCallbacks(created, refused).addCallback(wake_waiters)

    def _after_creation(self, name: str, request: RegistrationRequest) -> Deferred[PolicyDecision]:
        waiter: Deferred[None] = Deferred()
        self._creating[name].append(waiter)

        def again(_: None) -> PolicyDecision:
            device = self._registry.find(name)
            if device is None:
                return PolicyDecision.refuse(404, f"{name} is not a known device")
            return self._known(device, request)

        return waiter.addCallback(again)


def _settled(device: Device | None) -> bool:
    """A device this view may answer for without news from other writers."""
    return (
        device is not None
        and device.state is not DeviceState.AWAITING_ACTIVATION
        and (not device.is_placeholder)
    )


def _mac_matches(device: Device, mac: str | None) -> bool:
    """Whether ``mac`` is the device's MAC: told by its SEP name at once (``Device.mac``
    reads the name with a regular expression, once per REGISTER otherwise)."""
    if mac is None:
        return False
    mac = mac.upper()
    return device.name == "SEP" + mac or mac == device.mac
