"""One read transfer as a sans-I/O state machine.

Events come in as method calls with the current time injected (a datagram from the client's
TID, the timer firing, a repeated RRQ); each call returns the datagrams to send, and leaves
:attr:`Transfer.timer_at` (when the adapter should call :meth:`Transfer.timer_fired` next)
and :attr:`Transfer.outcome` (set once the transfer is over). No sockets, no reactor, so
every retransmit and window rule is tested with plain numbers.

Rules (RFC 1350, 2347, 7440, and the Sorcerer's Apprentice lesson): DATA is only ever sent
when an ACK moves the window forward or when the retransmit timer fires, never for a
duplicate ACK. An ACK for a block inside the window that was sent restarts the window just
after it (RFC 7440 gap signal); an ACK for the block before the window is a duplicate and is
ignored. Block numbers wrap from 65535 to 0; internally blocks are counted without wrapping.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import NamedTuple

from callboard.protocols.filesource import FileBody
from callboard.protocols.tftp import codec
from callboard.protocols.tftp.codec import decode_ack, encode_data

__all__ = ["NetasciiBody", "Outcome", "Transfer", "encode_blocks"]

_NOTHING: tuple[bytes, ...] = ()


class Outcome(NamedTuple):
    """How a transfer ended: ``ok`` or why not, with bytes the client acknowledged.

    A named tuple (immutable like a frozen dataclass, made in a third of the time): one per
    transfer.
    """

    ok: bool
    reason: str  # "ok", "timeout", "deadline", "client error N", "read error"
    error_code: int | None  # TFTP error code we or the client sent, if any
    bytes: int
    duration: float


class NetasciiBody:
    """A lazy netascii view of a body (LF -> CR LF, CR -> CR NUL), without reading it all.

    The conversion is byte-local, so the source is converted in fixed chunks; an index of
    where each converted chunk starts lets ``read_at`` seek, and only the last chunk is kept.
    The converted size costs a pass over the source, so the server does not offer tsize in
    netascii; ``size`` computes it when asked, chunk by chunk.
    """

    CHUNK = 65536

    def __init__(self, inner: FileBody) -> None:
        self._inner = inner
        self._starts = [0]  # converted offset of source chunk i
        self._cache_index = -1
        self._cache = b""
        self._size: int | None = None

    @property
    def size(self) -> int:
        if self._size is None:
            total, offset = 0, 0
            while raw := self._inner.read_at(offset, self.CHUNK):
                total += len(raw) + raw.count(b"\r") + raw.count(b"\n")
                offset += len(raw)
            self._size = total
        return self._size

    def _chunk(self, index: int) -> bytes:
        if index != self._cache_index:
            raw = self._inner.read_at(index * self.CHUNK, self.CHUNK)
            self._cache = raw.replace(b"\r", b"\r\x00").replace(b"\n", b"\r\n")
            self._cache_index = index
            if index == len(self._starts) - 1 and raw:
                self._starts.append(self._starts[index] + len(self._cache))
        return self._cache

    def read_at(self, offset: int, length: int) -> bytes:
        # Extend the index until it covers offset (transfers read forward, so this is cheap).
        while self._starts[-1] <= offset:
            before = len(self._starts)
            self._chunk(before - 1)
            if len(self._starts) == before:  # end of source
                return b""
        index = bisect.bisect_right(self._starts, offset) - 1
        out = []
        want = length
        pos = offset
        while want > 0:
            chunk = self._chunk(index)
            start = pos - self._starts[index]
            piece = chunk[start : start + want]
            if not piece:
                break
            out.append(piece)
            want -= len(piece)
            pos += len(piece)
            index += 1
            if index >= len(self._starts):
                break
        return b"".join(out)

    def close(self) -> None:
        self._inner.close()


def encode_blocks(data: bytes, blksize: int) -> tuple[bytes, ...]:
    """Every DATA packet of ``data`` at ``blksize``, block 1 first: what a transfer sends.

    The last packet is shorter than ``blksize`` (empty when the size is a multiple of it), as
    :class:`Transfer` ends a file. Encoded once per small file and block size, and shared
    by every transfer of those bytes (see ``Transfer(packets=...)``).
    """
    count = len(data) // blksize + 1
    return tuple(encode_data(n + 1, data[n * blksize : (n + 1) * blksize]) for n in range(count))


class Transfer:
    """Serve one file to one client TID.

    ``oack`` is the option acknowledgement to send first (then no DATA until ACK 0), or None
    for a plain RFC 1350 transfer that starts with block 1. ``timeout`` is the first
    retransmit interval; it doubles per retry up to ``max(timeout, 8)`` s unless the client
    negotiated it (RFC 2349), in which case it is used as is. After ``max_retries``
    retransmits without progress, or past ``deadline`` seconds in all, the transfer ends.
    ``packets``, when given, is :func:`encode_blocks` of the body's bytes at ``blksize``:
    sent as they are instead of reading and encoding each block (the same datagrams).
    """

    __slots__ = (
        "_base",
        "_blksize",
        "_deadline",
        "_fixed_timeout",
        "_last",
        "_last_length",
        "_max_retries",
        "_oack",
        "_packets",
        "_retries",
        "_sent",
        "_started",
        "_timeout",
        "_windowsize",
        "body",
        "outcome",
        "timer_at",
    )

    def __init__(
        self,
        body: FileBody,
        *,
        now: float,
        blksize: int = codec.DEFAULT_BLKSIZE,
        windowsize: int = 1,
        timeout: float = 1.0,
        fixed_timeout: bool = False,
        max_retries: int = 5,
        deadline: float = 600.0,
        oack: bytes | None = None,
        packets: Sequence[bytes] | None = None,
    ) -> None:
        self.body = body
        self._packets = packets
        self._blksize = blksize
        self._windowsize = windowsize
        self._timeout = timeout
        self._fixed_timeout = fixed_timeout
        self._max_retries = max_retries
        self._started = now
        self._deadline = now + deadline
        self._oack = oack
        self._base = 1  # first block not yet acknowledged
        self._sent = 0  # highest block sent so far
        self._last: int | None = None  # the final (short) block, once read
        self._last_length = 0  # and its payload's length
        self._retries = 0
        self.timer_at: float = now
        self.outcome: Outcome | None = None

    @property
    def blksize(self) -> int:
        return self._blksize

    @property
    def windowsize(self) -> int:
        return self._windowsize

    def start(self, now: float) -> Sequence[bytes]:
        """The first reply: the OACK, or the first window of DATA."""
        self._arm(now)
        if self._oack is not None:
            return (self._oack,)
        return self._block(now) if self._windowsize == 1 else self._window(now)

    # -- events ---------------------------------------------------------------------------

    def datagram_received(self, data: bytes, now: float) -> Sequence[bytes]:
        """A datagram from the client's TID."""
        if self.outcome is not None:
            return _NOTHING
        block = decode_ack(data)  # the per-block path: an int, no packet object
        if block is not None:
            return self._ack(block, now)
        return self._not_an_ack(data, now)

    def timer_fired(self, now: float) -> Sequence[bytes]:
        """The adapter's timer: retransmit if the last send went unanswered."""
        if self.outcome is not None:
            return _NOTHING
        if now >= self._deadline:
            self._finish(now, False, "deadline", codec.ErrorCode.NOT_DEFINED)
            return (codec.encode_error(codec.ErrorCode.NOT_DEFINED, "transfer took too long"),)
        if now < self.timer_at:  # progress since the timer was armed: nothing to do yet
            return _NOTHING
        return self._retransmit(now)

    def rrq_repeated(self, now: float) -> Sequence[bytes]:
        """The same client TID sent its RRQ again: it missed our first reply.

        Counted as a retry so that a flood of repeated RRQs stays bounded; once the client
        has acknowledged anything it clearly got the reply, so the RRQ is ignored.
        """
        if self.outcome is not None or self._base > 1:
            return _NOTHING
        return self._retransmit(now)

    def abort(self, now: float, reason: str) -> None:
        """The adapter gives up (shutdown, socket failure)."""
        if self.outcome is None:
            self._finish(now, False, reason, None)

    # -- internals ------------------------------------------------------------------------

    def _not_an_ack(self, data: bytes, now: float) -> Sequence[bytes]:
        """The client's ERROR ends the transfer quietly; anything else is a protocol violation."""
        try:
            packet: codec.Packet | None = codec.decode(data)
        except codec.MalformedPacket:
            packet = None
        if isinstance(packet, codec.Error) or codec.opcode(data) == codec.Opcode.ERROR:
            code = packet.code if isinstance(packet, codec.Error) else 0  # a truncated ERROR
            self._finish(now, False, f"client error {code}", code)
            return _NOTHING  # never answer an error with an error
        self._finish(now, False, "illegal operation", codec.ErrorCode.ILLEGAL_OPERATION)
        return (codec.encode_error(codec.ErrorCode.ILLEGAL_OPERATION, "expected ACK"),)

    def _arm(self, now: float) -> None:
        if self._fixed_timeout or not self._retries:  # no back-off yet: the per-ACK case
            interval = self._timeout
        else:
            interval = min(self._timeout * (1 << min(self._retries, 8)), max(self._timeout, 8.0))
        at = now + interval
        self.timer_at = at if at < self._deadline else self._deadline  # min(), one call less

    def _retransmit(self, now: float) -> Sequence[bytes]:
        self._retries += 1
        if self._retries > self._max_retries:
            self._finish(now, False, "timeout", None)
            return _NOTHING
        self._arm(now)
        if self._oack is not None:
            return (self._oack,)
        return self._window(now)

    def _ack(self, number: int, now: float) -> Sequence[bytes]:
        if self._oack is not None:
            if number != 0:
                return _NOTHING
            self._oack = None
            self._retries = 0
            self._arm(now)
            return self._window(now)
        # Map the 16-bit number onto the blocks sent: the newest block with that number.
        block = self._sent - ((self._sent - number) & 0xFFFF)
        if block < self._base:  # duplicate or stale ACK: never answer it (Sorcerer's Apprentice)
            return _NOTHING
        self._base = block + 1
        self._retries = 0
        if self._last is not None and block >= self._last:
            self._finish(now, True, "ok", None)
            return _NOTHING
        # _arm(now) with no retries (the per-ACK case), written out: no back-off to compute.
        at = now + self._timeout
        self.timer_at = at if at < self._deadline else self._deadline
        return self._block(now) if self._windowsize == 1 else self._window(now)

    def _window(self, now: float) -> Sequence[bytes]:
        """Send blocks from the window base: a fresh window, or a restart after a gap."""
        if self._windowsize == 1:
            return self._block(now)
        if self._packets is not None:
            return self._encoded_window()
        out: list[bytes] = []
        block = self._base
        end = self._base + self._windowsize
        if self._last is not None:
            end = min(end, self._last + 1)
        size = self._blksize
        try:
            # One read for the whole window, sliced per block.
            chunk = memoryview(self.body.read_at((block - 1) * size, (end - block) * size))
        except OSError:
            self._finish(now, False, "read error", codec.ErrorCode.NOT_DEFINED)
            return [codec.encode_error(codec.ErrorCode.NOT_DEFINED, "read error")]
        offset = 0
        while block < end:
            payload = chunk[offset : offset + size]
            offset += size
            out.append(encode_data(block, payload))
            if len(payload) < size:
                self._last = block
                self._last_length = len(payload)
                end = block + 1
            block += 1
        if block - 1 > self._sent:
            self._sent = block - 1
        return out

    def _encoded_window(self) -> list[bytes]:
        """:meth:`_window` from the pre-encoded packets: a slice, nothing read or encoded."""
        packets = self._packets
        assert packets is not None
        end = min(self._base - 1 + self._windowsize, len(packets))
        out = list(packets[self._base - 1 : end])
        if end == len(packets):
            self._last = end
            self._last_length = len(packets[-1]) - 4
        if end > self._sent:
            self._sent = end
        return out

    def _block(self, now: float) -> Sequence[bytes]:
        """Lock-step (window 1, the RFC 1350 case): the block at the base, alone."""
        block = self._base
        size = self._blksize
        packets = self._packets
        if packets is not None:
            packet = packets[block - 1]
            if len(packet) - 4 < size:
                self._last = block
                self._last_length = len(packet) - 4
            if block > self._sent:
                self._sent = block
            return (packet,)
        try:
            payload = self.body.read_at((block - 1) * size, size)
        except OSError:
            self._finish(now, False, "read error", codec.ErrorCode.NOT_DEFINED)
            return [codec.encode_error(codec.ErrorCode.NOT_DEFINED, "read error")]
        if len(payload) < size:
            self._last = block
            self._last_length = len(payload)
        if block > self._sent:
            self._sent = block
        return [encode_data(block, payload)]

    def _finish(self, now: float, ok: bool, reason: str, code: int | None) -> None:
        acked = (self._base - 1) * self._blksize
        if ok and self._last is not None:  # the short last block is acknowledged too
            acked = (self._last - 1) * self._blksize + self._last_length
        self.outcome = Outcome(ok, reason, code, acked, now - self._started)
