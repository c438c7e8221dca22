"""RTP packets (RFC 3550 §5.1): the fixed header, no extensions sent, CSRCs skipped on read."""

from __future__ import annotations

import struct
from dataclasses import dataclass

RTP_VERSION = 2
_HEADER = struct.Struct("!BBHII")


class RTPError(ValueError):
    """A datagram that is not an RTP packet we can read (dropped, never answered)."""


@dataclass(frozen=True)
class RTPPacket:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False

    def to_bytes(self) -> bytes:
        b1 = (0x80 if self.marker else 0) | (self.payload_type & 0x7F)
        header = _HEADER.pack(RTP_VERSION << 6, b1, self.sequence & 0xFFFF,
                              self.timestamp & 0xFFFFFFFF, self.ssrc & 0xFFFFFFFF)  # fmt: skip
        return header + self.payload


def parse_rtp(data: bytes) -> RTPPacket:
    """Read one datagram; padding and header extensions are honoured, CSRCs skipped."""
    if len(data) < _HEADER.size:
        raise RTPError("shorter than an RTP header")
    b0, b1, seq, ts, ssrc = _HEADER.unpack_from(data)
    if b0 >> 6 != RTP_VERSION:
        raise RTPError("not RTP version 2")
    offset = _HEADER.size + 4 * (b0 & 0x0F)
    end = len(data)
    if b0 & 0x10:  # header extension: 16-bit profile, 16-bit length in words
        if end < offset + 4:
            raise RTPError("truncated header extension")
        (words,) = struct.unpack_from("!H", data, offset + 2)
        offset += 4 + 4 * words
    if b0 & 0x20:  # padding: the last octet counts the padding octets
        if end <= offset or data[-1] == 0:
            raise RTPError("bad padding")
        end -= data[-1]
    if offset > end:
        raise RTPError("header longer than the packet")
    return RTPPacket(b1 & 0x7F, seq, ts, ssrc, bytes(data[offset:end]), bool(b1 & 0x80))
