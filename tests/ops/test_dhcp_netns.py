"""DHCP option 150 end to end: Debian's dnsmasq with the project's snippet, the emulated
phone's DHCP client, two network namespaces joined by a veth pair.

Needs root (CI runs as root). Where namespaces cannot be made the tests fail and say why;
they never skip.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SNIPPET = ROOT / "configs" / "dhcp" / "dnsmasq.conf"
SERVER_ADDRESS = "192.0.2.1"


@dataclass
class Lab:
    server_ns: str
    phone_ns: str
    server_if: str
    phone_if: str


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    for tool in ("ip", "dnsmasq"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (Debian packages iproute2, dnsmasq-base)")
    tag = f"{os.getpid() % 100000}"
    lab = Lab(f"cb-dhcp-srv-{tag}", f"cb-dhcp-ph-{tag}", f"cbs{tag}", f"cbp{tag}")
    made: list[str] = []
    try:
        for ns in (lab.server_ns, lab.phone_ns):
            result = run("ip", "netns", "add", ns, check=False)
            if result.returncode != 0:
                pytest.fail(
                    f"cannot create network namespace {ns} (root and CAP_SYS_ADMIN needed): "
                    f"{result.stderr.strip()}"
                )
            made.append(ns)
        run("ip", "link", "add", lab.server_if, "type", "veth", "peer", "name", lab.phone_if)
        run("ip", "link", "set", lab.server_if, "netns", lab.server_ns)
        run("ip", "link", "set", lab.phone_if, "netns", lab.phone_ns)
        run("ip", "-n", lab.server_ns, "addr", "add", f"{SERVER_ADDRESS}/24", "dev", lab.server_if)
        for ns, ifname in ((lab.server_ns, lab.server_if), (lab.phone_ns, lab.phone_if)):
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "link", "set", ifname, "up")
        yield lab
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair, and the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


StartServer = Callable[[Path], subprocess.Popen[str]]


@pytest.fixture
def dnsmasq(lab: Lab, tmp_path: Path) -> Iterator[StartServer]:
    """Start dnsmasq in the server namespace with a given snippet; stopped after the test."""
    started: list[subprocess.Popen[str]] = []

    def start(snippet: Path) -> subprocess.Popen[str]:
        wrapper = tmp_path / "dnsmasq-wrapper.conf"
        wrapper.write_text(
            "port=0\n"  # no DNS: only DHCP
            f"interface={lab.server_if}\n"
            "bind-interfaces\n"
            "no-ping\n"  # skip the 3 s "is this address in use" ping before each offer
            f"dhcp-leasefile={tmp_path / 'leases'}\n"
            f"conf-file={snippet}\n"
        )
        log = open(tmp_path / "dnsmasq.log", "w")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.server_ns, "dnsmasq", "--keep-in-foreground",
             f"--conf-file={wrapper}", "--pid-file=", "--log-facility=-", "--log-dhcp",
             "--user=root"],
            stdout=log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        log.close()
        started.append(proc)
        deadline = time.monotonic() + 20
        while "DHCP, IP range" not in (tmp_path / "dnsmasq.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dnsmasq did not start:\n{(tmp_path / 'dnsmasq.log').read_text()}")
            time.sleep(0.05)
        return proc

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def phone_dhcp(lab: Lab, tmp_path: Path, mac: str = "00:aa:bb:cc:dd:ee") -> dict[str, object]:
    """The emulated phone's DHCP client, run in the phone namespace as a separate process."""
    environ = dict(os.environ)
    environ["PYTHONPATH"] = str(ROOT / "build" / "typecheck")
    result = subprocess.run(
        ["ip", "netns", "exec", lab.phone_ns, sys.executable, "-m", "callboard.phone.dhcp",
         lab.phone_if, "--mac", mac, "--timeout", "20", "--retransmit", "0.5",
         "--vendor-class", "Cisco Systems, Inc. IP Phone CP-8841"],
        capture_output=True, text=True, timeout=60, env=environ, check=False,
    )  # fmt: skip
    server_log = (tmp_path / "dnsmasq.log").read_text()
    assert result.returncode == 0, f"{result.stderr}\n--- dnsmasq:\n{server_log}"
    lease: dict[str, object] = json.loads(result.stdout)
    return lease


def snippet_option_150(path: Path) -> list[str]:
    """The addresses the snippet itself lists in option 150, in its order."""
    match = re.search(r"^dhcp-option=option:tftp-server-address,(.+)$", path.read_text(), re.M)
    assert match, f"no option 150 line in {path}"
    return [part.strip() for part in match.group(1).split(",")]


