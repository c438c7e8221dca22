"""Node B killed (SIGKILL) in the middle of a boot storm: the phones finish on node A.

Two real ``callboard serve`` nodes on one PostgreSQL registry, with one identity (B imported
A's bundle) and ``cluster.nodes`` listing B first, then A. They differ only by address
(127.0.0.2 and 127.0.0.1, the same ports), as two machines would. Every phone is configured
with both addresses (option 150: B, A). Once some phones have onboarded through B, B is
killed; the rest fall over to A for files, TVS and REGISTER. Every phone told "activated" is
active, and no code is used twice.
"""

from __future__ import annotations

import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest_twisted
from callboard.daemon import bundle, certs
from callboard.phone.boot import BootOptions, BootResult
from callboard.phone.storm import read_bat_codes, run_storm, sequential_macs, storm_phones
from callboard.protocols.tvs.codec import ActivateStatus
from support.harness import Daemon
from twisted.internet import reactor as _reactor

reactor: Any = _reactor
PHONES = 60
KILL_AFTER = 12  # phones onboarded through node B before it is killed
A_ADDRESS, B_ADDRESS = "127.0.0.1", "127.0.0.2"
PASSPHRASE = "one cluster, one identity"

# Runs the daemon on another loopback address: the harness says `--listen-address 127.0.0.1`.
_ON_ADDRESS = (
    "import runpy, sys\n"
    "args = sys.argv[2:]\n"
    "args[args.index('--listen-address') + 1] = sys.argv[1]\n"
    "sys.argv = ['callboard', *args]\n"
    "runpy.run_module('callboard.daemon.main', run_name='__main__', alter_sys=True)\n"
)


def _free_on_all(port: int, addresses: tuple[str, ...]) -> bool:
    for address in addresses:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as probe:
                try:
                    probe.bind((address, port))
                except OSError:
                    return False
    return True


def shared_ports(names: tuple[str, ...], addresses: tuple[str, ...]) -> dict[str, int]:
    """One port per name that is free on every address (TCP and UDP)."""
    ports: dict[str, int] = {}
    while len(ports) < len(names):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = probe.getsockname()[1]
        if port not in ports.values() and _free_on_all(port, addresses):
            ports[names[len(ports)]] = port
    return ports


