"""The systemd units: systemd's own checks, and the socket names the daemon adopts."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from callboard.daemon.systemd_fds import ROLES

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
UNITS = sorted(p.name for p in SYSTEMD.iterdir() if p.suffix in (".service", ".socket"))
SOCKETS = [u for u in UNITS if u.endswith(".socket")]
SERVICES = [u for u in UNITS if u.endswith(".service")]
INSTALLED_EXEC = "/usr/local/bin/callboard"
MAX_EXPOSURE = 2.0


def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is not installed (Debian package systemd)")
    return path


def unit(name: str) -> configparser.ConfigParser:
    """A unit file as sections of keys; repeated keys (Conflicts=) are joined."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    text = (SYSTEMD / name).read_text().replace("\\\n", " ")
    parser.read_string(text)
    return parser


def verify_copy(tmp_path: Path, edit: dict[str, str] | None = None) -> Path:
    """The units in a directory of their own, ``ExecStart=`` pointed at this environment's
    ``callboard`` (``verify`` checks that the binary exists; the units name the path pip
    installs to, ``/usr/local/bin``, which a development machine need not have)."""
    here = Path(sysconfig.get_path("scripts")) / "callboard"
    if not here.exists():
        found = shutil.which("callboard")
        assert found, f"the callboard console script is not installed (not at {here}, not on PATH)"
        here = Path(found)
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace(INSTALLED_EXEC, str(here))
        for old, new in (edit or {}).items():
            text = text.replace(old, new)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_there_is_a_unit_for_each_listener() -> None:
    assert SERVICES == ["callboard-standalone.service", "callboard.service"]
    assert SOCKETS == [
        "callboard-http.socket",
        "callboard-https.socket",
        "callboard-sip-tcp.socket",
        "callboard-sip-tls.socket",
        "callboard-sip-udp.socket",
        "callboard-tftp.socket",
        "callboard-tvs.socket",
    ]


def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    directory = verify_copy(tmp_path)
    result = subprocess.run(
        [analyze(), "verify", "--man=false", *(str(directory / u) for u in UNITS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    directory = verify_copy(tmp_path, {"FileDescriptorName=": "FileDescriptorNmae="})
    result = subprocess.run(
        [analyze(), "verify", "--man=false", str(directory / "callboard-tftp.socket")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "Unknown key 'FileDescriptorNmae' in section [Socket]" in result.stderr


def exposure(name: str) -> float:
    result = subprocess.run(
        [analyze(), "security", "--offline=true", str(SYSTEMD / name)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    match = re.search(rf"Overall exposure level for {re.escape(name)}: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@pytest.mark.parametrize("name", SERVICES)
def test_exposure_is_at_most_two(name: str) -> None:
    assert exposure(name) <= MAX_EXPOSURE


def test_the_socket_activated_service_has_no_capabilities() -> None:
    service = unit("callboard.service")["Service"]
    assert service["CapabilityBoundingSet"] == "" and service["AmbientCapabilities"] == ""
    assert service["Type"] == "notify" and service["DynamicUser"] == "yes"
    assert "MemoryDenyWriteExecute" not in service
    assert (
        "MemoryDenyWriteExecute=yes is deliberately not set"
        in (SYSTEMD / "callboard.service").read_text()
    )
    standalone = unit("callboard-standalone.service")["Service"]
    assert standalone["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert standalone["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"


@pytest.mark.parametrize("name", SOCKETS)
def test_each_socket_is_named_for_a_role_of_its_kind(name: str) -> None:
    socket = unit(name)["Socket"]
    role = ROLES[socket["FileDescriptorName"]]
    assert name == f"callboard-{role.name}.socket"
    assert socket["Service"] == "callboard.service"
    listen = "ListenDatagram" if role.datagram else "ListenStream"
    other = "ListenStream" if role.datagram else "ListenDatagram"
    assert listen in socket and other not in socket


def test_socket_ports() -> None:
    ports = {
        unit(name)["Socket"]["FileDescriptorName"]: unit(name)["Socket"].get(
            "ListenDatagram", unit(name)["Socket"].get("ListenStream")
        )
        for name in SOCKETS
    }
    assert ports == {
        "tftp": "0.0.0.0:69",
        "http": "0.0.0.0:6970",
        "https": "0.0.0.0:6971",
        "tvs": "0.0.0.0:2445",
        "sip-udp": "0.0.0.0:5060",
        "sip-tcp": "0.0.0.0:5060",
        "sip-tls": "0.0.0.0:5061",
    }


def test_the_two_services_exclude_each_other() -> None:
    text = (SYSTEMD / "callboard-standalone.service").read_text()
    conflicts = " ".join(re.findall(r"^Conflicts=(.+)$", text, re.M)).split()
    assert sorted(conflicts) == sorted(["callboard.service", *SOCKETS])
    assert unit("callboard.service")["Unit"]["Conflicts"] == "callboard-standalone.service"
