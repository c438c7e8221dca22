"""One frozen configuration from the TOML file and the ``callboard serve`` flags.

Every key has a default; the file overrides defaults and flags override the file. Unknown
keys, wrong types and impossible values are refused before anything starts, with a
message naming the key and the file, so the daemon never runs half-configured.
"""

from __future__ import annotations

import ipaddress
import tomllib
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from callboard.protocols.models import MODELS

DEFAULT_STATE_DIR = Path("/var/lib/callboard")


class ConfigError(Exception):
    """A configuration the daemon refuses to start with."""


@dataclass(frozen=True)
class NetworkConfig:
    listen_addresses: tuple[str, ...] = ("127.0.0.1",)
    advertise_address: str = ""  # written into configs; default: the first listen address
    tftp_port: int = 69
    http_port: int = 6970
    tvs_port: int = 2445
    sip_port: int = 5060
    sip_tls_port: int = 5061
    # Ports written into configs for phones when they differ from the listened ones
    # (NAT, port forwarding); 0 means "the port actually listened on".
    advertise_tvs_port: int = 0
    advertise_sip_port: int = 0
    advertise_sip_tls_port: int = 0


@dataclass(frozen=True)
class EndpointsConfig:
    """Twisted endpoint strings replacing the listeners built from address and port.

    For example ``systemd:domain=INET:index=0`` takes a socket from systemd's socket
    activation. Empty: one ``tcp:`` listener per listen address (``unix:`` for admin).
    """

    http: str = ""
    tvs: str = ""
    sip: str = ""  # SIP over TCP; SIP over UDP stays on the listen addresses
    sip_tls: str = ""
    admin: str = ""


@dataclass(frozen=True)
class RegistryConfig:
    code_ttl_hours: float = 168.0
    unique_directory_numbers: bool = False


@dataclass(frozen=True)
class TFTPConfig:
    max_blksize: int = 1468
    max_windowsize: int = 64
    initial_timeout: float = 1.0
    max_retries: int = 5
    transfer_deadline: float = 600.0
    max_transfers: int = 4096
    max_transfers_per_client: int = 64


@dataclass(frozen=True)
class TVSConfig:
    manufacturing_trust: str = ""  # default <state_dir>/manufacturing-trust
    allow_sha1_mic: bool = False
    failure_budget: int = 5
    failure_budget_per_source: int = 0  # 0: the same as failure_budget
    failure_window_seconds: float = 900.0
    idle_timeout: float = 10.0
    max_connections: int = 1024
    key_type: str = "ec"
    itl_hash: str = "sha512"


@dataclass(frozen=True)
class SIPConfig:
    keepalive_expires: int = 120
    default_expires: int = 3600
    min_expires: int = 60
    max_expires: int = 7200
    realm: str = "callboard"
    digest_algorithms: tuple[str, ...] = ("MD5",)  # offered in this order; Cisco speaks MD5
    register_expires: int = 3600  # timerRegisterExpires written into phone configs
    transport: str = "tcp"  # the transport phones are told to use: tcp, udp or tls
    autoregistration_first: str = ""  # directory-number range for auto-registration
    autoregistration_last: str = ""


@dataclass(frozen=True)
class Config:
    state_dir: Path = DEFAULT_STATE_DIR
    tftp_root: Path | None = None
    admin_socket: Path | None = None
    demo: bool = False
    log_level: str = "info"
    source: str = "<defaults>"  # the file this came from, for messages
    network: NetworkConfig = field(default_factory=NetworkConfig)
    endpoints: EndpointsConfig = field(default_factory=EndpointsConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    tftp: TFTPConfig = field(default_factory=TFTPConfig)
    tvs: TVSConfig = field(default_factory=TVSConfig)
    sip: SIPConfig = field(default_factory=SIPConfig)
    loads: dict[str, str] = field(default_factory=dict)  # model -> firmware load name

    @property
    def tftp_root_path(self) -> Path:
        return self.tftp_root or self.state_dir / "tftp"

    @property
    def admin_socket_path(self) -> Path:
        return self.admin_socket or self.state_dir / "admin.sock"

    @property
    def manufacturing_trust_path(self) -> Path:
        return Path(self.tvs.manufacturing_trust or self.state_dir / "manufacturing-trust")

    @property
    def advertise_address(self) -> str:
        return self.network.advertise_address or self.network.listen_addresses[0]


_SECTIONS: dict[str, type[Any]] = {
    "network": NetworkConfig,
    "endpoints": EndpointsConfig,
    "registry": RegistryConfig,
    "tftp": TFTPConfig,
    "tvs": TVSConfig,
    "sip": SIPConfig,
}
_TOP_LEVEL = {"state_dir", "tftp_root", "admin_socket", "demo", "log_level"}


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
    config = _from_mapping(raw, source)
    for key, value in (overrides or {}).items():
        config = _override(config, key, value, f"command line ({source})")
    _validate(config)
    return config


def _from_mapping(raw: dict[str, Any], source: str) -> Config:
    config = Config(source=source)
    for key, value in raw.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{key}] must be a table")
            for sub, subvalue in value.items():
                config = _override(config, f"{key}.{sub}", subvalue, source)
        elif key == "loads":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [loads] maps model names to load-name strings")
            for model, load in value.items():
                config = _override(config, f"loads.{model}", load, source)
        elif key in _TOP_LEVEL:
            config = _override(config, key, value, source)
        else:
            raise ConfigError(f"{source}: unknown key {key!r}")
    return config


