"""The transfer state machine with time injected: windows, duplicates, timers, rollover."""

from __future__ import annotations

import struct

import pytest
from callboard.protocols.filesource import MemoryBody
from callboard.protocols.tftp import codec
from callboard.protocols.tftp.transfer import NetasciiBody, Transfer, encode_blocks


def ack(n: int) -> bytes:
    return struct.pack("!HH", 4, n & 0xFFFF)


def blocks(datagrams: object) -> list[int]:
    out = []
    for d in datagrams:  # type: ignore[attr-defined]
        packet = codec.decode(d)
        assert isinstance(packet, codec.Data)
        out.append(packet.block)
    return out


def make(data: bytes, **kw: object) -> Transfer:
    return Transfer(MemoryBody(data), now=0.0, **kw)  # type: ignore[arg-type]


def test_lockstep_transfer_and_outcome() -> None:
    t = make(b"a" * 1000)
    assert blocks(t.start(0.0)) == [1]
    assert blocks(t.datagram_received(ack(1), 0.1)) == [2]
    assert t.outcome is None
    assert t.datagram_received(ack(2), 0.2) == ()
    assert t.outcome is not None and t.outcome.ok and t.outcome.bytes == 1000
    assert t.outcome.duration == 0.2


def test_exact_multiple_ends_with_empty_block() -> None:
    t = make(b"a" * 1024)
    t.start(0)
    t.datagram_received(ack(1), 0)
    last = t.datagram_received(ack(2), 0)
    assert last == [b"\x00\x03\x00\x03"]
    t.datagram_received(ack(3), 0)
    assert t.outcome is not None and t.outcome.ok and t.outcome.bytes == 1024


def test_duplicate_ack_sends_nothing() -> None:
    t = make(b"a" * 5000)
    t.start(0)
    assert blocks(t.datagram_received(ack(1), 0)) == [2]
    assert t.datagram_received(ack(1), 0) == ()  # Sorcerer's Apprentice
    assert t.datagram_received(ack(0), 0) == ()  # stale


def test_timer_retransmits_with_backoff_and_gives_up() -> None:
    t = make(b"a" * 5000, timeout=1.0, max_retries=3)
    t.start(0)
    assert t.timer_at == 1.0
    assert t.timer_fired(0.5) == ()  # early wake-up: nothing due
    assert blocks(t.timer_fired(1.0)) == [1]
    assert t.timer_at == 3.0
    assert blocks(t.timer_fired(3.0)) == [1]
    assert t.timer_at == 7.0
    assert blocks(t.timer_fired(7.0)) == [1]
    assert t.timer_fired(15.0) == ()
    assert t.outcome is not None and t.outcome.reason == "timeout"


def test_negotiated_timeout_is_not_backed_off() -> None:
    t = make(b"a" * 5000, timeout=2.0, fixed_timeout=True)
    t.start(0)
    t.timer_fired(2.0)
    assert t.timer_at == 4.0


def test_progress_resets_retries_and_moves_timer_later() -> None:
    t = make(b"a" * 5000, timeout=1.0, max_retries=1)
    t.start(0)
    t.timer_fired(1.0)
    t.datagram_received(ack(1), 1.5)
    assert t.timer_at == 2.5
    assert blocks(t.timer_fired(2.5)) == [2]


def test_deadline_ends_transfer_with_error() -> None:
    t = make(b"a" * 5000, timeout=1.0, deadline=2.5, max_retries=100)
    t.start(0)
    t.timer_fired(1.0)
    assert t.timer_at == 2.5
    out = t.timer_fired(2.5)
    assert codec.decode(out[0]) == codec.Error(0, "transfer took too long")
    assert t.outcome is not None and t.outcome.reason == "deadline"


def test_oack_then_nothing_until_ack_zero() -> None:
    oack = codec.encode_oack({"blksize": "8", "windowsize": "4"})
    t = make(b"x" * 100, blksize=8, windowsize=4, oack=oack)
    assert t.start(0) == (oack,)
    assert t.datagram_received(ack(5), 0) == ()
    assert t.timer_fired(1.0) == (oack,)
    assert blocks(t.datagram_received(ack(0), 1.1)) == [1, 2, 3, 4]
    assert t.datagram_received(ack(0), 1.2) == ()


