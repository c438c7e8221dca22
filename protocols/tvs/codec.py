"""TVS wire format: a 10-byte header then TLV elements, all big-endian.

Header: ``0x57 | 0x01 | command:u8 | 0x00 | session_id:u32 | length:u16``; each element is
``tag:u8 | len:u16 | value``. Commands 1/2 are the real TVS VERIFY exchange; 0x81/0x82 are
Callboard's ACTIVATE extension (not Cisco-compatible). Pure functions on bytes, no I/O.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum

PROTOCOL_ID = 0x57
PROTOCOL_VERSION = 0x01
HEADER_LENGTH = 10
MAX_BODY_LENGTH = 0xFFFF

_HEADER = struct.Struct(">BBBBIH")
_ELEMENT = struct.Struct(">BH")


class Command(IntEnum):
    VERIFY_REQUEST = 0x01
    VERIFY_RESPONSE = 0x02
    ACTIVATE_REQUEST = 0x81
    ACTIVATE_RESPONSE = 0x82


class Tag(IntEnum):
    DEVICE_NAME = 0x01
    CERTIFICATE = 0x02
    STATUS = 0x07
    ROLES = 0x08
    TTL = 0x09
    ACTIVATION_CODE = 0x81
    REASON = 0x82
    DEVICE_NAME_ASSIGNED = 0x83


class VerifyStatus(IntEnum):
    TRUSTED = 0
    NOT_TRUSTED = 1


class ActivateStatus(IntEnum):
    ACTIVATED = 0
    REJECTED = 1
    CERTIFICATE_NOT_ACCEPTED = 2
    RATE_LIMITED = 3
    MALFORMED = 4


#: The prefix byte real phones put before the device name (tvsc sends 0x01).
DEVICE_NAME_PREFIX = 0x01

# Lenient on the model part (CP-8865NR, CP-7965G); strict on the MAC.
_DEVICE_NAME_RE = re.compile(r"^CP-([0-9A-Z]{3,8})-SEP([0-9A-F]{12})$")
_CODE_RE = re.compile(r"^[0-9]{16}$")
_CODE_SEPARATORS = re.compile(r"[\s\-]")


def normalise_activation_code(raw: str) -> str:
    """A code as typed or printed (``1234-5678-…``, spaces) → the 16-digit wire value.

    Raises :class:`ValueError` for anything else.
    """
    code = _CODE_SEPARATORS.sub("", raw)
    if not _CODE_RE.match(code):
        raise ValueError("an activation code is 16 digits")
    return code


class CodecError(ValueError):
    """Base of every decoding error; the server maps it to status 4 (malformed)."""


class IncompleteFrame(CodecError):
    """More bytes are needed before a frame can be decoded."""


class BadHeader(CodecError):
    """The header is not a TVS header (wrong protocol id, version or reserved byte)."""


class FrameTooLarge(CodecError):
    """The announced frame is larger than the configured maximum."""


class BadElements(CodecError):
    """The TLV body does not walk cleanly, or a required element is missing or invalid."""


@dataclass(frozen=True)
class Header:
    command: int
    session_id: int
    length: int


@dataclass(frozen=True)
class Frame:
    """One decoded message: command, session id and its elements in wire order."""

    command: int
    session_id: int
    elements: tuple[tuple[int, bytes], ...] = field(default=())

    def get(self, tag: int) -> bytes | None:
        """First value for ``tag``, or None."""
        for t, v in self.elements:
            if t == tag:
                return v
        return None


@dataclass(frozen=True)
class DeviceName:
    """``CP-<model>-SEP<MAC>``: what the phone claims to be, and its MIC's CN."""

    model: str
    mac: str

    @property
    def name(self) -> str:
        return f"CP-{self.model}-SEP{self.mac}"

    @property
    def sep_name(self) -> str:
        return f"SEP{self.mac}"

    @classmethod
    def parse(cls, text: str) -> DeviceName:
        m = _DEVICE_NAME_RE.match(text)
        if m is None:
            raise BadElements("device name is not CP-<model>-SEP<12 hex>")
        return cls(model=m.group(1), mac=m.group(2))


