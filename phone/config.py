"""The phone's reading of its provisioning files: ``XMLDefault.cnf.xml`` and ``SEP<MAC>.cnf.xml``.

Plain parsing, no I/O: bytes in, frozen dataclasses out, :class:`ConfigError` for a file that
is not the XML a phone expects. Only what the boot needs is read: call managers, TVS members,
the activation-code model list, and the device's lines, transport and load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from xml.etree import ElementTree as ET

__all__ = [
    "CallManager",
    "ConfigError",
    "DefaultConfig",
    "DeviceConfig",
    "LineConfig",
    "TVSMember",
    "parse_default_config",
    "parse_device_config",
    "parse_hotline",
]


@dataclass(frozen=True)
class TVSMember:
    address: str
    port: int
    priority: int = 0


@dataclass(frozen=True)
class CallManager:
    address: str
    sip_port: int
    secured_sip_port: int
    priority: int = 0


@dataclass(frozen=True)
class LineConfig:
    button: int
    name: str
    display_name: str
    auth_name: str
    auth_password: str = field(repr=False)


@dataclass(frozen=True)
class DefaultConfig:
    """What the phone reads from ``XMLDefault.cnf.xml``."""

    call_managers: tuple[CallManager, ...]
    tvs_members: tuple[TVSMember, ...]
    activation_models: tuple[tuple[str, str], ...]  # (model id, "Cisco 8841")
    activation_devices: frozenset[str] = frozenset()  # "SEP<MAC>" asked for a code one by one

    def requires_code(self, product: str, device_name: str = "") -> bool:
        """My model is listed, or I am (a per-device requirement on an auto-registering model)."""
        if device_name.upper() in self.activation_devices:
            return True
        wanted = product.casefold()
        return any(name.casefold() == wanted for _id, name in self.activation_models)


@dataclass(frozen=True)
class DeviceConfig:
    """What the phone reads from its own ``SEP<MAC>.cnf.xml``."""

    call_managers: tuple[CallManager, ...]
    tvs_members: tuple[TVSMember, ...]
    lines: tuple[LineConfig, ...]
    transport: str  # tcp, udp or tls (transportLayerProtocol 1/2/3)
    load: str
    version_stamp: str
    dial_template: str = ""  # the <dialTemplate> file name, if any (a hotline may be in it)

    @property
    def sip_server(self) -> CallManager | None:
        """The first call manager with a usable SIP port, or None."""
        servers = self.sip_servers
        return servers[0] if servers else None

    @property
    def sip_servers(self) -> tuple[CallManager, ...]:
        """Every call manager with a usable SIP port, in priority order (for failover)."""
        return tuple(
            cm
            for cm in self.call_managers
            if cm.address and (cm.secured_sip_port if self.transport == "tls" else cm.sip_port) > 0
        )


class ConfigError(ValueError):
    """A config file that is not the XML the phone expects."""


def _int(text: str | None, default: int = 0) -> int:
    try:
        return int((text or "").strip())
    except ValueError:
        return default


def _parse_xml(data: bytes, root_tag: str) -> ET.Element:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ConfigError(f"not XML: {exc}") from None
    if root.tag != root_tag:
        raise ConfigError(f"root element is <{root.tag}>, expected <{root_tag}>")
    return root


def _call_managers(members: list[ET.Element]) -> tuple[CallManager, ...]:
    out = [
        CallManager(
            address=(m.findtext("callManager/processNodeName") or "").strip(),
            sip_port=_int(m.findtext("callManager/ports/sipPort")),
            secured_sip_port=_int(m.findtext("callManager/ports/securedSipPort")),
            priority=_int(m.get("priority")),
        )
        for m in members
    ]
    return tuple(sorted(out, key=lambda c: c.priority))


def _tvs_members(root: ET.Element) -> tuple[TVSMember, ...]:
    out = [
        TVSMember(
            address=(m.findtext("address") or "").strip(),
            port=_int(m.findtext("port"), 2445),
            priority=_int(m.get("priority")),
        )
        for m in root.findall("TVS/members/member")
    ]
    return tuple(sorted((m for m in out if m.address), key=lambda m: m.priority))


def parse_default_config(data: bytes) -> DefaultConfig:
    root = _parse_xml(data, "Default")
    models = tuple(
        (m.get("id", ""), m.get("name", "")) for m in root.findall("activationCodeOnboarding/model")
    )
    devices = frozenset(
        d.get("name", "").upper() for d in root.findall("activationCodeOnboarding/device")
    )
    return DefaultConfig(
        call_managers=_call_managers(root.findall("callManagerGroup/members/member")),
        tvs_members=_tvs_members(root),
        activation_models=models,
        activation_devices=devices,
    )


_TRANSPORTS = {"1": "tcp", "2": "udp", "3": "tls"}


def parse_device_config(data: bytes) -> DeviceConfig:
    root = _parse_xml(data, "device")
    lines = tuple(
        LineConfig(
            button=_int(line.get("button"), i),
            name=(line.findtext("name") or "").strip(),
            display_name=(line.findtext("displayName") or "").strip(),
            auth_name=(line.findtext("authName") or "").strip(),
            auth_password=line.findtext("authPassword") or "",
        )
        for i, line in enumerate(root.findall("sipProfile/sipLines/line"), start=1)
        if (line.findtext("featureID") or "9").strip() == "9"
    )
    return DeviceConfig(
        call_managers=_call_managers(root.findall("devicePool/callManagerGroup/members/member")),
        tvs_members=_tvs_members(root),
        lines=lines,
        transport=_TRANSPORTS.get((root.findtext("transportLayerProtocol") or "1").strip(), "tcp"),
        load=(root.findtext("loadInformation") or "").strip(),
        version_stamp=(root.findtext("versionStamp") or "").strip(),
        dial_template=(root.findtext("sipProfile/dialTemplate") or "").strip(),
    )


def parse_hotline(data: bytes) -> str | None:
    """The number a dial template dials as soon as the handset is lifted (a hotline: an
    empty ``match`` with ``timeout="0"`` and a ``rewrite``), or None."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError:
        return None
    for rule in root.iter("TEMPLATE"):
        if rule.get("match") == "" and rule.get("timeout") == "0" and rule.get("rewrite"):
            return rule.get("rewrite")
    return None
