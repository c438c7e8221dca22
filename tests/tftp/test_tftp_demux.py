"""Pooled transfer ports: the demultiplexing rules without I/O, then the service's adapter.

:class:`PortTable`, :func:`free_port` and :func:`pick_port` are pure; the service is then
driven on a ``MemoryReactorClock`` with in-memory pool ports (what each port sent, and to
whom), and the real pooled socket is read through a fake FD set over a loopback socket.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from callboard.protocols.filesource import DirectorySource
from callboard.protocols.tftp import codec
from callboard.protocols.tftp.demux import UNKNOWN_TID, PortTable, free_port, pick_port
from callboard.protocols.tftp.server import TFTPService, TFTPSettings, _PooledSocket
from twisted.internet.testing import MemoryReactorClock

Addr = tuple[str, int]
A: Addr = ("192.0.2.7", 40000)
B: Addr = ("192.0.2.7", 40001)  # same client address, another port
ACK_1 = struct.pack("!HH", 4, 1)
ERROR = codec.encode_error(0, "bye")
BIG = bytes(range(256)) * 40  # 20 blocks of 512


# -- the rules, sans I/O -----------------------------------------------------------------------


def test_a_table_routes_by_client_address_and_port() -> None:
    table: PortTable[str] = PortTable()
    table.add(A, "transfer a")
    table.add(B, "transfer b")
    assert table.live.get(A) == "transfer a" and table.live.get(B) == "transfer b"
    assert table.live.get(("192.0.2.8", 40000)) is None and len(table) == 2


def test_an_unknown_tid_gets_error_5_but_an_error_gets_nothing() -> None:
    table: PortTable[str] = PortTable()
    table.add(A, "transfer a")
    assert table.stray(ACK_1, B, now=0.0) == UNKNOWN_TID
    assert codec.decode(UNKNOWN_TID) == codec.Error(5, "unknown transfer ID")
    assert table.stray(ERROR, B, now=0.0) is None
    assert table.stray(b"\x00\x05", B, now=0.0) is None  # even a truncated one
    assert table.live == {A: "transfer a"}  # nothing disturbed


def test_stragglers_of_a_finished_transfer_are_dropped_for_the_linger_only() -> None:
    table: PortTable[str] = PortTable(linger=5.0)
    table.add(A, "transfer a")
    table.remove(A, now=10.0)
    assert table.live == {} and table.lingering(A, 10.0)
    assert table.stray(ACK_1, A, now=14.9) is None  # a late duplicate of its last ACK
    assert table.stray(ACK_1, B, now=14.9) == UNKNOWN_TID  # another TID is not lingering
    assert table.stray(ACK_1, A, now=15.0) == UNKNOWN_TID  # forgotten after the linger
    table.remove(A, now=20.0)  # removing what is not live changes nothing
    assert not table.lingering(A, 20.0)


def test_lingering_clients_are_pruned_so_memory_stays_bounded() -> None:
    table: PortTable[str] = PortTable(linger=1.0)
    for port in range(1000):
        client = ("192.0.2.9", port)
        table.add(client, "t")
        table.remove(client, now=port * 0.01)
    assert len(table._recent) < 300  # about a second's worth, not all 1000
    assert len(table._expiry) < 300
    assert table.lingering(("192.0.2.9", 999), 9.99)


def test_a_client_that_finishes_again_lingers_for_its_latest_transfer() -> None:
    table: PortTable[str] = PortTable(linger=1.0)
    table.add(A, "first")
    table.remove(A, now=0.0)
    table.add(A, "second")
    table.remove(A, now=0.9)
    table.add(B, "other")
    table.remove(B, now=1.5)  # prunes: A's first expiry (1.0) is due, its second (1.9) not
    assert table.lingering(A, 1.8) and not table.lingering(A, 1.9)


def test_a_new_transfer_of_the_same_client_clears_its_lingering() -> None:
    table: PortTable[str] = PortTable()
    table.add(A, "old")
    table.remove(A, now=1.0)
    table.add(A, "new")
    assert not table.lingering(A, 1.0) and table.live.get(A) == "new"


def test_pick_port_goes_round_robin_and_avoids_a_clients_previous_port() -> None:
    tables: list[PortTable[str]] = [PortTable(), PortTable(), PortTable()]
    assert [pick_port(tables, start, A, 0.0) for start in range(4)] == [0, 1, 2, 0]
    tables[1].add(A, "live")
    assert pick_port(tables, 1, A, 0.0) == 2  # A is live on port 1
    tables[1].remove(A, now=0.0)
    tables[2].add(A, "live")
    assert pick_port(tables, 1, A, 1.0) == 0  # lingering on 1, live on 2
    assert pick_port(tables, 1, B, 1.0) == 1  # another TID of the same address: no conflict
    single: list[PortTable[str]] = [PortTable()]
    single[0].add(A, "x")
    assert pick_port(single, 5, A, 0.0) == 0  # a pool of one has no choice
    assert free_port(single, 5, A, 0.0) is None  # (which the pool answers with another port)
    assert free_port(single, 5, B, 0.0) == 0


# -- the service's adapter on an injected clock -------------------------------------------------


class Port:
    """One pooled port in memory: what the service sent from it, and to whom."""

    def __init__(self, local: str, receive: Callable[[bytes, Addr], None]) -> None:
        self.local = local
        self.receive = receive
        self.sent: list[tuple[bytes, Addr]] = []
        self.closed = False

    def send_all(self, datagrams: Any, addr: Addr) -> None:
        self.sent.extend((d, addr) for d in datagrams)

    def sendto(self, datagram: bytes, addr: Addr) -> int:
        self.sent.append((datagram, addr))
        return len(datagram)

    def close(self) -> None:
        self.closed = True

    def to(self, client: Addr) -> list[Any]:
        """Decoded packets sent to ``client`` since the last call for it."""
        mine = [codec.decode(d) for d, a in self.sent if a == client]
        self.sent = [(d, a) for d, a in self.sent if a != client]
        return mine


class Pooled:
    def __init__(self, root: Path, **settings: Any) -> None:
        self.clock = MemoryReactorClock()
        self.service = TFTPService(
            DirectorySource(str(root)), ["127.0.0.1"], 0, TFTPSettings(**settings), self.clock
        )
        self.ports: list[Port] = []
        self.service.transfer_port = self._open  # type: ignore[method-assign]

    def _open(self, _fds: Any, local: str, receive: Callable[[bytes, Addr], None]) -> Port:
        port = Port(local, receive)
        self.ports.append(port)
        return port

    def open_ports(self, count: int) -> None:
        """Grow the pool of 127.0.0.1 to ``count`` ports now (it opens one, then on demand)."""
        pool = self.service._pool("127.0.0.1")
        while len(pool.ports) < count:
            pool._add_port()

    def rrq(self, client: Addr, name: str = "big.bin") -> Port:
        """Start a transfer; the pool port its first reply came from."""
        sent = [len(p.sent) for p in self.ports]
        self.service._request(
            "127.0.0.1", codec.encode(codec.ReadRequest(name, "octet", {})), client, self._refused
        )
        return next(
            p for i, p in enumerate(self.ports) if len(p.sent) > (sent[i] if i < len(sent) else 0)
        )

    @staticmethod
    def _refused(datagram: bytes, addr: Addr) -> None:
        raise AssertionError(f"refused {addr}: {codec.decode(datagram)}")


@pytest.fixture
def pooled(tmp_path: Path) -> Callable[..., Pooled]:
    (tmp_path / "big.bin").write_bytes(BIG)
    (tmp_path / "other.bin").write_bytes(BIG[::-1])
    return lambda **settings: Pooled(tmp_path, **settings)


def test_the_pool_is_opened_once_and_reused_across_transfers(
    pooled: Callable[..., Pooled],
) -> None:
    p = pooled(initial_timeout=5.0)
    for n in range(20):
        client = ("192.0.2.20", 1000 + n)
        port = p.rrq(client)
        for block in range(1, 22):
            port.receive(struct.pack("!HH", 4, block), client)
    assert len(p.ports) == 1  # no socket per transfer: distinct TIDs all share one port
    assert not any(port.closed for port in p.ports) and p.service.live_transfers == 0
    p.service.stopService()
    assert all(port.closed for port in p.ports)


def test_two_transfers_from_one_address_different_ports_do_not_mix(
    pooled: Callable[..., Pooled],
) -> None:
    p = pooled(initial_timeout=5.0)
    p.service.pool_size = 1  # both on the same port: only the demultiplexer tells them apart
    port_a = p.rrq(A, "big.bin")
    port_b = p.rrq(B, "other.bin")
    assert port_a is port_b
    assert port_a.to(A) == [codec.Data(1, BIG[:512])]
    assert port_a.to(B) == [codec.Data(1, BIG[::-1][:512])]
    port_a.receive(ACK_1, A)  # A moves on; B is not touched
    assert port_a.to(A) == [codec.Data(2, BIG[512:1024])] and port_a.to(B) == []
    port_a.receive(ACK_1, B)
    assert port_a.to(B) == [codec.Data(2, BIG[::-1][512:1024])] and port_a.to(A) == []


def test_a_packet_on_the_wrong_pool_port_gets_error_5_and_disturbs_nothing(
    pooled: Callable[..., Pooled],
) -> None:
    p = pooled(initial_timeout=5.0)
    p.open_ports(2)
    home = p.rrq(A)
    other = next(port for port in p.ports if port is not home)
    home.to(A)
    other.receive(ACK_1, A)  # A's ACK sent to a TID that is not its transfer's
    assert other.to(A) == [codec.Error(5, "unknown transfer ID")]
    assert home.to(A) == []  # the transfer did not move
    home.receive(ACK_1, A)
    assert home.to(A) == [codec.Data(2, BIG[512:1024])]


def test_a_late_duplicate_of_the_last_ack_is_dropped_then_the_client_may_come_back(
    pooled: Callable[..., Pooled],
) -> None:
    p = pooled(initial_timeout=5.0)
    port = p.rrq(A)
    for block in range(1, 22):
        port.receive(struct.pack("!HH", 4, block), A)
    assert p.service.live_transfers == 0
    port.to(A)
    port.receive(struct.pack("!HH", 4, 21), A)  # the client repeated its last ACK
    assert port.to(A) == []  # no error 5 for a transfer that just ended well
    again = p.rrq(A)  # the same TID starts over at once: another port, so no confusion
    assert again is not port and again.to(A) == [codec.Data(1, BIG[:512])]


def test_a_client_reusing_its_tid_gets_a_new_port_while_the_old_ones_linger(
    pooled: Callable[..., Pooled],
) -> None:
    """tftp-hpa keeps one TID for a session: each next transfer away from the last ones."""
    p = pooled(initial_timeout=5.0)
    used = []
    for _ in range(p.service.pool_size):
        port = p.rrq(A)
        for block in range(1, 22):
            port.receive(struct.pack("!HH", 4, block), A)
        used.append(port)
    assert len(set(map(id, used))) == p.service.pool_size == len(p.ports)
    p.rrq(B)  # another TID still shares the ports opened: none is added for it
    shared = p.rrq(A)  # every port has A lingering and the pool is full: one is shared
    assert len(p.ports) == p.service.pool_size and shared in used
    assert shared.to(A)[-1] == codec.Data(1, BIG[:512])
    p.clock.advance(p.service.linger)  # the linger over, A is welcome on any port again
    p.rrq(("192.0.2.7", 40002))
    assert len(p.ports) == p.service.pool_size


def test_a_pool_that_cannot_grow_shares_a_port(pooled: Callable[..., Pooled]) -> None:
    p = pooled(initial_timeout=5.0)
    first = p.rrq(A)
    for block in range(1, 22):
        first.receive(struct.pack("!HH", 4, block), A)

    def exhausted(*_: Any) -> Port:
        raise OSError(24, "Too many open files")

    p.service.transfer_port = exhausted  # type: ignore[method-assign]
    again = p.rrq(A)  # no second port: the lingering one serves, not "server busy"
    assert again is first and again.to(A)[-1] == codec.Data(1, BIG[:512])


def test_one_timer_for_all_transfers_and_none_left_when_idle(
    pooled: Callable[..., Pooled],
) -> None:
    p = pooled(initial_timeout=1.0)
    ports = {n: p.rrq(("192.0.2.30", 2000 + n)) for n in range(64)}
    assert len(p.clock.getDelayedCalls()) == 1  # not one DelayedCall per transfer
    p.clock.advance(1.0)  # nobody acknowledged: every transfer retransmits its block
    for n, port in ports.items():
        assert port.to(("192.0.2.30", 2000 + n)) == [codec.Data(1, BIG[:512])] * 2
    p.service.stopService()
    assert p.clock.getDelayedCalls() == []


# -- the real pooled socket, read through a fake FD set -----------------------------------------


class FDSet:
    def __init__(self) -> None:
        self.readers: list[Any] = []

    def addReader(self, reader: Any) -> None:
        self.readers.append(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.remove(reader)


@pytest.mark.parametrize("local", ["127.0.0.1", "::1"])
def test_a_pooled_socket_drains_what_is_queued_and_normalises_addresses(local: str) -> None:
    fds = FDSet()
    got: list[tuple[bytes, Addr]] = []
    sock = _PooledSocket(fds, local, lambda d, a: got.append((d, a)))  # type: ignore[arg-type]
    family = socket.AF_INET6 if ":" in local else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as client:
        client.bind((local, 0))
        target = (local, sock._sock.getsockname()[1])  # type: ignore[union-attr]
        assert target[1] != 0
        for n in range(3):
            client.sendto(struct.pack("!HH", 4, n), target)
        me = client.getsockname()[:2]
        sock.doRead()  # one wake-up reads all three
        assert got == [(struct.pack("!HH", 4, n), me) for n in range(3)]
        sock.sendto(b"reply", me)
        data, source = client.recvfrom(100)
        assert data == b"reply" and source[:2] == target
    assert fds.readers == [sock]  # registered once, when opened
    sock.close()
    assert fds.readers == [] and sock.fileno() == -1


def test_a_pooled_port_gets_the_receive_buffer_of_a_listener(tmp_path: Path) -> None:
    """One port may take every client's ACKs: sized like the well-known port for bursts."""
    settings = TFTPSettings(receive_buffer=1 << 20)
    service = TFTPService(
        DirectorySource(str(tmp_path)), ["127.0.0.1"], 0, settings, MemoryReactorClock()
    )
    sock = service.open_transfer_port("127.0.0.1", lambda d, a: None)
    assert isinstance(sock, _PooledSocket) and sock._sock is not None
    default = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with default:
        unsized = default.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert sock._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) > unsized
    sock.close()


def test_a_small_file_is_encoded_once_and_again_only_when_it_changes(
    pooled: Callable[..., Pooled], tmp_path: Path
) -> None:
    p = pooled(initial_timeout=5.0)

    def fetch(client: Addr) -> bytes:
        port = p.rrq(client)
        got = b""
        for block in range(1, 100):
            packets = port.to(client)
            if not packets:
                return got
            assert packets == [codec.Data(block, packets[0].payload)]
            got += packets[0].payload
            port.receive(struct.pack("!HH", 4, block), client)
        raise AssertionError("did not end")

    assert fetch(A) == BIG and fetch(B) == BIG
    assert len(p.service._encoded) == 1  # the second transfer sent the first one's packets
    (tmp_path / "big.bin").write_bytes(BIG[::-1])
    p.service.encoded_files = 1  # the bound: the old file's packets are forgotten
    assert fetch(("192.0.2.8", 1)) == BIG[::-1] and len(p.service._encoded) == 1
    assert fetch(("192.0.2.8", 2)) == BIG[::-1] and len(p.service._encoded) == 1