def decode_header(data: bytes | bytearray | memoryview, max_frame: int = 65536) -> Header:
    """Decode the first 10 bytes; raise before the body arrives if the frame is unacceptable."""
    if len(data) < HEADER_LENGTH:
        raise IncompleteFrame("need 10 header bytes")
    proto, version, command, reserved, session_id, length = _HEADER.unpack_from(data, 0)
    if proto != PROTOCOL_ID or version != PROTOCOL_VERSION or reserved != 0:
        raise BadHeader(f"not a TVS header (id={proto:#x}, version={version}, rsvd={reserved})")
    if HEADER_LENGTH + length > max_frame:
        raise FrameTooLarge(f"frame of {HEADER_LENGTH + length} bytes exceeds {max_frame}")
    return Header(command=command, session_id=session_id, length=length)


def decode_elements(body: bytes | bytearray | memoryview) -> tuple[tuple[int, bytes], ...]:
    """Walk the TLV body; every byte must belong to exactly one element."""
    out: list[tuple[int, bytes]] = []
    view = bytes(body)  # a copy: no buffer export may outlive the call (callers resize theirs)
    i = 0
    n = len(view)
    while i < n:
        if n - i < 3:
            raise BadElements("truncated element header")
        tag, length = _ELEMENT.unpack_from(view, i)
        i += 3
        if n - i < length:
            raise BadElements(f"element {tag:#x} overruns the body")
        out.append((tag, view[i : i + length]))
        i += length
    return tuple(out)


def decode_frame(data: bytes | bytearray | memoryview, max_frame: int = 65536) -> tuple[Frame, int]:
    """Decode one frame from the start of ``data``; return it and the bytes consumed.

    Raises IncompleteFrame when more data is needed, another CodecError when the bytes can
    never become a valid frame.
    """
    header = decode_header(data, max_frame)
    end = HEADER_LENGTH + header.length
    if len(data) < end:
        raise IncompleteFrame(f"need {end} bytes")
    elements = decode_elements(data[HEADER_LENGTH:end])
    return Frame(header.command, header.session_id, elements), end


def encode_elements(elements: Iterable[tuple[int, bytes]]) -> bytes:
    parts: list[bytes] = []
    for tag, value in elements:
        if not 0 <= tag <= 0xFF:
            raise ValueError("tag out of range")
        if len(value) > MAX_BODY_LENGTH:
            raise ValueError("element too long")
        parts.append(_ELEMENT.pack(tag, len(value)))
        parts.append(value)
    return b"".join(parts)


def encode_frame(command: int, session_id: int, elements: Iterable[tuple[int, bytes]]) -> bytes:
    body = encode_elements(elements)
    if len(body) > MAX_BODY_LENGTH:
        raise ValueError("frame body too long")
    header = _HEADER.pack(PROTOCOL_ID, PROTOCOL_VERSION, command, 0, session_id, len(body))
    return header + body


def encode_frame_obj(frame: Frame) -> bytes:
    return encode_frame(frame.command, frame.session_id, frame.elements)


# Typed requests and responses ------------------------------------------------------------


def _device_name_value(device: DeviceName) -> bytes:
    return bytes([DEVICE_NAME_PREFIX]) + device.name.encode("ascii")


def parse_device_name_element(value: bytes) -> DeviceName:
    """Strip the one-byte prefix (tolerate its absence) and parse the name."""
    raw = value[1:] if value[:1] and value[0] < 0x20 else value
    raw = raw.rstrip(b"\x00")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise BadElements("device name is not ASCII") from None
    return DeviceName.parse(text)


@dataclass(frozen=True)
class VerifyRequest:
    session_id: int
    device_name: str | None  # as sent; not validated, VERIFY does not depend on it
    certificate_der: bytes

    def encode(self) -> bytes:
        elements: list[tuple[int, bytes]] = []
        if self.device_name is not None:
            name = bytes([DEVICE_NAME_PREFIX]) + self.device_name.encode("ascii")
            elements.append((Tag.DEVICE_NAME, name))
        elements.append((Tag.CERTIFICATE, self.certificate_der))
        return encode_frame(Command.VERIFY_REQUEST, self.session_id, elements)

    @classmethod
    def from_frame(cls, frame: Frame) -> VerifyRequest:
        cert = frame.get(Tag.CERTIFICATE)
        if not cert:
            raise BadElements("VERIFY_REQUEST without CERTIFICATE")
        name = frame.get(Tag.DEVICE_NAME)
        text = None
        if name is not None:
            raw = name[1:] if name[:1] and name[0] < 0x20 else name
            text = raw.rstrip(b"\x00").decode("ascii", "replace")
        return cls(frame.session_id, text, cert)


