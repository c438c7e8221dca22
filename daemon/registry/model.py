"""Plain records of the device registry and the pure rules over them.

Nothing here touches storage or time sources: callers pass ``now`` in. The rules follow
CUCM's: a device is named ``SEP<MAC>`` when its MAC is known and ``BAT<12 hex>`` while it is
a placeholder; a code issued to a ``SEP`` record is bound to that MAC, one issued to a ``BAT``
record to the model.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field, replace
from enum import StrEnum

from callboard.protocols import models
from callboard.protocols.models import MODELS, ModelInfo, model_key
from callboard.protocols.tvs.codec import normalise_activation_code

CODE_DIGITS = 16


class RegistryError(Exception):
    """A request the registry refuses; the message is safe to show an admin."""


class NotFound(RegistryError):
    """No such device or code."""


class Conflict(RegistryError):
    """The change would break a uniqueness rule (MAC, device name, directory number)."""


class Stale(Conflict):
    """The stored rows changed since they were read (another writer got there first);
    nothing was written."""


def model_info(name: str) -> ModelInfo:
    """Look a model up by name, accepting ``CP-8841`` and ``Cisco 8841`` spellings."""
    try:
        return MODELS[model_key(name)]
    except KeyError:
        supported = ", ".join(MODELS)
        raise RegistryError(f"unsupported model {name!r} (supported: {supported})") from None


class Onboarding(StrEnum):
    """Per-model default onboarding method (CUCM's Device Defaults)."""

    ACTIVATION_CODE = "activation-code"
    AUTOREGISTRATION = "autoregistration"
    IVR = "ivr"  # activation code keyed in on a voice-prompt call (daemon/ivr.py)


class DeviceState(StrEnum):
    PROVISIONED = "provisioned"  # configured, no code required: may fetch config and register
    AWAITING_ACTIVATION = "awaiting-activation"
    ACTIVE = "active"  # a code was redeemed (or autoregistered)


class CodeState(StrEnum):
    ISSUED = "issued"
    USED = "used"
    RELEASED = "released"
    EXPIRED = "expired"


_NAME_RE = re.compile(r"^(SEP|BAT)([0-9A-F]{12})$")
_DN_RE = re.compile(r"^[0-9A-Za-z*#+._-]{1,32}$")


def normalise_mac(raw: str) -> str:
    """The MAC as 12 upper-case hex digits, or a :class:`RegistryError` saying why not."""
    try:
        return models.normalise_mac(raw)
    except ValueError as exc:
        raise RegistryError(str(exc)) from None


def parse_device_name(name: str) -> tuple[str, str]:
    """Split ``SEP001122334455`` into (``SEP``, MAC); refuse anything else."""
    m = _NAME_RE.match(name.strip().upper())
    if not m:
        raise RegistryError(f"invalid device name {name!r}: expected SEP or BAT + 12 hex digits")
    return m.group(1), m.group(2)


def sep_name(mac: str) -> str:
    return "SEP" + normalise_mac(mac)


def new_bat_name() -> str:
    """A dummy name as CUCM's Bulk Administration makes them: BAT + 12 random hex digits."""
    return "BAT" + secrets.token_hex(6).upper()


def new_code() -> str:
    """A 16-digit single-use activation code from the OS CSPRNG."""
    return "".join(secrets.choice("0123456789") for _ in range(CODE_DIGITS))


def normalise_code(raw: str) -> str:
    """Accept a code with the dashes or spaces used to show it; return the 16 digits."""
    try:
        return normalise_activation_code(raw)
    except ValueError as exc:
        raise RegistryError(str(exc)) from None


def group_code(code: str) -> str:
    """Show a code as ``1234-5678-9012-3456`` (spreadsheets keep all digits of that form)."""
    return "-".join(code[i : i + 4] for i in range(0, len(code), 4))


def check_directory_number(dn: str) -> str:
    dn = dn.strip()
    if not _DN_RE.match(dn):
        raise RegistryError(f"invalid directory number {dn!r}")
    return dn


@dataclass(frozen=True, slots=True)
class Line:
    """A directory number on a device, with the SIP credentials the phone registers with."""

    directory_number: str
    display_name: str = ""
    auth_name: str = ""
    auth_password: str = ""


@dataclass(frozen=True, slots=True)
class Device:
    id: str  # stable across renames; codes refer to it
    name: str  # SEP<MAC> or BAT<12 hex>
    model: str
    description: str = ""
    owner_user: str = ""
    lines: tuple[Line, ...] = ()
    requires_activation: bool = False
    state: DeviceState = DeviceState.PROVISIONED
    created_at: float = 0.0
    updated_at: float = 0.0
    activated_at: float | None = None
    mic_sha256: str | None = None
    version: int = 1  # bumped on every change; drives the config versionStamp
    # Remote activation (the edge): CUCM's "Allow Activation Code via MRA"; the generation
    # every OAuth token of the device carries (bumped: all of them fail at once); the serial
    # of the one live refresh token (bumped on each rotation).
    allow_remote: bool = False
    token_generation: int = 0
    refresh_serial: int = 0
    onboarding: Onboarding | None = None  # the device's own method; None: its model's default

    @property
    def mac(self) -> str | None:
        prefix, mac = parse_device_name(self.name)
        return mac if prefix == "SEP" else None

    @property
    def is_placeholder(self) -> bool:
        return self.name.startswith("BAT")

    @property
    def may_fetch_config(self) -> bool:
        """Only a SEP record that is active or needs no code gets its own config file."""
        return not self.is_placeholder and self.state in (
            DeviceState.PROVISIONED,
            DeviceState.ACTIVE,
        )

    def changed(self, now: float, **changes: object) -> Device:
        return replace(self, updated_at=now, version=self.version + 1, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class ActivationCode:
    id: str
    device_id: str
    code: str = field(repr=False)
    issued_at: float
    expires_at: float
    state: CodeState = CodeState.ISSUED
    used_at: float | None = None

    def effective_state(self, now: float) -> CodeState:
        """Expiry is computed, not stored: an issued code past its time is expired."""
        if self.state is CodeState.ISSUED and now >= self.expires_at:
            return CodeState.EXPIRED
        return self.state

    def is_outstanding(self, now: float) -> bool:
        return self.effective_state(now) is CodeState.ISSUED


def binding_of(device: Device) -> str:
    """What a device's code is bound to: ``mac:<MAC>`` or ``model:<name>``."""
    mac = device.mac
    return f"mac:{mac}" if mac else f"model:{device.model}"
