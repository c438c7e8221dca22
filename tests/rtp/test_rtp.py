"""RTP packets, G.711, the RFC 4733 decoder and the paced sender (issue 14)."""

from __future__ import annotations

import itertools
import socket
import struct
import time
from pathlib import Path

import pytest
import pytest_twisted
from callboard.protocols.rtp.events import EventDecoder, encode_event
from callboard.protocols.rtp.g711 import encode
from callboard.protocols.rtp.packet import RTPError, RTPPacket, parse_rtp
from callboard.protocols.rtp.stream import FRAME_SAMPLES, RTPSender
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock


def test_packet_round_trip_and_bad_input() -> None:
    p = RTPPacket(0, 65535, 2**32 - 1, 0x1234, b"\xff" * 160, marker=True)
    assert parse_rtp(p.to_bytes()) == p
    for bad in (b"", b"\x80" * 5, b"\x40" + b"\x00" * 11, b"\xa0\x00" + b"\x00" * 10):
        with pytest.raises(RTPError):
            parse_rtp(bad)


def test_g711_reference_values() -> None:
    pcm = struct.pack("<5h", 0, 1000, -1000, 32767, -32768)
    assert encode(pcm, "PCMU") == bytes([0xFF, 0xCE, 0x4E, 0x80, 0x00])
    assert encode(pcm, "PCMA") == bytes([0xD5, 0xFA, 0x7A, 0xAA, 0x2A])


def _event_packets(event: int, ts: int, seq: int) -> list[RTPPacket]:
    packets = [RTPPacket(101, seq + i, ts, 7, encode_event(event, end=False, duration=160 * i))
               for i in range(4)]  # fmt: skip
    end = encode_event(event, end=True, duration=800)
    packets += [RTPPacket(101, seq + 4, ts, 7, end)] * 3  # the end, sent three times
    return packets


def test_decoder_acts_once_per_event_and_drops_retransmitted_ends() -> None:
    clock = Clock()
    digits: list[str] = []
    decoder = EventDecoder(digits.append, clock.seconds)
    for event, ts in ((1, 1000), (1, 2000), (11, 3000)):
        for packet in _event_packets(event, ts, ts):
            decoder.feed(packet)
        clock.advance(0.3)
    assert digits == ["1", "1", "#"]
    assert decoder.dropped == 6


def test_decoder_replayed_capture_is_a_new_key_press_but_a_late_copy_is_not() -> None:
    clock = Clock()
    digits: list[str] = []
    decoder = EventDecoder(digits.append, clock.seconds)
    for packet in _event_packets(5, 500, 1):
        decoder.feed(packet)
    decoder.feed(_event_packets(5, 500, 1)[0])  # reordered, at once: a late copy
    clock.advance(1.0)
    for packet in _event_packets(5, 500, 1):  # the same capture played again
        decoder.feed(packet)
    assert digits == ["5", "5"]


def test_decoder_event_without_end_is_reported_when_the_next_starts() -> None:
    digits: list[str] = []
    decoder = EventDecoder(digits.append, Clock().seconds)
    decoder.feed(RTPPacket(101, 1, 100, 7, encode_event(3, end=False, duration=160)))
    decoder.feed(RTPPacket(101, 2, 900, 7, encode_event(4, end=True, duration=160)))
    decoder.feed(RTPPacket(101, 3, 900, 7, b"\x01"))  # unreadable: dropped
    assert digits == ["3", "4"]


def test_sender_paces_20ms_frames_with_consecutive_sequence_numbers() -> None:
    clock = Clock()
    sent: list[bytes] = []
    sender = RTPSender(sent.append, clock, "PCMA")
    done: list[bool] = []
    sender.play(b"\x11" * (FRAME_SAMPLES * 3 + 10), lambda: done.append(True))
    sender.start()
    assert len(sent) == 1  # the first frame at once
    for _ in range(5):
        clock.advance(0.020)
    packets = [parse_rtp(d) for d in sent]
    assert len(packets) == 6
    assert [(p.sequence - packets[0].sequence) % 65536 for p in packets] == list(range(6))
    assert [(p.timestamp - packets[0].timestamp) % 2**32 for p in packets] == [
        160 * i for i in range(6)
    ]
    assert {p.payload_type for p in packets} == {8}
    assert packets[0].marker and not any(p.marker for p in packets[1:])
    assert packets[3].payload[:10] == b"\x11" * 10 and packets[3].payload[10:] == b"\xd5" * 150
    assert packets[5].payload == b"\xd5" * 160  # silence after the prompt
    assert done == [True]
    clock.advance(0.2)
    sender.stop()
    count = len(sent)
    clock.advance(1)
    assert len(sent) == count and not clock.getDelayedCalls()


