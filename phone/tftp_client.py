"""A small TFTP read client for the emulated phone, on the daemon's own packet codec.

Phones fetch trust lists and configs over TFTP when HTTP 6970 is not answering. This client
asks for ``blksize`` and ``tsize`` (RFC 2347-2349), locks onto the server's transfer port
(TID), re-acknowledges duplicates, retransmits its last packet on silence and gives up after
a bounded number of retries. :class:`ReadSession` is the sans-I/O part (datagrams in,
datagrams out); :func:`fetch` is the Twisted adapter. A missing file resolves to ``None``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from callboard.protocols.tftp import codec
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import DatagramProtocol

Address = tuple[str, int]

DEFAULT_BLKSIZE = 1428  # fits a 1500-byte Ethernet MTU with IP/UDP/TFTP headers
DEFAULT_MAX_SIZE = 16 * 1024 * 1024


class TFTPError(Exception):
    """The server answered with an ERROR other than "file not found", or broke the protocol."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"TFTP error {code}: {message}")
        self.code = code
        self.message = message


class TFTPTimeout(Exception):
    """No answer after the bounded retransmissions."""


@dataclass(frozen=True)
class Send:
    """A datagram to send; ``to`` is None for "the server's request port or TID"."""

    datagram: bytes
    to: Address | None = None


@dataclass(frozen=True)
class Finished:
    """The transfer ended: ``data`` is the file, or None when the server has no such file."""

    data: bytes | None


Step = list[Send | Finished]


