"""The daemon's service tree in-process: no I/O before start, settings reach the sockets,
one clock, all-or-nothing start; and inherited sockets end to end (``fd:``, ``systemd:``)."""

from __future__ import annotations

import fcntl
import os
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from callboard.daemon.config import Config, load_config
from callboard.daemon.service import CallboardService
from callboard.protocols.listening import ListenerService
from support.harness import systemd_launcher
from twisted.internet import reactor
from twisted.internet.error import CannotListenError


def config_for(tmp_path: Path, **overrides: Any) -> Config:
    ports = ("tftp", "http", "tvs", "sip", "sip_tls", "https")
    return load_config(
        None,
        {
            "state_dir": str(tmp_path / "state"),
            "network.listen_addresses": ["127.0.0.1"],
            **{f"network.{name}_port": 0 for name in ports},
            **overrides,
        },
    )


def rcvbuf(listener: ListenerService) -> int:
    assert listener.port is not None
    handle: socket.socket = listener.port.getHandle()  # type: ignore[attr-defined]
    return handle.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


@pytest_twisted.ensureDeferred
async def test_building_touches_nothing_and_start_binds_with_the_configured_settings(
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path, **{"tftp.receive_buffer": 4096, "sip.udp_receive_buffer": 16384})
    service = CallboardService(config, reactor)
    assert not config.state_dir.exists() and service.store is None
    service.startService()
    try:
        assert (config.state_dir / "callboard.sqlite3").exists()
        by_label: dict[str, list[ListenerService]] = {}
        for listener in service.listeners:
            by_label.setdefault(listener.label, []).append(listener)
        assert sorted(by_label) == ["admin", "http", "sip", "sip-tls", "sip-udp", "tftp", "tvs"]
        assert all(listener.port is not None for listener in service.listeners)
        [tftp], [sip_udp], [sip_tcp] = by_label["tftp"], by_label["sip-udp"], by_label["sip"]
        # Each receive buffer comes from its own section (Linux reports twice the request).
        assert 4096 <= rcvbuf(tftp) < 16384 <= rcvbuf(sip_udp) < 65536
        assert sip_udp.address() == sip_tcp.address()  # port 0: UDP follows TCP
        # One clock for the tree: the reactor's.
        assert service.now == reactor.seconds  # type: ignore[attr-defined]
        assert service.registrar.now == service.registrar.wall_now == service.now
        # Phones are told the ports actually bound.
        assert service.tree.settings.sip_port == sip_tcp.address()[1]  # type: ignore[index]
        status = service.status()
        assert status["sip-udp"] == [sip_udp.where()] and status["tftp"] == [tftp.where()]
    finally:
        await service.stopService()
    assert service.store is None
    assert all(listener.port is None for listener in service.listeners)


def test_a_port_that_cannot_be_had_leaves_nothing_running(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        config = config_for(tmp_path, **{"network.tvs_port": taken.getsockname()[1]})
        service = CallboardService(config, reactor)
        with pytest.raises(CannotListenError):
            service.startService()
    assert not service.running
    assert list(service) == [] and service.store is None


def high_fd(sock: socket.socket) -> int:
    """A duplicate numbered 10 or more, clear of the 3, 4, ... systemd hands out."""
    fd: int = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD, 10)
    return fd


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def test_the_daemon_adopts_inherited_and_socket_activated_listeners(
    daemon_factory: Any,
) -> None:
    sockets = [listening_socket() for _ in range(3)]
    http_port, tvs_port, sip_port = (s.getsockname()[1] for s in sockets)
    fds = [high_fd(s) for s in sockets]
    http_fd, tvs_fd, sip_fd = fds
    try:
        daemon = daemon_factory(
            "--set",
            f"endpoints.http=fd:{http_fd}",
            "--set",
            "endpoints.tvs=systemd:domain=INET:index=0",
            "--set",
            "endpoints.sip=systemd:domain=INET:name=sip",
            launcher=systemd_launcher([tvs_fd, sip_fd], ["tvs", "sip"]),
            pass_fds=tuple(fds),
        )
    finally:
        for fd in fds:
            os.close(fd)
        for s in sockets:
            s.close()  # the daemon holds its own copies
    status = daemon.status
    assert status["http"] == [f"127.0.0.1:{http_port}"]
    assert status["tvs"] == [f"127.0.0.1:{tvs_port}"]
    assert status["sip"] == [f"127.0.0.1:{sip_port}"]
    with urllib.request.urlopen(
        f"http://127.0.0.1:{http_port}/XMLDefault.cnf.xml", timeout=10
    ) as r:
        assert r.status == 200
        # Phones are told the SIP port the daemon was handed.
        assert f"<sipPort>{sip_port}</sipPort>".encode() in r.read()
    options = (
        "OPTIONS sip:127.0.0.1 SIP/2.0\r\n"
        "Via: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKadopt\r\n"
        "From: <sip:probe@127.0.0.1>;tag=1\r\nTo: <sip:127.0.0.1>\r\n"
        "Call-ID: adopt@test\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", sip_port), timeout=10) as client:
        client.sendall(options.encode())
        assert client.recv(4096).startswith(b"SIP/2.0 200 ")
