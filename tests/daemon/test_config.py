"""Configuration: defaults, overrides, and refusal of anything wrong before start-up."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from callboard.daemon.config import SECTIONS, ConfigError, load_config, section_keys
from callboard.daemon.provisioning import ProvisioningSettings
from callboard.daemon.registry.registry import RegistrySettings
from callboard.protocols.listening import Adopt, ListenerSpec
from callboard.protocols.sip.registrar import RegistrarSettings
from callboard.protocols.tftp.server import TFTPSettings
from callboard.protocols.tvs.activation import TVSSettings
from support.harness import run_cli, serve_args


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "callboard.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_real_ports() -> None:
    config = load_config(None)
    net = config.network
    assert (net.tftp_port, net.http_port, net.tvs_port, net.sip_port, net.sip_tls_port) == (
        69,
        6970,
        2445,
        5060,
        5061,
    )
    assert config.registry.code_ttl_hours == 168
    assert config.tftp_root_path == config.state_dir / "tftp"
    assert config.admin_socket_path == config.state_dir / "admin.sock"


def test_the_example_config_loads() -> None:
    example = Path(__file__).parents[2] / "configs" / "callboard.toml"
    config = load_config(example)
    assert config.advertise_address


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[network]\ntftp_port = 1069\nlisten_addresses = ["127.0.0.2"]\n')
    config = load_config(path, {"network.tftp_port": 2069, "state_dir": str(tmp_path)})
    assert config.network.tftp_port == 2069
    assert config.network.listen_addresses == ("127.0.0.2",)
    assert config.advertise_address == "127.0.0.2"
    assert config.state_dir == tmp_path


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("bogus = 1\n", ["unknown key", "bogus"]),
        ("[network]\ntftp_prot = 69\n", ["network.tftp_prot", "unknown"]),
        ("[nope]\nx = 1\n", ["nope"]),
        ('[network]\ntftp_port = "69"\n', ["network.tftp_port", "integer"]),
        ("[network]\ntftp_port = 70000\n", ["network.tftp_port", "not a port"]),
        ('[network]\nlisten_addresses = ["0.0.0.0"]\n', ["advertise_address", "0.0.0.0"]),
        ('[network]\nlisten_addresses = ["phone.example"]\n', ["listen_addresses"]),
        ("[registry]\ncode_ttl_hours = -1\n", ["registry.code_ttl_hours", "out of range"]),
        ("[tftp]\nmax_blksize = 4\n", ["tftp.max_blksize"]),
        ("[sip]\nmin_expires = 600\nmax_expires = 60\n", ["sip.max_expires"]),
        ('[sip]\nautoregistration_first = "2000"\n', ["autoregistration"]),
        ('[loads]\n"7960" = "x"\n', ["loads.7960"]),
        ("[network\n", ["not valid TOML"]),
        ("[tvs]\nallow_sha1_mic = 1\n", ["tvs.allow_sha1_mic", "true or false"]),
        # Keys that became settable are held to bounds too.
        ("[tftp]\nreceive_buffer = -1\n", ["tftp.receive_buffer", "out of range"]),
        ("[sip]\nudp_receive_buffer = -1\n", ["sip.udp_receive_buffer", "out of range"]),
        ("[sip]\nmax_contacts = 0\n", ["sip.max_contacts", "out of range"]),
        ('[sip]\nrealm = "a\\"b"\n', ["sip.realm", "SIP header"]),
        ('[sip]\ndomains = ["a b"]\n', ["sip.domains"]),
        ("[sip]\nnonce_secret = 1\n", ["sip.nonce_secret", "unknown"]),
        ('[sip]\ntransport = "sctp"\n', ["sip.transport", "sctp"]),
        (
            "[tvs]\nlockout_seconds = 600\nmax_lockout_seconds = 60\n",
            ["tvs.max_lockout_seconds", "out of range"],
        ),
        ('[tvs]\nkey_type = "dsa"\n', ["tvs.key_type", "dsa"]),
        ("[tvs]\nthrottle_budget = 3\n", ["tvs.throttle_budget", "unknown"]),
        ('[endpoints]\nhttp = "ssl:443"\n', ["endpoints.http", "ssl"]),
        ('[endpoints]\nsip = "tcp:5060:interface=phone.example"\n', ["endpoints.sip", "IP"]),
        ('[endpoints]\ntvs = "systemd:domain=INET"\n', ["endpoints.tvs", "index="]),
        ('[registry]\ncode_ttl_hours = "a week"\n', ["registry.code_ttl_hours", "a number"]),
        ('log_level = "loud"\n', ["log_level", "loud"]),
    ],
)
def test_bad_config_is_refused_naming_key_and_file(
    tmp_path: Path, text: str, words: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_serve_refuses_a_bad_config_and_starts_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, "[tftp]\nmax_windowsize = 0\n")
    state = tmp_path / "state"
    result = run_cli("serve", "--config", str(path), "--state-dir", str(state), timeout=30)
    assert result.returncode == 2
    assert "tftp.max_windowsize" in result.stderr and str(path) in result.stderr
    assert not state.exists()


def test_serve_exits_non_zero_when_a_port_is_taken(tmp_path: Path, daemon_factory: Any) -> None:
    first = daemon_factory()
    second = serve_args(tmp_path / "second", tvs=first.port("tvs"))
    result = run_cli(*second, timeout=30)
    assert result.returncode == 1
    assert "cannot listen" in result.stderr


def test_endpoint_strings_replace_the_built_listeners(daemon_factory: Any, tmp_path: Path) -> None:
    admin = tmp_path / "elsewhere.sock"
    config = write(tmp_path, f'[endpoints]\nadmin = "unix:address={admin}:mode=600:lockfile=1"\n')
    daemon = daemon_factory("--config", str(config), socket=admin)
    assert admin.exists() and not (daemon.state_dir / "admin.sock").exists()
    assert daemon.json("device", "list") == []


def test_any_key_can_be_set_on_the_command_line() -> None:
    from callboard.daemon.main import build_parser, serve_config

    args = build_parser().parse_args(
        [
            "serve",
            "--set",
            "tftp.max_blksize=8192",
            "--set",
            'sip.digest_algorithms=["MD5"]',
            "--set",
            "loads.8841=sip88xx.14-2-1",
            "--set",
            "sip.realm=example",
            "--tvs-port",
            "1",
        ]
    )
    config = serve_config(args)
    assert config.tftp.max_blksize == 8192
    assert config.sip.digest_algorithms == ("MD5",)
    assert config.loads == {"8841": "sip88xx.14-2-1"}
    assert config.sip.realm == "example" and config.network.tvs_port == 1
    for bad in ("tftp.max_blksize=huge", "nope.key=1", "loads.7960=x", "novalue"):
        with pytest.raises(ConfigError):
            serve_config(build_parser().parse_args(["serve", "--set", bad]))


def test_keys_that_could_not_be_set_before_reach_their_settings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[tftp]
receive_buffer = 1048576
[tvs]
lockout_seconds = 120
max_lockout_seconds = 3600
max_message = 32768
verify_ttl = 600
failure_budget_per_source = 50
[sip]
udp_receive_buffer = 0
max_contacts = 3
domains = ["pbx.example", "192.0.2.10"]
nonce_lifetime = 60
max_message_size = 8192
sweep_interval = 0.5
server_name = "Exchange"
keepalive_expires = 90
[endpoints]
http = "fd:5"
sip = "systemd:domain=INET6:name=sip"
""",
    )
    config = load_config(path, {"sip.max_contacts": 4})
    assert config.tftp.receive_buffer == 1 << 20
    tvs = config.tvs
    assert (tvs.throttle_base_lockout, tvs.throttle_max_lockout) == (120, 3600)
    assert (tvs.max_message, tvs.verify_ttl, tvs.throttle_source_budget) == (32768, 600, 50)
    assert config.sip_transport.udp_receive_buffer == 0
    sip = config.sip
    assert sip.max_contacts == 4  # the flag wins over the file
    assert sip.domains == frozenset({"pbx.example", "192.0.2.10"})
    assert (sip.nonce_lifetime, sip.max_message_size, sip.sweep_interval) == (60, 8192, 0.5)
    assert sip.server_name == "Exchange"
    # One key, two owners: what the registrar answers and what configs tell phones.
    assert sip.keepalive_expires == config.provisioning.keepalive_expires == 90
    assert config.endpoints.spec("http") == ListenerSpec.adopt("stream", 5)
    assert config.endpoints.spec("sip") == ListenerSpec(
        "stream", Adopt(family="INET6", systemd_name="sip")
    )


