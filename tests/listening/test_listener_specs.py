"""Listener specs: parsing endpoint strings, binding, and adopting sockets made here.

Every socket is a real loopback one: a spec is bound (or a socket this test created is
adopted by its descriptor number) and then talked to from a client socket.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from callboard.protocols.listening import (
    Adopt,
    AtomicMultiService,
    Bind,
    BindUNIX,
    ListenerService,
    ListenerSpec,
    listen,
    listeners_in,
    parse_endpoint,
    resolve_inherited,
)
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol

TIMEOUT = 10


# -- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        ("tcp:5060", "stream", ListenerSpec("stream", Bind("", 5060))),
        (
            "tcp:0:interface=127.0.0.1:backlog=128",
            "stream",
            ListenerSpec("stream", Bind("127.0.0.1", 0), backlog=128),
        ),
        ("tcp:port=80:interface=192.0.2.1", "stream", ListenerSpec.stream("192.0.2.1", 80)),
        (r"tcp6:5061:interface=\:\:1", "stream", ListenerSpec.stream("::1", 5061)),
        ("tcp6:5061", "stream", ListenerSpec.stream("::", 5061)),
        (
            "unix:address=/run/cb/admin.sock:mode=600:lockfile=1",
            "stream",
            ListenerSpec("stream", BindUNIX("/run/cb/admin.sock", 0o600, True)),
        ),
        # Twisted's defaults for unix: mode 666, lockfile on.
        (
            "unix:/tmp/x.sock",
            "stream",
            ListenerSpec("stream", BindUNIX("/tmp/x.sock", 0o666, True)),
        ),
        (
            r"unix:address=/tmp/a\:b.sock:lockfile=0",
            "stream",
            ListenerSpec("stream", BindUNIX("/tmp/a:b.sock", 0o666, False)),
        ),
        (
            "systemd:domain=INET:index=0",
            "stream",
            ListenerSpec("stream", Adopt(family="INET", systemd_index=0)),
        ),
        (
            "systemd:domain=INET6:name=sip",
            "stream",
            ListenerSpec("stream", Adopt(family="INET6", systemd_name="sip")),
        ),
        ("fd:7", "stream", ListenerSpec.adopt("stream", 7)),
        ("fd:fd=7:domain=UNIX", "stream", ListenerSpec.adopt("stream", 7, "UNIX")),
        ("fd:5", "datagram", ListenerSpec.adopt("datagram", 5)),
        ("udp:69:interface=192.0.2.10", "datagram", ListenerSpec.datagram("192.0.2.10", 69)),
        (
            "systemd:domain=INET:index=1",
            "datagram",
            ListenerSpec("datagram", Adopt(systemd_index=1)),
        ),
    ],
)
def test_endpoint_strings_parse_to_specs(text: str, kind: Any, expected: ListenerSpec) -> None:
    assert parse_endpoint(text, kind) == expected


@pytest.mark.parametrize(
    ("text", "kind", "words"),
    [
        ("ssl:443", "stream", ["ssl", "tcp, tcp6, unix, systemd, fd"]),
        ("tcp:http", "stream", ["port", "not a number"]),
        ("tcp:70000", "stream", ["70000", "not a port"]),
        ("tcp:80:bogus=1", "stream", ["bogus"]),
        ("tcp:80:127.0.0.1:50:9", "stream", ["too many"]),
        ("tcp:80:interface=phone.example", "stream", ["not an IP address"]),
        ("tcp", "stream", ["port is needed"]),
        ("tcp6:80:interface=127.0.0.1", "stream", ["IPv6"]),
        ("systemd:domain=INET", "stream", ["index= and name="]),
        ("systemd:domain=INET:index=0:name=x", "stream", ["index= and name="]),
        ("systemd:domain=IPX:index=0", "stream", ["IPX"]),
        ("fd:-1", "stream", ["not a file descriptor"]),
        ("unix:/tmp/x", "datagram", ["unix", "datagram"]),
        ("tcp:69", "datagram", ["tcp"]),
        (":80", "stream", ["type"]),
    ],
)
def test_bad_endpoint_strings_say_what_is_wrong(text: str, kind: Any, words: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        parse_endpoint(text, kind)
    for word in words:
        assert word in str(err.value)


def test_systemd_sockets_are_found_by_index_or_name_when_listening() -> None:
    # What the daemon read from LISTEN_FDS/LISTEN_FDNAMES="http:sip" (LISTEN_PID matching is
    # callboard.daemon.systemd_fds's job, tested there).
    inherited = {"http": [3], "sip": [4]}
    assert Adopt(systemd_index=0).fileno(inherited) == 3
    assert Adopt(systemd_index=1).fileno(inherited) == 4
    assert Adopt(systemd_name="sip").fileno(inherited) == 4
    with pytest.raises(CannotListenError, match="no index 2"):
        Adopt(systemd_index=2).fileno(inherited)
    with pytest.raises(CannotListenError, match="no socket named 'tvs'"):
        Adopt(systemd_name="tvs").fileno(inherited)
    # Nothing inherited: nothing to adopt.
    with pytest.raises(CannotListenError):
        Adopt(systemd_index=0).fileno()


def test_systemd_specs_resolve_to_the_descriptor_they_name() -> None:
    inherited = {"tvs": [3], "sip": [4, 5]}
    spec = ListenerSpec("stream", Adopt(family="INET6", systemd_name="sip"))
    assert resolve_inherited(spec, inherited) == ListenerSpec("stream", Adopt(fd=4, family="INET6"))
    bound = ListenerSpec.stream("127.0.0.1", 0)
    assert resolve_inherited(bound, inherited) is bound
    with pytest.raises(CannotListenError):
        resolve_inherited(ListenerSpec("stream", Adopt(systemd_name="http")), inherited)


def test_specs_refuse_what_cannot_be_listened_on() -> None:
    with pytest.raises(ValueError):
        ListenerSpec("datagram", BindUNIX("/tmp/x"))
    with pytest.raises(ValueError):
        ListenerSpec.stream("127.0.0.1", 65536)
    with pytest.raises(ValueError):
        Adopt()
    with pytest.raises(ValueError):
        Adopt(fd=3, systemd_index=0)


# -- talking to bound and adopted listeners --------------------------------------------------


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"echo:" + data)


class DatagramEcho(DatagramProtocol):
    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        assert self.transport is not None
        self.transport.write(b"echo:" + datagram, addr)


def stream_exchange(address: Any, family: int = socket.AF_INET) -> bytes:
    """A blocking client (run in a thread while the reactor serves)."""
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(TIMEOUT)
        client.connect(address)
        client.sendall(b"hello")
        return client.recv(100)


def datagram_exchange(port: int) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(TIMEOUT)
        client.sendto(b"hello", ("127.0.0.1", port))
        return client.recv(100)


def in_thread(fn: Any, *args: Any) -> Deferred[Any]:
    d: Deferred[Any] = threads.deferToThread(fn, *args)
    return d.addTimeout(TIMEOUT, reactor)


def receive_buffer(service: ListenerService) -> int:
    assert service.port is not None
    handle: socket.socket = service.port.getHandle()  # type: ignore[attr-defined]
    return handle.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


@pytest.fixture
def started() -> Iterator[list[ListenerService]]:
    services: list[ListenerService] = []
    yield services
    for service in services:
        if service.running:
            d = service.stopService()
            if d is not None:
                pytest_twisted.blockon(d)


def start(started: list[ListenerService], label: str, spec: ListenerSpec, target: Any) -> Any:
    service = ListenerService(label, spec, target, reactor)
    service.startService()
    started.append(service)
    return service


@pytest_twisted.ensureDeferred
async def test_a_bound_stream_listener_serves(started: list[ListenerService]) -> None:
    service = start(started, "echo", ListenerSpec.stream("127.0.0.1", 0), Factory.forProtocol(Echo))
    host, port = service.address()
    assert host == "127.0.0.1" and port > 0
    assert service.where() == f"127.0.0.1:{port}"
    assert await in_thread(stream_exchange, ("127.0.0.1", port)) == b"echo:hello"


@pytest_twisted.ensureDeferred
async def test_an_adopted_stream_socket_serves(started: list[ListenerService]) -> None:
    inherited = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    inherited.bind(("127.0.0.1", 0))
    inherited.listen(5)
    port = inherited.getsockname()[1]
    spec = parse_endpoint(f"fd:{inherited.fileno()}")
    service = start(started, "echo", spec, Factory.forProtocol(Echo))
    inherited.close()  # the listener holds its own duplicate
    assert service.address() == ("127.0.0.1", port)
    assert await in_thread(stream_exchange, ("127.0.0.1", port)) == b"echo:hello"


@pytest_twisted.ensureDeferred
async def test_an_adopted_datagram_socket_serves_with_its_receive_buffer(
    started: list[ListenerService],
) -> None:
    inherited = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    inherited.bind(("127.0.0.1", 0))
    port = inherited.getsockname()[1]
    default = inherited.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    spec = ListenerSpec.adopt("datagram", inherited.fileno(), receive_buffer=4096)
    service = start(started, "echo", spec, DatagramEcho())
    inherited.close()
    assert service.address() == ("127.0.0.1", port)
    assert 4096 <= receive_buffer(service) < default
    assert await in_thread(datagram_exchange, port) == b"echo:hello"


@pytest_twisted.ensureDeferred
async def test_a_bound_datagram_listener_gets_its_receive_buffer(
    started: list[ListenerService],
) -> None:
    plain = start(started, "echo", ListenerSpec.datagram("127.0.0.1", 0), DatagramEcho())
    small = start(
        started, "echo", ListenerSpec.datagram("127.0.0.1", 0, receive_buffer=4096), DatagramEcho()
    )
    assert 4096 <= receive_buffer(small) < receive_buffer(plain)
    assert await in_thread(datagram_exchange, small.address()[1]) == b"echo:hello"


@pytest_twisted.ensureDeferred
async def test_a_unix_listener_is_owner_only_and_replaces_a_stale_socket(
    started: list[ListenerService], tmp_path: Path
) -> None:
    path = tmp_path / "admin.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    # A daemon that crashed leaves its socket file and its lock (a symlink to its PID).
    os.symlink("999999999", f"{path}.lock")
    service = start(started, "admin", ListenerSpec.unix(str(path)), Factory.forProtocol(Echo))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert service.where() == str(path)
    assert await in_thread(stream_exchange, str(path), socket.AF_UNIX) == b"echo:hello"


def test_a_taken_port_cannot_be_listened_on() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(CannotListenError):
            listen(reactor, ListenerSpec.stream("127.0.0.1", port), Factory.forProtocol(Echo))


def test_adopting_a_closed_descriptor_cannot_listen() -> None:
    sock = socket.socket()
    fd = sock.fileno()
    sock.close()
    with pytest.raises(CannotListenError, match=f"fd:{fd}"):
        listen(reactor, ListenerSpec.adopt("stream", fd), Factory.forProtocol(Echo))


@pytest_twisted.ensureDeferred
async def test_a_group_starts_all_its_listeners_or_none() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        group = AtomicMultiService()
        first = ListenerService(
            "a", ListenerSpec.stream("127.0.0.1", 0), Factory.forProtocol(Echo), reactor
        )
        first.setServiceParent(group)
        ListenerService(
            "b",
            ListenerSpec.stream("127.0.0.1", taken.getsockname()[1]),
            Factory.forProtocol(Echo),
            reactor,
        ).setServiceParent(group)
        with pytest.raises(CannotListenError):
            group.startService()
    assert not group.running
    assert [s.running for s in listeners_in(group)] == [False, False]
    assert first.port is None  # the one that had bound was closed again
    await group.stopService()  # stopping a group that never started is harmless
