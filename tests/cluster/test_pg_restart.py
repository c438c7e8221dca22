"""PostgreSQL stopped and restarted under load, two real nodes serving throughout.

Extends ``test_two_nodes.py``'s single-node outage (one admin write refused, one file served)
to a bounded load on two nodes: a stream of activations (real TVS over TLS with lab MICs,
alternating nodes), REGISTERs of already-active phones (the emulated phone's SIP UA over TCP)
and file fetches (HTTP and TFTP), while the registry's server is stopped and started again.

Checked: no activation lost or duplicated (every phone told "activated" is active in the
database, every active phone was told so, each code used once); while the database is down
files and REGISTERs of active phones never fail and activations fail with a clear TVS status;
after it returns both nodes recover without a restart (activations succeed again, bindings are
written again).
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest_twisted
import tftpy
from callboard.daemon import certs
from callboard.phone.sip_ua import SipUserAgent
from callboard.protocols.tvs.client import activate
from callboard.protocols.tvs.codec import ActivateStatus, DeviceName
from cluster.test_two_nodes import tvs_pin
from support.postgres import PGServer
from twisted.internet import defer, reactor, task, threads

ACTIVE_MACS = ["00AA00000001", "00AA00000002", "00AA00000003", "00AA00000004"]
CODES = 6  # phones waiting to be activated, one code each
UNAVAILABLE = "activation service unavailable"


@dataclass
class Record:
    """What the load saw, stamped with the phase it started and ended in."""

    phase: str = "up"
    registers: list[tuple[str, str, int]] = field(default_factory=list)  # phase, node, status
    fetches: list[tuple[str, str, str]] = field(default_factory=list)  # phase, what, error
    activations: list[tuple[str, str, str, int, str]] = field(default_factory=list)
    told_activated: dict[str, str] = field(default_factory=dict)  # MAC → device name
    running: bool = True


def fetch_http(node: Any, name: str) -> None:
    url = f"http://127.0.0.1:{node.port('http')}/{name}"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200 and response.read()


def fetch_tftp(node: Any, name: str, out: Path) -> None:
    tftpy.TftpClient("127.0.0.1", node.port("tftp")).download(name, str(out), timeout=2)
    assert out.stat().st_size > 0


async def register_loop(uas: list[tuple[str, SipUserAgent]], rec: Record) -> None:
    while rec.running:
        for node_name, ua in uas:
            phase = rec.phase
            result = await ua.register().addTimeout(10, reactor)
            status = min((line.status for line in result.lines), default=0)
            rec.registers.append((phase if phase == rec.phase else "transition", node_name, status))
        await task.deferLater(reactor, 0.05, lambda: None)


async def fetch_loop(nodes: list[Any], tmp_path: Path, rec: Record) -> None:
    i = 0
    while rec.running:
        node = nodes[i % 2]
        name = f"SEP{ACTIVE_MACS[i % len(ACTIVE_MACS)]}.cnf.xml"
        out = tmp_path / f"f{i}.xml"
        for what, fetch, args in (
            ("http", fetch_http, (node, name)),
            ("tftp", fetch_tftp, (node, name, out)),
        ):
            phase = rec.phase
            error = ""
            try:
                await threads.deferToThread(fetch, *args)
            except Exception as exc:  # recorded, asserted on below
                error = f"{type(exc).__name__}: {exc}"
            rec.fetches.append((phase if phase == rec.phase else "transition", what, error))
        i += 1
        await task.deferLater(reactor, 0.05, lambda: None)


async def activation_loop(
    nodes: list[Any], pins: list[bytes], phones: list[tuple[str, str, Any]], rec: Record
) -> None:
    """Each phone retries its code (on alternating nodes) until told activated."""
    i = 0
    while rec.running and any(mac not in rec.told_activated for mac, _, _ in phones):
        for mac, code, mic in phones:
            if mac in rec.told_activated or not rec.running:
                continue
            which = i % 2
            i += 1
            phase = rec.phase
            answer = await activate(
                reactor, "127.0.0.1", nodes[which].port("tvs"),
                device=DeviceName("8841", mac), code=code, pinned_der=pins[which],
                mic=(mic.cert, mic.key), timeout=30,
            )  # fmt: skip
            phase = phase if phase == rec.phase else "transition"
            rec.activations.append((phase, mac, "ab"[which], answer.status, answer.reason))
            if answer.status == ActivateStatus.ACTIVATED:
                assert mac not in rec.told_activated, f"{mac} told activated twice"
                rec.told_activated[mac] = answer.device_name_assigned or ""
            await task.deferLater(reactor, 0.1, lambda: None)


async def wait(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_postgresql_restarted_under_load_loses_and_duplicates_nothing(
    daemon_factory: Any, tmp_path: Path, pg_dsn: str, pg_server: PGServer
) -> None:
    lab_dir = tmp_path / "lab"
    lab = certs.make_lab_ca()
    certs.write_lab_ca(lab_dir, lab)
    nodes = [
        daemon_factory(
            "--registry", pg_dsn, "--manufacturing-trust", str(lab_dir),
            "--set", "registry.feed_interval=0.2", "--set", f"registry.node_name=node-{name}",
            "--set", "tvs.failure_budget_per_source=100000", "--set", "tvs.failure_budget=100000",
            state_dir=tmp_path / f"node-{name}",
        )
        for name in ("a", "b")
    ]  # fmt: skip
    a, b = nodes
    for n, mac in enumerate(ACTIVE_MACS):
        a.json("device", "add", "--model", "8841", "--mac", mac, "--line", f"{3000 + n}",
               "--no-require-activation")  # fmt: skip
    waiting = [a.json("device", "add", "--model", "8841")["name"] for _ in range(CODES)]
    codes = [a.json("code", "show", name)["code"].replace("-", "") for name in waiting]
    deadline = time.monotonic() + 10
    while len(b.json("device", "list")) < len(ACTIVE_MACS) + CODES:
        assert time.monotonic() < deadline, "node B did not catch up"
        await wait(0.1)
    pins = [tvs_pin(a), tvs_pin(b)]
    macs = [f"00BB{i:08X}" for i in range(CODES)]
    phones = [
        (mac, code, certs.issue_mic(lab, model="8841", mac=mac))
        for mac, code in zip(macs, codes, strict=True)
    ]
    uas = [
        (
            "ab"[n % 2],
            SipUserAgent(
                reactor, "127.0.0.1", nodes[n % 2].port("sip"), "tcp",
                device_name=f"SEP{mac}", mac=mac, model_id="683", model="8841",
                lines=[(f"{3000 + n}", "", "")], send_alarm=False,
            ),
        )
        for n, mac in enumerate(ACTIVE_MACS)
    ]  # fmt: skip
    rec = Record()
    loops = [
        register_loop(uas, rec),
        fetch_loop(nodes, tmp_path, rec),
        activation_loop(nodes, pins, phones[: CODES // 2], rec),
    ]
    running = [defer.ensureDeferred(loop) for loop in loops]
    try:
        # Up: a few activations go through on both nodes.
        while len(rec.told_activated) < 2:
            await wait(0.1)
        rec.phase = "stopping"
        await threads.deferToThread(pg_server.stop)
        rec.phase = "down"
        await wait(4.0)
        # The second half of the phones start while the database is still away.
        running.append(
            defer.ensureDeferred(activation_loop(nodes, pins, phones[CODES // 2 :], rec))
        )
        await wait(2.0)
        rec.phase = "starting"
        await threads.deferToThread(pg_server.start)
        rec.phase = "back"
        deadline = time.monotonic() + 30
        while len(rec.told_activated) < CODES:
            assert time.monotonic() < deadline, f"nodes did not recover: {rec.activations[-4:]}"
            await wait(0.2)
        await wait(1.0)  # REGISTERs and fetches go on a little after the recovery
    finally:
        rec.running = False
        for d in running:
            await d.addTimeout(60, reactor)
        for _, ua in uas:
            await ua.close()

    # Files and REGISTERs of the active phones never failed, in any phase.
    assert rec.registers and all(status == 200 for _, _, status in rec.registers), [
        r for r in rec.registers if r[2] != 200
    ][:5]
    assert {phase for phase, _, _ in rec.registers} >= {"up", "down", "back"}
    assert [f for f in rec.fetches if f[2]] == []
    assert {phase for phase, _, _ in rec.fetches} >= {"up", "down", "back"}
    # While down, every activation failed with the TVS status and reason that say why.
    down = [r for r in rec.activations if r[0] == "down"]
    assert down and all(
        (status, reason) == (ActivateStatus.REJECTED, UNAVAILABLE)
        for _, _, _, status, reason in down
    ), down
    assert {node for _, _, node, _, _ in down} == {"a", "b"}
    # Nothing lost, nothing twice: the told, the database and both nodes agree.
    assert set(rec.told_activated) == set(macs)
    assert sorted(rec.told_activated.values()) == sorted(f"SEP{mac}" for mac in macs)
    with psycopg.connect(pg_dsn) as conn:
        used = conn.execute("SELECT count(*) FROM codes WHERE state = 'used'").fetchone()
        active = conn.execute(
            "SELECT name FROM devices WHERE state = 'active' AND name LIKE 'SEP00BB%'"
        ).fetchall()
        placeholders = conn.execute("SELECT count(*) FROM devices WHERE name LIKE 'BAT%'")
        left = placeholders.fetchone()
    assert used == (CODES,)
    assert sorted(name for (name,) in active) == sorted(rec.told_activated.values())
    assert left == (0,)
    for node in nodes:
        deadline = time.monotonic() + 5
        while True:
            states = {d["name"]: d["state"] for d in node.json("device", "list")}
            if all(states.get(name) == "active" for name in rec.told_activated.values()):
                break
            assert time.monotonic() < deadline, states
            await wait(0.2)
    # The bindings kept in memory while the database was away were written when it returned.
    deadline = time.monotonic() + 5
    while b.json("status")["cluster_registrations"] != len(ACTIVE_MACS):
        assert time.monotonic() < deadline, b.json("status")
        await wait(0.2)
    assert b.json("status")["registrations_by_node"] == {"node-a": 2, "node-b": 2}
    for phase in ("up", "down", "back"):
        print(
            f"{phase}: {sum(r[0] == phase for r in rec.registers)} REGISTERs,"
            f" {sum(f[0] == phase for f in rec.fetches)} fetches,"
            f" {sum(a[0] == phase for a in rec.activations)} activation attempts"
        )
