"""Two real ``callboard serve`` nodes on one PostgreSQL registry.

Each node has its own state directory and ports; the registry is all they share. Phones are
the TVS client speaking to each node over real TLS; files come over real HTTP.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest_twisted
from callboard.daemon import certs
from callboard.protocols.tvs.client import activate
from callboard.protocols.tvs.codec import DeviceName
from support.harness import run_cli
from support.probes import http_status, tvs_pin
from twisted.internet import defer, reactor


def two_nodes(daemon_factory: Any, tmp_path: Path, dsn: str, *extra: str) -> tuple[Any, Any]:
    return tuple(  # type: ignore[return-value]
        daemon_factory("--registry", dsn, *extra, state_dir=tmp_path / f"node-{name}")
        for name in ("a", "b")
    )


def test_a_device_added_on_node_a_is_served_by_node_b_within_a_second(
    daemon_factory: Any, tmp_path: Path, pg_dsn: str
) -> None:
    a, b = two_nodes(daemon_factory, tmp_path, pg_dsn)
    assert http_status(b, "SEP001122334455.cnf.xml") == 404
    added = a.json(
        "device", "add", "--model", "8841", "--mac", "001122334455", "--no-require-activation"
    )
    start = time.monotonic()
    while http_status(b, "SEP001122334455.cnf.xml") != 200:
        assert time.monotonic() - start < 1.0, "node B did not serve the new device within 1 s"
        time.sleep(0.02)
    assert b.json("device", "show", added["name"])["state"] == "provisioned"


@pytest_twisted.ensureDeferred
async def test_200_phones_race_one_bat_code_on_two_nodes_and_one_wins(
    daemon_factory: Any, tmp_path: Path, pg_dsn: str
) -> None:
    lab_dir = tmp_path / "lab"
    lab = certs.make_lab_ca()
    certs.write_lab_ca(lab_dir, lab)
    a, b = two_nodes(
        daemon_factory,
        tmp_path,
        pg_dsn,
        "--manufacturing-trust",
        str(lab_dir),
        "--set",
        "tvs.failure_budget_per_source=100000",
        "--set",
        "tvs.failure_budget=100000",
    )
    name = a.json("device", "add", "--model", "8841")["name"]
    code = a.json("code", "show", name)["code"].replace("-", "")
    deadline = time.monotonic() + 5
    while not any(d["name"] == name for d in b.json("device", "list")):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    pins = {id(a): tvs_pin(a), id(b): tvs_pin(b)}
    macs = [f"0011223{i:05X}" for i in range(200)]
    mics = [certs.issue_mic(lab, model="8841", mac=mac) for mac in macs]
    attempts = []
    for i, (mac, mic) in enumerate(zip(macs, mics, strict=True)):
        node = a if i % 2 else b
        d = activate(
            reactor,
            "127.0.0.1",
            node.port("tvs"),
            device=DeviceName("8841", mac),
            code=code,
            pinned_der=pins[id(node)],
            mic=(mic.cert, mic.key),
            timeout=60,
        )
        attempts.append(d)
    answers = await defer.gatherResults(attempts).addTimeout(120, reactor)
    winners = [r for r in answers if r.status == 0]
    assert len(winners) == 1, [r.status for r in answers]
    winner = winners[0].device_name_assigned
    with psycopg.connect(pg_dsn) as conn:
        used = conn.execute("SELECT count(*) FROM codes WHERE state = 'used'").fetchone()
        active = conn.execute("SELECT name FROM devices WHERE state = 'active'").fetchall()
    assert used == (1,)
    assert active == [(winner,)]
    for node in (a, b):  # both nodes agree (the loser's view caught up through the feed)
        deadline = time.monotonic() + 5
        while node.json("device", "show", winner)["state"] != "active":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert code not in node.log()


def test_bad_registry_urls_are_one_line_errors(tmp_path: Path, pg_server: Any) -> None:
    state = ["--state-dir", str(tmp_path / "s"), "--listen-address", "127.0.0.1"]
    for url, expected, status in [
        ("mysql://x/y", "is not sqlite:/// or postgresql://", 2),
        ("sqlite://relative", "expected sqlite:///absolute/path", 2),
        ("postgresql://a@b/c?nonsense=1", "malformed postgresql:// URL", 2),
        (f"postgresql://callboard@127.0.0.1:{pg_server.port + 1}/x", "cannot start", 1),
    ]:
        result = run_cli("serve", *state, "--registry", url, timeout=60)
        assert result.returncode == status, (url, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (url, result.stderr)
        migrate = run_cli("db", "migrate", "--registry", url)
        assert migrate.returncode != 0 and len(migrate.stderr.strip().splitlines()) == 1


def test_db_migrate_creates_and_refuses_a_newer_schema(pg_dsn: str, tmp_path: Path) -> None:
    first = run_cli("db", "migrate", "--registry", pg_dsn, check=True)
    assert "migrated from version 0" in first.stdout
    again = run_cli("db", "migrate", "--registry", pg_dsn, check=True)
    assert "up to date" in again.stdout
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE callboard_schema SET version = version + 1")
    newer = run_cli("db", "migrate", "--registry", pg_dsn)
    assert newer.returncode == 1 and "newer than this Callboard" in newer.stderr
    lite = run_cli("db", "migrate", "--registry", f"sqlite://{tmp_path}/x.sqlite3", check=True)
    assert "migrated from version 0" in lite.stdout


def test_with_the_database_down_files_are_served_and_writes_fail_clearly(
    daemon_factory: Any, tmp_path: Path, pg_dsn: str, pg_server: Any
) -> None:
    node = daemon_factory("--registry", pg_dsn, state_dir=tmp_path / "node")
    node.json(
        "device", "add", "--model", "8841", "--mac", "001122334455", "--no-require-activation"
    )
    pg_server.stop()
    try:
        refused = node.cli("device", "add", "--model", "8851", "--mac", "0011223344AA")
        assert refused.returncode != 0
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "unreachable" in refused.stderr or "connection failed" in refused.stderr
        # Memory still serves what is active; nothing of the refused write shows.
        assert http_status(node, "SEP001122334455.cnf.xml") == 200
        assert [d["name"] for d in node.json("device", "list")] == ["SEP001122334455"]
    finally:
        pg_server.start()
    # Back: the same node writes again without a restart.
    deadline = time.monotonic() + 15
    while node.cli("device", "add", "--model", "8851", "--mac", "0011223344AA").returncode:
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.2)
    with psycopg.connect(pg_dsn) as conn:
        names = conn.execute("SELECT name FROM devices ORDER BY name").fetchall()
    assert names == [("SEP001122334455",), ("SEP0011223344AA",)]
