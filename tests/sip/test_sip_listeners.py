"""The SIP service's listeners come from specs: UDP follows TCP's port, buffers, adoption."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest_twisted
from callboard.protocols.listening import ListenerService, ListenerSpec, listeners_in
from callboard.protocols.sip.message import Response, parse_message
from callboard.protocols.sip.registrar import Registrar
from callboard.protocols.sip.transports import SIPRegistrarService
from twisted.internet import reactor, threads

TIMEOUT = 10


def registrar(policy: Any) -> Registrar:
    now = reactor.seconds  # type: ignore[attr-defined]
    return Registrar(policy, now=now, wall_now=now)


def rcvbuf(listener: ListenerService) -> int:
    assert listener.port is not None
    handle: socket.socket = listener.port.getHandle()  # type: ignore[attr-defined]
    return handle.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def udp_request(port: int, build: Callable[[int], bytes]) -> Response:
    """One datagram out, the answer back (blocking: run in a thread while the reactor serves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(TIMEOUT)
        client.bind(("127.0.0.1", 0))
        client.sendto(build(client.getsockname()[1]), ("127.0.0.1", port))
        answer = parse_message(client.recv(65536))
    assert isinstance(answer, Response)
    return answer


@pytest_twisted.ensureDeferred
async def test_udp_on_port_zero_follows_tcp_and_gets_its_receive_buffer(policy: Any) -> None:
    svc = SIPRegistrarService(
        registrar(policy),
        reactor,
        tcp=[ListenerSpec.stream("127.0.0.1", 0)],
        udp=[
            ListenerSpec.datagram("127.0.0.1", 0, receive_buffer=4096),
            ListenerSpec.datagram("127.0.0.2", 0),  # no TCP there: a port of its own
        ],
    )
    svc.startService()
    try:
        assert svc.tcp_port and svc.udp_port == svc.tcp_port
        small, plain = [s for s in listeners_in(svc) if s.label == "sip-udp"]
        assert 4096 <= rcvbuf(small) < rcvbuf(plain)
    finally:
        await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_an_adopted_udp_socket_answers_register(
    policy: Any, make_register: Callable[..., bytes]
) -> None:
    inherited = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    inherited.bind(("127.0.0.1", 0))
    port = inherited.getsockname()[1]
    svc = SIPRegistrarService(
        registrar(policy), reactor, udp=[ListenerSpec.adopt("datagram", inherited.fileno())]
    )
    svc.startService()
    inherited.close()
    try:
        assert svc.udp_port == port

        def register(local: int) -> bytes:
            return make_register(transport="UDP", contact_host=f"127.0.0.1:{local}")

        d = threads.deferToThread(udp_request, port, register)
        answer = await d.addTimeout(TIMEOUT, reactor)
        assert answer.status == 200
        assert [b.transport for b in svc.registrar.bindings_for_device("SEP001122334455")] == [
            "udp"
        ]
    finally:
        await svc.stopService()
