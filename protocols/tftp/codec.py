"""TFTP packets and option negotiation, as pure functions over bytes.

Everything that parses client bytes lives here so that it can be fuzzed in isolation: any
byte string given to :func:`decode` yields a packet or a :class:`MalformedPacket` (which
carries the TFTP error code to answer with), never another exception. Covers RFC 1350
(packets, modes), RFC 2347 (OACK), RFC 2348 (blksize), RFC 2349 (timeout, tsize) and
RFC 7440 (windowsize).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "MAX_BLKSIZE",
    "MIN_BLKSIZE",
    "Ack",
    "Data",
    "Error",
    "ErrorCode",
    "MalformedPacket",
    "Negotiated",
    "OptionAck",
    "OptionError",
    "Packet",
    "ReadRequest",
    "WriteRequest",
    "decode",
    "decode_ack",
    "encode",
    "encode_ack",
    "encode_data",
    "encode_error",
    "encode_oack",
    "negotiate",
    "opcode",
]

MIN_BLKSIZE = 8
MAX_BLKSIZE = 65464
MAX_WINDOWSIZE = 65535
DEFAULT_BLKSIZE = 512


class Opcode(IntEnum):
    RRQ = 1
    WRQ = 2
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6


class ErrorCode(IntEnum):
    """RFC 1350 error codes plus RFC 2347's option refusal."""

    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_REFUSED = 8


class MalformedPacket(Exception):
    """Bytes that are not a valid TFTP packet; ``code`` is the error to answer with."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class OptionError(Exception):
    """A requested option value the server refuses (answered with error 8)."""


@dataclass(frozen=True, slots=True)
class ReadRequest:
    filename: str
    mode: str  # lower-cased: "octet" or "netascii"
    options: dict[str, str]  # lower-cased names, first occurrence wins


@dataclass(frozen=True, slots=True)
class WriteRequest:
    filename: str
    mode: str
    options: dict[str, str]


@dataclass(frozen=True, slots=True)
class Data:
    block: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    block: int


@dataclass(frozen=True, slots=True)
class Error:
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class OptionAck:
    options: dict[str, str]


Packet = ReadRequest | WriteRequest | Data | Ack | Error | OptionAck

_HEADER = struct.Struct("!HH")
# Plain ints for the per-block paths: an IntEnum member costs a lookup and a conversion.
_DATA = int(Opcode.DATA)
_ACK = int(Opcode.ACK)
_MODES = frozenset({"octet", "netascii", "mail"})


def _text(raw: bytes) -> str:
    # Names are bytes on the wire; surrogateescape keeps every byte and never fails.
    return raw.decode("utf-8", "surrogateescape")


def _request(opcode: int, body: bytes) -> ReadRequest | WriteRequest:
    if not body.endswith(b"\x00"):
        raise MalformedPacket(ErrorCode.ILLEGAL_OPERATION, "request not NUL-terminated")
    fields = body[:-1].split(b"\x00")
    if len(fields) < 2:
        raise MalformedPacket(ErrorCode.ILLEGAL_OPERATION, "request without mode")
    filename = _text(fields[0])
    mode = _text(fields[1]).lower()
    if mode not in _MODES:
        if any(_text(f).lower() in _MODES for f in fields[2:]):
            # "name\0more\0octet\0": a NUL inside the file name, not a strange mode.
            raise MalformedPacket(ErrorCode.ACCESS_VIOLATION, "NUL in file name")
        raise MalformedPacket(ErrorCode.ILLEGAL_OPERATION, "unknown transfer mode")
    options: dict[str, str] = {}
    # A dangling option name without a value is ignored rather than refused.
    for i in range(2, len(fields) - 1, 2):
        name = _text(fields[i]).lower()
        if name and name not in options:
            options[name] = _text(fields[i + 1])
    if opcode == Opcode.RRQ:
        return ReadRequest(filename, mode, options)
    return WriteRequest(filename, mode, options)


def opcode(datagram: bytes) -> int | None:
    """The opcode field (any value, valid or not), or None when there is none; parses nothing."""
    if len(datagram) < 2:
        return None
    return (datagram[0] << 8) | datagram[1]


def decode_ack(datagram: bytes) -> int | None:
    """The block number if ``datagram`` is a well-formed ACK, else None.

    The transfer's per-block path: the same answer :func:`decode` gives for an ACK, without
    building a packet object. Anything else goes through :func:`decode`.
    """
    if len(datagram) == 4 and datagram[1] == _ACK and datagram[0] == 0:
        return (datagram[2] << 8) | datagram[3]
    return None


def decode(datagram: bytes) -> Packet:
    """Parse one datagram; raise :class:`MalformedPacket` for anything invalid."""
    if len(datagram) < 2:
        raise MalformedPacket(ErrorCode.ILLEGAL_OPERATION, "packet too short")
    opcode = (datagram[0] << 8) | datagram[1]
    if opcode in (Opcode.RRQ, Opcode.WRQ):
        return _request(opcode, datagram[2:])
    if opcode == Opcode.DATA:
        if len(datagram) < 4:
            raise MalformedPacket(ErrorCode.ILLEGAL_OPERATION, "DATA too short")
        return Data((datagram[2] << 8) | datagram[3], bytes(datagram[4:]))
    if opcode == Opcode.ACK:
        if len(datagram) != 4:
            raise MalformedPacket(ErrorCode.ILLEGAL_OPERATION, "ACK of wrong length")
        return Ack((datagram[2] << 8) | datagram[3])
    if opcode == Opcode.ERROR:
        if len(datagram) < 4:
            raise MalformedPacket(ErrorCode.ILLEGAL_OPERATION, "ERROR too short")
        message = datagram[4:].split(b"\x00", 1)[0]
        return Error((datagram[2] << 8) | datagram[3], _text(message))
    if opcode == Opcode.OACK:
        body = datagram[2:]
        fields = body[:-1].split(b"\x00") if body.endswith(b"\x00") else []
        if not body.endswith(b"\x00") and body:
            raise MalformedPacket(ErrorCode.ILLEGAL_OPERATION, "OACK not NUL-terminated")
        options = {
            _text(fields[i]).lower(): _text(fields[i + 1]) for i in range(0, len(fields) - 1, 2)
        }
        return OptionAck(options)
    raise MalformedPacket(ErrorCode.ILLEGAL_OPERATION, "unknown opcode")


def _fields(*parts: str) -> bytes:
    return b"".join(p.encode("utf-8", "surrogateescape") + b"\x00" for p in parts)


def encode_data(block: int, payload: bytes | memoryview) -> bytes:
    """A DATA packet; ``payload`` may be a slice of a larger read (no copy before the join)."""
    return _HEADER.pack(_DATA, block & 0xFFFF) + payload


def encode_ack(block: int) -> bytes:
    return _HEADER.pack(_ACK, block & 0xFFFF)


def encode_error(code: int, message: str) -> bytes:
    return _HEADER.pack(Opcode.ERROR, code & 0xFFFF) + _fields(message)


def encode_oack(options: dict[str, str]) -> bytes:
    flat = [x for kv in options.items() for x in kv]
    return struct.pack("!H", Opcode.OACK) + _fields(*flat)


def encode(packet: Packet) -> bytes:
    """Serialise any packet (the server only sends DATA, OACK and ERROR; tests send the rest)."""
    match packet:
        case ReadRequest() | WriteRequest():
            opcode = Opcode.RRQ if isinstance(packet, ReadRequest) else Opcode.WRQ
            flat = [x for kv in packet.options.items() for x in kv]
            return struct.pack("!H", opcode) + _fields(packet.filename, packet.mode, *flat)
        case Data(block, payload):
            return encode_data(block, payload)
        case Ack(block):
            return encode_ack(block)
        case Error(code, message):
            return encode_error(code, message)
        case OptionAck(options):
            return encode_oack(options)
    raise TypeError(f"not a TFTP packet: {packet!r}")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The transfer parameters agreed with the client, and the OACK to send (if any)."""

    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout: float | None = None  # seconds, when the client asked for one
    oack: dict[str, str] | None = None


