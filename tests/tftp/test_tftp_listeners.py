"""TFTP's listening sockets come from specs: adopted sockets serve, buffers are applied."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest_twisted
from callboard.protocols.filesource import DirectorySource
from callboard.protocols.listening import ListenerSpec
from callboard.protocols.tftp.server import TFTPService, TFTPSettings
from twisted.internet import reactor, threads

TIMEOUT = 10
BODY = b"<device/>\n" * 20


def fetch(port: int, name: str) -> tuple[bytes, tuple[str, int]]:
    """RRQ, one DATA block back, ACK it (blocking: run in a thread while the reactor serves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(TIMEOUT)
        client.sendto(b"\x00\x01" + name.encode() + b"\x00octet\x00", ("127.0.0.1", port))
        packet, sender = client.recvfrom(65536)
        opcode, block = struct.unpack("!HH", packet[:4])
        assert (opcode, block) == (3, 1), packet
        client.sendto(struct.pack("!HH", 4, 1), sender)
        return packet[4:], sender


@pytest_twisted.ensureDeferred
async def test_an_adopted_socket_serves_and_transfers_answer_from_its_address(
    tmp_path: Path,
) -> None:
    (tmp_path / "SEPDEFAULT.cnf.xml").write_bytes(BODY)
    inherited = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    inherited.bind(("127.0.0.1", 0))
    port = inherited.getsockname()[1]
    service = TFTPService(
        DirectorySource(str(tmp_path)),
        settings=TFTPSettings(initial_timeout=0.2),
        reactor=reactor,
        listeners=[ListenerSpec.adopt("datagram", inherited.fileno())],
    )
    service.startService()
    inherited.close()
    try:
        assert [p.getHost().port for p in service.ports] == [port]  # type: ignore[attr-defined]
        d = threads.deferToThread(fetch, port, "SEPDEFAULT.cnf.xml")
        body, sender = await d.addTimeout(TIMEOUT, reactor)
        assert body == BODY
        assert sender[0] == "127.0.0.1" and sender[1] != port  # the transfer's own TID
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_receive_buffer_setting_sizes_each_listening_socket(tmp_path: Path) -> None:
    service = TFTPService(
        DirectorySource(str(tmp_path)),
        ["127.0.0.1", "127.0.0.2"],
        0,
        TFTPSettings(receive_buffer=4096),
        reactor,
    )
    service.startService()
    try:
        sizes = [
            p.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)  # type: ignore[attr-defined]
            for p in service.ports
        ]
        assert len(sizes) == 2 and all(4096 <= size < 65536 for size in sizes)
    finally:
        await service.stopService()
