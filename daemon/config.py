"""One frozen configuration from the TOML file and the ``callboard serve`` flags.

Every key has a default; the file overrides defaults and flags override the file. Each TOML
table is read straight into the settings dataclasses of the parts that use it (a protocol's
own settings class is its section: ``[tftp]`` is :class:`TFTPSettings`, the registrar part
of ``[sip]`` is :class:`RegistrarSettings`, ...), and each class validates itself once
everything is read. Unknown keys, wrong types and impossible values are refused before
anything starts, with a message naming the key and the file, so the daemon never runs
half-configured.
"""

from __future__ import annotations

import ipaddress
import tomllib
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from callboard.protocols.listening import ListenerSpec, parse_endpoint
from callboard.protocols.models import MODELS
from callboard.protocols.settings import SettingError, check_choice, config_keys
from callboard.protocols.sip.registrar import RegistrarSettings
from callboard.protocols.sip.transports import SIPTransportSettings
from callboard.protocols.tftp.server import TFTPSettings
from callboard.protocols.tvs.activation import TVSSettings

from .cluster import ClusterNode, ClusterSettings, parse_nodes
from .edge.settings import EdgeSettings, RemoteSettings
from .ivr import IVRSettings
from .provisioning import PhoneSettings, ProvisioningSettings
from .registry.engines import StoreSettings
from .registry.registry import RegistrySettings
from .shared_throttle import AttemptRetention
from .sip_policy import AutoRegistration
from .web.settings import SelfCareSettings, SMTPSettings, WebSettings

DEFAULT_STATE_DIR = Path("/var/lib/callboard")


class ConfigError(Exception):
    """A configuration the daemon refuses to start with."""


@dataclass(frozen=True)
class NetworkConfig:
    """[network]: where the daemon listens, and what phones are told to reach."""

    listen_addresses: tuple[str, ...] = ("127.0.0.1",)
    advertise_address: str = ""  # written into configs; default: the first listen address
    tftp_port: int = 69
    http_port: int = 6970
    tvs_port: int = 2445
    sip_port: int = 5060
    sip_tls_port: int = 5061
    https_port: int = 6971  # HTTPS provisioning (ITL 1.1 phones); 0 = off
    # Ports written into configs for phones when they differ from the listened ones
    # (NAT, port forwarding); 0 means "the port actually listened on".
    advertise_tvs_port: int = 0
    advertise_sip_port: int = 0
    advertise_sip_tls_port: int = 0
    web_port: int = -1  # the HTTPS web console, Self-Care and REST API; -1: off

    @property
    def advertised(self) -> str:
        return self.advertise_address or self.listen_addresses[0]

    def validate(self) -> None:
        if not self.listen_addresses:
            raise SettingError("listen_addresses", "at least one address is needed")
        for address in self.listen_addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise SettingError(
                    "listen_addresses", f"{address!r} is not an IP address"
                ) from None
        try:
            advertised = ipaddress.ip_address(self.advertised)
        except ValueError:
            raise SettingError(
                "advertise_address", f"{self.advertised!r} is not an IP address"
            ) from None
        if advertised.is_unspecified:
            raise SettingError(
                "advertise_address",
                f"phones cannot reach {advertised}; set the address they should use",
            )
        for f in fields(self):
            if f.name.endswith("_port"):
                port = getattr(self, f.name)
                if not 0 <= port <= 65535 and not (f.name == "web_port" and port == -1):
                    raise SettingError(f.name, f"{port} is not a port number")


@dataclass(frozen=True)
class EndpointsConfig:
    """[endpoints]: listener specs replacing the ones built from address and port.

    Twisted's endpoint syntax plus ``fd:N`` (see :mod:`callboard.protocols.listening`); for
    example ``systemd:domain=INET:index=0`` takes a socket from systemd's socket activation.
    Empty: one ``tcp:`` listener per listen address (a ``unix:`` socket for admin).
    """

    http: str = ""
    tvs: str = ""
    sip: str = ""  # SIP over TCP; SIP over UDP stays on the listen addresses
    sip_tls: str = ""
    https: str = ""  # HTTPS provisioning; a spec here turns it on even with https_port 0
    admin: str = ""
    web: str = ""

    def spec(self, name: str) -> ListenerSpec | None:
        text: str = getattr(self, name)
        return parse_endpoint(text, "stream") if text else None

    def validate(self) -> None:
        for f in fields(self):
            try:
                self.spec(f.name)
            except ValueError as exc:
                raise SettingError(f.name, str(exc)) from None


