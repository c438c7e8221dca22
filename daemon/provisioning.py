"""The virtual file tree that TFTP and HTTP serve, fed by the registry.

Phones ask for a fixed set of names (``CTLSEP<MAC>.tlv``, ``ITLSEP<MAC>.tlv``,
``ITLFile.tlv``, ``SEP<MAC>.cnf.xml``, ``XMLDefault.cnf.xml``) and then firmware by name.
The first group is rendered here from the registry and the trust lists; anything else comes
from the TFTP root on disk. A device's config is rendered once per record version.

Signed files: once a phone's ITL holds a TFTP-role certificate it asks for ``<name>.sgn``
(cisco-protocols.md sections 2, 5 and 16). With a signer (:class:`~.signing.SgnSigner`) every
file above except the trust lists is also served as ``<name>.sgn``: the unsigned file behind
a header signed with the CCM+TFTP key, its FILENAME the base name plus ``.sgn``. A ``.sgn``
already under the TFTP root is served as it is. Over HTTPS (6971) a phone asking for
``SEP<MAC>.cnf.xml.sgn`` wants the unsigned config, which TLS already authenticates.

Templates (``configs/templates/README.md``): the device config is ``SEP<MAC>.cnf.xml``,
``SEPDevice-<model>.cnf.xml`` or ``SEPDevice.cnf.xml`` from ``<state-dir>/templates``, else
the packaged one; its ``vendorConfig`` fragment likewise (per device, model, family, default).
"""

from __future__ import annotations

import re
import uuid
from collections import OrderedDict
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
    Opened,
    Requester,
)
from callboard.protocols.models import MODELS
from callboard.protocols.settings import SettingError, check_choice, check_range, config_key
from twisted.internet.defer import Deferred

from .cluster import ClusterNode
from .logs import get_logger
from .registry.model import Device, DeviceState, Line, Onboarding
from .registry.registry import Registry
from .signing import SgnSigner

log = get_logger("callboard.provisioning")

_SEP_CONFIG = re.compile(r"^sep([0-9a-f]{12})\.cnf\.xml$")
_ITL = re.compile(r"^(itlfile\.tlv|itlsep[0-9a-f]{12}\.tlv)$")
_CTL = re.compile(r"^(ctlfile\.tlv|ctlsep[0-9a-f]{12}\.tlv)$")
_RENDERED_ONLY = re.compile(
    r"^(sep|bat)[0-9a-f]{12}\.cnf\.xml(\.sgn|\.enc\.sgn)?$|^sepdefault\.cnf$"
)
_SIGNED_NEVER = re.compile(r"\.(sgn|enc|tlv)$")  # no .sgn of a .sgn, an .enc or a trust list
# What every name _SEP_CONFIG, _ITL, _CTL and _RENDERED_ONLY match starts with (lower-cased):
# any other name (firmware, files under the TFTP root) goes to the disk without trying them.
_RENDERED_STEMS = frozenset({"sep", "bat", "itl", "ctl"})
# Rendered device configs kept, least recently served dropped first: a booting phone fetches
# its file again within seconds (TFTP then HTTP, retries), but keeping every device's file
# (a few KB each) would hold hundreds of MB with 100,000 devices.
CONFIG_CACHE_SIZE = 4096
_VERSION_NAMESPACE = uuid.UUID("6f1e3a52-8f0b-4c55-9d2e-3c1b7e0a9d41")
_TRANSPORT_CODES = {"tcp": "1", "udp": "2", "tls": "3"}
_SECURITY_MODES = {"tls": (2, 3), "tcp": (1,), "udp": (1,)}
_SECURITY_DEFAULT = {"tls": 2, "tcp": 1, "udp": 1}


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
    # deviceSecurityMode: 1 non-secure, 2 authenticated, 3 encrypted; 0 = follow the
    # transport (TLS needs 2 or 3, TCP and UDP need 1: "Device Security").
    device_security_mode: int = 0
    loads: dict[str, str] = field(default_factory=dict, metadata=config_key(None))
    # [cluster] nodes, in priority order (filled in by the service); empty: this node alone.
    cluster_nodes: tuple[ClusterNode, ...] = field(default=(), metadata=config_key(None))

    def validate(self) -> None:
        check_range("register_expires", self.register_expires, 1, 7 * 86400)
        check_range("keepalive_expires", self.keepalive_expires, 1, 86400)
        check_choice("transport", self.transport, tuple(_TRANSPORT_CODES))
        mode = self.device_security_mode
        if mode and mode not in _SECURITY_MODES[self.transport]:
            raise SettingError(
                "device_security_mode",
                f"{mode} does not go with transport {self.transport!r} (SIP over TLS needs "
                "2 or 3, TCP and UDP need 1)",
            )

    @property
    def security_mode(self) -> int:
        """The deviceSecurityMode written into configs (consistent with the transport)."""
        return self.device_security_mode or _SECURITY_DEFAULT[self.transport]