def test_the_settings_classes_are_the_sections() -> None:
    config = load_config(None)
    assert isinstance(config.tftp, TFTPSettings) and config.tftp == TFTPSettings()
    assert isinstance(config.tvs, TVSSettings) and config.tvs == TVSSettings()
    assert isinstance(config.sip, RegistrarSettings) and config.sip == RegistrarSettings()
    assert isinstance(config.registry, RegistrySettings)
    assert config.provisioning == ProvisioningSettings()
    assert not config.autoregistration.enabled


def test_the_example_names_every_key_with_its_default() -> None:
    example = Path(__file__).parents[2] / "configs" / "callboard.toml"
    text = example.read_text()
    parsed = tomllib.loads(text)
    defaults = load_config(None)
    for section in SECTIONS:
        block = text.split(f"[{section}]\n", 1)[1].split("\n[", 1)[0]
        for key in section_keys(section):
            line = re.search(rf"^#? ?{key} = (.*)$", block, re.MULTILINE)
            assert line, f"configs/callboard.toml does not show {section}.{key}"
            value = parsed.get(section, {}).get(key)
            if value is None or "example" in line.group(1):
                continue
            config = load_config(None, {f"{section}.{key}": value})
            assert config == defaults, (
                f"{section}.{key} = {value!r} in the example is not the default"
            )