@pytest_twisted.ensureDeferred
async def test_node_b_killed_mid_storm_phones_finish_on_node_a(
    daemon_factory: Any, tmp_path: Path, pg_dsn: str
) -> None:
    lab_dir = tmp_path / "lab"
    lab = certs.make_lab_ca()
    certs.write_lab_ca(lab_dir, lab)
    a_state, b_state = tmp_path / "node-a", tmp_path / "node-b"
    certs.init_certs(a_state)
    bundle.export_identity(a_state, tmp_path / "identity.cbid", PASSPHRASE)
    bundle.import_identity(b_state, tmp_path / "identity.cbid", PASSPHRASE)

    ports = shared_ports(("tftp", "http", "tvs", "sip", "sip-tls"), (A_ADDRESS, B_ADDRESS))
    common = ["--registry", pg_dsn, "--manufacturing-trust", str(lab_dir)]
    for name, port in ports.items():
        common += [f"--{name}-port", str(port)]
    common += [
        "--set",
        f'cluster.nodes=[{{name = "b", address = "{B_ADDRESS}"}}, '
        f'{{name = "a", address = "{A_ADDRESS}"}}]',
        "--set",
        "tvs.failure_budget_per_source=100000",
        "--set",
        "tvs.failure_budget=100000",
    ]
    with ThreadPoolExecutor(2) as pool:  # start both nodes at once
        a_started = pool.submit(daemon_factory, *common, state_dir=a_state)
        b_started = pool.submit(
            daemon_factory,
            *common,
            state_dir=b_state,
            launcher=[sys.executable, "-c", _ON_ADDRESS, B_ADDRESS],
        )
        a: Daemon = a_started.result()
        b: Daemon = b_started.result()
    assert b.status["tvs"][0] == f"{B_ADDRESS}:{ports['tvs']}"

    rows = ["mac,model,description,user,directory_number,display_name,requires_activation"]
    rows += [f",8841,storm {i},,{6000 + i},Storm {i},true" for i in range(PHONES)]
    (tmp_path / "import.csv").write_text("\n".join(rows) + "\n")
    assert a.json("import", str(tmp_path / "import.csv"), "--dummy-mac")["imported"] == PHONES
    a.cli("codes", "export", str(tmp_path / "codes.csv"))
    codes = read_bat_codes((tmp_path / "codes.csv").read_text(), "8841")
    assert len(codes) == PHONES
    macs = sequential_macs("0A0B00000000", PHONES)
    phones = storm_phones(lab, "8841", macs, codes)

    results: list[BootResult] = []
    killed: list[bool] = []

    def on_result(result: BootResult) -> None:
        results.append(result)
        if not killed and sum(r.ok for r in results) >= KILL_AFTER:
            assert b.proc is not None
            b.proc.send_signal(signal.SIGKILL)
            killed.append(True)

    options = BootOptions(
        transport="http",
        http_port=ports["http"],
        https_port=0,
        timeout=3.0,
        config_retries=20,
        config_retry_delay=0.1,
    )
    report = await run_storm(
        reactor, phones, [B_ADDRESS, A_ADDRESS], options, concurrency=12, on_result=on_result
    ).addTimeout(120, reactor)
    assert killed, "the storm ended before node B was killed"
    assert b.stop(signal.SIGKILL) == -signal.SIGKILL

    # Onboarded through B before the kill, and through A after it (files, TVS and REGISTER).
    before = [r for r in results[:KILL_AFTER] if r.ok]
    assert any(f"[tvs] {B_ADDRESS}:" in "\n".join(r.steps) for r in before)
    after = [r for r in results[KILL_AFTER:] if r.ok]
    activated_on_a = [
        r for r in after if f"[tvs] {A_ADDRESS}:{ports['tvs']}: status 0" in "\n".join(r.steps)
    ]
    registered_on_a = [
        r for r in after if f"REGISTER to tcp:{A_ADDRESS}:{ports['sip']}" in "\n".join(r.steps)
    ]
    assert activated_on_a and registered_on_a, [r.steps for r in after[:1]]
    failed = [r for r in results if not r.ok]
    # A phone whose activation B committed but never answered is refused by A (its code is
    # used); any other failure is a failover that did not happen.
    assert all("activation refused" in r.reason for r in failed), [r.reason for r in failed]
    assert len(failed) <= 12 and report.onboarded == PHONES - len(failed)

    told_activated = {
        r.device_name
        for r in results
        if r.activation is not None and r.activation.status == ActivateStatus.ACTIVATED
    }
    assert told_activated >= {r.device_name for r in results if r.ok}
    with psycopg.connect(pg_dsn) as conn:
        active = {
            row[0]
            for row in conn.execute("SELECT name FROM devices WHERE state = 'active'").fetchall()
        }
        used = conn.execute("SELECT device_id FROM codes WHERE state = 'used'").fetchall()
        active_ids = conn.execute(
            "SELECT id FROM devices WHERE name LIKE 'SEP%' AND state = 'active'"
        ).fetchall()
        bats = conn.execute("SELECT count(*) FROM devices WHERE name LIKE 'BAT%'").fetchone()
    assert told_activated <= active  # every phone told "activated" is active
    assert len(used) == len(active_ids) == len({row[0] for row in used})  # no code used twice
    assert {row[0] for row in used} == {row[0] for row in active_ids}
    assert bats == (0,) and active == {f"SEP{mac}" for mac in macs}  # every code: one phone
    assert a.proc is not None and a.proc.poll() is None
    deadline = time.monotonic() + 5  # node A's own view agrees (its change feed caught up)
    while {d["name"] for d in a.json("device", "list") if d["state"] == "active"} != active:
        assert time.monotonic() < deadline
        time.sleep(0.1)
