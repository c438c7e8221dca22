"""A real phone boot against a real daemon, seen as ops see it: ``/metrics`` scraped with curl,
one phone's story in the log by grepping its name, and ``callboard status``."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from callboard.daemon import certs
from e2e.phone_e2e_support import boot, make_lab, mic_files
from support.ports import free_port

MAC = "00AABBCC0303"


def scrape(port: int) -> dict[str, float]:
    result = subprocess.run(
        ["curl", "-sS", "-f", f"http://127.0.0.1:{port}/metrics"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    samples: dict[str, float] = {}
    for line in result.stdout.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_a_phone_boot_in_metrics_logs_and_status(daemon_factory: Any, tmp_path: Path) -> None:
    lab_dir = tmp_path / "lab"
    lab: certs.LabCA = make_lab(lab_dir)
    port = free_port()
    daemon = daemon_factory("--manufacturing-trust", str(lab_dir), "--metrics-port", str(port))
    assert daemon.status["metrics"] == [f"127.0.0.1:{port}"]
    before = scrape(port)
    assert before["callboard_activations_total"] == 0
    assert before['callboard_devices{state="active"}'] == 0

    bat = daemon.json("device", "add", "--model", "8841", "--line", "4001", "--password", "pw")
    code = daemon.json("code", "show", bat["name"])["code"]
    assert scrape(port)["callboard_activation_codes_outstanding"] == 1
    mic = mic_files(lab, tmp_path / "mics", model="8841", mac=MAC)
    result = boot(daemon, mic, model="8841", mac=MAC, extra=("--code", code))
    assert result.returncode == 0, result.stdout + result.stderr

    m = scrape(port)
    assert m["callboard_activations_total"] == 1
    assert m['callboard_tvs_requests_total{command="activate",status="activated"}'] == 1
    assert m["callboard_tvs_connections_total"] >= 1
    assert m['callboard_transfers_total{kind="itl",outcome="ok",protocol="http"}'] >= 1
    assert m['callboard_transfers_total{kind="sep_config",outcome="ok",protocol="http"}'] >= 1
    assert (
        m['callboard_transfers_total{kind="sep_config",outcome="not_found",protocol="http"}'] >= 1
    )
    assert m['callboard_transfer_duration_seconds_count{kind="sep_config",protocol="http"}'] >= 2
    assert m['callboard_sip_register_responses_total{code="200"}'] >= 1
    assert m["callboard_sip_registrations"] == 1
    assert m["callboard_activation_codes_outstanding"] == 0
    assert m['callboard_devices{state="active"}'] == 1
    assert m['callboard_admin_changes_total{action="device.add"}'] == 1
    assert m['callboard_throttle_lockouts_total{scope="device"}'] == 0
    assert any(name.startswith("process_") for name in m)
    assert not [name for name in m if MAC in name.upper()]  # no label carries a MAC

    # One grep tells the phone's story, each step an event naming the device.
    story = [json.loads(line) for line in daemon.log().splitlines() if f"SEP{MAC}" in line]
    events = [e["event"] for e in story]
    assert all(e.get("device", "").endswith(f"SEP{MAC}") for e in story if "file" in e)
    first_request = next(i for i, e in enumerate(story) if e.get("file"))
    activated = events.index("device activated")
    registered = next(i for i, ev in enumerate(events) if ev.startswith("SIP registered"))
    assert first_request < activated < registered
    assert any(re.search(rf"ITLSEP{MAC}\.tlv", e.get("file", "")) for e in story)
    log = daemon.log()
    assert code not in log and code.replace("-", "") not in log
    assert "Starting protocol" not in log and "Starting factory" not in log

    status = daemon.json("status")
    assert status["version"] and status["uptime_seconds"] >= 0
    assert status["devices_by_state"] == {"active": 1}
    assert (status["codes_outstanding"], status["registrations"], status["lockouts"]) == (0, 1, 0)
    text = daemon.cli("status").stdout
    for line in ("version: ", "uptime: ", "devices: 1 (active 1)", "codes outstanding: 0",
                 "registrations: 1", "lockouts: 0"):  # fmt: skip
        assert line in text, text
