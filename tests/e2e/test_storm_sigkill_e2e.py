"""Group commit under a hard kill: SIGKILL in the middle of a storm of activations.

Every phone the TVS told "activated" must be active after the restart (its write was on
disk before the answer left), and no code may have been used twice.
"""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest_twisted
from callboard.daemon import certs
from callboard.phone.http_client import HttpFetcher
from callboard.phone.storm import read_bat_codes
from callboard.protocols.tvs import client as tvs_client
from callboard.protocols.tvs.codec import ActivateResponse, ActivateStatus, DeviceName
from callboard.protocols.tvs.itl import Role, parse_itl
from cryptography.hazmat.primitives import serialization
from e2e.phone_e2e_support import make_lab
from support.harness import Daemon
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.python.failure import Failure

reactor: Any = _reactor
PHONES = 60
KILL_AFTER = 10  # activations answered before the kill


@pytest_twisted.ensureDeferred
async def test_sigkill_mid_storm_keeps_every_acknowledged_activation(
    daemon_factory: Any, tmp_path: Path
) -> None:
    lab_dir = tmp_path / "lab"
    lab = make_lab(lab_dir)
    state = tmp_path / "state"
    first: Daemon = daemon_factory("--manufacturing-trust", str(lab_dir), state_dir=state)
    rows = ["mac,model,description,user,directory_number,display_name,requires_activation"]
    rows += [f",8841,storm {i},,{5000 + i},Storm {i},true" for i in range(PHONES)]
    (tmp_path / "import.csv").write_text("\n".join(rows) + "\n")
    assert first.json("import", str(tmp_path / "import.csv"), "--dummy-mac")["imported"] == PHONES
    first.cli("codes", "export", str(tmp_path / "codes.csv"))
    codes = [
        c.replace("-", "") for c in read_bat_codes((tmp_path / "codes.csv").read_text(), "8841")
    ]
    assert len(codes) == PHONES

    http = HttpFetcher(reactor)
    try:
        itl = await http.fetch("127.0.0.1", first.port("http"), "ITLFile.tlv")
    finally:
        await http.close()
    assert itl is not None
    pinned = parse_itl(itl).certificates(Role.TVS)[0].public_bytes(serialization.Encoding.DER)

    macs = [f"00AACC{i:06X}" for i in range(PHONES)]
    mics = [certs.issue_mic(lab, model="8841", mac=mac) for mac in macs]
    told_activated: list[str] = []
    killed: list[int] = []
    errors: list[str] = []

    def answered(response: ActivateResponse, mac: str) -> None:
        if killed:
            return  # arrived in the same reactor turn as the kill: ignore, be strict
        errors.append(f"{response.status} {response.reason}")
        if response.status == ActivateStatus.ACTIVATED:
            told_activated.append(mac)
            if len(told_activated) == KILL_AFTER:
                assert first.proc is not None
                first.proc.send_signal(signal.SIGKILL)
                killed.append(first.stop(signal.SIGKILL))

    attempts = []
    for mac, mic, code in zip(macs, mics, codes, strict=True):
        d = tvs_client.activate(
            reactor, "127.0.0.1", first.port("tvs"), device=DeviceName("8841", mac),
            code=code, pinned_der=pinned, mic=(mic.cert, mic.key), timeout=20,
        )  # fmt: skip
        d.addCallback(answered, mac)
        d.addErrback(lambda f: errors.append(repr(f.value)))  # cut off by the kill: expected
        attempts.append(d)
    done: defer.Deferred[list[Failure | None]] = defer.gatherResults(attempts)
    await done.addTimeout(90, reactor)
    assert killed == [-signal.SIGKILL], errors[:5]
    assert len(told_activated) == KILL_AFTER

    second: Daemon = daemon_factory("--manufacturing-trust", str(lab_dir), state_dir=state)
    devices = {d["name"]: d for d in second.json("device", "list")}
    for mac in told_activated:
        assert devices[f"SEP{mac}"]["state"] == "active", mac
    active = [n for n, d in devices.items() if n.startswith("SEP") and d["state"] == "active"]
    bats = [n for n in devices if n.startswith("BAT")]
    assert len(active) + len(bats) == PHONES  # every code: a BAT still, or one phone

    db = sqlite3.connect(state / "callboard.sqlite3")
    try:
        used = db.execute("SELECT device_id FROM codes WHERE state = 'used'").fetchall()
        by_device = db.execute(
            "SELECT id FROM devices WHERE name LIKE 'SEP%' AND state = 'active'"
        ).fetchall()
    finally:
        db.close()
    assert len(used) == len(active) == len(by_device)
    assert len({row[0] for row in used}) == len(used)  # no device holds two used codes
    assert {row[0] for row in used} == {row[0] for row in by_device}
