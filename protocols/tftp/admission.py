"""Whether to serve a read request, and on what terms: pure decisions over plain values.

The service asks twice per request on the well-known port. :func:`admit` screens the datagram
(is it a read request we serve, is there room for one more transfer, is the name acceptable);
once the service has opened the file, :func:`agree` negotiates the options against its size.
Each answer is the go-ahead or a :class:`Refusal` that carries the error packet to send, so
every refusal rule is tested with numbers and bytes, without sockets, files or a reactor.

The order of the checks is the one clients see (and tftp-hpa's): malformed request, write
request, mail mode, server busy, bad name; then the file source's errors; then the options.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from callboard.protocols.filesource import AccessViolation, FileNotFound, normalise_name
from callboard.protocols.tftp import codec
from callboard.protocols.tftp.codec import ErrorCode

__all__ = [
    "Admitted",
    "Limits",
    "Load",
    "Refusal",
    "Terms",
    "admit",
    "agree",
    "over_limits",
    "refusal_for",
]


class Limits(Protocol):
    """The settings admission reads (``TFTPSettings`` provides them)."""

    @property
    def max_transfers(self) -> int: ...
    @property
    def max_transfers_per_client(self) -> int: ...
    @property
    def max_blksize(self) -> int: ...
    @property
    def max_windowsize(self) -> int: ...
    @property
    def initial_timeout(self) -> float: ...


class Load(NamedTuple):
    """Live transfers when the request arrived: all clients, and the requesting address.

    A named tuple: made for every request, and a tuple is made in a third of the time a
    frozen dataclass takes.
    """

    total: int
    client: int


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request turned down: the TFTP error to answer with, and the name asked (for the log)."""

    filename: str
    code: ErrorCode
    message: str

    @property
    def packet(self) -> bytes:
        return codec.encode_error(self.code, self.message)


@dataclass(frozen=True, slots=True)
class Admitted:
    """A read request the service may open: ``name`` is normalised, ``filename`` as asked."""

    filename: str
    name: str
    netascii: bool
    options: dict[str, str]  # shared by every request of the same bytes: never changed


@dataclass(frozen=True, slots=True)
class Terms:
    """The negotiated transfer, ready for :class:`~callboard.protocols.tftp.transfer.Transfer`."""

    blksize: int
    windowsize: int
    timeout: float  # the first retransmit interval
    fixed_timeout: bool  # the client negotiated it (RFC 2349): no back-off
    oack: bytes | None  # the option acknowledgement to send first, if any


def admit(datagram: bytes, load: Load, limits: Limits) -> Admitted | Refusal | None:
    """Screen a datagram that is not part of a live transfer.

    None means "ignore it": stray DATA, ACK or ERROR on the well-known port is never answered,
    and neither is junk that does not even claim to be a request.
    """
    if len(datagram) <= _REMEMBERED_SIZE and type(datagram) is bytes:
        screened = _screen_remembered(datagram)
    else:
        screened = _screen(datagram)  # a large datagram is junk: not worth its memory
    if not isinstance(screened, _Named):
        return screened  # refused or ignored before the load matters
    if over_limits(load.total, load.client, limits):
        return Refusal(screened.filename, ErrorCode.NOT_DEFINED, "server busy")
    return screened.verdict


def over_limits(total: int, client: int, limits: Limits) -> bool:
    """Is there no room for one more transfer (``total`` live, ``client`` from its address)?"""
    return total >= limits.max_transfers or client >= limits.max_transfers_per_client


@dataclass(frozen=True, slots=True)
class _Named:
    """A read request past the checks that come before "server busy": its name's verdict."""

    filename: str
    verdict: Admitted | Refusal


def _screen(datagram: bytes) -> _Named | Refusal | None:
    """Everything :func:`admit` decides that does not depend on the load, per datagram.

    Remembered (below) for small datagrams: in a boot storm thousands of phones send the
    very same RRQ bytes, and the answer (immutable values) is the same for each. Only the
    busy check is asked every time.
    """
    try:
        packet = codec.decode(datagram)
    except codec.MalformedPacket as exc:
        if codec.opcode(datagram) in (codec.Opcode.RRQ, codec.Opcode.WRQ):
            return Refusal("", exc.code, exc.message)
        return None
    if isinstance(packet, codec.WriteRequest):
        return Refusal(
            packet.filename, ErrorCode.ACCESS_VIOLATION, "write requests are not accepted"
        )
    if not isinstance(packet, codec.ReadRequest):
        return None
    if packet.mode == "mail":
        return Refusal(packet.filename, ErrorCode.ILLEGAL_OPERATION, "mail mode is not supported")
    try:
        name = normalise_name(packet.filename)
    except (FileNotFound, AccessViolation) as exc:
        return _Named(packet.filename, refusal_for(packet.filename, exc))
    admitted = Admitted(packet.filename, name, packet.mode == "netascii", packet.options)
    return _Named(packet.filename, admitted)


_REMEMBERED_SIZE = 512
_screen_remembered = functools.lru_cache(maxsize=1024)(_screen)


def refusal_for(filename: str, error: FileNotFound | AccessViolation) -> Refusal:
    """The answer to a name the file source (or the name check) turned down."""
    if isinstance(error, FileNotFound):
        return Refusal(filename, ErrorCode.FILE_NOT_FOUND, "file not found")
    return Refusal(filename, ErrorCode.ACCESS_VIOLATION, "access violation")


@functools.lru_cache(maxsize=16)
def _plain_terms(timeout: float) -> Terms:
    """The terms of a request without options (immutable, so one per timeout will do)."""
    return Terms(codec.DEFAULT_BLKSIZE, 1, timeout, False, None)


def agree(request: Admitted, size: int, limits: Limits) -> Terms | Refusal:
    """Negotiate the options for a file of ``size`` bytes (RFC 2347-2349, 7440).

    In netascii the size on the wire is unknown until converted, so tsize is not offered.
    """
    if not request.options:  # RFC 1350 as most clients speak it: nothing to negotiate
        return _plain_terms(limits.initial_timeout)
    try:
        agreed = codec.negotiate(
            request.options,
            size=None if request.netascii else size,
            max_blksize=limits.max_blksize,
            max_windowsize=limits.max_windowsize,
        )
    except codec.OptionError as exc:
        return Refusal(request.filename, ErrorCode.OPTION_REFUSED, str(exc))
    return Terms(
        blksize=agreed.blksize,
        windowsize=agreed.windowsize,
        timeout=agreed.timeout or limits.initial_timeout,
        fixed_timeout=agreed.timeout is not None,
        oack=codec.encode_oack(agreed.oack) if agreed.oack else None,
    )
