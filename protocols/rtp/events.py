"""RFC 4733 telephone-events: keypad digits out of an RTP stream (sans-I/O).

A sender repeats an event's packets while the key is held and sends the final one (E bit)
three times. One digit is reported per event, on the first end packet; its retransmissions
are dropped. Events are keyed by (SSRC, RTP timestamp): every packet of one event carries
the timestamp of its start. A sender that replays the very same packets later (a test tool
playing one capture twice) starts again with non-end packets; once ``rearm_after`` seconds
have passed since the end, such a packet starts a new event rather than being a late copy.
An event that never shows its end is reported when the next event starts.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from callboard.protocols.rtp.packet import RTPPacket

#: RFC 4733 §3.2: events 0-9, *, #, A-D.
DIGITS = "0123456789*#ABCD"
_EVENT = struct.Struct("!BBH")


class EventError(ValueError):
    """A telephone-event payload that cannot be read (dropped)."""


@dataclass(frozen=True)
class TelephoneEvent:
    event: int
    end: bool
    volume: int
    duration: int

    @property
    def digit(self) -> str | None:
        return DIGITS[self.event] if self.event < len(DIGITS) else None


def parse_event(payload: bytes) -> TelephoneEvent:
    if len(payload) < _EVENT.size:
        raise EventError("telephone-event payload shorter than 4 octets")
    event, flags, duration = _EVENT.unpack_from(payload)
    return TelephoneEvent(event, bool(flags & 0x80), flags & 0x3F, duration)


def encode_event(event: int, *, end: bool, duration: int, volume: int = 10) -> bytes:
    return _EVENT.pack(event, (0x80 if end else 0) | (volume & 0x3F), duration & 0xFFFF)


class EventDecoder:
    """Feed it the telephone-event packets of one call; it calls ``on_digit`` once per key."""

    def __init__(
        self,
        on_digit: Callable[[str], None],
        now: Callable[[], float],
        rearm_after: float = 0.2,
    ) -> None:
        self._on_digit = on_digit
        self._now = now
        self._rearm_after = rearm_after
        self._current: tuple[int, int] | None = None  # (ssrc, timestamp) of the open event
        self._current_digit: str | None = None
        self._ended: dict[tuple[int, int], float] = {}  # event key → when it ended
        self.dropped = 0  # retransmitted end packets and unreadable payloads

    def feed(self, packet: RTPPacket) -> None:
        try:
            event = parse_event(packet.payload)
        except EventError:
            self.dropped += 1
            return
        key = (packet.ssrc, packet.timestamp)
        ended_at = self._ended.get(key)
        if ended_at is not None:
            if event.end or self._now() - ended_at < self._rearm_after:
                self.dropped += 1  # a retransmitted end, or a late copy of this event
                return
            del self._ended[key]  # the same packets again, later: a new key press
        if key != self._current:
            self._close_unended()
            self._current, self._current_digit = key, event.digit
        if event.end:
            self._finish(key)

    def _close_unended(self) -> None:
        """The previous event lost its end packets: report it now (RFC 4733 §2.5.1.3)."""
        if self._current is not None:
            self._finish(self._current)

    def _finish(self, key: tuple[int, int]) -> None:
        digit = self._current_digit
        self._current = self._current_digit = None
        self._ended[key] = self._now()
        if len(self._ended) > 64:
            self._ended.pop(next(iter(self._ended)))
        if digit is not None:
            self._on_digit(digit)
