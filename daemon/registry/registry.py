"""The device registry: the one place that changes device and code state.

Reads come from memory. Every change is first written through the :class:`Store` as one
transaction and only then applied to memory from the very same change list, so memory
never runs ahead of the disk and a failed write leaves both untouched. Listeners hear of
each device change afterwards (the registrar drops bindings, the file service re-renders).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from callboard.protocols.models import MODELS
from callboard.protocols.settings import check_range

from .model import (
    ActivationCode,
    CodeState,
    Conflict,
    Device,
    DeviceState,
    Line,
    NotFound,
    Onboarding,
    RegistryError,
    check_directory_number,
    model_info,
    new_bat_name,
    new_code,
    normalise_code,
    normalise_mac,
    sep_name,
)
from .store import Change, DeleteDevice, PutCode, PutDefault, PutDevice, Store

Clock = Callable[[], float]
DeviceListener = Callable[[Device | None, Device | None], None]


@dataclass(frozen=True)
class RegistrySettings:
    """The registry's rules; also the [registry] configuration section."""

    code_ttl_hours: float = 168.0
    unique_directory_numbers: bool = False

    def validate(self) -> None:
        check_range("code_ttl_hours", self.code_ttl_hours, 0.01, 24 * 3650)


@dataclass(frozen=True)
class DeviceSpec:
    """What an admin gives to create a device (one CLI call or one CSV row)."""

    model: str
    mac: str | None = None
    description: str = ""
    owner_user: str = ""
    lines: tuple[Line, ...] = ()
    requires_activation: bool | None = None  # None: follow the model's default


@dataclass(frozen=True)
class Redeemed:
    """Outcome of a redemption; ``reason`` is for the audit log and never holds the code."""

    ok: bool
    reason: str
    device: Device | None = None


class BulkError(RegistryError):
    """Some rows of a bulk insert are bad; nothing was written."""

    def __init__(self, problems: list[tuple[int, RegistryError]]) -> None:
        self.errors = problems
        self.problems = [(index, str(error)) for index, error in problems]
        super().__init__(f"{len(problems)} bad row(s); nothing was imported")