@dataclass(frozen=True)
class TrustConfig:
    """The daemon's part of [tvs]: the manufacturing trust store and the server's own keys."""

    manufacturing_trust: str = ""  # default <state_dir>/manufacturing-trust
    key_type: str = "ec"  # TVS and CCM+TFTP keys: ec (P-256) or rsa (2048)
    itl_hash: str = "sha512"  # ITLFile.tlv signature hash

    def validate(self) -> None:
        check_choice("key_type", self.key_type, ("ec", "rsa"))
        check_choice("itl_hash", self.itl_hash, ("sha512", "sha1"))


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: the Prometheus ``/metrics`` listener (plain HTTP); port 0 means off."""

    port: int = 0
    address: str = "127.0.0.1"

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingError("port", f"{self.port} is not a port number")
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            raise SettingError("address", f"{self.address!r} is not an IP address") from None


@dataclass(frozen=True)
class Config:
    state_dir: Path = DEFAULT_STATE_DIR
    tftp_root: Path | None = None
    admin_socket: Path | None = None
    demo: bool = False
    log_level: str = "info"
    log_format: str = "json"  # or "console"
    shutdown_grace: float = 5.0  # seconds in-flight transfers and TVS requests get at SIGTERM
    workers: int = 1  # reactor processes sharing every listener (--workers; see supervisor)
    source: str = "<defaults>"  # the file this came from, for messages
    network: NetworkConfig = field(default_factory=NetworkConfig)
    endpoints: EndpointsConfig = field(default_factory=EndpointsConfig)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    store: StoreSettings = field(default_factory=StoreSettings)  # [registry] url
    tftp: TFTPSettings = field(default_factory=TFTPSettings)
    tvs: TVSSettings = field(default_factory=TVSSettings)
    trust: TrustConfig = field(default_factory=TrustConfig)
    attempts: AttemptRetention = field(default_factory=AttemptRetention)  # [tvs] retention
    sip: RegistrarSettings = field(default_factory=RegistrarSettings)
    sip_transport: SIPTransportSettings = field(default_factory=SIPTransportSettings)
    autoregistration: AutoRegistration = field(default_factory=AutoRegistration)
    provisioning: ProvisioningSettings = field(default_factory=ProvisioningSettings)
    phones: PhoneSettings = field(default_factory=PhoneSettings)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    ivr: IVRSettings = field(default_factory=IVRSettings)
    edge: EdgeSettings = field(default_factory=EdgeSettings)
    remote: RemoteSettings = field(default_factory=RemoteSettings)
    web: WebSettings = field(default_factory=WebSettings)
    smtp: SMTPSettings = field(default_factory=SMTPSettings)
    self_care: SelfCareSettings = field(default_factory=SelfCareSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    @property
    def loads(self) -> dict[str, str]:
        """[loads]: firmware load name per model."""
        return self.provisioning.loads

    @property
    def tftp_root_path(self) -> Path:
        return self.tftp_root or self.state_dir / "tftp"

    @property
    def admin_socket_path(self) -> Path:
        return self.admin_socket or self.state_dir / "admin.sock"

    @property
    def manufacturing_trust_path(self) -> Path:
        return Path(self.trust.manufacturing_trust or self.state_dir / "manufacturing-trust")

    @property
    def advertise_address(self) -> str:
        return self.network.advertised


# Each TOML table and the settings classes that read it, as (Config attribute, class). A key
# belongs to every class of its table that has it (``sip.keepalive_expires`` is both what the
# registrar answers and what configs tell phones).
SECTIONS: dict[str, tuple[tuple[str, type[Any]], ...]] = {
    "network": (("network", NetworkConfig),),
    "endpoints": (("endpoints", EndpointsConfig),),
    "registry": (("registry", RegistrySettings), ("store", StoreSettings)),
    "tftp": (("tftp", TFTPSettings),),
    "tvs": (("tvs", TVSSettings), ("trust", TrustConfig), ("attempts", AttemptRetention)),
    "sip": (
        ("sip", RegistrarSettings),
        ("sip_transport", SIPTransportSettings),
        ("autoregistration", AutoRegistration),
        ("provisioning", ProvisioningSettings),
    ),
    "phones": (("phones", PhoneSettings),),
    "metrics": (("metrics", MetricsConfig),),
    "ivr": (("ivr", IVRSettings),),
    "edge": (("edge", EdgeSettings),),
    "remote": (("remote", RemoteSettings),),
    "web": (("web", WebSettings),),
    "smtp": (("smtp", SMTPSettings),),
    "self_care": (("self_care", SelfCareSettings),),
    "cluster": (("cluster", ClusterSettings),),
}
_TOP_LEVEL = (
    "state_dir",
    "tftp_root",
    "admin_socket",
    "demo",
    "log_level",
    "log_format",
    "shutdown_grace",
    "workers",
)
MAX_WORKERS = 64
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")


def section_keys(section: str) -> list[str]:
    """Every key of a TOML table, in the order its classes declare them."""
    keys: dict[str, None] = {}
    for _, cls in SECTIONS[section]:
        keys.update(dict.fromkeys(config_keys(cls)))
    return list(keys)


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read ``path`` (if given), apply flag ``overrides`` (dotted keys), validate."""
    source = str(path) if path else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    values = _Values(source)
    values.add_file(raw)
    for key, value in (overrides or {}).items():
        values.add(key, value, f"command line ({source})")
    return values.build()