@dataclass(frozen=True)
class VerifyResponse:
    session_id: int
    status: int
    roles: tuple[int, ...] = ()
    ttl: int | None = None

    def encode(self) -> bytes:
        elements: list[tuple[int, bytes]] = [(Tag.STATUS, bytes([self.status]))]
        if self.roles:
            elements.append((Tag.ROLES, bytes(self.roles)))
        if self.ttl is not None:
            elements.append((Tag.TTL, struct.pack(">I", self.ttl)))
        return encode_frame(Command.VERIFY_RESPONSE, self.session_id, elements)

    @classmethod
    def from_frame(cls, frame: Frame) -> VerifyResponse:
        status = frame.get(Tag.STATUS)
        if status is None or len(status) != 1:
            raise BadElements("VERIFY_RESPONSE without a one-byte STATUS")
        roles = frame.get(Tag.ROLES) or b""
        ttl_raw = frame.get(Tag.TTL)
        ttl: int | None = None
        if ttl_raw is not None:
            if len(ttl_raw) != 4:
                raise BadElements("TTL is not a u32")
            (ttl,) = struct.unpack(">I", ttl_raw)
        return cls(frame.session_id, status[0], tuple(roles), ttl)


@dataclass(frozen=True)
class ActivateRequest:
    """Callboard extension. ``repr`` hides the code so it never lands in a log by accident."""

    session_id: int
    device: DeviceName
    code: str = field(repr=False)

    def encode(self) -> bytes:
        return encode_frame(
            Command.ACTIVATE_REQUEST,
            self.session_id,
            [
                (Tag.DEVICE_NAME, _device_name_value(self.device)),
                (Tag.ACTIVATION_CODE, self.code.encode("ascii")),
            ],
        )

    @classmethod
    def from_frame(cls, frame: Frame) -> ActivateRequest:
        name = frame.get(Tag.DEVICE_NAME)
        if name is None:
            raise BadElements("ACTIVATE_REQUEST without DEVICE_NAME")
        device = parse_device_name_element(name)
        raw = frame.get(Tag.ACTIVATION_CODE)
        if raw is None:
            raise BadElements("ACTIVATE_REQUEST without ACTIVATION_CODE")
        try:
            code = raw.decode("ascii")
        except UnicodeDecodeError:
            raise BadElements("activation code is not 16 ASCII digits") from None
        if _CODE_RE.match(code) is None:
            raise BadElements("activation code is not 16 ASCII digits")
        return cls(frame.session_id, device, code)


@dataclass(frozen=True)
class ActivateResponse:
    session_id: int
    status: int
    reason: str = ""
    device_name_assigned: str | None = None

    def encode(self) -> bytes:
        elements: list[tuple[int, bytes]] = [(Tag.STATUS, bytes([self.status]))]
        reason = self.reason.encode("utf-8")[:1024]
        elements.append((Tag.REASON, reason))
        if self.device_name_assigned is not None:
            elements.append((Tag.DEVICE_NAME_ASSIGNED, self.device_name_assigned.encode("ascii")))
        return encode_frame(Command.ACTIVATE_RESPONSE, self.session_id, elements)

    @classmethod
    def from_frame(cls, frame: Frame) -> ActivateResponse:
        status = frame.get(Tag.STATUS)
        if status is None or len(status) != 1:
            raise BadElements("ACTIVATE_RESPONSE without a one-byte STATUS")
        reason = (frame.get(Tag.REASON) or b"").decode("utf-8", "replace")
        assigned = frame.get(Tag.DEVICE_NAME_ASSIGNED)
        return cls(
            frame.session_id,
            status[0],
            reason,
            assigned.decode("ascii", "replace") if assigned is not None else None,
        )