def _override(config: Config, key: str, value: Any, source: str) -> Config:
    section, _, name = key.partition(".") if key.startswith("loads.") else key.rpartition(".")
    if section == "loads":
        if name not in MODELS:
            raise ConfigError(f"{source}: {key}: unsupported model")
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: {key}: expected a load name string")
        return replace(config, loads={**config.loads, name: value})
    if section:
        cls = _SECTIONS.get(section)
        if cls is None:
            raise ConfigError(f"{source}: unknown section [{section}]")
        current = getattr(config, section)
        coerced = _coerce(cls, name, value, f"{source}: {key}")
        return replace(config, **{section: replace(current, **{name: coerced})})
    if name not in _TOP_LEVEL:
        raise ConfigError(f"{source}: unknown key {name!r}")
    return replace(config, **{name: _coerce(Config, name, value, f"{source}: {key}")})


def _coerce(cls: type[Any], name: str, value: Any, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    if name not in {f.name for f in fields(cls)} or name == "source":
        raise ConfigError(f"{where}: unknown key")
    expected = hints[name]
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
    if expected == tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    raise AssertionError(f"no coercion for {expected!r}")  # pragma: no cover


def _validate(config: Config) -> None:
    where = config.source
    net = config.network
    if not net.listen_addresses:
        raise ConfigError(f"{where}: network.listen_addresses: at least one address is needed")
    for address in net.listen_addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(
                f"{where}: network.listen_addresses: {address!r} is not an IP address"
            ) from None
    try:
        advertised = ipaddress.ip_address(config.advertise_address)
    except ValueError:
        raise ConfigError(
            f"{where}: network.advertise_address: {config.advertise_address!r} is not an IP address"
        ) from None
    if advertised.is_unspecified:
        raise ConfigError(
            f"{where}: network.advertise_address: phones cannot reach {advertised}; "
            "set the address they should use"
        )
    for f in fields(NetworkConfig):
        if f.name.endswith("_port"):
            port = getattr(net, f.name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{where}: network.{f.name}: {port} is not a port number")
    _check_range(where, "registry.code_ttl_hours", config.registry.code_ttl_hours, 0.01, 24 * 3650)
    _check_range(where, "tftp.max_blksize", config.tftp.max_blksize, 8, 65464)
    _check_range(where, "tftp.max_windowsize", config.tftp.max_windowsize, 1, 32768)
    _check_range(where, "tftp.initial_timeout", config.tftp.initial_timeout, 0.05, 255)
    _check_range(where, "tftp.max_retries", config.tftp.max_retries, 1, 100)
    _check_range(where, "tftp.transfer_deadline", config.tftp.transfer_deadline, 1, 86400)
    _check_range(where, "tftp.max_transfers", config.tftp.max_transfers, 1, 1_000_000)
    _check_range(
        where, "tftp.max_transfers_per_client", config.tftp.max_transfers_per_client, 1, 1_000_000
    )
    _check_range(where, "tvs.failure_budget", config.tvs.failure_budget, 1, 1_000_000)
    _check_range(
        where, "tvs.failure_budget_per_source", config.tvs.failure_budget_per_source, 0, 1_000_000
    )
    _check_range(where, "tvs.failure_window_seconds", config.tvs.failure_window_seconds, 1, 1e7)
    _check_range(where, "tvs.idle_timeout", config.tvs.idle_timeout, 0.1, 3600)
    _check_range(where, "tvs.max_connections", config.tvs.max_connections, 1, 1_000_000)
    _choice(where, "tvs.key_type", config.tvs.key_type, ("ec", "rsa"))
    _choice(where, "tvs.itl_hash", config.tvs.itl_hash, ("sha512", "sha1"))
    sip = config.sip
    _check_range(where, "sip.min_expires", sip.min_expires, 1, 86400)
    _check_range(where, "sip.max_expires", sip.max_expires, sip.min_expires, 7 * 86400)
    _check_range(
        where, "sip.default_expires", sip.default_expires, sip.min_expires, sip.max_expires
    )
    _check_range(where, "sip.keepalive_expires", sip.keepalive_expires, 1, 86400)
    _check_range(where, "sip.register_expires", sip.register_expires, 1, 7 * 86400)
    _choice(where, "sip.transport", sip.transport, ("tcp", "udp", "tls"))
    if not sip.digest_algorithms:
        raise ConfigError(f"{where}: sip.digest_algorithms: at least one algorithm is needed")
    for algorithm in sip.digest_algorithms:
        _choice(where, "sip.digest_algorithms", algorithm, ("SHA-256", "MD5"))
    first, last = sip.autoregistration_first, sip.autoregistration_last
    if bool(first) != bool(last):
        raise ConfigError(
            f"{where}: sip.autoregistration_first and sip.autoregistration_last go together"
        )
    if first and not (
        first.isdigit() and last.isdigit() and len(first) == len(last) and int(first) <= int(last)
    ):
        raise ConfigError(
            f"{where}: sip.autoregistration_first..last must be a range of equal-length numbers"
        )
    _choice(where, "log_level", config.log_level, ("debug", "info", "warning", "error"))


def _check_range(where: str, key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{where}: {key}: {value} is out of range ({low}..{high})")


def _choice(where: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: {key}: {value!r} is not one of {', '.join(choices)}")
