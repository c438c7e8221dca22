"""An independent peer: the sipp scenarios of tests/sipp/ against the in-process registrar."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from callboard.protocols.sip.registrar import Registrar, RegistrarSettings
from callboard.protocols.sip.transports import SIPRegistrarService
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

SIPP = "/usr/bin/sipp"
SCENARIOS = Path(__file__).resolve().parents[1] / "sipp"


@pytest_twisted.async_yield_fixture
async def sip_server(policy: Any) -> AsyncIterator[SIPRegistrarService]:
    # The defaults: one MD5 challenge, which is all sipp 3.6 (like a Cisco phone) can answer.
    registrar = Registrar(
        policy,
        RegistrarSettings(),
        now=reactor.seconds,  # type: ignore[attr-defined]
        wall_now=time.time,
    )
    svc = SIPRegistrarService(
        registrar, reactor, udp_port=0, tcp_port=0, tls_port=None, interface="127.0.0.1"
    )
    svc.startService()
    yield svc
    await svc.stopService()


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


CASES = [
    # scenario, dn, device MAC, transport, expected registrar binding count after
    ("register_ok.xml", "1001", "001122334455", "u1", 1),
    ("register_ok.xml", "1001", "001122334455", "t1", 1),
    ("register_unknown_404.xml", "1001", "0000000000aa", "u1", 0),
    ("register_inactive_403.xml", "2001", "00aabbccddee", "u1", 0),
    ("register_digest.xml", "1002", "001122334455", "u1", 1),
    ("register_digest.xml", "1002", "001122334455", "t1", 1),
    ("unregister.xml", "1001", "001122334455", "u1", 0),
    # Cisco firmware (protocol notes §10, §16): the 7821's REGISTER with its multipart body,
    # Reason and Contact parameters, digest MD5, then a refresh; the keep-alive to a backup
    # node; the alarm REFER.
    ("cisco_register.xml", "1002", "001122334455", "u1", 1),
    ("cisco_register.xml", "1002", "001122334455", "t1", 1),
    ("cisco_keepalive.xml", "1001", "001122334455", "u1", 1),
    ("cisco_keepalive.xml", "1001", "001122334455", "t1", 1),
    ("cisco_alarm_refer.xml", "1001", "001122334455", "u1", 0),
    ("cisco_alarm_refer.xml", "1001", "001122334455", "t1", 0),
]

#: Registrar counters each scenario must leave (beyond the binding count).
COUNTERS: dict[str, dict[str, int]] = {
    "cisco_register.xml": {"remotecc_answers": 1, "challenged_401": 1, "registrations": 2},
    "cisco_keepalive.xml": {"keepalives": 1, "unregistrations": 0, "registrations": 1},
    "cisco_alarm_refer.xml": {"refer": 2, "alarms": 1, "unsupported_415": 1},
}


@pytest.mark.parametrize(("scenario", "dn", "mac", "transport", "bindings"), CASES)
@pytest_twisted.ensureDeferred
async def test_sipp_scenario(
    sip_server: SIPRegistrarService,
    tmp_path: Path,
    scenario: str,
    dn: str,
    mac: str,
    transport: str,
    bindings: int,
) -> None:
    port = sip_server.udp_port if transport == "u1" else sip_server.tcp_port
    local = free_port(socket.SOCK_DGRAM if transport == "u1" else socket.SOCK_STREAM)
    args = [
        f"127.0.0.1:{port}",
        "-sf", str(SCENARIOS / scenario),
        "-t", transport,
        "-i", "127.0.0.1",
        "-p", str(local),
        "-m", "1",
        "-timeout", "10s",
        "-timeout_error",
        "-trace_err",
        "-nostdin",
        "-key", "dn", dn,
        "-key", "mac", mac,
        "-key", "device", f"SEP{mac.upper()}",
        "-key", "model", "683",
    ]  # fmt: skip
    d = getProcessOutputAndValue(SIPP, args, env=dict(os.environ), path=str(tmp_path))
    d.addTimeout(20, reactor)
    out, err, code = await d
    errors = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*_errors.log"))
    assert code == 0, f"sipp exit {code}\n{out[-2000:]!r}\n{err[-2000:]!r}\n{errors}"
    assert sip_server.registrar.binding_count() == bindings
    counters = sip_server.registrar.counters_snapshot()
    expected = COUNTERS.get(scenario, {})
    assert {k: counters[k] for k in expected} == expected
