"""TFTPService: timing on an injected clock, then real loopback sockets and real clients.

Retransmits, windows and "nothing more is sent" are checked on a ``MemoryReactorClock`` with
in-memory transfer sockets, so no test waits for time to pass. Refusals, limits and TIDs are
then checked over real loopback sockets; external clients (curl, tftp-hpa, atftp) run as
subprocesses while the reactor keeps running, and tftpy's blocking client runs in a thread.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import tftpy
from callboard.protocols.filesource import DirectorySource
from callboard.protocols.tftp import admission, codec
from callboard.protocols.tftp.server import TFTPService, TFTPSettings
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher

SMALL = b'<?xml version="1.0"?>\n<device>\r\n' + b"<x/>\n" * 180 + b"</device>\n"
BIG = random.Random(7).randbytes(3 * 1024 * 1024 + 77)
Addr = tuple[str, int]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tftproot")
    (path / "SEP001122334455.cnf.xml").write_bytes(SMALL)
    (path / "firmware").mkdir()
    (path / "firmware" / "big.loads").write_bytes(BIG)
    (path / "roll.bin").write_bytes(random.Random(3).randbytes(8 * 65536 + 100))
    outside = path.parent / "secret.txt"
    outside.write_bytes(b"secret")
    (path / "escape").symlink_to(outside)
    return path


def start(root: Path, addresses: list[str] | None = None, **kw: Any) -> TFTPService:
    settings = TFTPSettings(**{"initial_timeout": 0.2, **kw})
    service = TFTPService(DirectorySource(str(root)), addresses or ["127.0.0.1"], 0, settings)
    service.startService()
    return service


@pytest.fixture
def server(root: Path) -> Iterator[TFTPService]:
    service = start(root)
    yield service
    pytest_twisted.blockon(service.stopService())


def port_of(service: TFTPService, index: int = 0) -> int:
    return int(service.ports[index].getHost().port)


class Probe(DatagramProtocol):
    """A raw TFTP peer on a real socket that records every datagram it receives."""

    def __init__(self) -> None:
        self.queue: DeferredQueue[tuple[bytes, Addr]] = DeferredQueue()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.queue.put((datagram, addr))

    def send(self, data: bytes, addr: Addr) -> None:
        assert self.transport is not None
        self.transport.write(data, addr)

    async def recv(self, timeout: float = 5.0) -> tuple[Any, Addr]:
        d: Deferred[tuple[bytes, Addr]] = self.queue.get()
        d.addTimeout(timeout, reactor)
        data, addr = await d
        return codec.decode(data), addr


@pytest.fixture
def probes() -> Iterator[Any]:
    ports = []

    def make(interface: str = "127.0.0.1") -> Probe:
        probe = Probe()
        ports.append(reactor.listenUDP(0, probe, interface=interface))
        return probe

    yield make
    for p in ports:
        p.stopListening()


def rrq(name: str, mode: str = "octet", **options: str) -> bytes:
    return codec.encode(codec.ReadRequest(name, mode, options))


def ack(n: int) -> bytes:
    return struct.pack("!HH", 4, n & 0xFFFF)


async def fetch_raw(probe: Probe, addr: Addr, name: str, **options: str) -> bytes:
    """A minimal lock-step client built on the probe."""
    probe.send(rrq(name, **options), addr)
    out = []
    packet, tid = await probe.recv()
    if isinstance(packet, codec.OptionAck):
        probe.send(ack(0), tid)
        packet, tid = await probe.recv()
    size = int(options.get("blksize", 512))
    while True:
        assert isinstance(packet, codec.Data), packet
        out.append(packet.payload)
        probe.send(ack(packet.block), tid)
        if len(packet.payload) < size:
            return b"".join(out)
        packet, tid = await probe.recv()


# -- timing, on an injected clock ---------------------------------------------------------------


class MemorySocket:
    """A pooled transfer port in memory: records what the service sends, and to whom."""

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


class TransferView:
    """One transfer seen through the pooled port it landed on (what its client would see).

    ``protocol.datagramReceived`` delivers a datagram to that port as if from ``addr``;
    ``sent`` is what the port sent; ``closed`` is true once the transfer is over.
    """

    def __init__(self, clocked: Clocked, port: MemorySocket, client: Addr) -> None:
        self._clocked = clocked
        self.port = port
        self.client = client
        self.protocol = self

    def datagramReceived(self, datagram: bytes, addr: Addr) -> None:
        self.port.receive(datagram, addr)

    @property
    def sent(self) -> list[tuple[bytes, Addr]]:
        return self.port.sent

    @property
    def closed(self) -> bool:
        return ("127.0.0.1", *self.client) not in self._clocked.service._transfers

    def take(self) -> list[Any]:
        """The packets the port sent since the last call, decoded."""
        out = [codec.decode(d) for d, _ in self.port.sent]
        self.port.sent.clear()
        return out


class Clocked:
    """A TFTPService on a MemoryReactorClock whose transfer ports are MemorySockets."""

    CLIENT: Addr = ("192.0.2.50", 40000)

    def __init__(self, root: Path, **settings: Any) -> None:
        self.clock = MemoryReactorClock()
        self.service = TFTPService(
            DirectorySource(str(root)), ["127.0.0.1"], 0, TFTPSettings(**settings), self.clock
        )
        self.sockets: list[MemorySocket] = []
        self.replies: list[tuple[bytes, Addr]] = []
        self.service.transfer_port = self._open  # type: ignore[method-assign]

    def _open(self, _fds: Any, local: str, receive: Callable[[bytes, Addr], None]) -> MemorySocket:
        sock = MemorySocket(local, receive)
        self.sockets.append(sock)
        return sock

    def request(self, datagram: bytes, client: Addr = CLIENT) -> TransferView | None:
        """An RRQ on the well-known port; a view of the new transfer, if one started."""
        key = ("127.0.0.1", *client)
        live = self.service._transfers
        was_live = key in live
        self.service._request("127.0.0.1", datagram, client, self._reply)
        if was_live or key not in live:
            return None
        port = next(s for s in self.sockets if s.receive.__self__ is live[key].port)
        return TransferView(self, port, client)

    def _reply(self, datagram: bytes, addr: Addr) -> None:
        self.replies.append((datagram, addr))

    def ack(self, sock: TransferView, block: int, client: Addr = CLIENT) -> None:
        sock.protocol.datagramReceived(ack(block), client)


@pytest.fixture
def clocked(root: Path) -> Callable[..., Clocked]:
    return lambda **settings: Clocked(root, **settings)


def test_unacknowledged_data_is_retransmitted_with_backoff_then_abandoned(
    clocked: Callable[..., Clocked],
) -> None:
    c = clocked(initial_timeout=0.1, max_retries=2)
    sock = c.request(rrq("SEP001122334455.cnf.xml"))
    assert sock is not None and sock.take() == [codec.Data(1, SMALL[:512])]
    c.clock.advance(0.099)
    assert sock.take() == []  # not yet
    c.clock.advance(0.001)
    assert sock.take() == [codec.Data(1, SMALL[:512])]  # first retry after 0.1 s
    c.clock.advance(0.199)
    assert sock.take() == []
    c.clock.advance(0.001)
    assert sock.take() == [codec.Data(1, SMALL[:512])]  # second retry 0.2 s later
    assert c.service.live_transfers == 1
    c.clock.advance(0.4)
    assert sock.take() == [] and sock.closed  # given up, silently
    assert c.service.live_transfers == 0 and c.clock.getDelayedCalls() == []
    c.clock.advance(60)
    assert sock.take() == []


def test_no_amplification_oack_then_one_window_per_ack(clocked: Callable[..., Clocked]) -> None:
    c = clocked(initial_timeout=3.0)
    sock = c.request(rrq("firmware/big.loads", blksize="1468", windowsize="16"))
    assert sock is not None
    assert sock.take() == [codec.OptionAck({"blksize": "1468", "windowsize": "16"})]
    c.clock.advance(2.9)
    assert sock.take() == []  # no DATA before ACK 0
    c.ack(sock, 0)
    window = sock.take()
    assert [p.block for p in window] == list(range(1, 17))
    assert b"".join(p.payload for p in window) == BIG[: 16 * 1468]
    c.ack(sock, 0)  # a late duplicate of ACK 0
    assert sock.take() == []
    c.ack(sock, 16)
    assert [p.block for p in sock.take()] == list(range(17, 33))
    c.ack(sock, 16)  # duplicate: must not yield another window
    c.ack(sock, 10)  # stale
    assert sock.take() == []
    c.clock.advance(2.999)
    assert sock.take() == []
    c.clock.advance(0.001)
    assert [p.block for p in sock.take()] == list(range(17, 33))  # the timer resends it


def test_progress_moves_the_retransmit_later(clocked: Callable[..., Clocked]) -> None:
    c = clocked(initial_timeout=1.0)
    sock = c.request(rrq("firmware/big.loads"))
    assert sock is not None and [p.block for p in sock.take()] == [1]
    c.clock.advance(0.9)
    c.ack(sock, 1)
    assert [p.block for p in sock.take()] == [2]
    c.clock.advance(0.1)  # block 1's timer would have fired now
    assert sock.take() == []
    c.clock.advance(0.9)
    assert [p.block for p in sock.take()] == [2]


def test_deadline_ends_a_slow_transfer_with_an_error(clocked: Callable[..., Clocked]) -> None:
    c = clocked(initial_timeout=1.0, transfer_deadline=2.5, max_retries=100)
    sock = c.request(rrq("firmware/big.loads"))
    assert sock is not None
    for _ in range(4):
        c.clock.advance(0.5)
        c.ack(sock, sock.take()[-1].block)
    c.clock.advance(0.5)
    assert sock.take()[-1] == codec.Error(0, "transfer took too long")
    assert sock.closed and c.service.live_transfers == 0


def test_completed_transfer_is_released(clocked: Callable[..., Clocked]) -> None:
    c = clocked()
    sock = c.request(rrq("SEP001122334455.cnf.xml"))
    assert sock is not None
    data = []
    while not sock.closed:
        packet = sock.take()[-1]
        data.append(packet.payload)
        c.ack(sock, packet.block)
    assert b"".join(data) == SMALL
    assert c.service.live_transfers == 0
    # No transfer timer is left; only the pending summary of successful transfers.
    [summary] = c.clock.getDelayedCalls()
    assert summary.getTime() == c.clock.seconds() + c.service.summary_interval
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        c.clock.advance(c.service.summary_interval)
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e for e in events if e.get("log_namespace") == "callboard.tftp"]
    assert [(e["transfers"], e["bytes"]) for e in lines] == [(1, len(SMALL))]
    assert c.clock.getDelayedCalls() == []


def test_refused_requests_open_no_transfer(clocked: Callable[..., Clocked]) -> None:
    c = clocked()
    for datagram in (rrq("missing.cnf.xml"), rrq("../secret.txt"), rrq("escape"), rrq("a", "mail")):
        assert c.request(datagram) is None
    assert [codec.decode(d).code for d, _ in c.replies] == [1, 2, 2, 4]  # type: ignore[union-attr]
    assert all(addr == Clocked.CLIENT for _, addr in c.replies)
    assert c.service.live_transfers == 0 and c.clock.getDelayedCalls() == []


def test_global_cap_refuses_other_clients(clocked: Callable[..., Clocked]) -> None:
    c = clocked(max_transfers=1)
    assert c.request(rrq("firmware/big.loads")) is not None
    assert c.request(rrq("SEP001122334455.cnf.xml"), ("192.0.2.51", 1234)) is None
    assert c.replies == [(codec.encode_error(0, "server busy"), ("192.0.2.51", 1234))]


def test_no_socket_for_the_transfer_means_busy(clocked: Callable[..., Clocked]) -> None:
    c = clocked()

    def exhausted(*_: Any) -> MemorySocket:
        raise OSError(24, "Too many open files")

    c.service.transfer_port = exhausted  # type: ignore[method-assign]
    assert c.request(rrq("SEP001122334455.cnf.xml")) is None
    assert c.replies == [(codec.encode_error(0, "server busy"), Clocked.CLIENT)]
    assert c.service.live_transfers == 0


def test_stray_and_repeated_packets(clocked: Callable[..., Clocked]) -> None:
    c = clocked(initial_timeout=5.0, max_retries=1)
    sock = c.request(rrq("SEP001122334455.cnf.xml"))
    assert sock is not None and len(sock.take()) == 1
    c.request(ack(1), ("192.0.2.99", 5))  # stray ACK on the well-known port: ignored
    assert c.replies == []
    sock.protocol.datagramReceived(ack(1), ("192.0.2.99", 5))  # another TID: error 5
    sock.protocol.datagramReceived(codec.encode_error(0, "x"), ("192.0.2.99", 5))  # not answered
    assert sock.sent == [(codec.encode_error(5, "unknown transfer ID"), ("192.0.2.99", 5))]
    sock.sent.clear()
    assert c.request(rrq("SEP001122334455.cnf.xml")) is None  # the same TID asks again
    assert sock.take() == [codec.Data(1, SMALL[:512])]  # a retry, not a second transfer
    assert c.request(rrq("SEP001122334455.cnf.xml")) is None
    assert sock.take() == [] and sock.closed  # retries are bounded: max_retries=1
    assert c.service.live_transfers == 0


def test_client_error_ends_the_transfer_quietly(clocked: Callable[..., Clocked]) -> None:
    c = clocked()
    sock = c.request(rrq("firmware/big.loads"))
    assert sock is not None
    sock.take()
    sock.protocol.datagramReceived(codec.encode_error(3, "disk full"), Clocked.CLIENT)
    assert sock.take() == [] and sock.closed and c.service.live_transfers == 0


def test_shutdown_aborts_live_transfers(clocked: Callable[..., Clocked]) -> None:
    c = clocked()
    socks = [c.request(rrq("firmware/big.loads"), ("192.0.2.60", p)) for p in (1, 2)]
    c.service.stopService()
    assert all(s is not None and s.closed for s in socks)
    assert c.service.live_transfers == 0 and c.clock.getDelayedCalls() == []


# -- plans: a request of bytes seen before skips its negotiation, never its checks ------------


def fetch_clocked(c: Clocked, datagram: bytes, client: Addr) -> list[Any]:
    """Every packet one transfer sends, acknowledging each DATA (and an OACK with ACK 0)."""
    sock = c.request(datagram, client)
    assert sock is not None
    seen: list[Any] = []
    while not sock.closed:
        packets = sock.take()
        seen += packets
        last = packets[-1]
        c.ack(sock, 0 if isinstance(last, codec.OptionAck) else last.block, client)
    return seen


@pytest.mark.parametrize(
    "datagram",
    [
        rrq("SEP001122334455.cnf.xml"),
        rrq("SEP001122334455.cnf.xml", blksize="600", tsize="0"),
        rrq("SEP001122334455.cnf.xml", windowsize="4", blksize="512", timeout="3"),
        rrq("SEP001122334455.cnf.xml", blksize="8"),  # packets too small to keep encoded
    ],
)
def test_a_planned_request_is_answered_exactly_like_the_first(
    clocked: Callable[..., Clocked], datagram: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = clocked()
    agreed: list[Any] = []
    agree = admission.agree
    monkeypatch.setattr(admission, "agree", lambda *a: agreed.append(a) or agree(*a))
    first = fetch_clocked(c, datagram, ("192.0.2.70", 1000))
    again = [fetch_clocked(c, datagram, ("192.0.2.71", 1000 + n)) for n in range(3)]
    assert again == [first] * 3
    assert len(agreed) == 1  # the later ones used the first one's plan
    assert b"".join(p.payload for p in first if isinstance(p, codec.Data)) == SMALL


def test_a_plan_is_dropped_once_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "XMLDefault.cnf.xml").write_bytes(b"one" * 200)
    c = Clocked(tmp_path)
    datagram = rrq("XMLDefault.cnf.xml", tsize="0")
    first = fetch_clocked(c, datagram, ("192.0.2.72", 1))
    assert first[0] == codec.OptionAck({"tsize": "600"})
    (tmp_path / "XMLDefault.cnf.xml").write_bytes(b"two" * 300)
    after = fetch_clocked(c, datagram, ("192.0.2.72", 2))
    assert after[0] == codec.OptionAck({"tsize": "900"})
    assert b"".join(p.payload for p in after[1:]) == b"two" * 300


def test_a_plan_is_dropped_when_the_settings_change(clocked: Callable[..., Clocked]) -> None:
    c = clocked(max_blksize=1024)
    datagram = rrq("SEP001122334455.cnf.xml", blksize="1400")
    assert fetch_clocked(c, datagram, ("192.0.2.73", 1))[0] == codec.OptionAck({"blksize": "1024"})
    c.service.settings = TFTPSettings(max_blksize=700)  # a reload
    assert fetch_clocked(c, datagram, ("192.0.2.73", 2))[0] == codec.OptionAck({"blksize": "700"})


def test_a_planned_request_is_still_refused_when_busy_or_missing(
    tmp_path: Path,
) -> None:
    (tmp_path / "a.cnf.xml").write_bytes(b"a" * 100)
    c = Clocked(tmp_path, max_transfers_per_client=1)
    datagram = rrq("a.cnf.xml")
    fetch_clocked(c, datagram, ("192.0.2.74", 1))  # planned
    assert c.request(datagram, ("192.0.2.74", 2)) is not None
    assert c.request(datagram, ("192.0.2.74", 3)) is None  # over the per-client limit
    assert c.replies == [(codec.encode_error(0, "server busy"), ("192.0.2.74", 3))]
    (tmp_path / "a.cnf.xml").unlink()
    assert c.request(datagram, ("192.0.2.75", 1)) is None
    assert c.replies[-1] == (codec.encode_error(1, "file not found"), ("192.0.2.75", 1))


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (codec.encode(codec.WriteRequest("SEP001122334455.cnf.xml", "octet", {})), 2),
        (rrq("../secret.txt"), 2),
        (rrq("..\\..\\etc\\passwd"), 2),
        (rrq("escape"), 2),  # symlink out of the root
        (rrq("firmware"), 2),  # a directory
        (rrq("SEP\x01.cnf.xml"), 2),
        (b"\x00\x01SEP001122334455\x00.cnf.xml\x00octet\x00", 2),  # NUL in the name
        (rrq("/etc/passwd"), 1),  # normalised under the root: just missing
        (rrq("CTLSEP001122334455.tlv"), 1),
        (rrq("SEP001122334455.cnf.xml", blksize="4"), 8),
        (rrq("SEP001122334455.cnf.xml", blksize="huge"), 8),
        (rrq("SEP001122334455.cnf.xml", timeout="0"), 8),
        (rrq("SEP001122334455.cnf.xml", windowsize="0"), 8),
        (rrq("SEP001122334455.cnf.xml", "mail"), 4),
        (b"\x00\x01SEP001122334455.cnf.xml\x00octet", 4),
    ],
)
@pytest_twisted.ensureDeferred
async def test_refusals_carry_exact_code_and_server_keeps_serving(
    server: TFTPService, probes: Any, request_bytes: bytes, code: int
) -> None:
    addr = ("127.0.0.1", port_of(server))
    probe = probes()
    probe.send(request_bytes, addr)
    packet, source = await probe.recv()
    assert isinstance(packet, codec.Error) and packet.code == code, packet
    assert source == addr
    assert server.live_transfers == 0  # a refusal never leaves a transfer behind
    assert await fetch_raw(probes(), addr, "SEP001122334455.cnf.xml") == SMALL


@pytest_twisted.ensureDeferred
async def test_unknown_options_ignored_and_data_starts_at_block_1(
    server: TFTPService, probes: Any
) -> None:
    probe = probes()
    probe.send(
        rrq("SEP001122334455.cnf.xml", rollover="0", utimeout="5"), ("127.0.0.1", port_of(server))
    )
    packet, _ = await probe.recv()
    assert isinstance(packet, codec.Data) and packet.block == 1


@pytest_twisted.ensureDeferred
async def test_wrong_tid_gets_error_5_and_transfer_continues(
    server: TFTPService, probes: Any
) -> None:
    client, intruder = probes(), probes()
    client.send(rrq("SEP001122334455.cnf.xml"), ("127.0.0.1", port_of(server)))
    packet, tid = await client.recv()
    assert tid[1] != port_of(server)
    intruder.send(ack(1), tid)
    error, source = await intruder.recv()
    assert error == codec.Error(5, "unknown transfer ID") and source == tid
    data = [packet.payload]
    while len(packet.payload) == 512:
        client.send(ack(packet.block), tid)
        packet, _ = await client.recv()
        data.append(packet.payload)
    client.send(ack(packet.block), tid)
    assert b"".join(data) == SMALL


@pytest_twisted.ensureDeferred
async def test_repeated_rrq_is_a_retry_not_a_second_transfer(
    server: TFTPService, probes: Any
) -> None:
    probe = probes()
    addr = ("127.0.0.1", port_of(server))
    probe.send(rrq("SEP001122334455.cnf.xml"), addr)
    first, tid1 = await probe.recv()
    probe.send(rrq("SEP001122334455.cnf.xml"), addr)
    again, tid2 = await probe.recv()
    assert first == again and tid1 == tid2 and server.live_transfers == 1


@pytest_twisted.ensureDeferred
async def test_busy_past_per_client_cap_and_others_still_served(root: Path, probes: Any) -> None:
    service = start(root, max_transfers_per_client=2, initial_timeout=5.0)
    addr = ("127.0.0.1", port_of(service))
    try:
        holders = [probes(), probes()]
        for p in holders:
            p.send(rrq("firmware/big.loads"), addr)
            await p.recv()
        third = probes()
        third.send(rrq("firmware/big.loads"), addr)
        packet, _ = await third.recv()
        assert packet == codec.Error(0, "server busy")
        other = probes("127.0.0.2")
        assert await fetch_raw(other, addr, "SEP001122334455.cnf.xml") == SMALL
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_global_cap(root: Path, probes: Any) -> None:
    service = start(root, max_transfers=1, initial_timeout=5.0)
    addr = ("127.0.0.1", port_of(service))
    try:
        holder = probes()
        holder.send(rrq("firmware/big.loads"), addr)
        await holder.recv()  # its transfer is live
        probe = probes("127.0.0.3")
        probe.send(rrq("SEP001122334455.cnf.xml"), addr)
        packet, _ = await probe.recv()
        assert packet == codec.Error(0, "server busy")
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_replies_come_from_the_address_asked(root: Path, probes: Any) -> None:
    service = start(root, addresses=["127.0.0.1", "127.0.0.2"])
    try:
        for index, address in enumerate(["127.0.0.1", "127.0.0.2"]):
            probe = probes()
            probe.send(rrq("SEP001122334455.cnf.xml"), (address, port_of(service, index)))
            _, source = await probe.recv()
            assert source[0] == address
    finally:
        await service.stopService()


# -- real clients -----------------------------------------------------------------------------


async def run(exe: str, *args: str) -> tuple[bytes, bytes, int]:
    d = getProcessOutputAndValue(exe, args, env=dict(os.environ))
    d.addTimeout(30, reactor)
    result: tuple[bytes, bytes, int] = await d
    return result


FILES = [("SEP001122334455.cnf.xml", SMALL), ("firmware/big.loads", BIG)]


@pytest.mark.parametrize(("name", "content"), FILES, ids=["config", "firmware"])
@pytest_twisted.ensureDeferred
async def test_curl(server: TFTPService, tmp_path: Path, name: str, content: bytes) -> None:
    out = tmp_path / "out"
    url = f"tftp://127.0.0.1:{port_of(server)}/{name}"
    _, err, code = await run("/usr/bin/curl", "-sS", "--tftp-blksize", "1468", "-o", str(out), url)
    assert code == 0, err
    assert out.read_bytes() == content


@pytest.mark.parametrize(("name", "content"), FILES, ids=["config", "firmware"])
@pytest_twisted.ensureDeferred
async def test_tftp_hpa(server: TFTPService, tmp_path: Path, name: str, content: bytes) -> None:
    out = tmp_path / "out"
    _, err, code = await run(
        "/usr/bin/tftp",
        "-m",
        "binary",
        "127.0.0.1",
        str(port_of(server)),
        "-c",
        "get",
        name,
        str(out),
    )
    assert code == 0 and out.read_bytes() == content, err


@pytest_twisted.ensureDeferred
async def test_tftp_hpa_netascii(server: TFTPService, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _, err, code = await run(
        "/usr/bin/tftp",
        "-m",
        "ascii",
        "127.0.0.1",
        str(port_of(server)),
        "-c",
        "get",
        "SEP001122334455.cnf.xml",
        str(out),
    )
    assert code == 0 and out.read_bytes() == SMALL, err


@pytest.mark.parametrize(("name", "content"), FILES, ids=["config", "firmware"])
@pytest.mark.parametrize("window", ["1", "16"])
@pytest_twisted.ensureDeferred
async def test_atftp(
    server: TFTPService, tmp_path: Path, name: str, content: bytes, window: str
) -> None:
    out = tmp_path / "out"
    _, err, code = await run(
        "/usr/bin/atftp",
        "--get",
        "-r",
        name,
        "-l",
        str(out),
        "--option",
        "blksize 1468",
        "--option",
        f"windowsize {window}",
        "--option",
        "tsize 0",
        "127.0.0.1",
        str(port_of(server)),
    )
    assert code == 0 and out.read_bytes() == content, err


@pytest.mark.parametrize(("name", "content"), FILES, ids=["config", "firmware"])
@pytest_twisted.ensureDeferred
async def test_tftpy(server: TFTPService, tmp_path: Path, name: str, content: bytes) -> None:
    out = tmp_path / "out"
    client = tftpy.TftpClient("127.0.0.1", port_of(server), options={"blksize": 1468})
    d = threads.deferToThread(client.download, name, str(out), timeout=5)
    d.addTimeout(30, reactor)
    await d
    assert out.read_bytes() == content


@pytest_twisted.ensureDeferred
async def test_rollover_with_blksize_8(server: TFTPService, tmp_path: Path, root: Path) -> None:
    out = tmp_path / "out"
    _, err, code = await run(
        "/usr/bin/atftp",
        "--get",
        "-r",
        "roll.bin",
        "-l",
        str(out),
        "--option",
        "blksize 8",
        "--option",
        "windowsize 64",
        "127.0.0.1",
        str(port_of(server)),
    )
    assert code == 0, err
    assert out.read_bytes() == (root / "roll.bin").read_bytes()


# -- loss and reordering ------------------------------------------------------------------------


class Relay(DatagramProtocol):
    """Between one client and the server: drops and duplicates packets, seeded."""

    def __init__(self, server: Addr, seed: int, drop: float, dup: float) -> None:
        self.server = server
        self.server_tid: Addr | None = None
        self.client: Addr | None = None
        self.rng = random.Random(seed)
        self.drop, self.dup = drop, dup
        self.dropped = self.duplicated = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        assert self.transport is not None
        first = self.client is None
        if first or addr == self.client:
            self.client = addr
            target = self.server if first or self.server_tid is None else self.server_tid
        else:
            self.server_tid = self.server_tid or addr
            target = self.client
        if not first and self.rng.random() < self.drop:
            self.dropped += 1
            return
        self.transport.write(datagram, target)
        if self.rng.random() < self.dup:
            self.duplicated += 1
            reactor.callLater(0.01, self.transport.write, datagram, target)


@pytest.mark.parametrize("client", ["tftpy", "atftp-window"])
@pytest_twisted.ensureDeferred
async def test_loss_and_duplicates_still_yield_identical_bytes(
    root: Path, tmp_path: Path, client: str
) -> None:
    service = start(root, initial_timeout=0.05, max_retries=20)
    relay = Relay(("127.0.0.1", port_of(service)), seed=42, drop=0.05, dup=0.05)
    relay_port = reactor.listenUDP(0, relay, interface="127.0.0.1")
    content = BIG[: 256 * 1024]
    (tmp_path / "part.bin").write_bytes(content)
    service.source = DirectorySource(str(tmp_path))
    out = tmp_path / "out"
    try:
        rport = relay_port.getHost().port
        if client == "tftpy":
            c = tftpy.TftpClient("127.0.0.1", rport, options={"blksize": 1024})
            d = threads.deferToThread(c.download, "part.bin", str(out), timeout=5)
            d.addTimeout(40, reactor)
            await d
        else:
            _, err, code = await run(
                "/usr/bin/atftp",
                "--get",
                "-r",
                "part.bin",
                "-l",
                str(out),
                "--option",
                "blksize 1024",
                "--option",
                "windowsize 8",
                "127.0.0.1",
                str(rport),
            )
            assert code == 0, err
        assert out.read_bytes() == content
        assert relay.dropped > 5 and relay.duplicated > 5
    finally:
        relay_port.stopListening()
        await service.stopService()