class _Values:
    """Values gathered from the file, then the flags (type-checked as they come in)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.top: dict[str, Any] = {}
        self.sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        self.loads: dict[str, str] = {}

    def add_file(self, raw: dict[str, Any]) -> None:
        for key, value in raw.items():
            if key in SECTIONS or key == "loads":
                if not isinstance(value, dict):
                    raise ConfigError(
                        f"{self.source}: [loads] maps model names to load-name strings"
                        if key == "loads"
                        else f"{self.source}: [{key}] must be a table"
                    )
                for name, subvalue in value.items():
                    self.add(f"{key}.{name}", subvalue, self.source)
            elif key in _TOP_LEVEL:
                self.add(key, value, self.source)
            else:
                raise ConfigError(f"{self.source}: unknown key {key!r}")

    def add(self, key: str, value: Any, origin: str) -> None:
        section, dot, name = key.partition(".")
        if not dot:
            if key not in _TOP_LEVEL:
                raise ConfigError(f"{origin}: unknown key {key!r}")
            self.top[key] = _coerce(_hint(Config, key), value, f"{origin}: {key}")
        elif section == "loads":
            if name not in MODELS:
                raise ConfigError(f"{origin}: {key}: unsupported model")
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{origin}: {key}: expected a load name string")
            self.loads[name] = value
        elif section in SECTIONS:
            owners = [(cls, config_keys(cls)[name]) for cls in _classes(section, name)]
            if not owners:
                raise ConfigError(f"{origin}: {key}: unknown key")
            cls, attr = owners[0]
            self.sections[section][name] = _coerce(_hint(cls, attr), value, f"{origin}: {key}")
        else:
            raise ConfigError(f"{origin}: unknown section [{section}]")

    def build(self) -> Config:
        parts: dict[str, Any] = {}
        for section, classes in SECTIONS.items():
            given = self.sections[section]
            for attribute, cls in classes:
                keys = config_keys(cls)
                kwargs = {keys[k]: v for k, v in given.items() if k in keys}
                parts[attribute] = self._settings(section, cls, kwargs)
        parts["provisioning"] = replace(parts["provisioning"], loads=dict(self.loads))
        config = Config(source=self.source, **self.top, **parts)
        if config.log_level not in LOG_LEVELS:
            raise ConfigError(
                f"{self.source}: log_level: {config.log_level!r} is not one of "
                + ", ".join(LOG_LEVELS)
            )
        if config.log_format not in LOG_FORMATS:
            raise ConfigError(
                f"{self.source}: log_format: {config.log_format!r} is not one of "
                + ", ".join(LOG_FORMATS)
            )
        if not 1 <= config.workers <= MAX_WORKERS:
            raise ConfigError(
                f"{self.source}: workers: {config.workers} is not between 1 and {MAX_WORKERS}"
            )
        if not 0 <= config.shutdown_grace <= 3600:
            raise ConfigError(
                f"{self.source}: shutdown_grace: {config.shutdown_grace} is not between 0 and 3600"
            )
        return config

    def _settings(self, section: str, cls: type[Any], kwargs: dict[str, Any]) -> Any:
        """Build one settings object and let it validate itself; name the key it refuses."""
        try:
            settings = cls(**kwargs)
            validate = getattr(settings, "validate", None)
            if validate is not None:
                validate()
        except SettingError as exc:
            key = {attr: k for k, attr in config_keys(cls).items()}.get(exc.name, exc.name)
            raise ConfigError(f"{self.source}: {section}.{key}: {exc.reason}") from None
        return settings


def _classes(section: str, key: str) -> list[type[Any]]:
    return [cls for _, cls in SECTIONS[section] if key in config_keys(cls)]


def _hint(cls: type[Any], name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(expected: Any, value: Any, where: str) -> Any:
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if expected in (Path, Path | None):
        if not isinstance(value, str | Path) or not str(value):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    if expected in (tuple[str, ...], frozenset[str]):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value) if expected == tuple[str, ...] else frozenset(value)
    if expected == tuple[ClusterNode, ...]:
        try:
            return parse_nodes(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    raise AssertionError(f"no coercion for {expected!r}")  # pragma: no cover
