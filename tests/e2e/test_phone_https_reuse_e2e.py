"""A phone's two HTTPS config requests in one boot: one connection, or two with --no-reuse.

Before activation the phone asks 6971 for ``SEP<MAC>.cnf.xml.sgn`` (404), after it for the
same name (200). As a real phone, it keeps that connection open between the two; with
``--no-reuse`` every fetch is a new connection with a full handshake. Told apart by the
client port the daemon logs for each HTTPS request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from callboard.daemon import certs
from e2e.phone_e2e_support import boot, mic_files
from support.harness import Daemon

HTTPS = "endpoints.https=tcp:0:interface=127.0.0.1"


@pytest.fixture
def served(daemon_factory: Any, lab: certs.LabCA, lab_dir: Path) -> Daemon:
    d: Daemon = daemon_factory("--manufacturing-trust", str(lab_dir), "--set", HTTPS)
    return d


def _https_requests(daemon: Daemon, mac: str) -> list[tuple[int, int]]:
    """(client port, status) of each HTTPS request for the phone's own config, in order."""
    found = []
    for line in daemon.log().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("transport") == "https" and f"SEP{mac}" in str(event.get("file")):
            found.append((event["client_port"], event["status"]))
    return found


@pytest.mark.parametrize(("mac", "flags", "connections"), [
    ("00AABBCC0A01", (), 1),
    ("00AABBCC0A02", ("--no-reuse",), 2),
])  # fmt: skip
def test_the_phone_asks_6971_twice_on_one_connection_unless_told_not_to_reuse(
    served: Daemon,
    lab: certs.LabCA,
    tmp_path: Path,
    mac: str,
    flags: tuple[str, ...],
    connections: int,
) -> None:
    dev = served.json("device", "add", "--model", "8841", "--line", "2001:Desk",
                      "--password", "pw-2001")  # fmt: skip
    code = served.json("code", "show", dev["name"])["code"]
    mic = mic_files(lab, tmp_path / "mics", model="8841", mac=mac)
    extra = ("--code", code, "--https-port", str(served.port("https")), *flags)
    result = boot(served, mic, model="8841", mac=mac, extra=extra)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "status 0 activated" in result.stdout
    requests = _https_requests(served, mac)
    assert [status for _port, status in requests] == [404, 200]
    assert len({port for port, _status in requests}) == connections
