"""MIME bodies in SIP (RFC 3261 §7.4, RFC 2046 §5.1): media types and multipart/mixed, no I/O.

Cisco phones put two ``application/x-cisco-remotecc-request+xml`` parts in a ``multipart/mixed``
body on their first REGISTER (bulkregisterreq, optionsind: protocol notes §10, §16). The
registrar reads them through :func:`body_parts`, which turns any request body into its parts:
none for an empty body, one for a plain body, each part for a multipart one (the boundary comes
from the ``Content-Type``). Everything malformed, from a missing boundary to a part whose
headers do not parse, raises :class:`MultipartError`, whose ``reason`` is the text of the 400
the caller sends; nothing else escapes (the fuzz tests hold it to that).

The parser is lenient where phones are (bare LF line ends, transport padding after a boundary,
a preamble and an epilogue) and strict where leniency would be ambiguous: the delimiter must
start a line, the close delimiter must be there, and the number of parts is bounded.
:func:`build_multipart` writes what the emulated phone sends, CRLF throughout.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from callboard.protocols.sip.message import (
    Headers,
    SIPParseError,
    parse_fields,
    parse_params,
    unquote,
)

#: More parts than any phone sends (Cisco sends two; CME's REFERs four).
MAX_PARTS = 16
#: The default type of a body part without Content-Type (RFC 2046 §5.1).
DEFAULT_PART_TYPE = "text/plain"

_TOKEN_RE = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")
#: RFC 2046 §5.1.1 bchars: 1 to 70 of them, not ending in a space.
_BOUNDARY_RE = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


class MultipartError(ValueError):
    """A body that cannot be read; ``reason`` says why (the 400's Warning text)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class MediaType:
    """``type/subtype;param=value``: the type in lower case, parameter names too."""

    type: str
    params: tuple[tuple[str, str], ...] = ()

    def param(self, name: str) -> str | None:
        lname = name.lower()
        return next((v for k, v in self.params if k == lname), None)

    def __str__(self) -> str:
        return self.type + "".join(f";{k}={v}" for k, v in self.params)


def parse_media_type(value: str) -> MediaType:
    """A ``Content-Type`` value (RFC 3261 §20.15); parameter values unquoted."""
    main, _, rest = value.partition(";")
    kind, slash, subtype = main.strip().partition("/")
    if not slash or not _TOKEN_RE.fullmatch(kind) or not _TOKEN_RE.fullmatch(subtype):
        raise MultipartError(f"bad media type {value[:60]!r}")
    try:
        params = parse_params(rest)
    except SIPParseError as exc:
        raise MultipartError(f"bad media type parameter: {exc.reason}") from None
    return MediaType(
        f"{kind}/{subtype}".lower(),
        tuple((k.lower(), unquote(v or "")) for k, v in params),
    )


@dataclass(frozen=True)
class Part:
    """One body part: its headers, its media type (default ``text/plain``) and its bytes."""

    headers: Headers
    media_type: MediaType
    body: bytes

    @property
    def content_type(self) -> str:
        return self.media_type.type


def body_parts(content_type: str | None, body: bytes, *, max_parts: int = MAX_PARTS) -> list[Part]:
    """The parts of a message body: [] when empty, each part of a ``multipart/*`` body, else
    the body itself as one part. A body without a Content-Type is an error (RFC 3261 §20.15)."""
    if not body:
        return []
    if content_type is None:
        raise MultipartError("a body without Content-Type")
    media = parse_media_type(content_type)
    if not media.type.startswith("multipart/"):
        headers = Headers([("Content-Type", content_type)])
        return [Part(headers, media, body)]
    boundary = media.param("boundary")
    if boundary is None:
        raise MultipartError(f"{media.type} without a boundary")
    return parse_multipart(body, boundary, max_parts=max_parts)


def parse_multipart(body: bytes, boundary: str, *, max_parts: int = MAX_PARTS) -> list[Part]:
    """The parts between ``--boundary`` delimiters, up to the ``--boundary--`` close delimiter.

    The line break before a delimiter belongs to the delimiter (RFC 2046 §5.1.1), so a part's
    bytes are exactly what was between.
    """
    if not _BOUNDARY_RE.fullmatch(boundary):
        raise MultipartError("bad multipart boundary")
    dash_boundary = b"--" + boundary.encode("ascii")
    parts: list[Part] = []
    content_start: int | None = None  # after the delimiter line that opened the current part
    for start, end, close in _delimiters(body, dash_boundary):
        if content_start is not None:
            if len(parts) >= max_parts:
                raise MultipartError(f"more than {max_parts} body parts")
            parts.append(_parse_part(body[content_start:start]))
        if close:
            if not parts:
                raise MultipartError("multipart body without a part")
            return parts
        content_start = end
    if content_start is None:
        raise MultipartError("multipart body without its boundary")
    raise MultipartError("multipart body without its close delimiter")


def _delimiters(body: bytes, dash_boundary: bytes) -> Iterator[tuple[int, int, bool]]:
    """Each delimiter line: (where it starts, line break before it included; where the next
    part starts; whether it is the close delimiter)."""
    pos = 0
    size = len(body)
    while (at := body.find(dash_boundary, pos)) >= 0:
        pos = at + len(dash_boundary)
        if at > 0 and body[at - 1 : at] != b"\n":
            continue  # not at the start of a line: content, not a delimiter
        start = at - 2 if body[at - 2 : at] == b"\r\n" else max(at - 1, 0)
        if body.startswith(b"--", pos):
            yield start, size, True
            return
        after = pos
        while after < size and body[after] in b" \t":  # transport padding
            after += 1
        if body.startswith(b"\r\n", after):
            yield start, after + 2, False
        elif body.startswith(b"\n", after):
            yield start, after + 1, False
        # else: a longer line merely starting with the boundary; keep looking


def _parse_part(raw: bytes) -> Part:
    """A part's header lines, the blank line, and its body (RFC 2046 §5.1.1: headers and the
    blank line may both be absent)."""
    if raw.startswith(b"\r\n"):
        head, body = b"", raw[2:]
    elif raw.startswith(b"\n"):
        head, body = b"", raw[1:]
    else:
        crlf, lf = raw.find(b"\r\n\r\n"), raw.find(b"\n\n")
        if crlf >= 0 and (lf < 0 or crlf <= lf):
            head, body = raw[:crlf], raw[crlf + 4 :]
        elif lf >= 0:
            head, body = raw[:lf], raw[lf + 2 :]
        else:
            head, body = raw, b""
    try:
        headers = parse_fields(head)
    except SIPParseError as exc:
        raise MultipartError(f"body part: {exc.reason}") from None
    content_type = headers.get("content-type")
    media = parse_media_type(content_type) if content_type else MediaType(DEFAULT_PART_TYPE)
    return Part(headers, media, body)


def build_multipart(
    parts: Sequence[tuple[Sequence[tuple[str, str]], bytes]], boundary: str
) -> bytes:
    """A multipart body: each part's header fields and bytes, CRLF line ends, close delimiter."""
    if not _BOUNDARY_RE.fullmatch(boundary):
        raise ValueError("bad multipart boundary")
    dash = b"--" + boundary.encode("ascii")
    out: list[bytes] = []
    for fields, body in parts:
        if dash in body:
            raise ValueError("the boundary occurs in a body part")
        head = "".join(f"{name}: {value}\r\n" for name, value in fields).encode("utf-8")
        out.append(dash + b"\r\n" + head + b"\r\n" + body + b"\r\n")
    return b"".join(out) + dash + b"--\r\n"
