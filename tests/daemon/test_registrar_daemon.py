"""The registrar inside the real daemon, driven by sipp (Debian's sip-tester) and the CLI."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support.ports import free_port

SIPP = "/usr/bin/sipp"
SCENARIOS = Path(__file__).resolve().parents[1] / "sipp"


def sipp(daemon: Any, tmp_path: Path, scenario: str, dn: str, mac: str, transport: str) -> None:
    port = daemon.port("sip-udp" if transport == "u1" else "sip")
    local = free_port(socket.SOCK_DGRAM if transport == "u1" else socket.SOCK_STREAM)
    result = subprocess.run(
        [
            SIPP,
            f"127.0.0.1:{port}",
            "-sf",
            str(SCENARIOS / scenario),
            "-t",
            transport,
            "-i",
            "127.0.0.1",
            "-p",
            str(local),
            "-m",
            "1",
            "-timeout",
            "10s",
            "-timeout_error",
            "-trace_err",
            "-nostdin",
            "-key",
            "dn",
            dn,
            "-key",
            "mac",
            mac,
            "-key",
            "device",
            f"SEP{mac.upper()}",
            "-key",
            "model",
            "683",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    errors = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*_errors.log"))
    assert result.returncode == 0, f"{scenario}: sipp exit {result.returncode}\n{errors}"


@pytest.fixture
def sip_daemon(daemon_factory: Any, tmp_path: Path) -> Any:
    config = tmp_path / "callboard.toml"
    # sipp answers only the first WWW-Authenticate and knows MD5 alone.
    config.write_text('[sip]\ndigest_algorithms = ["MD5", "SHA-256"]\n')
    daemon = daemon_factory("--config", str(config))
    daemon.json(
        "device",
        "add",
        "--model",
        "8841",
        "--mac",
        "001122334455",
        "--line",
        "1001",
        "--no-require-activation",
    )
    daemon.json(
        "device",
        "add",
        "--model",
        "8841",
        "--mac",
        "001122334466",
        "--line",
        "1002",
        "--password",
        "pw",
        "--auth-name",
        "a1002",
        "--no-require-activation",
    )
    daemon.json("device", "add", "--model", "8841", "--mac", "00aabbccddee", "--line", "2001")
    return daemon


@pytest.mark.parametrize("transport", ["u1", "t1"])
def test_sipp_against_the_daemon(sip_daemon: Any, tmp_path: Path, transport: str) -> None:
    sipp(sip_daemon, tmp_path, "register_ok.xml", "1001", "001122334455", transport)
    shown = sip_daemon.json("device", "show", "SEP001122334455")
    (binding,) = shown["registrations"]
    assert binding["transport"] == ("udp" if transport == "u1" else "tcp")
    assert binding["user_agent"] == "Cisco-CP8841/sipp" and binding["expires_in"] > 3500
    sipp(sip_daemon, tmp_path, "register_unknown_404.xml", "1001", "0000000000aa", transport)
    sipp(sip_daemon, tmp_path, "register_inactive_403.xml", "2001", "00aabbccddee", transport)
    sipp(sip_daemon, tmp_path, "register_digest.xml", "1002", "001122334466", transport)
    sipp(sip_daemon, tmp_path, "unregister.xml", "1001", "001122334455", transport)
    assert sip_daemon.json("device", "show", "SEP001122334455")["registrations"] == []
    counters = sip_daemon.json("status")["counters"]
    assert counters["sip_registrations"] >= 2 and counters["sip_refused_404"] == 1
    assert counters["sip_refused_403"] == 1 and counters["sip_bindings"] == 1  # the 1002 line


def test_re_onboarding_drops_registrations(sip_daemon: Any, tmp_path: Path) -> None:
    sipp(sip_daemon, tmp_path, "register_ok.xml", "1001", "001122334455", "t1")
    assert len(sip_daemon.json("device", "show", "SEP001122334455")["registrations"]) == 1
    sip_daemon.json("code", "generate", "SEP001122334455")
    shown = sip_daemon.json("device", "show", "SEP001122334455")
    assert shown["state"] == "awaiting-activation" and shown["registrations"] == []
    # And it cannot register again until a code is redeemed.
    sipp(sip_daemon, tmp_path, "register_inactive_403.xml", "1001", "001122334455", "t1")


def test_autoregistration_creates_phones_until_the_range_runs_out(
    daemon_factory: Any, tmp_path: Path
) -> None:
    config = tmp_path / "auto.toml"
    config.write_text('[sip]\nautoregistration_first = "2000"\nautoregistration_last = "2001"\n')
    daemon = daemon_factory("--config", str(config))
    daemon.json("defaults", "set", "8841", "--onboarding", "autoregistration")
    for mac in ("0000000000a1", "0000000000a2"):
        sipp(daemon, tmp_path, "register_ok.xml", "9999", mac, "t1")
    devices = {d["name"]: d for d in daemon.json("device", "list")}
    assert set(devices) == {"SEP0000000000A1", "SEP0000000000A2"}
    assert sorted(d["lines"][0]["directory_number"] for d in devices.values()) == ["2000", "2001"]
    assert all(d["state"] == "active" for d in devices.values())
    # The range is exhausted: a clear 403 and a log line, not a crash.
    sipp(daemon, tmp_path, "register_inactive_403.xml", "9999", "0000000000a3", "t1")
    assert "auto-registration range exhausted" in daemon.log()
    # A model still on activation codes is not auto-registered: unknown stays 404.
    daemon.json("defaults", "set", "8841", "--onboarding", "activation-code")
    sipp(daemon, tmp_path, "register_unknown_404.xml", "9999", "0000000000a4", "t1")