@dataclass(frozen=True)
class PhoneSettings:
    """[phones]: what every SEP config carries besides servers and lines (CUCM's defaults).

    Per model and per device, templates override all of it (see the module docstring).
    """

    time_zone: str = "Greenwich Standard Time"  # a Cisco time-zone name
    olson_time_zone: str = "Etc/UTC"
    date_template: str = "D/M/Y"
    ntp_servers: tuple[str, ...] = ()  # unicast NTP servers, in order; empty: none
    user_locale: str = "English_United_States"
    user_locale_language: str = "en_US"
    network_locale: str = "United_States"
    softkey_file: str = ""  # e.g. "softkeys.xml" under the TFTP root; empty: built-in keys
    dial_template: str = ""  # e.g. "dialplan.xml" under the TFTP root; empty: none
    messages_number: str = ""  # voicemail pilot number on every line
    max_calls: int = 4  # maxNumCalls per line
    busy_trigger: int = 2  # busyTrigger per line

    def validate(self) -> None:
        check_range("max_calls", self.max_calls, 1, 50)
        check_range("busy_trigger", self.busy_trigger, 1, self.max_calls)
        for name in ("softkey_file", "dial_template"):
            value = getattr(self, name)
            if value and (value.startswith("/") or ".." in value.split("/")):
                raise SettingError(name, f"{value!r} must be a name under the TFTP root")


def load_template(name: str, override_dir: Path | None) -> Template:
    """The packaged template, unless the state dir holds one of the same name."""
    if override_dir is not None and (override_dir / name).is_file():
        return Template((override_dir / name).read_text(encoding="utf-8"))
    text = resources.files("callboard.daemon.templates").joinpath(name).read_text("utf-8")
    return Template(text)


def _template_files(override_dir: Path | None) -> dict[str, Template]:
    """Every template that may be picked per model or device, read once at start.

    The packaged ones first, then the state dir's (same name wins), so rendering a config
    never touches the disk.
    """
    found: dict[str, Template] = {}
    packaged = resources.files("callboard.daemon.templates")
    sources = [(entry.name, entry) for entry in packaged.iterdir()]
    if override_dir is not None and override_dir.is_dir():
        sources += [(entry.name, entry) for entry in sorted(override_dir.iterdir())]
    for name, entry in sources:
        if name.endswith((".xml", ".cnf.xml")) and entry.is_file():
            found[name] = Template(entry.read_text(encoding="utf-8"))
    return found


def model_family(model: str) -> str:
    """``8841`` → ``88xx``, ``7821`` → ``78xx``: the load families of section 3."""
    return model[:2] + "xx"


