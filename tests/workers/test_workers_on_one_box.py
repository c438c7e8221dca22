"""``callboard serve --workers 2``: two real worker processes on one SQLite registry.

The daemon is a real subprocess (a supervisor and its two workers); phones are the TVS client
over real TLS, files come over real HTTP (urllib) and TFTP (tftp-hpa and a raw UDP socket).
Which worker served what is read back from ``status`` (each worker's PID and what it served)
and from the aggregated ``/metrics`` (a ``worker`` label on every sample).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from callboard.daemon import certs
from callboard.protocols.tvs.client import activate
from callboard.protocols.tvs.codec import DeviceName
from prometheus_client.parser import text_string_to_metric_families
from support.harness import Daemon, run_cli, serve_args, systemd_launcher
from support.ports import free_port
from support.probes import http_status, tvs_pin
from twisted.internet import defer, reactor

WORKERS = ("--workers", "2")


def all_workers(daemon: Daemon, count: int = 2, timeout: float = 30) -> dict[str, Any]:
    """The status once every worker answers (worker 0 is up before the others start)."""
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = daemon.json("status")
        if status.get("workers_answering") == count:
            daemon.status = status
            return status
        assert time.monotonic() < deadline, (status, daemon.log())
        time.sleep(0.1)


def start(daemon_factory: Any, *extra: str, state_dir: Path | None = None) -> Daemon:
    daemon: Daemon = daemon_factory(*WORKERS, *extra, state_dir=state_dir)
    all_workers(daemon)
    return daemon


def worker_pids(status: dict[str, Any]) -> list[int]:
    return [int(w["pid"]) for w in status["workers"]]


def children_of(pid: int) -> set[int]:
    tasks = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in tasks.read_text().split()} if tasks.exists() else set()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def tftp_hpa(port: int, name: str, out: Path) -> bool:
    result = subprocess.run(
        ["tftp", "-m", "binary", "127.0.0.1", str(port), "-c", "get", name, str(out)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return result.returncode == 0 and out.exists() and out.stat().st_size > 0 and not result.stderr


def tftp_first_block(port: int, name: str) -> tuple[bytes, int]:
    """A raw read request: the first DATA packet and the port it came from (then ACK)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(b"\x00\x01" + name.encode() + b"\x00octet\x00", ("127.0.0.1", port))
        data, peer = sock.recvfrom(65536)
        sock.sendto(struct.pack("!HH", 4, 1), peer)
    return data, peer[1]


def metrics(daemon: Daemon) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    url = f"http://127.0.0.1:{daemon.port('metrics')}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def served(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], protocol: str
) -> dict[str, float]:
    """Transfers per worker for one protocol, from the aggregated exposition."""
    per: dict[str, float] = {}
    for (name, labels), value in samples.items():
        tags = dict(labels)
        if name == "callboard_transfers_total" and tags.get("protocol") == protocol:
            per[tags["worker"]] = per.get(tags["worker"], 0) + value
    return per


@pytest_twisted.ensureDeferred
async def test_200_phones_race_one_bat_code_across_two_workers_and_one_wins(
    daemon_factory: Any, tmp_path: Path
) -> None:
    lab_dir = tmp_path / "lab"
    lab = certs.make_lab_ca()
    certs.write_lab_ca(lab_dir, lab)
    daemon = start(
        daemon_factory,
        "--manufacturing-trust",
        str(lab_dir),
        "--set",
        "tvs.failure_budget_per_source=100000",
        "--set",
        "tvs.failure_budget=100000",
    )
    name = daemon.json("device", "add", "--model", "8841")["name"]
    code = daemon.json("code", "show", name)["code"].replace("-", "")
    time.sleep(0.5)  # both workers have the new device (feed followed every 0.2 s)
    pin = tvs_pin(daemon)
    macs = [f"0011223{i:05X}" for i in range(200)]
    mics = [certs.issue_mic(lab, model="8841", mac=mac) for mac in macs]
    attempts = [
        activate(
            reactor,
            "127.0.0.1",
            daemon.port("tvs"),
            device=DeviceName("8841", mac),
            code=code,
            pinned_der=pin,
            mic=(mic.cert, mic.key),
            timeout=60,
        )
        for mac, mic in zip(macs, mics, strict=True)
    ]
    answers = await defer.gatherResults(attempts).addTimeout(120, reactor)
    winners = [r for r in answers if r.status == 0]
    assert len(winners) == 1, [r.status for r in answers]
    winner = winners[0].device_name_assigned
    with sqlite3.connect(daemon.state_dir / "callboard.sqlite3") as db:
        used = db.execute("SELECT count(*) FROM codes WHERE state = 'used'").fetchone()
        active = db.execute("SELECT name FROM devices WHERE state = 'active'").fetchall()
    assert used == (1,)
    assert active == [(winner,)]
    status = all_workers(daemon)
    requests = {w["index"]: w["served"]["tvs_requests"] for w in status["workers"]}
    assert sum(requests.values()) >= 200 and all(requests.values()), requests  # both served
    assert len(set(worker_pids(status))) == 2
    assert daemon.json("device", "show", winner)["state"] == "active"
    peer = run_cli(
        "--admin-socket", str(daemon.state_dir / "workers" / "admin-1.sock"),
        "device", "show", winner, "--json",
    )  # fmt: skip
    assert peer.returncode == 0 and '"active"' in peer.stdout  # worker 1's own view agrees
    assert code not in daemon.log()


