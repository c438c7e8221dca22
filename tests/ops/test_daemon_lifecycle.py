"""The daemon as systemd runs it, with real processes: socket activation by role with real
clients (tftp-hpa, curl, SIP over UDP), sd_notify, one daemon per state directory, SIGHUP,
SIGTERM with a transfer in flight, backup and restore, and the one-line refusals."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.harness import Daemon, run_cli, serve_args, systemd_launcher
from support.ports import free_port


def high_fd(sock: socket.socket) -> int:
    """A duplicate numbered 10 or more, clear of the 3, 4, ... systemd hands out."""
    fd: int = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD, 10)
    return fd


class NotifySocket:
    """The systemd side of sd_notify: a datagram socket and everything sent to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not any(line in m.splitlines() for m in self.messages):
            assert time.monotonic() < deadline, f"no {line!r} in {self.messages}"
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.sock.recv(4096).decode())


def one_line_refusal(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode not in (0, None), result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_socket_activated_daemon_serves_tftp_http_and_sip_through_adopted_sockets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # WatchdogSec=1s: a ping every 0.5 s
    tftp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tftp.bind(("127.0.0.1", 0))
    http = socket.socket()
    http.bind(("127.0.0.1", 0))
    http.listen(16)
    sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sip.bind(("127.0.0.1", 0))
    sockets = [tftp, http, sip]
    ports = [s.getsockname()[1] for s in sockets]
    fds = [high_fd(s) for s in sockets]
    daemon = Daemon(
        tmp_path / "state",
        launcher=systemd_launcher(fds, ["tftp", "http", "sip-udp"]),
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
        tftp_port, http_port, sip_port = ports
        status = daemon.status
        assert status["tftp"] == [f"127.0.0.1:{tftp_port}"]
        assert status["http"] == [f"127.0.0.1:{http_port}"]
        assert "tvs" not in status and "sip" not in status  # no socket: that listener is off
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1")
        assert any(
            line.startswith("STATUS=starting") for m in notify.messages for line in m.split("\n")
        )
        assert any("STATUS=serving" in m for m in notify.messages)

        out = tmp_path / "XMLDefault.cnf.xml"
        got = subprocess.run(
            ["tftp", "-m", "binary", "127.0.0.1", str(tftp_port), "-c", "get",
             "XMLDefault.cnf.xml", str(out)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert got.returncode == 0 and b"<Default>" in out.read_bytes(), got
        curl = subprocess.run(
            ["curl", "-sS", "-f", f"http://127.0.0.1:{http_port}/XMLDefault.cnf.xml"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert curl.returncode == 0 and "<Default>" in curl.stdout, curl.stderr
        options = (
            "OPTIONS sip:127.0.0.1 SIP/2.0\r\n"
            "Via: SIP/2.0/UDP 127.0.0.1:5999;rport;branch=z9hG4bKsockact\r\n"
            "From: <sip:probe@127.0.0.1>;tag=1\r\nTo: <sip:127.0.0.1>\r\n"
            "Call-ID: sockact@test\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            client.sendto(options.encode(), ("127.0.0.1", sip_port))
            assert client.recv(4096).startswith(b"SIP/2.0 200 ")
    finally:
        assert daemon.stop() == 0
    notify.wait_for("STOPPING=1")
    log = daemon.log()
    assert "Starting protocol" not in log and "Starting factory" not in log


def test_debian_systemd_socket_activate_hands_the_daemon_its_http_socket(tmp_path: Path) -> None:
    port = free_port()
    typecheck = Path(__file__).resolve().parents[2] / "build" / "typecheck"
    state = tmp_path / "state"
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=http",
         "-E", f"PYTHONPATH={typecheck}", sys.executable, "-m", "callboard.daemon.main",
         *serve_args(state)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:  # the socket is listening once systemd-socket-activate has bound it
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        got = subprocess.run(
            ["curl", "-sS", "-f", "-m", "30", f"http://127.0.0.1:{port}/XMLDefault.cnf.xml"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert got.returncode == 0 and "<Default>" in got.stdout, got.stderr
        status = run_cli("--state-dir", str(state), "status", "--json")
        assert status.returncode == 0, status.stderr
        listening = json.loads(status.stdout)
        assert listening["http"] == [f"127.0.0.1:{port}"] and listening["tftp"] == []
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


SHIM = """
import os, sys
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=sys.argv[1], LISTEN_FDNAMES=sys.argv[2])
os.execv(sys.executable, [sys.executable, "-m", "callboard.daemon.main", *sys.argv[3:]])
"""


def test_malformed_listen_fds_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SHIM, "two", "tftp", *serve_args(tmp_path / "state")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    one_line_refusal(result, "LISTEN_FDS", "'two'")
    assert result.returncode == 2


def test_unknown_socket_name_is_refused_at_start(tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    fd = high_fd(sock)
    try:
        result = subprocess.run(
            [*systemd_launcher([fd], ["callboard-http.socket"]), *serve_args(tmp_path / "state")],
            capture_output=True, text=True, timeout=60, check=False, pass_fds=(fd,),
        )  # fmt: skip
    finally:
        os.close(fd)
        sock.close()
    one_line_refusal(result, "callboard-http.socket", "FileDescriptorName=")
    assert result.returncode == 2
    assert not (tmp_path / "state" / "callboard.sqlite3").exists()


def test_a_second_daemon_on_the_state_dir_exits_at_once_naming_the_first(
    daemon_factory: Any, tmp_path: Path
) -> None:
    first = daemon_factory("--log-format", "console")
    assert first.proc is not None
    started = time.monotonic()
    second = run_cli(*serve_args(first.state_dir), timeout=30)
    assert time.monotonic() - started < 20
    one_line_refusal(second, f"PID {first.proc.pid}", "callboard.lock")
    assert first.proc.poll() is None and first.cli("status").returncode == 0
    log = first.log()
    assert "callboard started" in log and not log.lstrip().startswith("{")  # console format


def test_metrics_port_in_use_is_one_line_and_non_zero(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_cli(*serve_args(tmp_path / "state"), "--metrics-port", str(port))
    one_line_refusal(result, "cannot listen", str(port))


SEP_MAC = "00AABBCC0202"


def http_text(daemon: Daemon, name: str) -> str:
    result = subprocess.run(
        ["curl", "-sS", "-f", f"http://127.0.0.1:{daemon.port('http')}/{name}"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_for_log(daemon: Daemon, text: str, count: int = 1, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while daemon.log().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{daemon.log()}"
        time.sleep(0.05)


def test_sighup_applies_templates_and_settings_refuses_bad_config_reports_restarts(
    daemon_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    config = tmp_path / "callboard.toml"
    config.write_text("[tftp]\nmax_blksize = 1428\n")
    daemon = daemon_factory("--config", str(config))
    daemon.json("device", "add", "--model", "8841", "--mac", SEP_MAC, "--no-require-activation")
    assert "reloaded-by-sighup" not in http_text(daemon, f"SEP{SEP_MAC}.cnf.xml")
    assert daemon.proc is not None

    packaged = Path(__file__).resolve().parents[2] / "configs" / "templates" / "SEPDevice.cnf.xml"
    templates = daemon.state_dir / "templates"
    templates.mkdir()
    text = packaged.read_text()
    marked = text.replace("<device", "<!-- reloaded-by-sighup --><device", 1)
    assert marked != text
    (templates / "SEPDevice.cnf.xml").write_text(marked)
    config.write_text("[tftp]\nmax_blksize = 8192\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for_log(daemon, "configuration reloaded")
    notify.wait_for("RELOADING=1")
    reloading = next(i for i, m in enumerate(notify.messages) if "RELOADING=1" in m.split("\n"))
    deadline = time.monotonic() + 10
    while not any("READY=1" in m.split("\n") for m in notify.messages[reloading + 1 :]):
        assert time.monotonic() < deadline, notify.messages
        with contextlib.suppress(TimeoutError):
            notify.messages.append(notify.sock.recv(4096).decode())
    assert "reloaded-by-sighup" in http_text(daemon, f"SEP{SEP_MAC}.cnf.xml")
    assert "tftp.max_blksize" in daemon.log()  # applied, and said so

    config.write_text('[tftp]\nmax_blksize = "big"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for_log(daemon, "configuration reload refused")
    refused = [line for line in daemon.log().splitlines() if "reload refused" in line]
    assert "tftp.max_blksize" in refused[0]

    config.write_text(f"[tftp]\nmax_blksize = 8192\n[metrics]\nport = {free_port()}\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for_log(daemon, "configuration reloaded", count=2)
    restart = [line for line in daemon.log().splitlines() if "needs a restart" in line]
    assert restart and "metrics.port" in restart[0]
    assert "metrics" not in daemon.json("status")  # not half-applied: no listener appeared
    assert daemon.cli("status").returncode == 0 and daemon.stop() == 0


def test_sigterm_lets_a_tftp_transfer_in_flight_finish_then_exits_0(
    daemon_factory: Any, tmp_path: Path
) -> None:
    daemon = daemon_factory("--set", "shutdown_grace=20")
    payload = os.urandom(100 * 512 + 17)
    (daemon.state_dir / "tftp" / "big.loads").write_bytes(payload)
    assert daemon.proc is not None
    received = bytearray()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(10)
        client.sendto(b"\x00\x01big.loads\x00octet\x00", ("127.0.0.1", daemon.port("tftp")))
        data, peer = client.recvfrom(1024)
        daemon.proc.send_signal(signal.SIGTERM)  # mid-transfer
        time.sleep(0.5)
        assert daemon.proc.poll() is None  # still finishing the transfer
        while True:
            assert data[:2] == b"\x00\x03", data
            received += data[4:]
            client.sendto(b"\x00\x04" + data[2:4], peer)
            if len(data) - 4 < 512:
                break
            data, _ = client.recvfrom(1024)
    assert bytes(received) == payload
    assert daemon.proc.wait(timeout=20) == 0
    log = daemon.log()
    # Successful transfers are summarised (one line at info); the stop flushes the summary.
    served = f"tftp: 1 transfers served ({len(payload)} bytes)"
    assert served in log and "letting in-flight work finish" in log


def test_backup_restores_into_a_fresh_state_dir_with_the_same_devices_and_codes(
    daemon_factory: Any, tmp_path: Path
) -> None:
    first = daemon_factory(state_dir=tmp_path / "old")
    bat = first.json("device", "add", "--model", "8841", "--line", "3001")["name"]
    first.json("device", "add", "--model", "8851", "--mac", SEP_MAC, "--line", "3002")
    code = first.json("code", "show", bat)["code"]
    backup = tmp_path / "backups" / "registry.sqlite3"
    backup.parent.mkdir()
    done = first.cli("backup", str(backup))
    assert done.returncode == 0 and str(backup) in done.stdout, done.stderr
    devices = sorted(d["name"] for d in first.json("device", "list"))
    assert first.stop() == 0

    fresh = tmp_path / "new"
    fresh.mkdir(mode=0o700)
    shutil.copyfile(backup, fresh / "callboard.sqlite3")
    second = daemon_factory(state_dir=fresh)
    assert sorted(d["name"] for d in second.json("device", "list")) == devices
    assert second.json("code", "show", bat)["code"] == code
    assert second.json("status")["codes_outstanding"] >= 1

    refused = second.cli("backup", "/proc/no-such-dir/registry.sqlite3")
    one_line_refusal(refused, "cannot write", "/proc/no-such-dir/registry.sqlite3")