class ProvisioningTree:
    """A :class:`~callboard.protocols.filesource.FileSource` over the registry and disk."""

    def __init__(
        self,
        registry: Registry,
        settings: ProvisioningSettings,
        root: DirectorySource,
        trust_list: Callable[[], bytes | None] = lambda: None,
        template_dir: Path | None = None,
        *,
        phones: PhoneSettings | None = None,
        signer: SgnSigner | None = None,
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._phones = phones or PhoneSettings()
        self._root = root
        self._trust_list = trust_list
        self._signer = signer
        self._default_template = load_template("XMLDefault.cnf.xml", template_dir)
        self._device_template = load_template("SEPDevice.cnf.xml", template_dir)
        self._templates = _template_files(template_dir)
        self._device_cache: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self._default_cache: tuple[int, bytes] | None = None  # (defaults version, bytes)
        #: The bootstrap config of a MAC that may activate by voice (None: not that MAC).
        self.bootstrap: Callable[[str], bytes | None] | None = None
        #: Files rendered on request by name (lower-case), e.g. the IVR hotline dial template.
        self.generated: dict[str, Callable[[], bytes]] = {}
        registry.subscribe(self._forget)
        self._check_templates()

    def _check_templates(self) -> None:
        """Render every template once, so a broken override stops start-up, not a phone."""
        samples = [
            Device(id="0" * 32, name="SEP000000000000", model=m, lines=(Line("1000", "Check"),))
            for m in sorted({"8841", "7821", *self._template_models()})
        ]
        samples += [
            Device(id="0" * 32, name=name, model="8841", lines=(Line("1000", "Check"),))
            for name in self._template_devices()
        ]
        try:
            ET.fromstring(self.xml_default())
            for sample in samples:
                ET.fromstring(self.render_device(sample))
        except (KeyError, ValueError, ET.ParseError) as exc:
            raise ValueError(f"phone-config template is broken: {exc!r}") from None

    def _template_models(self) -> set[str]:
        out = set()
        for name in self._templates:
            match = re.match(r"^(?:SEPDevice|vendorConfig)-([0-9A-Z]+)\.", name)
            if match and match.group(1) in MODELS:
                out.add(match.group(1))
        return out

    def _template_devices(self) -> list[str]:
        names = {
            m.group(1)
            for m in (
                re.match(r"^(?:vendorConfig-)?(SEP[0-9A-F]{12})\.", n) for n in self._templates
            )
            if m
        }
        return sorted(names)

    def missing_loads(self) -> list[str]:
        """Configured firmware loads with no ``<load>.loads`` under the TFTP root."""
        root = Path(self._root.root)
        loads = set(self._settings.loads.values())
        return sorted(load for load in loads if not (root / f"{load}.loads").is_file())

    def warnings(self) -> list[str]:
        """What an operator should fix, for the log and ``callboard status``."""
        return [
            f"firmware load {load} is configured but {load}.loads is not in the TFTP root"
            for load in self.missing_loads()
        ]

    def reload_templates(self, template_dir: Path | None) -> None:
        """SIGHUP: read the templates again; a broken one raises and the old ones stay."""
        old = (self._default_template, self._device_template, self._default_cache)
        self._default_template = load_template("XMLDefault.cnf.xml", template_dir)
        self._device_template = load_template("SEPDevice.cnf.xml", template_dir)
        self._default_cache = None
        try:
            self._check_templates()
        except ValueError:
            self._default_template, self._device_template, self._default_cache = old
            raise
        self._device_cache.clear()
        self._default_cache = None

    def advertise(self, settings: ProvisioningSettings) -> None:
        """Change what configs advertise (the daemon learns bound ports after listening)."""
        self._settings = settings
        self._device_cache.clear()
        self._default_cache = None

    @property
    def settings(self) -> ProvisioningSettings:
        return self._settings

    @property
    def signer(self) -> SgnSigner | None:
        return self._signer

    def open(self, name: str, requester: Requester) -> Opened:
        try:
            return self._open(name, requester)
        except FileNotFound:
            if not (self._registry.shared and _SEP_CONFIG.match(_unsigned(name.lower()))):
                raise
        # A phone activated through another worker or node a moment ago, perhaps: read the
        # change feed before answering "not found" (the phone would retry, but seconds later).
        return self._registry.settled().addCallback(lambda _: self._open(name, requester))

    def _open(self, name: str, requester: Requester) -> Opened:
        lowered = name.lower()
        if self._signer is not None and lowered.endswith(".sgn"):
            return self._open_signed(name[: -len(".sgn")], requester)
        return self._open_plain(name, lowered, requester)

    def _open_signed(self, unsigned: str, requester: Requester) -> Opened:
        """``<unsigned>.sgn``: signed here, or unsigned for a SEP config asked over HTTPS."""
        assert self._signer is not None
        lowered = unsigned.lower()
        match = _SEP_CONFIG.match(lowered)
        if match and requester.transport == "https":
            # HTTPS 6971: the phone asks for the .sgn name but wants the plain config.
            return MemoryBody(self._device_config(match.group(1).upper(), requester))
        # Rendered files are signed under their canonical names, whatever the request's case.
        if lowered == "xmldefault.cnf.xml":
            return _later(self._signer.sign_bytes("XMLDefault.cnf.xml", self.xml_default()))
        if match:
            mac = match.group(1).upper()
            data = self._device_config(mac, requester)
            return _later(self._signer.sign_bytes(f"SEP{mac}.cnf.xml", data))
        if lowered in self.generated:
            return _later(self._signer.sign_bytes(lowered, self.generated[lowered]()))
        if _ITL.match(lowered) or _CTL.match(lowered) or _RENDERED_ONLY.match(lowered):
            raise FileNotFound(unsigned + ".sgn")
        if _SIGNED_NEVER.search(lowered):
            raise FileNotFound(unsigned + ".sgn")
        try:
            return self._root.open(unsigned + ".sgn", requester)  # signed by its supplier
        except FileNotFound:
            pass
        return _later(self._signer.sign_disk(unsigned, self._root.open(unsigned, requester)))

    def _open_plain(self, name: str, lowered: str, requester: Requester) -> FileBody:
        if lowered == "xmldefault.cnf.xml":
            return MemoryBody(self.xml_default())
        if lowered in self.generated:
            return MemoryBody(self.generated[lowered]())
        if lowered[:3] not in _RENDERED_STEMS:
            return self._root.open(name, requester)
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
            self._device_cache.move_to_end(device.id)
        else:
            data = self.render_device(device)
            self._device_cache[device.id] = (device.version, data)
            if len(self._device_cache) > CONFIG_CACHE_SIZE:
                self._device_cache.popitem(last=False)
        log.info(
            "config served",
            device=device.name,
            client=requester.host,
            transport=requester.transport,
            version=device.version,
        )
        return data

    def render_device(self, device: Device) -> bytes:
        s, p = self._settings, self._phones
        lines = "\n".join(
            f"""      <line button="{i}" lineIndex="{i}">
        <featureID>9</featureID>
        <featureLabel>{escape(ln.display_name or ln.directory_number)}</featureLabel>
        <proxy>USECALLMANAGER</proxy>
        <port>{s.sip_port}</port>
        <name>{escape(ln.directory_number)}</name>
        <displayName>{escape(ln.display_name)}</displayName>
        <autoAnswer>
          <autoAnswerEnabled>2</autoAnswerEnabled>
        </autoAnswer>
        <callWaiting>3</callWaiting>
        <authName>{escape(ln.auth_name or ln.directory_number)}</authName>
        <authPassword>{escape(ln.auth_password)}</authPassword>
        <contact>{escape(ln.directory_number)}</contact>
        <messagesNumber>{escape(p.messages_number)}</messagesNumber>
        <maxNumCalls>{p.max_calls}</maxNumCalls>
        <busyTrigger>{p.busy_trigger}</busyTrigger>
      </line>"""
            for i, ln in enumerate(device.lines, start=1)
        )
        load = s.loads.get(device.model)
        stamp = uuid.uuid5(_VERSION_NAMESPACE, f"{device.id}:{device.version}")
        template = self._pick(device, "SEPDevice", ".cnf.xml", self._device_template)
        assert template is not None
        vendor = self._pick(device, "vendorConfig", ".xml", None)
        values = {
            "call_manager_members": self._call_manager_members("        "),
            "tvs_members": self._tvs_members("      "),
            "register_expires": s.register_expires,
            "keepalive_expires": s.keepalive_expires,
            "lines": lines,
            "load_information": (
                f"  <loadInformation>{escape(load)}</loadInformation>" if load else ""
            ),
            "description": escape(device.description),
            "version_stamp": stamp,
            "transport_layer_protocol": _TRANSPORT_CODES[s.transport],
            "device_security_mode": s.security_mode,
            "device_name": escape(device.name),
            "model": escape(device.model),
            "date_time_setting": self._date_time_setting("    "),
            "user_locale": escape(p.user_locale),
            "user_locale_language": escape(p.user_locale_language),
            "network_locale": escape(p.network_locale),
            "softkey_file": _optional("    ", "softKeyFile", p.softkey_file),
            "dial_template": _optional("    ", "dialTemplate", p.dial_template),
        }
        values["vendor_config"] = vendor.substitute(values).rstrip("\n") if vendor else ""
        return template.substitute(values).encode("utf-8")

    def _pick(
        self, device: Device, stem: str, suffix: str, fallback: Template | None
    ) -> Template | None:
        """The most specific template: this device, its model, its family, the default."""
        names = [f"{device.name}{suffix}"] if stem == "SEPDevice" else []
        names += [
            f"{stem}-{device.name}{suffix}",
            f"{stem}-{device.model}{suffix}",
            f"{stem}-{model_family(device.model)}{suffix}",
        ]
        for name in names:
            if name in self._templates:
                return self._templates[name]
        return fallback if fallback is not None else self._templates.get(stem + suffix)

    def _date_time_setting(self, indent: str) -> str:
        p = self._phones
        ntps = "".join(
            f"\n{indent}    <ntp>\n{indent}      <name>{escape(server)}</name>\n"
            f"{indent}      <ntpMode>Unicast</ntpMode>\n{indent}    </ntp>"
            for server in p.ntp_servers
        )
        return (
            f"{indent}<dateTimeSetting>\n"
            f"{indent}  <name>{escape(p.time_zone)}</name>\n"
            f"{indent}  <dateTemplate>{escape(p.date_template)}</dateTemplate>\n"
            f"{indent}  <timeZone>{escape(p.time_zone)}</timeZone>\n"
            f"{indent}  <olsonTimeZone>{escape(p.olson_time_zone)}</olsonTimeZone>\n"
            f"{indent}  <ntps>{ntps}\n{indent}  </ntps>\n"
            f"{indent}</dateTimeSetting>"
        )

    def _call_manager_members(self, indent: str) -> str:
        s = self._settings
        if s.cluster_nodes:
            return "\n".join(
                _cluster_call_manager(indent, i, node, s) for i, node in enumerate(s.cluster_nodes)
            )
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
        if s.cluster_nodes:
            return "\n".join(
                f'{indent}<member priority="{i}"><port>{node.tvs_port or s.tvs_port}</port>'
                f"<address>{escape(node.address)}</address></member>"
                for i, node in enumerate(s.cluster_nodes)
            )
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
            and self._registry.onboarding(device.model) is not Onboarding.ACTIVATION_CODE
            and self._registry.onboarding_of(device) is not Onboarding.IVR
        )

    def _forget(self, old: Device | None, new: Device | None) -> None:
        for device in (old, new):
            if device is not None:
                self._device_cache.pop(device.id, None)
                if self._listed_individually(device):
                    self._default_cache = None