def test_a_device_added_through_the_admin_cli_is_served_by_both_workers_within_a_second(
    daemon_factory: Any, tmp_path: Path
) -> None:
    daemon = start(daemon_factory, "--metrics-port", str(free_port()))
    file = "SEP001122334455.cnf.xml"
    assert http_status(daemon, file) == 404
    before_http = served(metrics(daemon), "http")
    before_tftp = served(metrics(daemon), "tftp")
    daemon.json(
        "device", "add", "--model", "8841", "--mac", "001122334455", "--no-require-activation"
    )
    added = time.monotonic()
    time.sleep(0.8)  # then every request, on whichever worker it lands, finds the device
    for i in range(16):
        assert http_status(daemon, file) == 200, i
        assert tftp_hpa(daemon.port("tftp"), file, tmp_path / f"copy-{i}.xml"), i
    elapsed = time.monotonic() - added
    data, port = tftp_first_block(daemon.port("tftp"), file)
    assert data[:4] == b"\x00\x03\x00\x01" and port != daemon.port("tftp")
    samples = metrics(daemon)
    for protocol, before in (("http", before_http), ("tftp", before_tftp)):
        after = served(samples, protocol)
        gained = {w: after.get(w, 0) - before.get(w, 0) for w in ("0", "1")}
        assert all(n >= 1 for n in gained.values()), (protocol, gained)  # both workers served
    up = {dict(k[1])["worker"]: v for k, v in samples.items() if k[0] == "callboard_worker_up"}
    assert up == {"0": 1.0, "1": 1.0}
    assert elapsed < 10  # the fetches themselves are quick; the 0.8 s above is the claim


def test_status_aggregates_the_workers_and_a_second_daemon_is_refused(
    daemon_factory: Any, tmp_path: Path
) -> None:
    daemon = start(daemon_factory)
    assert daemon.proc is not None
    supervisor = daemon.proc.pid
    status = daemon.status
    pids = worker_pids(status)
    assert [w["index"] for w in status["workers"]] == [0, 1]
    assert set(pids) == children_of(supervisor) and status["supervisor_pid"] == supervisor
    assert status["registrations"] == sum(w["registrations"] for w in status["workers"])
    text = daemon.cli("status")
    assert text.returncode == 0 and f"workers: 2/2 (PIDs {pids[0]}, {pids[1]})" in text.stdout
    rows = [line.split() for line in text.stdout.splitlines() if line.startswith(("0 ", "1 "))]
    assert [row[:2] for row in rows] == [["0", str(pids[0])], ["1", str(pids[1])]]  # a row each
    assert "{" not in text.stdout  # tables, not Python dicts
    # One daemon per state directory, workers or not.
    second = run_cli(*serve_args(daemon.state_dir), *WORKERS, timeout=60)
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"another callboard (PID {supervisor})" in lines[0], second.stderr
    # A worker that dies is replaced; the daemon goes on.
    os.kill(pids[1], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        status = daemon.json("status")
        if status.get("workers_answering") == 2 and worker_pids(status)[1] != pids[1]:
            break
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.2)
    assert worker_pids(status)[0] == pids[0]
    assert http_status(daemon, "XMLDefault.cnf.xml") == 200
    # SIGTERM stops every worker cleanly; the supervisor exits 0.
    pids = worker_pids(status)
    assert daemon.stop(signal.SIGTERM) == 0
    assert not any(alive(pid) for pid in pids)
    assert not (daemon.state_dir / "admin.sock").exists()
    assert not list((daemon.state_dir / "workers").glob("*.sock"))
    assert "Traceback" not in daemon.log()


def test_workers_orphaned_by_a_killed_supervisor_stop(daemon_factory: Any) -> None:
    daemon = start(daemon_factory)
    pids = worker_pids(daemon.status)
    daemon.stop(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.1)


