"""SIP bindings seen cluster-wide: a phone registered on node A shows on node B.

Two real ``callboard serve`` nodes on one PostgreSQL registry (and two on one SQLite file, as
the workers of one box are); the phone is sipp (Debian's sip-tester) registering over UDP;
node B is asked through its admin socket (``status``, ``device show``) and its HTTPS REST API.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from support.harness import Daemon
from web.web_support import WebClient, new_token

SIPP = "/usr/bin/sipp"
SCENARIOS = Path(__file__).resolve().parents[1] / "sipp"
MAC = "001122334455"
NAME = f"SEP{MAC.upper()}"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sipp(daemon: Daemon, tmp_path: Path, scenario: str, mac: str = MAC, dn: str = "1001") -> None:
    """One REGISTER transaction of a phone's line, over UDP."""
    result = subprocess.run(
        [
            SIPP, f"127.0.0.1:{daemon.port('sip-udp')}",
            "-sf", str(SCENARIOS / scenario), "-t", "u1", "-i", "127.0.0.1",
            "-p", str(free_udp_port()), "-m", "1", "-timeout", "10s", "-timeout_error",
            "-trace_err", "-nostdin",
            "-key", "dn", dn, "-key", "mac", mac, "-key", "device", f"SEP{mac.upper()}",
            "-key", "model", "683",
        ],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    errors = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*_errors.log"))
    assert result.returncode == 0, f"{scenario}: sipp exit {result.returncode}\n{errors}"


def within(seconds: float, check: Callable[[], bool], what: str) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < seconds, f"{what} not within {seconds}s"
        time.sleep(0.02)
    return time.monotonic() - start


def nodes(daemon_factory: Any, tmp_path: Path, *registry: str) -> tuple[Daemon, Daemon]:
    started = []
    for name in ("a", "b"):
        options = ["--set", f"registry.node_name=node-{name}", "--web-port", "0"]
        options += ["--set", "registry.feed_interval=0.1"]
        started.append(daemon_factory(*registry, *options, state_dir=tmp_path / f"node-{name}"))
    a, b = started
    a.json("device", "add", "--model", "8841", "--mac", MAC, "--line", "1001",
           "--no-require-activation")  # fmt: skip
    within(5, lambda: any(d["name"] == NAME for d in b.json("device", "list")), "device on B")
    return a, b


class Api:
    """Node B's HTTPS REST API with a read-only token (quick to poll, unlike the CLI)."""

    def __init__(self, node: Daemon) -> None:
        self.client = WebClient(node.port("web"))
        self.token = new_token(node, "reader", "--read-only")

    def registrations(self, name: str = NAME) -> list[dict[str, Any]]:
        reply = self.client.api("GET", f"/api/v1/devices/{name}/registrations", self.token)
        assert reply.status == 200, reply.text
        found: list[dict[str, Any]] = reply.json()
        return found


def registrations(node: Daemon, name: str = NAME) -> list[dict[str, Any]]:
    regs: list[dict[str, Any]] = node.json("device", "show", name)["registrations"]
    return regs


def check_seen_cluster_wide(a: Daemon, b: Daemon, tmp_path: Path) -> None:
    api = Api(b)
    assert api.registrations() == [] and b.json("status")["cluster_registrations"] == 0
    sipp(a, tmp_path, "register_ok.xml")
    took = within(1.0, lambda: bool(api.registrations()), "node A's binding on node B's API")
    (seen,) = api.registrations()
    assert seen["node"] == "node-a" and seen["transport"] == "udp", seen
    assert seen["user_agent"] == "Cisco-CP8841/sipp" and 3500 < seen["expires_in"] <= 3630, seen
    (shown,) = registrations(b)  # the admin socket's `device show` says the same
    assert (shown["node"], shown["contact"], shown["source"]) == (
        "node-a", seen["contact"], seen["source"]
    )  # fmt: skip
    (own,) = registrations(a)  # node A: its own, from memory
    assert own["node"] == "node-a" and own["contact"] == seen["contact"]
    status = b.json("status")
    assert status["registrations"] == 0  # node B itself holds none
    assert status["cluster_registrations"] == 1
    assert status["registrations_by_node"] == {"node-a": 1}
    assert "registrations: 0 here, 1 in the cluster (node-a 1)" in b.cli("status").stdout
    # Unregistered on A: gone from B within a second.
    sipp(a, tmp_path, "unregister.xml")
    within(1.0, lambda: api.registrations() == [], "the removal on node B")
    assert b.json("status")["cluster_registrations"] == 0
    print(f"binding seen on node B after {took:.2f}s")


def test_a_phone_registered_on_node_a_shows_on_node_b_within_a_second(
    daemon_factory: Any, tmp_path: Path, pg_dsn: str
) -> None:
    a, b = nodes(daemon_factory, tmp_path, "--registry", pg_dsn)
    check_seen_cluster_wide(a, b, tmp_path)


def test_two_processes_on_one_sqlite_file_see_each_others_bindings(
    daemon_factory: Any, tmp_path: Path
) -> None:
    url = f"sqlite://{tmp_path}/shared.sqlite3"
    a, b = nodes(daemon_factory, tmp_path, "--registry", url)
    check_seen_cluster_wide(a, b, tmp_path)


def test_re_onboarding_and_a_clean_stop_remove_the_shared_rows(
    daemon_factory: Any, tmp_path: Path, pg_dsn: str
) -> None:
    a, b = nodes(daemon_factory, tmp_path, "--registry", pg_dsn)
    other = "0011223344AA"
    a.json("device", "add", "--model", "8841", "--mac", other, "--line", "1002",
           "--no-require-activation")  # fmt: skip
    sipp(a, tmp_path, "register_ok.xml")
    sipp(a, tmp_path, "register_ok.xml", mac=other, dn="1002")
    api = Api(b)
    within(1.0, lambda: bool(api.registrations(f"SEP{other}")), "the second phone on node B")
    assert b.json("status")["cluster_registrations"] == 2
    b.json("code", "generate", NAME)  # re-onboarded on node B: node A drops its bindings
    within(2.0, lambda: api.registrations() == [], "the drop seen on node B")
    assert registrations(a) == []
    assert len(api.registrations(f"SEP{other}")) == 1
    assert a.stop() == 0  # a clean stop takes node A's rows with it
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM bindings").fetchone() == (0,)
    assert b.json("status")["cluster_registrations"] == 0