def _cluster_call_manager(
    indent: str, priority: int, node: ClusterNode, s: ProvisioningSettings
) -> str:
    """One ``callManagerGroup`` member for a [cluster] node (ports default to ours)."""
    return (
        f'{indent}<member priority="{priority}">\n'
        f"{indent}  <callManager>\n"
        f"{indent}    <name>{escape(node.name)}</name>\n"
        f"{indent}    <ports>\n"
        f"{indent}      <ethernetPhonePort>2000</ethernetPhonePort>\n"
        f"{indent}      <sipPort>{node.sip_port or s.sip_port}</sipPort>\n"
        f"{indent}      <securedSipPort>{node.sip_tls_port or s.sip_tls_port}</securedSipPort>\n"
        f"{indent}    </ports>\n"
        f"{indent}    <processNodeName>{escape(node.address)}</processNodeName>\n"
        f"{indent}  </callManager>\n"
        f"{indent}</member>"
    )


def _optional(indent: str, element: str, value: str) -> str:
    """``<element>value</element>`` on its own line, or nothing for an unset value."""
    return f"{indent}<{element}>{escape(value)}</{element}>" if value else ""


def _later(result: bytes | Deferred[bytes]) -> Opened:
    """Signed bytes as a body: now when cached, else when the signature is done."""
    if isinstance(result, bytes):
        return MemoryBody(result)
    return result.addCallback(MemoryBody)


def _unsigned(lowered: str) -> str:
    return lowered[: -len(".sgn")] if lowered.endswith(".sgn") else lowered
