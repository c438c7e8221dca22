"""TFTPService over real loopback sockets: refusals, limits, windows, and real clients.

External clients (curl, tftp-hpa, atftp) run as subprocesses while the reactor keeps
running; tftpy's blocking client runs in a thread.
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
import tftpy
from callboard.protocols.filesource import DirectorySource
from callboard.protocols.tftp import codec
from callboard.protocols.tftp.server import TFTPService, TFTPSettings
from twisted.internet import reactor, task, threads
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.utils import getProcessOutputAndValue

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

    async def quiet(self, seconds: float) -> int:
        """How many datagrams arrive within ``seconds``."""
        await task.deferLater(reactor, seconds, lambda: None)
        return len(self.queue.pending)


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
    assert await fetch_raw(probes(), addr, "SEP001122334455.cnf.xml") == SMALL
    await task.deferLater(reactor, 0.05, lambda: None)
    assert server.live_transfers == 0


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
async def test_unacknowledged_data_is_retransmitted_then_abandoned(root: Path, probes: Any) -> None:
    service = start(root, initial_timeout=0.1, max_retries=2)
    try:
        probe = probes()
        probe.send(rrq("SEP001122334455.cnf.xml"), ("127.0.0.1", port_of(service)))
        seen = [await probe.recv() for _ in range(3)]
        assert all(p == seen[0][0] for p, _ in seen)
        assert await probe.quiet(1.0) == 0
        assert service.live_transfers == 0
    finally:
        await service.stopService()


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
        probes().send(rrq("firmware/big.loads"), addr)
        await task.deferLater(reactor, 0.1, lambda: None)
        probe = probes("127.0.0.3")
        probe.send(rrq("SEP001122334455.cnf.xml"), addr)
        packet, _ = await probe.recv()
        assert packet == codec.Error(0, "server busy")
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_no_amplification_oack_then_one_window(root: Path, probes: Any) -> None:
    service = start(root, initial_timeout=3.0)
    try:
        probe = probes()
        probe.send(
            rrq("firmware/big.loads", blksize="1468", windowsize="16"),
            ("127.0.0.1", port_of(service)),
        )
        packet, tid = await probe.recv()
        assert packet == codec.OptionAck({"blksize": "1468", "windowsize": "16"})
        assert await probe.quiet(0.4) == 0  # no DATA before ACK 0
        probe.send(ack(0), tid)
        assert await probe.quiet(0.4) == 16
        window = [await probe.recv() for _ in range(16)]
        assert [p.block for p, _ in window] == list(range(1, 17))
        probe.send(ack(16), tid)
        probe.send(ack(16), tid)  # duplicate: must not yield another window
        assert await probe.quiet(0.4) == 16
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