def test_bad_worker_counts_are_one_line_errors(tmp_path: Path) -> None:
    base = serve_args(tmp_path / "s")
    for extra, expected in [
        (["--workers", "0"], "workers: 0 is not between 1 and 64"),
        (["--workers", "65"], "workers: 65 is not between 1 and 64"),
        (["--workers", "2", "--set", "endpoints.http=tcp:0"], "[endpoints] http"),
    ]:
        result = run_cli(*base, *extra, timeout=60)
        assert result.returncode == 2, (extra, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (extra, result.stderr)


class NotifySocket:
    """The systemd side of sd_notify: a datagram socket and every message sent to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def count(self, line: str) -> int:
        return sum(line in m.splitlines() for m in self.messages)

    def wait_for(self, line: str, times: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.count(line) < times:
            assert time.monotonic() < deadline, f"no {line!r} x{times} in {self.messages}"
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.sock.recv(4096).decode())


def test_under_systemd_ready_waits_for_every_worker_and_sighup_reloads_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # WatchdogSec=1s
    tftp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tftp.bind(("127.0.0.1", 0))
    http = socket.socket()
    http.bind(("127.0.0.1", 0))
    http.listen(64)
    sockets = [tftp, http]
    fds = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 10) for s in sockets]
    daemon = Daemon(
        tmp_path / "state",
        *WORKERS,
        launcher=systemd_launcher(fds, ["tftp", "http"]),
        pass_fds=tuple(fds),
    )
    try:
        daemon.start()
    finally:
        for fd in fds:
            os.close(fd)
        for s in sockets:
            s.close()
    try:
        notify.wait_for("READY=1")
        # READY=1 came only once both workers were ready: both answer at once.
        assert daemon.json("status")["workers_answering"] == 2
        assert any("STATUS=serving with 2 workers" in m for m in notify.messages)
        notify.wait_for("WATCHDOG=1", times=2)
        # Both workers adopted systemd's sockets (shared by the two, not reuseport).
        status = all_workers(daemon)
        assert status["http"] == [f"127.0.0.1:{daemon.port('http')}"]
        assert "tvs" not in status  # no socket from systemd: off, as in one process
        for i in range(8):
            assert http_status(daemon, "XMLDefault.cnf.xml") == 200
            assert tftp_hpa(daemon.port("tftp"), "XMLDefault.cnf.xml", tmp_path / f"x{i}")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        notify.wait_for("READY=1", times=2)
        pids = worker_pids(status)
        assert worker_pids(all_workers(daemon)) == pids  # reloaded in place, not restarted
        reloaded = [
            json.loads(x) for x in daemon.log().splitlines() if "configuration reloaded" in x
        ]
        assert sorted(entry["worker"] for entry in reloaded) == [0, 1]  # each worker re-read it
        assert daemon.stop(signal.SIGTERM) == 0
        notify.wait_for("STOPPING=1")
        assert not any(alive(pid) for pid in pids)
    finally:
        if daemon.proc is not None:
            daemon.stop(signal.SIGKILL)


def test_a_storm_across_two_workers_onboards_every_phone(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """A phone's TVS connection, its file fetches and its REGISTER land on either worker: one
    activated through worker A a moment ago is served its config and registered by worker B
    at once (B reads the change feed before it says "not found" or 404), not after a retry."""
    from e2e.phone_e2e_support import make_lab

    lab = tmp_path / "lab"
    make_lab(lab)
    daemon = start(daemon_factory, "--manufacturing-trust", str(lab))
    result = run_cli(
        "phone", "storm", "--provision", "--count", "40", "--model", "8841",
        "--lab-ca", str(lab), "--server", "127.0.0.1", "--admin-socket", str(daemon.socket),
        "--http-port", str(daemon.port("http")), "--tftp-port", str(daemon.port("tftp")),
        "--https-port", "0", "--transport", "http", "--mic-cache", str(tmp_path / "mics"),
        "--concurrency", "16", "--timeout", "20",
        timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr + daemon.log()[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("phones=40 ok=40 failed=0 ")
    # Bindings reach the shared store by a write-behind every 0.5 s: the last phones' are
    # visible cluster-wide within about a second of their 200, not at once.
    deadline = time.monotonic() + 5
    status = all_workers(daemon)
    while status["cluster_registrations"] != 40 and time.monotonic() < deadline:
        time.sleep(0.1)
        status = all_workers(daemon)
    assert status["cluster_registrations"] == 40, status
    served = [w["served"]["sip_register_responses"] for w in status["workers"]]
    assert all(n > 0 for n in served), served  # both workers took REGISTERs
