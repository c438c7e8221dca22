"""Pooled transfer ports over real loopback sockets, with raw probes and real clients.

Transfers answer from a few pooled ports, never the listening one, and many transfers from
one client address (different ports) run at once on them without mixing: tftp-hpa and atftp
clients fetch distinct files concurrently from 127.0.0.1. A client only completes a
multi-block transfer if its ACKs reach the transfer, and ACKs on the listening port are
ignored there, so completion shows the DATA came from a pooled port; the raw probes check the
source port itself.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from callboard.protocols.filesource import DirectorySource
from callboard.protocols.tftp import codec
from callboard.protocols.tftp.server import TFTPService, TFTPSettings
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.internet.utils import getProcessOutputAndValue

Addr = tuple[str, int]
FILES = {f"file{n}.bin": random.Random(n).randbytes(400_000 + 517 * n) for n in range(12)}


@pytest.fixture
def service(tmp_path: Path) -> Iterator[TFTPService]:
    for name, content in FILES.items():
        (tmp_path / name).write_bytes(content)
    svc = TFTPService(
        DirectorySource(str(tmp_path)), ["127.0.0.1"], 0, TFTPSettings(initial_timeout=2.0)
    )
    svc.startService()
    yield svc
    pytest_twisted.blockon(svc.stopService())


def listen_port(svc: TFTPService) -> int:
    return int(svc.ports[0].getHost().port)  # type: ignore[attr-defined]


class Probe(DatagramProtocol):
    def __init__(self) -> None:
        self.queue: DeferredQueue[tuple[bytes, Addr]] = DeferredQueue()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.queue.put((datagram, addr))

    def send(self, data: bytes, addr: Addr) -> None:
        assert self.transport is not None
        self.transport.write(data, addr)

    async def recv(self) -> tuple[Any, Addr]:
        d: Deferred[tuple[bytes, Addr]] = self.queue.get()
        d.addTimeout(5, reactor)
        data, addr = await d
        return codec.decode(data), addr


@pytest.fixture
def probes() -> Iterator[Any]:
    ports = []

    def make() -> Probe:
        probe = Probe()
        ports.append(reactor.listenUDP(0, probe, interface="127.0.0.1"))
        return probe

    yield make
    for port in ports:
        port.stopListening()


def ack(block: int) -> bytes:
    return struct.pack("!HH", 4, block & 0xFFFF)


@pytest_twisted.ensureDeferred
async def test_interleaved_transfers_from_one_address_come_from_pooled_ports(
    service: TFTPService, probes: Any
) -> None:
    """Eight probes on 127.0.0.1, lock-step in turn: each gets its own file, from a pool port."""
    names = list(FILES)[:8]
    clients = [probes() for _ in names]
    server = ("127.0.0.1", listen_port(service))
    tids: list[Addr] = []
    received: list[list[bytes]] = [[] for _ in names]
    for client, name in zip(clients, names, strict=True):
        client.send(codec.encode(codec.ReadRequest(name, "octet", {})), server)
    for index, client in enumerate(clients):
        packet, tid = await client.recv()
        assert packet.block == 1
        received[index].append(packet.payload)
        tids.append(tid)
    pool = {tid[1] for tid in tids}
    assert listen_port(service) not in pool and len(pool) == 1  # distinct TIDs share one port
    done = [False] * len(names)
    while not all(done):  # one block each in turn, so the transfers truly interleave
        for index, client in enumerate(clients):
            if done[index]:
                continue
            client.send(ack(len(received[index])), tids[index])
            if len(received[index][-1]) < 512:
                done[index] = True
                continue
            packet, tid = await client.recv()
            assert tid == tids[index] and packet.block == (len(received[index]) + 1) & 0xFFFF
            received[index].append(packet.payload)
    for index, name in enumerate(names):
        assert b"".join(received[index]) == FILES[name]


async def run(exe: str, *args: str) -> tuple[bytes, bytes, int]:
    d = getProcessOutputAndValue(exe, args, env=dict(os.environ))
    d.addTimeout(60, reactor)
    result: tuple[bytes, bytes, int] = await d
    return result


@pytest_twisted.ensureDeferred
async def test_concurrent_tftp_hpa_and_atftp_clients_on_one_address_do_not_mix(
    service: TFTPService, tmp_path: Path
) -> None:
    service.pool_size = 1  # every transfer on one port: only the demultiplexer keeps them apart
    port = str(listen_port(service))
    fetches = []
    for n, name in enumerate(FILES):
        out = tmp_path / f"out-{name}"
        if n % 2:
            args = ["-m", "binary", "127.0.0.1", port, "-c", "get", name, str(out)]
            fetches.append(run("/usr/bin/tftp", *args))
        else:
            args = ["--get", "-r", name, "-l", str(out), "127.0.0.1", port]
            fetches.append(run("/usr/bin/atftp", *args))
    seen_live = 0

    def count_live() -> None:
        nonlocal seen_live
        seen_live = max(seen_live, service.live_transfers)

    sampling = LoopingCall(count_live)
    sampling.start(0.005)
    try:
        results = await defer.gatherResults([defer.ensureDeferred(f) for f in fetches])
    finally:
        sampling.stop()
    for (_, err, code), name in zip(results, FILES, strict=True):
        assert code == 0, err
        assert (tmp_path / f"out-{name}").read_bytes() == FILES[name], name
    assert seen_live >= 3  # they did run at the same time
    [pool] = service._pools.values()
    assert len(pool.ports) == 1 and pool.ports[0].socket is not None  # no socket per transfer