class Registry:
    def __init__(
        self, store: Store, clock: Clock, settings: RegistrySettings | None = None
    ) -> None:
        self._store = store
        self._clock = clock
        self.settings = settings or RegistrySettings()
        self._listeners: list[DeviceListener] = []
        self._index_key = secrets.token_bytes(32)
        self._devices: dict[str, Device] = {}
        self._by_name: dict[str, str] = {}
        self._codes: dict[str, ActivationCode] = {}
        self._code_of_device: dict[str, str] = {}
        self._code_index: dict[bytes, str] = {}
        self._dn_owners: dict[str, set[str]] = {}
        self._defaults: dict[str, Onboarding] = {}
        self.defaults_version = 0  # bumped on every change of a model's default
        snapshot = store.load()
        self._remember(
            [PutDevice(d) for d in snapshot.devices]
            + [PutCode(c) for c in sorted(snapshot.codes, key=lambda c: c.issued_at)]
            + [PutDefault(m, o) for m, o in snapshot.defaults.items()]
        )

    # -- reads -------------------------------------------------------------------------

    def subscribe(self, listener: DeviceListener) -> None:
        self._listeners.append(listener)

    def devices(self) -> list[Device]:
        return sorted(self._devices.values(), key=lambda d: d.name)

    def __len__(self) -> int:
        return len(self._devices)

    def find(self, name: str) -> Device | None:
        device_id = self._by_name.get(name.strip().upper())
        return self._devices.get(device_id) if device_id else None

    def get(self, name: str) -> Device:
        device = self.find(name)
        if device is None:
            raise NotFound(f"no device named {name!r}")
        return device

    def current_code(self, device: Device) -> ActivationCode | None:
        """The device's latest code, whatever its state (None if it never had one)."""
        code_id = self._code_of_device.get(device.id)
        return self._codes.get(code_id) if code_id else None

    def outstanding_code(self, device: Device) -> ActivationCode | None:
        code = self.current_code(device)
        return code if code and code.is_outstanding(self._clock()) else None

    def outstanding_codes(self) -> list[tuple[Device, ActivationCode]]:
        now = self._clock()
        found = []
        for device_id, code_id in self._code_of_device.items():
            code = self._codes[code_id]
            if code.is_outstanding(now):
                found.append((self._devices[device_id], code))
        return sorted(found, key=lambda pair: pair[0].name)

    def onboarding(self, model: str) -> Onboarding:
        return self._defaults.get(model_info(model).name, Onboarding.ACTIVATION_CODE)

    def defaults(self) -> dict[str, Onboarding]:
        """Every supported model's onboarding method (activation code unless changed)."""
        return {name: self.onboarding(name) for name in MODELS}

    def now(self) -> float:
        return self._clock()

    # -- admin changes -----------------------------------------------------------------

    def add_device(self, spec: DeviceSpec) -> Device:
        try:
            return self.add_devices([spec])[0]
        except BulkError as exc:
            raise exc.errors[0][1] from None

    def add_devices(self, specs: Sequence[DeviceSpec], *, dry_run: bool = False) -> list[Device]:
        """Insert devices in one transaction: all of them, or none and a :class:`BulkError`.

        ``dry_run`` checks every spec against the registry and each other, writing nothing.
        """
        now = self._clock()
        problems: list[tuple[int, RegistryError]] = []
        changes: list[Change] = []
        created: list[Device] = []
        claimed_names: set[str] = set()
        claimed_dns: set[str] = set()
        for index, spec in enumerate(specs):
            try:
                device = self._new_device(spec, now)
                if device.name in claimed_names or device.name in self._by_name:
                    raise Conflict(f"a device for MAC {device.mac} already exists")
                dns = {ln.directory_number for ln in device.lines}
                if self.settings.unique_directory_numbers:
                    taken = sorted(dn for dn in dns if dn in claimed_dns or self._dn_owners.get(dn))
                    if taken:
                        raise Conflict(f"directory number {taken[0]} is already in use")
            except RegistryError as exc:
                problems.append((index, exc))
                continue
            claimed_names.add(device.name)
            claimed_dns |= dns
            created.append(device)
            changes.append(PutDevice(device))
            if device.requires_activation:
                changes.append(PutCode(self._issue(device, now)))
        if problems:
            raise BulkError(problems)
        if not dry_run:
            self._commit(changes)
        return created

    def set_mac(self, name: str, mac: str | None) -> Device:
        """Give a device its real MAC (BAT→SEP) or blank it (SEP→new BAT).

        Blanking the MAC of a device that requires activation puts it back to awaiting
        activation with a fresh code, as re-onboarding a replaced phone needs.
        """
        device = self.get(name)
        now = self._clock()
        changes: list[Change] = []
        if mac is None:
            if device.is_placeholder:
                return device
            new = device.changed(now, name=self._unused_bat_name())
            if new.requires_activation:
                new = replace(new, state=DeviceState.AWAITING_ACTIVATION, activated_at=None)
                changes.extend(self._void_code(new, now))
                changes.append(PutCode(self._issue(new, now)))
        else:
            target = sep_name(mac)
            if target == device.name:
                return device
            if target in self._by_name:
                raise Conflict(f"MAC {mac} already belongs to {target}")
            new = device.changed(now, name=target)
        self._commit([PutDevice(new), *changes])
        return new

    def set_requires_activation(self, name: str, required: bool) -> Device:
        device = self.get(name)
        if required:
            return self.generate_code(name)[0]
        if not device.requires_activation:
            return device
        now = self._clock()
        state = DeviceState.ACTIVE if device.activated_at else DeviceState.PROVISIONED
        new = device.changed(now, requires_activation=False, state=state)
        self._commit([PutDevice(new), *self._void_code(new, now)])
        return new

    def generate_code(self, name: str) -> tuple[Device, ActivationCode]:
        """Issue a new code, voiding the old one; the device must then (re-)activate.

        On an active device this is CUCM's re-onboarding: it goes back to awaiting
        activation at once, so its config is no longer served and its bindings drop.
        """
        device = self.get(name)
        now = self._clock()
        new = device.changed(
            now,
            requires_activation=True,
            state=DeviceState.AWAITING_ACTIVATION,
        )
        code = self._issue(new, now)
        self._commit([PutDevice(new), *self._void_code(new, now), PutCode(code)])
        return new, code

    def release_code(self, name: str) -> ActivationCode:
        """Void a device's outstanding code (CUCM's "Release Activation Code")."""
        device = self.get(name)
        now = self._clock()
        changes = self._void_code(device, now)
        if not changes:
            raise NotFound(f"{device.name} has no outstanding activation code")
        self._commit(changes)
        released = changes[0]
        assert isinstance(released, PutCode)
        return released.code

    def delete(self, name: str) -> Device:
        device = self.get(name)
        self._commit([DeleteDevice(device.id)])
        return device

    def set_default(self, model: str, onboarding: Onboarding) -> None:
        self._commit([PutDefault(model_info(model).name, onboarding)])

    # -- phone-driven changes ------------------------------------------------------------

    def redeem(self, *, mac: str, model: str, code: str, mic_sha256: str) -> Redeemed:
        """Redeem a code for a phone proven (by its MIC) to have ``mac`` and ``model``.

        All checks and the write happen here in one step: the code becomes used, a BAT
        record becomes SEP<mac>, the device becomes active, and the MIC fingerprint is
        recorded, durably, before this returns.
        """
        now = self._clock()
        try:
            digits = normalise_code(code)
            mac = normalise_mac(mac)
            phone_model = model_info(model).name
        except RegistryError as exc:
            return Redeemed(False, str(exc))
        code_id = self._code_index.get(self._index_digest(digits))
        stored = self._codes.get(code_id) if code_id else None
        if stored is None or not hmac.compare_digest(stored.code, digits):
            return Redeemed(False, "unknown activation code")
        state = stored.effective_state(now)
        if state is not CodeState.ISSUED:
            return Redeemed(False, f"activation code is {state.value}")
        device = self._devices[stored.device_id]
        if device.is_placeholder:
            if device.model != phone_model:
                return Redeemed(False, f"code is bound to model {device.model}")
            target = "SEP" + mac
            if target in self._by_name:
                return Redeemed(False, f"MAC {mac} already belongs to another device")
        else:
            if device.mac != mac:
                return Redeemed(False, f"code is bound to another MAC ({device.name})")
            if device.model != phone_model:
                return Redeemed(False, f"{device.name} is provisioned as model {device.model}")
            target = device.name
        new = device.changed(
            now,
            name=target,
            state=DeviceState.ACTIVE,
            activated_at=now,
            mic_sha256=mic_sha256,
        )
        used = replace(stored, state=CodeState.USED, used_at=now)
        self._commit([PutDevice(new), PutCode(used)])
        return Redeemed(True, "activated", new)

    def autoregister(self, *, mac: str, model: str, line: Line) -> Device:
        """Create an active SEP record for an unknown phone (CUCM auto-registration)."""
        now = self._clock()
        device = self._new_device(
            DeviceSpec(model=model, mac=mac, lines=(line,), requires_activation=False), now
        )
        if device.name in self._by_name:
            raise Conflict(f"a device for MAC {device.mac} already exists")
        device = replace(device, state=DeviceState.ACTIVE, activated_at=now)
        self._commit([PutDevice(device)])
        return device

    def directory_number_in_use(self, dn: str) -> bool:
        return bool(self._dn_owners.get(dn))

    # -- internals -----------------------------------------------------------------------

    def _new_device(self, spec: DeviceSpec, now: float) -> Device:
        info = model_info(spec.model)
        name = sep_name(spec.mac) if spec.mac else self._unused_bat_name()
        lines = tuple(
            replace(
                ln,
                directory_number=check_directory_number(ln.directory_number),
                auth_name=ln.auth_name or ln.directory_number.strip(),
            )
            for ln in spec.lines
        )
        dns = [ln.directory_number for ln in lines]
        if len(set(dns)) != len(dns):
            raise RegistryError("a directory number appears twice on one device")
        required = (
            spec.requires_activation
            if spec.requires_activation is not None
            else self.onboarding(info.name) is Onboarding.ACTIVATION_CODE
        )
        return Device(
            id=uuid.uuid4().hex,
            name=name,
            model=info.name,
            description=spec.description,
            owner_user=spec.owner_user,
            lines=lines,
            requires_activation=required,
            state=DeviceState.AWAITING_ACTIVATION if required else DeviceState.PROVISIONED,
            created_at=now,
            updated_at=now,
        )

    def _unused_bat_name(self) -> str:
        while True:
            name = new_bat_name()
            if name not in self._by_name:
                return name

    def _issue(self, device: Device, now: float) -> ActivationCode:
        while True:
            digits = new_code()
            if self._index_digest(digits) not in self._code_index:
                break
        return ActivationCode(
            id=uuid.uuid4().hex,
            device_id=device.id,
            code=digits,
            issued_at=now,
            expires_at=now + self.settings.code_ttl_hours * 3600.0,
        )

    def _void_code(self, device: Device, now: float) -> list[Change]:
        code = self.current_code(device)
        if code is None or not code.is_outstanding(now):
            return []
        return [PutCode(replace(code, state=CodeState.RELEASED))]

    def _index_digest(self, digits: str) -> bytes:
        return hmac.new(self._index_key, digits.encode(), hashlib.sha256).digest()

    def _commit(self, changes: list[Change]) -> None:
        self._store.apply(changes)
        events = self._remember(changes)
        for old, new in events:
            for listener in self._listeners:
                listener(old, new)

    def _remember(self, changes: Iterable[Change]) -> list[tuple[Device | None, Device | None]]:
        """Apply already-stored changes to memory; return (old, new) device pairs."""
        events: list[tuple[Device | None, Device | None]] = []
        for change in changes:
            if isinstance(change, PutDevice):
                new = change.device
                old = self._devices.get(new.id)
                if old is not None:
                    self._forget_device_indexes(old)
                self._devices[new.id] = new
                self._by_name[new.name] = new.id
                for ln in new.lines:
                    self._dn_owners.setdefault(ln.directory_number, set()).add(new.id)
                events.append((old, new))
            elif isinstance(change, DeleteDevice):
                old = self._devices.pop(change.device_id, None)
                if old is not None:
                    self._forget_device_indexes(old)
                    code_id = self._code_of_device.pop(old.id, None)
                    if code_id:
                        self._drop_code(code_id)
                    events.append((old, None))
            elif isinstance(change, PutCode):
                code = change.code
                previous = self._code_of_device.get(code.device_id)
                if previous and previous != code.id:
                    self._drop_code(previous)
                self._codes[code.id] = code
                self._code_of_device[code.device_id] = code.id
                digest = self._index_digest(code.code)
                if code.state is CodeState.ISSUED:
                    self._code_index[digest] = code.id
                else:
                    self._code_index.pop(digest, None)
            else:
                self._defaults[change.model] = change.onboarding
                self.defaults_version += 1
        return events

    def _drop_code(self, code_id: str) -> None:
        code = self._codes.pop(code_id, None)
        if code is not None:
            digest = self._index_digest(code.code)
            if self._code_index.get(digest) == code_id:
                del self._code_index[digest]

    def _forget_device_indexes(self, device: Device) -> None:
        if self._by_name.get(device.name) == device.id:
            del self._by_name[device.name]
        for ln in device.lines:
            owners = self._dn_owners.get(ln.directory_number)
            if owners:
                owners.discard(device.id)
                if not owners:
                    del self._dn_owners[ln.directory_number]