def _int_option(name: str, value: str, low: int, high: int) -> int:
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        raise OptionError(f"{name} is not a number")
    number = int(text)
    if not low <= number <= high:
        raise OptionError(f"{name} out of range {low}..{high}")
    return number


def negotiate(
    options: dict[str, str],
    *,
    size: int | None,
    max_blksize: int,
    max_windowsize: int,
) -> Negotiated:
    """Agree on blksize/timeout/tsize/windowsize; unknown options are ignored.

    ``size`` is the file size for tsize, or None when it is not known up front (netascii),
    in which case tsize is left out of the OACK. Raises :class:`OptionError` for a value
    out of its RFC range; in-range values above our caps are lowered, as RFC 2348 allows.
    """
    oack: dict[str, str] = {}
    blksize = DEFAULT_BLKSIZE
    windowsize = 1
    timeout: float | None = None
    for name, value in options.items():
        if name == "blksize":
            blksize = min(_int_option(name, value, MIN_BLKSIZE, MAX_BLKSIZE), max_blksize)
            oack[name] = str(blksize)
        elif name == "timeout":
            timeout = float(_int_option(name, value, 1, 255))
            oack[name] = str(int(timeout))
        elif name == "tsize":
            _int_option(name, value, 0, 2**63)
            if size is not None:
                oack[name] = str(size)
        elif name == "windowsize":
            windowsize = min(_int_option(name, value, 1, MAX_WINDOWSIZE), max_windowsize)
            oack[name] = str(windowsize)
    return Negotiated(blksize, windowsize, timeout, oack or None)
