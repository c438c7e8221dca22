"""The DHCP snippets in configs/dhcp/ are fed to the real servers' own config checkers."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

DHCP = Path(__file__).resolve().parents[2] / "configs" / "dhcp"
OPTION_150 = ["192.0.2.10", "192.0.2.11"]


def tool(name: str, package: str) -> str:
    path = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        pytest.fail(f"{name} is not installed (Debian package {package})")
    return path


def check(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def dnsmasq_test(conf: Path) -> subprocess.CompletedProcess[str]:
    return check([tool("dnsmasq", "dnsmasq-base"), "--test", f"--conf-file={conf}"])


def kea_test(conf: Path) -> subprocess.CompletedProcess[str]:
    return check([tool("kea-dhcp4", "kea-dhcp4-server"), "-t", str(conf)])


def dhcpd_test(conf: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return check(
        [tool("dhcpd", "isc-dhcp-server"), "-t", "-4", "-cf", str(conf),
         "-lf", str(tmp_path / "dhcpd.leases")]
    )  # fmt: skip


def test_dnsmasq_accepts_the_snippet(tmp_path: Path) -> None:
    result = dnsmasq_test(DHCP / "dnsmasq.conf")
    assert result.returncode == 0 and "syntax check OK" in result.stderr, result.stderr
    # As deployed: included from a main configuration that owns the interface and DNS.
    wrapper = tmp_path / "dnsmasq.conf"
    wrapper.write_text(f"port=0\nbind-interfaces\nconf-file={DHCP / 'dnsmasq.conf'}\n")
    result = dnsmasq_test(wrapper)
    assert result.returncode == 0 and "syntax check OK" in result.stderr, result.stderr


def test_dnsmasq_check_can_fail(tmp_path: Path) -> None:
    broken = tmp_path / "broken.conf"
    broken.write_text((DHCP / "dnsmasq.conf").read_text().replace("192.0.2.11", "192.0.2.311"))
    result = dnsmasq_test(broken)
    assert result.returncode != 0 and "bad" in result.stderr


def test_kea_accepts_its_configuration() -> None:
    result = kea_test(DHCP / "kea-dhcp4.json")
    assert result.returncode == 0, result.stdout + result.stderr


def test_kea_check_can_fail(tmp_path: Path) -> None:
    broken = tmp_path / "kea.json"
    broken.write_text((DHCP / "kea-dhcp4.json").read_text().replace('"array": true', '"array": 7'))
    assert kea_test(broken).returncode != 0


def test_isc_dhcpd_accepts_its_configuration(tmp_path: Path) -> None:
    result = dhcpd_test(DHCP / "isc-dhcpd.conf", tmp_path)
    assert result.returncode == 0, result.stderr


def test_isc_dhcpd_check_can_fail(tmp_path: Path) -> None:
    broken = tmp_path / "dhcpd.conf"
    broken.write_text((DHCP / "isc-dhcpd.conf").read_text().replace("array of ip-address", "x"))
    assert dhcpd_test(broken, tmp_path).returncode != 0


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("dnsmasq.conf", r"^dhcp-option=option:tftp-server-address,(.+)$"),
        ("kea-dhcp4.json", r'"name": "tftp-servers", "data": "([^"]+)"'),
        ("isc-dhcpd.conf", r"^\s*option tftp-servers (\d[^;]+);"),
        ("cisco-ios.txt", r"^\s*option 150 ip (.+)$"),
    ],
)
def test_every_snippet_lists_the_same_servers_in_the_same_order(name: str, pattern: str) -> None:
    match = re.search(pattern, (DHCP / name).read_text(), re.M)
    assert match, f"no option 150 in {name}"
    assert re.split(r"[,\s]+", match.group(1).strip()) == OPTION_150


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("dnsmasq.conf", r'^dhcp-option=option:tftp-server,"([^"]+)"$'),
        ("kea-dhcp4.json", r'"name": "tftp-server-name", "data": "([^"]+)"'),
        ("isc-dhcpd.conf", r'^\s*option tftp-server-name "([^"]+)";'),
        ("cisco-ios.txt", r"^\s*option 66 ascii (\S+)$"),
    ],
)
def test_every_snippet_gives_option_66_as_one_name(name: str, pattern: str) -> None:
    match = re.search(pattern, (DHCP / name).read_text(), re.M)
    assert match and match.group(1) == OPTION_150[0], name