def test_the_project_snippet_gives_option_150_in_order(
    lab: Lab, dnsmasq: StartServer, tmp_path: Path
) -> None:
    dnsmasq(SNIPPET)
    lease = phone_dhcp(lab, tmp_path)
    expected = snippet_option_150(SNIPPET)
    assert expected == ["192.0.2.10", "192.0.2.11"]
    assert lease["tftp_servers"] == expected
    assert lease["provisioning_servers"] == expected
    assert lease["tftp_server_name"] == "192.0.2.10"  # option 66 came too, as text
    assert lease["server_id"] == SERVER_ADDRESS
    assert lease["routers"] == ["192.0.2.1"]
    assert lease["prefix_length"] == 24
    address = ipaddress.IPv4Address(str(lease["address"]))
    assert ipaddress.IPv4Address("192.0.2.100") <= address <= ipaddress.IPv4Address("192.0.2.200")
    log = (tmp_path / "dnsmasq.log").read_text()
    assert "DHCPACK" in log and "00:aa:bb:cc:dd:ee" in log  # our chaddr, from a real server
    assert "150:tftp-server-address" in log  # the phone asked for it in option 55


def test_order_is_the_servers_not_sorted(lab: Lab, dnsmasq: StartServer, tmp_path: Path) -> None:
    snippet = tmp_path / "reversed.conf"
    snippet.write_text(
        "dhcp-range=192.0.2.100,192.0.2.200,255.255.255.0,1h\n"
        "dhcp-option=option:tftp-server-address,192.0.2.12,192.0.2.10,192.0.2.11\n"
    )
    dnsmasq(snippet)
    lease = phone_dhcp(lab, tmp_path, mac="00:aa:bb:cc:dd:01")
    assert lease["tftp_servers"] == ["192.0.2.12", "192.0.2.10", "192.0.2.11"]
    assert lease["tftp_server_name"] is None


def test_option_66_alone_is_the_fallback(lab: Lab, dnsmasq: StartServer, tmp_path: Path) -> None:
    snippet = tmp_path / "name-only.conf"
    snippet.write_text(
        "dhcp-range=192.0.2.100,192.0.2.200,255.255.255.0,1h\n"
        'dhcp-option=option:tftp-server,"callboard.example.net"\n'
    )
    dnsmasq(snippet)
    lease = phone_dhcp(lab, tmp_path, mac="00:aa:bb:cc:dd:02")
    assert lease["tftp_servers"] == []
    assert lease["provisioning_servers"] == ["callboard.example.net"]


def test_the_phone_boots_from_dhcp_to_registered(
    lab: Lab, dnsmasq: StartServer, tmp_path: Path
) -> None:
    """dnsmasq with the project's snippet and the daemon in one namespace, the emulated phone
    in the other: `callboard phone boot --dhcp IFACE` learns option 150 and registers."""
    from support.harness import Daemon

    first = snippet_option_150(SNIPPET)[0]  # 192.0.2.10: the daemon listens there
    run("ip", "-n", lab.server_ns, "addr", "replace", f"{first}/24", "dev", lab.server_if)
    # The emulated phone does not configure its interface from the lease; a static address
    # outside the DHCP range lets it reach the servers the lease names.
    run("ip", "-n", lab.phone_ns, "addr", "replace", "192.0.2.50/24", "dev", lab.phone_if)
    dnsmasq(SNIPPET)
    lab_dir = tmp_path / "lab"
    from callboard.daemon import certs

    ca = certs.make_lab_ca()
    certs.write_lab_ca(lab_dir, ca)
    mic = certs.write_mic(tmp_path / "mic", certs.issue_mic(ca, model="8841", mac="00AABBCCDDEE"))
    # A fresh namespace: the standard ports are free (the phone uses 69 and 6970 by default).
    daemon = Daemon(
        tmp_path / "state",
        "--listen-address", first, "--advertise-address", first,
        "--tftp-port", "69", "--http-port", "6970", "--tvs-port", "2445",
        "--sip-port", "5060", "--sip-tls-port", "5061",
        "--manufacturing-trust", str(lab_dir),
        launcher=["ip", "netns", "exec", lab.server_ns, sys.executable, "-m",
                  "callboard.daemon.main"],
    )  # fmt: skip
    environ = dict(os.environ)
    environ["PYTHONPATH"] = str(ROOT / "build" / "typecheck")
    try:
        daemon.start()
        daemon.json("device", "add", "--model", "8841", "--mac", "00AABBCCDDEE", "--line",
                    "5001", "--password", "pw-5001", "--no-require-activation")  # fmt: skip
        result = subprocess.run(
            ["ip", "netns", "exec", lab.phone_ns, sys.executable, "-m", "callboard.daemon.main",
             "phone", "boot", "--dhcp", lab.phone_if, "--model", "8841", "--mac", "00AABBCCDDEE",
             "--mic", str(mic[0]), "--mic-key", str(mic[1]), "--timeout", "5"],
            capture_output=True, text=True, timeout=120, env=environ, check=False,
        )  # fmt: skip
        out = result.stdout
        assert result.returncode == 0, out + result.stderr + daemon.log()
        assert "[dhcp] lease 192.0.2." in out and "option 150 192.0.2.10,192.0.2.11" in out
        assert f"provisioning server {first}:6970 answers over http" in out
        assert "5001=200" in out
        shown = daemon.json("device", "show", "SEP00AABBCCDDEE")
        assert shown["registrations"], shown
    finally:
        if daemon.proc is not None:
            daemon.stop()
