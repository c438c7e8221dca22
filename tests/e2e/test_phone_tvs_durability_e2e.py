"""Activation against the real daemon under stress: SIGKILL right after success, 200-way races."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest_twisted
from callboard.daemon import certs
from callboard.phone.boot import BootOptions, BootResult, Outcome, PhoneIdentity
from callboard.phone.driver import boot_phone
from callboard.phone.http_client import HttpFetcher
from callboard.protocols.tvs import client as tvs_client
from callboard.protocols.tvs.codec import ActivateStatus, DeviceName
from callboard.protocols.tvs.itl import Role, parse_itl
from cryptography.hazmat.primitives import serialization
from e2e.phone_e2e_support import device, http_get, make_lab
from support.harness import Daemon
from twisted.internet import defer
from twisted.internet import reactor as _reactor

reactor: Any = _reactor


@pytest_twisted.ensureDeferred
async def test_activation_survives_sigkill_right_after_the_answer(
    daemon_factory: Any, tmp_path: Path
) -> None:
    lab_dir = tmp_path / "lab"
    lab = make_lab(lab_dir)
    state = tmp_path / "state"
    first: Daemon = daemon_factory("--manufacturing-trust", str(lab_dir), state_dir=state)
    bat = first.json("device", "add", "--model", "8841", "--line", "3001")["name"]
    code = first.json("code", "show", bat)["code"].replace("-", "")
    mac = "00AABBCC0201"
    mic = certs.issue_mic(lab, model="8841", mac=mac)

    http = HttpFetcher(reactor)
    try:
        itl_bytes = await http.fetch("127.0.0.1", first.port("http"), "ITLFile.tlv")
    finally:
        await http.close()
    assert itl_bytes is not None
    pinned = parse_itl(itl_bytes).certificates(Role.TVS)[0].public_bytes(serialization.Encoding.DER)

    killed: list[int] = []

    def kill_on_answer(response: Any) -> Any:
        # The very first thing after the answer arrives: no chance for a graceful flush.
        assert first.proc is not None
        first.proc.send_signal(signal.SIGKILL)
        killed.append(first.stop(signal.SIGKILL))
        return response

    d = tvs_client.activate(
        reactor, "127.0.0.1", first.port("tvs"), device=DeviceName("8841", mac), code=code,
        pinned_der=pinned, mic=(mic.cert, mic.key), timeout=20,
    )  # fmt: skip
    d.addCallback(kill_on_answer)
    d.addTimeout(30, reactor)
    response = await d
    assert response.status == ActivateStatus.ACTIVATED, response.reason
    assert killed == [-signal.SIGKILL]

    second: Daemon = daemon_factory("--manufacturing-trust", str(lab_dir), state_dir=state)
    dev = device(second, f"SEP{mac}")
    assert dev is not None and dev["state"] == "active"
    assert device(second, bat) is None
    assert second.json("code", "show", f"SEP{mac}")["state"] == "used"
    assert http_get(second, f"SEP{mac}.cnf.xml") == 200


@pytest_twisted.ensureDeferred
async def test_200_phones_race_one_bat_code_exactly_one_wins(
    daemon_factory: Any, tmp_path: Path
) -> None:
    lab_dir = tmp_path / "lab"
    lab = make_lab(lab_dir)
    served: Daemon = daemon_factory("--manufacturing-trust", str(lab_dir))
    bat = served.json("device", "add", "--model", "8841", "--line", "3100")["name"]
    code = served.json("code", "show", bat)["code"]

    phones = []
    for i in range(200):
        mac = f"00AABB{i:06X}"
        mic = certs.issue_mic(lab, model="8841", mac=mac)
        phones.append(
            PhoneIdentity(mac=mac, model="8841", mic_cert=mic.cert, mic_key=mic.key, code=code)
        )
    options = BootOptions(
        transport="http", http_port=served.port("http"), timeout=30, register=False
    )
    http = HttpFetcher(reactor, max_per_host=200)
    try:
        boots = [boot_phone(reactor, p, ["127.0.0.1"], options, http=http) for p in phones]
        gathered: defer.Deferred[list[BootResult]] = defer.gatherResults(boots)
        gathered.addTimeout(90, reactor)
        results = await gathered
    finally:
        await http.close()

    winners = [r for r in results if r.outcome is Outcome.ONBOARDED]
    losers = [r for r in results if r.outcome is not Outcome.ONBOARDED]
    assert len(winners) == 1, [r.reason for r in winners]
    assert len(losers) == 199
    for r in losers:
        assert r.outcome is Outcome.REJECTED, r.reason
        assert r.activation is not None
        assert r.activation.status in (ActivateStatus.REJECTED, ActivateStatus.RATE_LIMITED)
    statuses = {r.activation.status for r in losers if r.activation is not None}
    assert ActivateStatus.REJECTED in statuses

    winner = winners[0].device_name
    devices = served.json("device", "list")
    seps = [d for d in devices if d["name"].startswith("SEP")]
    assert [d["name"] for d in seps] == [winner]
    assert seps[0]["state"] == "active"
    assert not any(d["name"] == bat for d in devices)
    assert served.json("code", "show", winner)["state"] == "used"