class ReadSession:
    """One RRQ from start to finish, without sockets or timers.

    Feed every datagram (and its source) to :meth:`receive`; call :meth:`on_timeout` when the
    retransmit timer fires. Both return what to send and, at the end, a :class:`Finished`.
    Errors (server ERRORs other than 1, protocol violations, too many retries) raise.
    """

    def __init__(
        self,
        filename: str,
        server: Address,
        *,
        blksize: int = DEFAULT_BLKSIZE,
        tsize: bool = True,
        max_retries: int = 5,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        if not codec.MIN_BLKSIZE <= blksize <= codec.MAX_BLKSIZE:
            raise ValueError("blksize out of range")
        self.filename = filename
        self.server = server
        self.requested_blksize = blksize
        self.blksize = 512  # until an OACK says otherwise
        self.tsize: int | None = None
        self.max_retries = max_retries
        self.max_size = max_size
        self.tid: Address | None = None
        self.retries = 0
        self.done = False
        self._options: dict[str, str] = {}
        if blksize != 512:
            self._options["blksize"] = str(blksize)
        if tsize:
            self._options["tsize"] = "0"
        self._expected = 1  # next DATA block wanted (mod 65536)
        self._chunks: list[bytes] = []
        self._received = 0
        self._last: bytes = b""

    def start(self) -> Step:
        self._last = codec.encode(codec.ReadRequest(self.filename, "octet", dict(self._options)))
        return [Send(self._last, self.server)]

    def on_timeout(self) -> Step:
        """Resend the last packet (the RRQ or the last ACK); raise when out of retries."""
        if self.done:
            return []
        self.retries += 1
        if self.retries > self.max_retries:
            raise TFTPTimeout(f"no answer for {self.filename} after {self.max_retries} retries")
        return [Send(self._last, self.tid or self.server)]

    def receive(self, datagram: bytes, source: Address) -> Step:
        if self.done:
            return []
        if self.tid is None:
            if source[0] != self.server[0]:
                return []  # a stray datagram from another host: not ours to answer
            self.tid = source
        elif source != self.tid:
            # RFC 1350: a packet from an unknown TID gets error 5 and the transfer goes on.
            return [Send(codec.encode_error(codec.ErrorCode.UNKNOWN_TID, "unknown TID"), source)]
        try:
            packet = codec.decode(datagram)
        except codec.MalformedPacket as exc:
            self.done = True
            raise TFTPError(exc.code, f"malformed packet from server: {exc.message}") from None
        if isinstance(packet, codec.Error):
            self.done = True
            if packet.code == codec.ErrorCode.FILE_NOT_FOUND:
                return [Finished(None)]
            raise TFTPError(packet.code, packet.message)
        if isinstance(packet, codec.OptionAck):
            return self._on_oack(packet)
        if isinstance(packet, codec.Data):
            return self._on_data(packet)
        return self._abort(codec.ErrorCode.ILLEGAL_OPERATION, "unexpected packet")

    def _abort(self, code: int, message: str) -> Step:
        self.done = True
        assert self.tid is not None
        error = codec.encode_error(code, message)
        raise _Abort(TFTPError(code, message), Send(error, self.tid))

    def _on_oack(self, oack: codec.OptionAck) -> Step:
        if self._expected != 1 or self._chunks:
            return []  # a late duplicate OACK once data flows: ignore it
        blksize = oack.options.get("blksize")
        if blksize is not None:
            if not blksize.isdigit() or not (
                codec.MIN_BLKSIZE <= int(blksize) <= self.requested_blksize
            ):
                return self._abort(codec.ErrorCode.OPTION_REFUSED, "bad blksize in OACK")
            self.blksize = int(blksize)
        tsize = oack.options.get("tsize")
        if tsize is not None and tsize.isdigit():
            self.tsize = int(tsize)
            if self.tsize > self.max_size:
                return self._abort(codec.ErrorCode.DISK_FULL, "file too large")
        self.retries = 0
        self._last = codec.encode_ack(0)
        return [Send(self._last, self.tid)]

    def _on_data(self, data: codec.Data) -> Step:
        if self._chunks and data.block == (self._expected - 1) & 0xFFFF:
            return [Send(codec.encode_ack(data.block), self.tid)]  # our ACK was lost
        if data.block != self._expected:
            return []
        if len(data.payload) > self.blksize:
            return self._abort(codec.ErrorCode.ILLEGAL_OPERATION, "block larger than blksize")
        self._received += len(data.payload)
        if self._received > self.max_size:
            return self._abort(codec.ErrorCode.DISK_FULL, "file too large")
        self._chunks.append(data.payload)
        self._expected = (self._expected + 1) & 0xFFFF
        self.retries = 0
        self._last = codec.encode_ack(data.block)
        out: Step = [Send(self._last, self.tid)]
        if len(data.payload) < self.blksize:
            self.done = True
            body = b"".join(self._chunks)
            if self.tsize is not None and self.tsize != len(body):
                raise TFTPError(0, f"tsize said {self.tsize} bytes, got {len(body)}")
            out.append(Finished(body))
        return out


class _Abort(Exception):
    """Internal: an error to raise after telling the server why."""

    def __init__(self, error: TFTPError, send: Send) -> None:
        super().__init__(str(error))
        self.error = error
        self.send = send


class _ClientProtocol(DatagramProtocol):
    """Adapter: one ephemeral UDP socket per transfer, one retransmit timer."""

    def __init__(self, reactor: Any, session: ReadSession, timeout: float) -> None:
        self.reactor = reactor
        self.session = session
        self.timeout = timeout
        self.result: defer.Deferred[bytes | None] = defer.Deferred()
        self._timer: IDelayedCall | None = None

    def startProtocol(self) -> None:
        self._run(self.session.start)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self._run(lambda: self.session.receive(datagram, (addr[0], addr[1])))

    def _fire_timeout(self) -> None:
        self._timer = None
        self._run(self.session.on_timeout)

    def _run(self, step: Any) -> None:
        if self.result.called:
            return
        try:
            actions: Step = step()
        except _Abort as abort:
            self._send(abort.send)
            self._finish(error=abort.error)
            return
        except (TFTPError, TFTPTimeout) as exc:
            self._finish(error=exc)
            return
        for action in actions:
            if isinstance(action, Send):
                self._send(action)
            else:
                self._finish(data=action.data)
                return
        if any(isinstance(a, Send) for a in actions) or self._timer is None:
            self._arm()

    def _send(self, send: Send) -> None:
        if self.transport is not None:
            self.transport.write(send.datagram, send.to or self.session.server)

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.timeout)
        else:
            self._timer = self.reactor.callLater(self.timeout, self._fire_timeout)

    def _finish(self, data: bytes | None = None, error: Exception | None = None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        port, self.transport = self.transport, None
        if port is not None:
            port.stopListening()
        if error is not None:
            self.result.errback(error)
        else:
            self.result.callback(data)


async def _resolve(reactor: Any, host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        resolved: str = await reactor.resolve(host)
        return resolved


def fetch(
    reactor: Any,
    host: str,
    port: int,
    filename: str,
    *,
    blksize: int = DEFAULT_BLKSIZE,
    tsize: bool = True,
    timeout: float = 1.0,
    max_retries: int = 5,
    max_size: int = DEFAULT_MAX_SIZE,
) -> defer.Deferred[bytes | None]:
    """Read ``filename`` from ``host:port``; fires with the bytes, or None if not found.

    ``timeout`` is the retransmit interval; the whole transfer fails with
    :class:`TFTPTimeout` after ``max_retries`` silent intervals in a row.
    """

    async def run() -> bytes | None:
        address = await _resolve(reactor, host)
        session = ReadSession(
            filename,
            (address, port),
            blksize=blksize,
            tsize=tsize,
            max_retries=max_retries,
            max_size=max_size,
        )
        proto = _ClientProtocol(reactor, session, timeout)
        interface = "::" if ":" in address else ""
        reactor.listenUDP(0, proto, interface=interface, maxPacketSize=65536)
        return await proto.result

    return defer.Deferred.fromCoroutine(run())
