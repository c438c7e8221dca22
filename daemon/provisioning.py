"""The virtual file tree that TFTP and HTTP serve, fed by the registry.

Phones ask for a fixed set of names (``CTLSEP<MAC>.tlv``, ``ITLSEP<MAC>.tlv``,
``ITLFile.tlv``, ``SEP<MAC>.cnf.xml``, ``XMLDefault.cnf.xml``) and then firmware by name.
The first group is rendered here from the registry and the trust lists; anything else comes
from the TFTP root on disk. A device's config is rendered once per record version.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape, quoteattr

from callboard.protocols.filesource import (
    DirectorySource,
    FileBody,
    FileNotFound,
    MemoryBody,
    Requester,
)
from callboard.protocols.models import MODELS
from callboard.protocols.settings import check_choice, check_range, config_key

from .logs import get_logger
from .registry.model import Device, DeviceState, Line, Onboarding
from .registry.registry import Registry

log = get_logger("callboard.provisioning")

_SEP_CONFIG = re.compile(r"^sep([0-9a-f]{12})\.cnf\.xml$")
_ITL = re.compile(r"^(itlfile\.tlv|itlsep[0-9a-f]{12}\.tlv)$")
_CTL = re.compile(r"^(ctlfile\.tlv|ctlsep[0-9a-f]{12}\.tlv)$")
_RENDERED_ONLY = re.compile(
    r"^(sep|bat)[0-9a-f]{12}\.cnf\.xml(\.sgn|\.enc\.sgn)?$|^sepdefault\.cnf$"
)
_VERSION_NAMESPACE = uuid.UUID("6f1e3a52-8f0b-4c55-9d2e-3c1b7e0a9d41")
_TRANSPORT_CODES = {"tcp": "1", "udp": "2", "tls": "3"}


@dataclass(frozen=True)
class ProvisioningSettings:
    """What configs tell phones: where to register and where TVS is (advertised values).

    ``register_expires``, ``keepalive_expires`` and ``transport`` are keys of the [sip]
    configuration section, ``loads`` is the [loads] table; the address and ports are filled
    in by the service from [network] and from the ports actually bound.
    """

    address: str = field(default="", metadata=config_key(None))
    sip_port: int = field(default=0, metadata=config_key(None))
    sip_tls_port: int = field(default=0, metadata=config_key(None))
    tvs_port: int = field(default=0, metadata=config_key(None))
    register_expires: int = 3600  # timerRegisterExpires
    keepalive_expires: int = 120
    transport: str = "tcp"  # the transport phones are told to use
    loads: dict[str, str] = field(default_factory=dict, metadata=config_key(None))

    def validate(self) -> None:
        check_range("register_expires", self.register_expires, 1, 7 * 86400)
        check_range("keepalive_expires", self.keepalive_expires, 1, 86400)
        check_choice("transport", self.transport, tuple(_TRANSPORT_CODES))


def load_template(name: str, override_dir: Path | None) -> Template:
    """The packaged template, unless the state dir holds one of the same name."""
    if override_dir is not None and (override_dir / name).is_file():
        return Template((override_dir / name).read_text(encoding="utf-8"))
    text = resources.files("callboard.daemon.templates").joinpath(name).read_text("utf-8")
    return Template(text)


class ProvisioningTree:
    """A :class:`~callboard.protocols.filesource.FileSource` over the registry and disk."""

    def __init__(
        self,
        registry: Registry,
        settings: ProvisioningSettings,
        root: DirectorySource,
        trust_list: Callable[[], bytes | None] = lambda: None,
        template_dir: Path | None = None,
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._root = root
        self._trust_list = trust_list
        self._default_template = load_template("XMLDefault.cnf.xml", template_dir)
        self._device_template = load_template("SEPDevice.cnf.xml", template_dir)
        self._device_cache: dict[str, tuple[int, bytes]] = {}
        self._default_cache: tuple[int, bytes] | None = None  # (defaults version, bytes)
        #: The bootstrap config of a MAC that may activate by voice (None: not that MAC).
        self.bootstrap: Callable[[str], bytes | None] | None = None
        registry.subscribe(self._forget)
        self._check_templates()

    def _check_templates(self) -> None:
        """Render both templates once, so a broken override stops start-up, not a phone."""
        sample = Device(
            id="0" * 32, name="SEP000000000000", model="8841", lines=(Line("1000", "Check"),)
        )
        try:
            ET.fromstring(self.xml_default())
            ET.fromstring(self.render_device(sample))
        except (KeyError, ValueError, ET.ParseError) as exc:
            raise ValueError(f"phone-config template is broken: {exc!r}") from None

    def advertise(self, settings: ProvisioningSettings) -> None:
        """Change what configs advertise (the daemon learns bound ports after listening)."""
        self._settings = settings
        self._device_cache.clear()
        self._default_cache = None

    @property
    def settings(self) -> ProvisioningSettings:
        return self._settings

    def open(self, name: str, requester: Requester) -> FileBody:
        lowered = name.lower()
        if lowered == "xmldefault.cnf.xml":
            return MemoryBody(self.xml_default())
        match = _SEP_CONFIG.match(lowered)
        if match:
            return MemoryBody(self._device_config(match.group(1).upper(), requester))
        if _ITL.match(lowered):
            data = self._trust_list()
            if data is None:
                raise FileNotFound(name)
            return MemoryBody(data)
        if _CTL.match(lowered) or _RENDERED_ONLY.match(lowered):
            # No CTL (no mixed-mode security); signed/encrypted configs are not offered,
            # and BAT placeholders are never served by name.
            raise FileNotFound(name)
        return self._root.open(name, requester)

    # -- rendering -----------------------------------------------------------------------

    def xml_default(self) -> bytes:
        version = self._registry.defaults_version
        if self._default_cache and self._default_cache[0] == version:
            return self._default_cache[1]
        defaults = sorted(self._registry.defaults().items())
        activation_models = "\n".join(
            [
                f"    <model id={quoteattr(info.model_id)} name={quoteattr(info.product)}/>"
                for info, method in ((MODELS[m], method) for m, method in defaults)
                if method is Onboarding.ACTIVATION_CODE
            ]
            + [
                # A code required of one phone whose model auto-registers: name the phone.
                f"    <device name={quoteattr(d.name)}/>"
                for d in self._registry.devices()
                if self._listed_individually(d)
            ]
        )
        data = self._default_template.substitute(
            call_manager_members=self._call_manager_members("      "),
            tvs_members=self._tvs_members("      "),
            load_information=self._default_loads(),
            activation_code_models=activation_models,
        ).encode("utf-8")
        self._default_cache = (version, data)
        return data

    def _device_config(self, mac: str, requester: Requester) -> bytes:
        device = self._registry.find("SEP" + mac)
        if device is None or not device.may_fetch_config:
            bootstrap = self.bootstrap(mac) if self.bootstrap is not None else None
            if bootstrap is not None:  # it may activate by voice (daemon/ivr.py)
                log.info("bootstrap config served", mac=mac, client=requester.host)
                return bootstrap
            raise FileNotFound(f"SEP{mac}.cnf.xml")
        cached = self._device_cache.get(device.id)
        if cached and cached[0] == device.version:
            data = cached[1]
        else:
            data = self.render_device(device)
            self._device_cache[device.id] = (device.version, data)
        log.info(
            "config served",
            device=device.name,
            client=requester.host,
            transport=requester.transport,
            version=device.version,
        )
        return data

    def render_device(self, device: Device) -> bytes:
        s = self._settings
        lines = "\n".join(
            f"""      <line button="{i}" lineIndex="{i}">
        <featureID>9</featureID>
        <featureLabel>{escape(ln.display_name or ln.directory_number)}</featureLabel>
        <proxy>{escape(s.address)}</proxy>
        <port>{s.sip_port}</port>
        <name>{escape(ln.directory_number)}</name>
        <displayName>{escape(ln.display_name)}</displayName>
        <authName>{escape(ln.auth_name or ln.directory_number)}</authName>
        <authPassword>{escape(ln.auth_password)}</authPassword>
        <contact>{escape(ln.directory_number)}</contact>
      </line>"""
            for i, ln in enumerate(device.lines, start=1)
        )
        load = s.loads.get(device.model)
        stamp = uuid.uuid5(_VERSION_NAMESPACE, f"{device.id}:{device.version}")
        return self._device_template.substitute(
            call_manager_members=self._call_manager_members("        "),
            tvs_members=self._tvs_members("      "),
            register_expires=s.register_expires,
            keepalive_expires=s.keepalive_expires,
            lines=lines,
            load_information=f"  <loadInformation>{escape(load)}</loadInformation>" if load else "",
            description=escape(device.description),
            version_stamp=stamp,
            transport_layer_protocol=_TRANSPORT_CODES[s.transport],
        ).encode("utf-8")

    def _call_manager_members(self, indent: str) -> str:
        s = self._settings
        return (
            f'{indent}<member priority="0">\n'
            f"{indent}  <callManager>\n"
            f"{indent}    <ports>\n"
            f"{indent}      <ethernetPhonePort>2000</ethernetPhonePort>\n"
            f"{indent}      <sipPort>{s.sip_port}</sipPort>\n"
            f"{indent}      <securedSipPort>{s.sip_tls_port}</securedSipPort>\n"
            f"{indent}    </ports>\n"
            f"{indent}    <processNodeName>{escape(s.address)}</processNodeName>\n"
            f"{indent}  </callManager>\n"
            f"{indent}</member>"
        )

    def _tvs_members(self, indent: str) -> str:
        s = self._settings
        return (
            f'{indent}<member priority="0"><port>{s.tvs_port}</port>'
            f"<address>{escape(s.address)}</address></member>"
        )

    def _default_loads(self) -> str:
        seen: set[str] = set()
        out = []
        for model, load in sorted(self._settings.loads.items()):
            info = MODELS[model]
            if info.model_id in seen:
                continue
            seen.add(info.model_id)
            out.append(
                f"  <loadInformation{info.model_id} model={quoteattr(info.product)}>"
                f"{escape(load)}</loadInformation{info.model_id}>"
            )
        return "\n".join(out)

    def _listed_individually(self, device: Device) -> bool:
        return (
            device.state is DeviceState.AWAITING_ACTIVATION
            and not device.is_placeholder
            and self._registry.onboarding(device.model) is Onboarding.AUTOREGISTRATION
        )

    def _forget(self, old: Device | None, new: Device | None) -> None:
        for device in (old, new):
            if device is not None:
                self._device_cache.pop(device.id, None)
                if self._listed_individually(device):
                    self._default_cache = None
