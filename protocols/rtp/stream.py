"""Paced G.711 sending: one 20 ms frame per tick of one ``LoopingCall`` per call.

The reactor paces (``IReactorTime``): no Deferred per packet, no sleeping. Between prompts the
stream carries silence, so the phone's jitter buffer and any NAT binding stay warm. If the
reactor falls behind, the frames it skipped are sent at once on the next tick (up to a few),
so the timestamp keeps step with the clock and the audio is not stretched.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable

from callboard.protocols.rtp.g711 import SILENCE
from callboard.protocols.rtp.packet import RTPPacket
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

SAMPLE_RATE = 8000
FRAME_SECONDS = 0.020
FRAME_SAMPLES = 160  # 20 ms at 8 kHz, one octet per sample
PAYLOAD_TYPES = {"PCMU": 0, "PCMA": 8}
MAX_CATCH_UP = 5  # frames sent at once after a stall, at most


class RTPSender:
    """Sends one call's audio: ``play(audio, done)`` queues G.711 octets of the chosen law."""

    def __init__(
        self,
        send: Callable[[bytes], None],
        clock: IReactorTime,
        codec: str = "PCMU",
        payload_type: int | None = None,
    ) -> None:
        self._send = send
        self._clock = clock
        self.codec = codec
        self.payload_type = PAYLOAD_TYPES[codec] if payload_type is None else payload_type
        self._silence = bytes([SILENCE[codec]]) * FRAME_SAMPLES
        self.ssrc = int.from_bytes(os.urandom(4), "big")
        self.sequence = int.from_bytes(os.urandom(2), "big")
        self.timestamp = int.from_bytes(os.urandom(4), "big")
        self._queue: deque[tuple[bytes, Callable[[], None] | None]] = deque()
        self._offset = 0
        self._marker = True  # RFC 3551 §4.1: the first packet of a talkspurt
        self._loop: LoopingCall | None = None
        self.sent = 0

    def start(self) -> None:
        if self._loop is None:
            self._loop = LoopingCall.withCount(self._tick)
            self._loop.clock = self._clock
            self._loop.start(FRAME_SECONDS, now=True)

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        self._queue.clear()

    @property
    def running(self) -> bool:
        return self._loop is not None

    @property
    def playing(self) -> bool:
        return bool(self._queue)

    def play(self, audio: bytes, done: Callable[[], None] | None = None) -> None:
        """Queue ``audio`` (G.711 octets of :attr:`codec`); ``done`` runs after its last frame."""
        self._queue.append((audio, done))

    def interrupt(self) -> None:
        """Drop what is queued (the caller started keying: stop talking over them)."""
        self._queue.clear()
        self._offset = 0

    def _tick(self, count: int) -> None:
        for _ in range(min(count, MAX_CATCH_UP)):
            if self._loop is None:
                return
            self._send_frame(self._next_frame())

    def _next_frame(self) -> bytes:
        if not self._queue:
            return self._silence
        audio, done = self._queue[0]
        frame = audio[self._offset : self._offset + FRAME_SAMPLES]
        self._offset += FRAME_SAMPLES
        if self._offset >= len(audio):
            self._queue.popleft()
            self._offset = 0
            if done is not None:
                self._clock.callLater(0, done)
        return frame.ljust(FRAME_SAMPLES, self._silence[:1])

    def _send_frame(self, frame: bytes) -> None:
        packet = RTPPacket(self.payload_type, self.sequence, self.timestamp, self.ssrc, frame,
                           marker=self._marker)  # fmt: skip
        self._marker = False
        self.sequence = (self.sequence + 1) & 0xFFFF
        self.timestamp = (self.timestamp + FRAME_SAMPLES) & 0xFFFFFFFF
        self.sent += 1
        self._send(packet.to_bytes())


def frames_of(audio: bytes) -> int:
    return -(-len(audio) // FRAME_SAMPLES)
