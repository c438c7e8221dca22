"""Configuration: defaults, overrides, and refusal of anything wrong before start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from callboard.daemon.config import ConfigError, load_config
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
