"""TVS inside the real daemon: the trust store reloads on SIGHUP, the ITL pins TVS."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from callboard.daemon import certs
from callboard.protocols.tvs.client import activate
from callboard.protocols.tvs.codec import DeviceName
from support.probes import tvs_pin
from twisted.internet import reactor


@pytest_twisted.ensureDeferred
async def test_trust_store_reloads_on_sighup(daemon_factory: Any, tmp_path: Path) -> None:
    lab_dir = tmp_path / "lab"
    lab = certs.make_lab_ca()
    certs.write_lab_ca(lab_dir, lab)
    mic = certs.issue_mic(lab, model="8841", mac="00AABBCCDDEE")
    trust = tmp_path / "trust"
    trust.mkdir()
    daemon = daemon_factory("--manufacturing-trust", str(trust))
    name = daemon.json("device", "add", "--model", "8841")["name"]
    code = daemon.json("code", "show", name)["code"]
    pin = tvs_pin(daemon)

    async def redeem() -> Any:
        d = activate(
            reactor,
            "127.0.0.1",
            daemon.port("tvs"),
            device=DeviceName("8841", "00AABBCCDDEE"),
            code=code.replace("-", ""),
            pinned_der=pin,
            mic=(mic.cert, mic.key),
        )
        d.addTimeout(20, reactor)
        return await d

    refused = await redeem()
    assert refused.status == 2  # the lab root is not trusted yet
    for name_ in ("lab-root.pem", "lab-ca.pem"):
        shutil.copyfile(lab_dir / name_, trust / name_)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "manufacturing trust store reloaded" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    accepted = await redeem()
    assert (accepted.status, accepted.device_name_assigned) == (0, "SEP00AABBCCDDEE")
    shown = daemon.json("device", "show", "SEP00AABBCCDDEE")
    assert shown["state"] == "active" and shown["mic_sha256"]
    log = daemon.log()
    assert code not in log and code.replace("-", "") not in log