class _Capture(DatagramProtocol):
    """A test UDP socket receiving the RTP stream, noting when each packet arrived."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, RTPPacket]] = []

    def datagramReceived(self, datagram: bytes, addr: object) -> None:
        self.arrivals.append((time.monotonic(), parse_rtp(datagram)))


@pytest_twisted.ensureDeferred
async def test_rtp_stream_captured_on_a_socket_is_paced_and_in_sequence() -> None:
    """The real reactor paces, a real socket captures: 20 ms apart (generous tolerance)."""
    capture = _Capture()
    port = reactor.listenUDP(0, capture, interface="127.0.0.1")  # type: ignore[attr-defined]
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = ("127.0.0.1", port.getHost().port)
    sender = RTPSender(lambda data: out.sendto(data, target), reactor, "PCMU")
    sender.play(b"\x00" * 160 * 10)
    sender.start()
    d: Deferred[None] = Deferred()
    reactor.callLater(1.0, d.callback, None)  # type: ignore[attr-defined]
    await d
    sender.stop()
    d2: Deferred[None] = Deferred()
    reactor.callLater(0.05, d2.callback, None)  # type: ignore[attr-defined]
    await d2
    await port.stopListening()
    out.close()
    packets = [p for _, p in capture.arrivals]
    assert 40 <= len(packets) <= 55, len(packets)  # 1 s at 50 packets a second
    seqs = [(p.sequence - packets[0].sequence) % 65536 for p in packets]
    assert seqs == list(range(len(packets)))
    stamps = [(p.timestamp - packets[0].timestamp) % 2**32 for p in packets]
    assert stamps == [160 * i for i in range(len(packets))]
    times = [t for t, _ in capture.arrivals]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    mean = sum(gaps) / len(gaps)
    assert 0.015 < mean < 0.025, mean
    assert sorted(gaps)[len(gaps) // 2] == pytest.approx(0.020, abs=0.008)


def test_prompts_are_real_audio() -> None:
    """Each packaged prompt is 8 kHz speech: seconds long, loud enough, not clipped (sox)."""
    import subprocess

    prompts = Path(__file__).resolve().parents[2] / "daemon" / "prompts"
    names = sorted(p.name for p in prompts.glob("*.wav"))
    assert names == ["accepted.wav", "enter-code.wav", "rejected.wav", "too-many.wav"]
    for name in names:
        path = prompts / name
        assert path.stat().st_size < 100_000
        stat = subprocess.run(["sox", str(path), "-n", "stat"], capture_output=True,
                              text=True, check=True).stderr  # fmt: skip
        values = dict(
            (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in stat.splitlines())
        )
        assert 1.0 < float(values["Length (seconds)"]) < 6.0, name
        assert float(values["RMS     amplitude"]) > 0.02, name
        assert float(values["Maximum amplitude"]) < 0.99, name
        rate = subprocess.run(["soxi", "-r", str(path)], capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
        assert rate == "8000"


def test_rtp_from_another_address_is_ignored() -> None:
    from callboard.daemon.ivr import RTPEndpoint

    got: list[bytes] = []
    endpoint = RTPEndpoint(got.append)
    endpoint.remote = ("192.0.2.5", 40000)
    packet = RTPPacket(101, 1, 1, 1, encode_event(1, end=True, duration=160)).to_bytes()
    endpoint.datagramReceived(packet, ("192.0.2.6", 40000))
    endpoint.datagramReceived(packet, ("192.0.2.5", 40001))
    assert got == [] and endpoint.ignored == 2
    endpoint.datagramReceived(packet, ("192.0.2.5", 40000))
    assert got == [packet]