def test_window_gap_restarts_after_acked_block_and_duplicate_is_ignored() -> None:
    t = make(b"x" * 8 * 20, blksize=8, windowsize=4)
    assert blocks(t.start(0)) == [1, 2, 3, 4]
    assert blocks(t.datagram_received(ack(2), 0)) == [3, 4, 5, 6]  # gap: restart at 3
    assert t.datagram_received(ack(2), 0) == ()  # later duplicate ignored
    assert blocks(t.datagram_received(ack(6), 0)) == [7, 8, 9, 10]
    assert blocks(t.timer_fired(5.0)) == [7, 8, 9, 10]  # timeout resends the window


def test_window_stops_at_last_block() -> None:
    t = make(b"x" * 20, blksize=8, windowsize=16)
    assert blocks(t.start(0)) == [1, 2, 3]
    t.datagram_received(ack(3), 0)
    assert t.outcome is not None and t.outcome.ok and t.outcome.bytes == 20


def test_block_numbers_roll_over_to_zero() -> None:
    size = 8 * 65540 + 3
    t = make(bytes(range(256)) * (size // 256) + b"\x01" * (size % 256), blksize=8, windowsize=64)
    out = list(t.start(0))
    seen = blocks(out)
    while t.outcome is None:
        out = list(t.datagram_received(ack(seen[-1]), 0))
        seen.extend(blocks(out))
    assert len(seen) == 65541
    assert seen[65534:65538] == [65535, 0, 1, 2]
    assert t.outcome.ok and t.outcome.bytes == size


def test_repeated_rrq_resends_first_reply_only_before_progress() -> None:
    t = make(b"x" * 2000, max_retries=2)
    t.start(0)
    assert blocks(t.rrq_repeated(0.1)) == [1]
    t.datagram_received(ack(1), 0.2)
    assert t.rrq_repeated(0.3) == ()


def test_client_error_and_junk_end_the_transfer() -> None:
    t = make(b"x" * 2000)
    t.start(0)
    t.datagram_received(codec.encode_error(3, "disk full"), 0)
    assert t.outcome is not None and t.outcome.reason == "client error 3"
    t2 = make(b"x" * 2000)
    t2.start(0)
    out = t2.datagram_received(b"\x00\x03\x00\x01", 0)
    assert codec.decode(out[0]) == codec.Error(4, "expected ACK")


def test_netascii_body_converts_lazily_across_chunks() -> None:
    NetasciiBody.CHUNK = 7
    try:
        raw = b"a\nb\rc\r\n" * 50 + b"tail"
        expected = raw.replace(b"\r", b"\r\x00").replace(b"\n", b"\r\n")
        body = NetasciiBody(MemoryBody(raw))
        got = b"".join(body.read_at(i, 5) for i in range(0, len(expected) + 10, 5))
        assert got == expected
        assert body.read_at(3, 11) == expected[3:14]  # seeks back
        assert body.read_at(len(expected), 5) == b""
    finally:
        NetasciiBody.CHUNK = 65536


def _script(t: Transfer, total_blocks: int) -> list[object]:
    """Drive a transfer through every kind of event; everything it sent and how it ended."""
    sent: list[object] = [list(t.start(0.0))]
    now = 0.0
    sent.append(list(t.timer_fired(5.0)))  # a retransmit of the first window
    acked = 0
    while t.outcome is None and acked <= total_blocks + 1:
        now += 0.1
        sent.append(list(t.datagram_received(ack(acked), now)))  # a duplicate: nothing
        acked += 1
        sent.append(list(t.datagram_received(ack(acked), now)))
        if acked % 3 == 0 and t.outcome is None:
            now += 10.0
            sent.append(list(t.timer_fired(now)))
    sent.append(t.outcome)
    return sent


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 1024, 1500, 4096, 10_000])
@pytest.mark.parametrize(("blksize", "windowsize"), [(512, 1), (512, 4), (1468, 1), (8, 16)])
def test_pre_encoded_packets_send_exactly_what_reading_the_body_sends(
    size: int, blksize: int, windowsize: int
) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    packets = encode_blocks(data, blksize)
    assert b"".join(p[4:] for p in packets) == data and len(packets[-1]) - 4 < blksize
    kw = {"blksize": blksize, "windowsize": windowsize, "max_retries": 1000, "deadline": 1e9}
    read = _script(make(data, **kw), len(packets))
    encoded = _script(make(data, packets=packets, **kw), len(packets))
    assert encoded == read
    assert read[-1] is not None and read[-1].ok  # type: ignore[attr-defined]
