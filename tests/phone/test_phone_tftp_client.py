"""The phone's TFTP read client: the sans-I/O session, then real transfers from our TFTPService."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from callboard.phone import tftp_client
from callboard.phone.tftp_client import Finished, ReadSession, Send, TFTPError, TFTPTimeout
from callboard.protocols.filesource import DirectorySource
from callboard.protocols.tftp import codec
from callboard.protocols.tftp.server import TFTPService, TFTPSettings
from twisted.internet import reactor as _reactor

reactor: Any = _reactor

SERVER = ("127.0.0.1", 69)
TID = ("127.0.0.1", 40000)


def sent(step: list[Send | Finished]) -> list[codec.Packet]:
    return [codec.decode(a.datagram) for a in step if isinstance(a, Send)]


def test_rrq_asks_for_blksize_and_tsize_then_follows_the_oack() -> None:
    s = ReadSession("SEP00AABBCCDDEE.cnf.xml", SERVER, blksize=1428)
    (rrq,) = sent(s.start())
    assert isinstance(rrq, codec.ReadRequest)
    assert rrq.mode == "octet" and rrq.options == {"blksize": "1428", "tsize": "0"}
    step = s.receive(codec.encode_oack({"blksize": "1024", "tsize": "1500"}), TID)
    assert sent(step) == [codec.Ack(0)]
    assert s.blksize == 1024 and s.tsize == 1500 and s.tid == TID
    step = s.receive(codec.encode_data(1, b"a" * 1024), TID)
    assert sent(step) == [codec.Ack(1)]
    step = s.receive(codec.encode_data(2, b"b" * 476), TID)
    assert sent(step) == [codec.Ack(2)]
    assert step[-1] == Finished(b"a" * 1024 + b"b" * 476)


def test_server_without_options_sends_512_byte_blocks() -> None:
    s = ReadSession("f", SERVER)
    s.start()
    assert sent(s.receive(codec.encode_data(1, b"x" * 512), TID)) == [codec.Ack(1)]
    step = s.receive(codec.encode_data(2, b""), TID)
    assert step[-1] == Finished(b"x" * 512)


def test_duplicate_data_is_reacked_and_not_appended() -> None:
    s = ReadSession("f", SERVER)
    s.start()
    s.receive(codec.encode_data(1, b"x" * 512), TID)
    assert sent(s.receive(codec.encode_data(1, b"x" * 512), TID)) == [codec.Ack(1)]
    assert sent(s.receive(codec.encode_data(5, b"late"), TID)) == []
    assert s.receive(codec.encode_data(2, b"end"), TID)[-1] == Finished(b"x" * 512 + b"end")


def test_unknown_tid_gets_error_5_and_the_transfer_goes_on() -> None:
    s = ReadSession("f", SERVER)
    s.start()
    s.receive(codec.encode_data(1, b"x" * 512), TID)
    step = s.receive(codec.encode_data(2, b"evil"), ("127.0.0.1", 40001))
    assert step == [
        Send(codec.encode_error(codec.ErrorCode.UNKNOWN_TID, "unknown TID"), ("127.0.0.1", 40001))
    ]
    assert s.receive(codec.encode_data(2, b"ok"), TID)[-1] == Finished(b"x" * 512 + b"ok")


def test_file_not_found_is_none_other_errors_raise() -> None:
    s = ReadSession("f", SERVER)
    s.start()
    assert s.receive(codec.encode_error(1, "nope"), TID) == [Finished(None)]
    s = ReadSession("f", SERVER)
    s.start()
    with pytest.raises(TFTPError) as info:
        s.receive(codec.encode_error(2, "access violation"), TID)
    assert info.value.code == 2


def test_silence_retransmits_the_last_packet_then_gives_up() -> None:
    s = ReadSession("f", SERVER, max_retries=2)
    first = s.start()
    assert s.on_timeout() == first
    assert s.on_timeout() == first
    with pytest.raises(TFTPTimeout):
        s.on_timeout()


def test_tsize_mismatch_and_oversize_blocks_are_refused() -> None:
    s = ReadSession("f", SERVER)
    s.start()
    s.receive(codec.encode_oack({"tsize": "10"}), TID)
    with pytest.raises(TFTPError):
        s.receive(codec.encode_data(1, b"short"), TID)
    s = ReadSession("f", SERVER, blksize=512)
    s.start()
    with pytest.raises(Exception, match="larger than blksize"):
        s.receive(codec.encode_data(1, b"x" * 600), TID)


@pytest.fixture
def tftp_port(tmp_path: Path) -> Iterator[int]:
    root = tmp_path / "root"
    root.mkdir()
    for name, size in (("empty.bin", 0), ("exact.bin", 1428 * 3), ("big.bin", 200_000)):
        (root / name).write_bytes(os.urandom(size))
    service = TFTPService(
        DirectorySource(str(root)),
        addresses=["127.0.0.1"],
        port=0,
        settings=TFTPSettings(initial_timeout=0.2),
        reactor=reactor,
    )
    service.startService()  # type: ignore[no-untyped-call]
    service.root = root  # type: ignore[attr-defined]
    yield service.ports[0].getHost().port  # type: ignore[attr-defined,no-any-return]
    service.stopService()  # type: ignore[no-untyped-call]


@pytest_twisted.ensureDeferred
async def test_real_transfers_from_our_tftp_service(tftp_port: int, tmp_path: Path) -> None:
    root = tmp_path / "root"
    for name in ("empty.bin", "exact.bin", "big.bin"):
        d = tftp_client.fetch(reactor, "127.0.0.1", tftp_port, name, timeout=0.5)
        d.addTimeout(20, reactor)
        assert await d == (root / name).read_bytes(), name
    d = tftp_client.fetch(reactor, "127.0.0.1", tftp_port, "missing.bin", timeout=0.5)
    d.addTimeout(20, reactor)
    assert await d is None
    d = tftp_client.fetch(reactor, "127.0.0.1", tftp_port, "../etc/passwd", timeout=0.5)
    d.addTimeout(20, reactor)
    with pytest.raises(TFTPError):
        await d


@pytest_twisted.ensureDeferred
async def test_silent_server_times_out_within_the_retry_budget() -> None:
    quiet = reactor.listenUDP(0, _Silent(), interface="127.0.0.1")
    try:
        started = reactor.seconds()
        d = tftp_client.fetch(
            reactor, "127.0.0.1", quiet.getHost().port, "f", timeout=0.1, max_retries=3
        )
        d.addTimeout(10, reactor)
        with pytest.raises(TFTPTimeout):
            await d
        assert reactor.seconds() - started < 2
    finally:
        await quiet.stopListening()


class _Silent(tftp_client.DatagramProtocol):
    """Swallows every datagram: a server that never answers."""

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        pass
