"""SIP message codec (RFC 3261 §7, §20, §25): bytes to messages and back, no I/O.

The registrar and the emulated phone both speak through this module, so it is lenient where
real phones are sloppy (bare LF line ends, compact header names, header folding) and strict
where leniency would be ambiguous (a start line, a Content-Length that lies). Every failure
surfaces as :class:`SIPParseError` (or its subclass :class:`MessageTooLarge`), never as some
other exception: the fuzz tests hold it to that.

- :func:`parse_message` turns one datagram, or one framed stream message, into a
  :class:`Request` or :class:`Response`.
- :class:`StreamFramer` cuts a TCP/TLS byte stream into whole messages using Content-Length
  (RFC 3261 §18.3) and skips CRLF keep-alives (RFC 5626 §3.5.1). It reads a header section
  and its Content-Length with the same functions as :func:`parse_message`
  (:func:`parse_head`, :func:`content_length`), so the two can never disagree on where a
  message ends.
- :func:`parse_via`, :func:`parse_name_addr`, :func:`parse_contact_list` and :func:`parse_uri`
  read the structured headers the registrar needs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

DEFAULT_MAX_MESSAGE = 64 * 1024

#: RFC 3261 §7.3.3 compact forms (plus a few extension ones phones use).
COMPACT_FORMS: dict[str, str] = {
    "v": "via",
    "f": "from",
    "t": "to",
    "i": "call-id",
    "m": "contact",
    "l": "content-length",
    "c": "content-type",
    "e": "content-encoding",
    "k": "supported",
    "s": "subject",
    "o": "event",
    "r": "refer-to",
    "u": "allow-events",
    "x": "session-expires",
}

#: How a header is written when we serialize it (lower-case key → canonical spelling).
CANONICAL_NAMES: dict[str, str] = {
    "via": "Via",
    "from": "From",
    "to": "To",
    "call-id": "Call-ID",
    "cseq": "CSeq",
    "contact": "Contact",
    "content-length": "Content-Length",
    "content-type": "Content-Type",
    "max-forwards": "Max-Forwards",
    "expires": "Expires",
    "min-expires": "Min-Expires",
    "www-authenticate": "WWW-Authenticate",
    "authorization": "Authorization",
    "user-agent": "User-Agent",
    "server": "Server",
    "date": "Date",
    "warning": "Warning",
    "allow": "Allow",
    "accept": "Accept",
    "supported": "Supported",
    "require": "Require",
    "unsupported": "Unsupported",
    "record-route": "Record-Route",
    "route": "Route",
    "session-id": "Session-ID",
}

#: Headers whose comma-separated values are separate header values (RFC 3261 §7.3.1).
#: Authorization-style headers, Date and Warning-with-dates are not in this list on purpose.
LIST_HEADERS = frozenset(
    {
        "via",
        "contact",
        "route",
        "record-route",
        "allow",
        "accept",
        "supported",
        "require",
        "unsupported",
        "proxy-require",
        "accept-encoding",
        "accept-language",
        "allow-events",
        "path",
    }
)


REASONS: dict[int, str] = {
    100: "Trying",
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request Entity Too Large",
    415: "Unsupported Media Type",
    420: "Bad Extension",
    423: "Interval Too Brief",
    481: "Call/Transaction Does Not Exist",
    483: "Too Many Hops",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "Version Not Supported",
    513: "Message Too Large",
}


class SIPParseError(ValueError):
    """Bytes that are not a usable SIP message.

    ``partial`` is the request as far as it could be read (start line and headers) when a
    400 can still be formed from it; ``None`` means the input can only be dropped.
    """

    status = 400  # the answer, when ``partial`` allows one

    def __init__(self, reason: str, partial: Request | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.partial = partial


class MessageTooLarge(SIPParseError):
    """Larger than the configured limit: answered 513 (datagram) or closed (stream)."""

    status = 513


class VersionNotSupported(SIPParseError):
    """A request line naming another SIP version than 2.0: answered 505 (RFC 3261 §8.2.2)."""

    status = 505


_KEY_CACHE: dict[str, str] = {}


def canonical_key(name: str) -> str:
    """Lower-case header key with compact forms expanded."""
    key = _KEY_CACHE.get(name)
    if key is None:
        key = name.lower()
        key = COMPACT_FORMS.get(key, key)
        if len(_KEY_CACHE) < 4096:
            _KEY_CACHE[name] = key
    return key


def canonical_name(key: str) -> str:
    name = CANONICAL_NAMES.get(key)
    if name is not None:
        return name
    return "-".join(part.capitalize() for part in key.split("-"))


class Headers:
    """Ordered, case-insensitive multi-map of header fields.

    Stored as (key, value) pairs in arrival order with ``key`` canonical (lower-case,
    compact forms expanded). :meth:`values` splits the comma lists of list headers, so a
    ``Contact: <a>, <b>`` line and two ``Contact`` lines read the same. A request's fields
    are looked up a dozen times each: the first lookup indexes them by key once (any change
    drops the index).
    """

    __slots__ = ("_index", "_items")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = [(canonical_key(k), v) for k, v in items]
        self._index: dict[str, list[str]] | None = None

    def _by_key(self) -> dict[str, list[str]]:
        index = self._index
        if index is None:
            index = {}
            for k, v in self._items:
                found = index.get(k)
                if found is None:
                    index[k] = [v]
                else:
                    found.append(v)
            self._index = index
        return index

    def add(self, name: str, value: str) -> None:
        self._items.append((canonical_key(name), value))
        self._index = None

    def set(self, name: str, value: str) -> None:
        """Replace every field of that name with one value, at the first one's place."""
        key = canonical_key(name)
        out: list[tuple[str, str]] = []
        placed = False
        for k, v in self._items:
            if k == key:
                if not placed:
                    out.append((k, value))
                    placed = True
            else:
                out.append((k, v))
        if not placed:
            out.append((key, value))
        self._items = out
        self._index = None

    def put_first(self, name: str, values: Iterable[str]) -> None:
        """Every field of that name replaced by ``values``, ahead of all the others (a
        response's Via list, rewritten)."""
        key = canonical_key(name)
        self._items = [(key, v) for v in values] + [i for i in self._items if i[0] != key]
        self._index = None

    def remove(self, name: str) -> None:
        key = canonical_key(name)
        self._items = [(k, v) for k, v in self._items if k != key]
        self._index = None

    def _found(self, name: str) -> list[str] | None:
        """The values under ``name``: looked up as given first (callers mostly pass the
        canonical key itself, which then needs no lowering), else under its canonical key."""
        index = self._index
        if index is None:
            index = self._by_key()
        found = index.get(name)
        if found is None:
            key = canonical_key(name)
            if key != name:
                found = index.get(key)
        return found

    @overload
    def get(self, name: str) -> str | None: ...
    @overload
    def get(self, name: str, default: str) -> str: ...
    def get(self, name: str, default: str | None = None) -> str | None:
        """The first raw field value (no comma splitting)."""
        found = self._found(name)
        return default if found is None else found[0]

    def get_all(self, name: str) -> list[str]:
        """Every raw field value of that name (no comma splitting)."""
        found = self._found(name)
        return [] if found is None else list(found)

    def values(self, name: str) -> list[str]:
        """Every value, with comma-separated lists split for list headers."""
        raw = self._found(name)
        if raw is None:
            return []
        if canonical_key(name) not in LIST_HEADERS:
            return list(raw)
        out: list[str] = []
        for v in raw:
            if _one_value(v):
                stripped = v.strip()
                if stripped:
                    out.append(stripped)
                continue
            out.extend(p.strip() for p in split_unquoted(v, ",") if p.strip())
        return out

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._found(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def copy(self) -> Headers:
        h = Headers()
        h._items = list(self._items)
        return h


def _one_value(v: str) -> bool:
    """A field value that :func:`split_unquoted` would return whole (the usual Via or
    Contact line): no comma, and its quotes pair up without escapes, so none is left open."""
    return "," not in v and "\\" not in v and not v.count('"') % 2


@dataclass
class Request:
    method: str
    uri: str
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""
    version: str = "SIP/2.0"

    def to_bytes(self) -> bytes:
        return _serialize(f"{self.method} {self.uri} {self.version}", self.headers, self.body)


@dataclass
class Response:
    status: int
    reason: str = ""
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""
    version: str = "SIP/2.0"

    def to_bytes(self) -> bytes:
        reason = self.reason or REASONS.get(self.status, "Unknown")
        return _serialize(f"{self.version} {self.status} {reason}", self.headers, self.body)


Message = Request | Response


#: "Name: " as each key is written, made once per key.
_FIELD_PREFIXES: dict[str, str] = {}


def _field_prefix(key: str) -> str:
    prefix = _FIELD_PREFIXES.get(key)
    if prefix is None:
        prefix = canonical_name(key) + ": "
        if len(_FIELD_PREFIXES) < 4096:
            _FIELD_PREFIXES[key] = prefix
    return prefix


def _serialize(start: str, headers: Headers, body: bytes) -> bytes:
    prefix = _FIELD_PREFIXES.get
    lines = [
        (prefix(key) or _field_prefix(key)) + value
        for key, value in headers._items
        if key != "content-length"
    ]
    lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    return (start + "\r\n" + "\r\n".join(lines)).encode() + body


def _head_end(data: bytes | bytearray) -> tuple[int, int] | None:
    """Where the header section ends: (its length, the blank line's length), or None yet.

    The first blank line wins, CRLF or bare LF: the parser and the stream framer both cut here.
    """
    crlf = data.find(b"\r\n\r\n")
    lf = data.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf <= lf):
        return crlf, 4
    if lf >= 0:
        return lf, 2
    return None


def _split_head(data: bytes) -> tuple[bytes, bytes]:
    """Split at the blank line ending the header section (CRLF or bare LF)."""
    found = _head_end(data)
    if found is None:
        return data, b""
    end, sep = found
    return data[:end], data[end + sep :]


_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_CTL_RE = re.compile(r"[\x00-\x08\x0a-\x1f]")
#: Any control character a header value may not hold, line ends aside: absent from a whole
#: header section (the usual case), no value needs checking on its own.
_CTL_ANY_RE = re.compile(r"[\x00-\x08\x0b-\x1f]")
_BAD_HOST_RE = re.compile(r'[\s<>"@;,]')
_BAD_PARAM_RE = re.compile(r"[\s<>]")
_SPACE_RE = re.compile(r"\s")  # what str.isspace() says is whitespace


def _is_token(s: str) -> bool:
    return _TOKEN_RE.fullmatch(s) is not None


def is_number(s: str) -> bool:
    """ASCII digits only (``str.isdigit`` also takes ``²`` and ``٣``)."""
    return s.isascii() and s.isdigit()


def parse_message(data: bytes, max_size: int = DEFAULT_MAX_MESSAGE) -> Message:
    """Parse one whole SIP message.

    Without a Content-Length (datagrams only) the body is the rest of the data; with one, the
    body is cut to it and a shorter remainder is an error (RFC 3261 §18.3).
    """
    if len(data) > max_size:
        head = _split_head(data[:max_size])[0]
        if len(head) >= max_size - 4:
            head = head[: max(0, head.rfind(b"\n"))]  # the last line may be cut short
        raise MessageTooLarge(
            f"message of {len(data)} bytes exceeds {max_size}", _partial_request(head)
        )
    # Leading CRLFs before a start line are allowed (RFC 3261 §7.5).
    head, body = _split_head(data.lstrip(b"\r\n"))
    msg = parse_head(head)
    length = content_length(msg)
    if length is not None:
        if length > len(body):
            raise SIPParseError("body shorter than Content-Length", _as_partial(msg))
        body = body[:length]
    msg.body = body
    return msg


def parse_head(head: bytes) -> Message:
    """The start line and header fields of a message (its header section, without the blank
    line); the body is left empty."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # Refused, but answered when the rest is readable: the bad bytes read as U+FFFD.
        raise SIPParseError("header section is not UTF-8", _readable_request(head)) from None
    return _parse_head_text(text)


def _parse_head_text(text: str) -> Message:
    text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    try:
        msg = _parse_start_line(lines[0].strip())
    except VersionNotSupported as exc:
        if exc.partial is not None:  # read its header fields too, to answer 505
            try:
                _read_fields(lines[1:], exc.partial.headers, None, True)
            except SIPParseError:
                exc.partial = None
        raise
    _read_fields(lines[1:], msg.headers, _as_partial(msg), _CTL_ANY_RE.search(text) is not None)
    return msg


def _readable_request(head: bytes) -> Request | None:
    """The request in a header section that is not UTF-8, read with the bad bytes replaced,
    to answer it; None when even so it is not a readable request."""
    try:
        return _as_partial(_parse_head_text(head.decode("utf-8", "replace")))
    except SIPParseError as exc:
        return exc.partial


def parse_fields(block: bytes) -> Headers:
    """Header lines without a start line (a MIME body part's headers, RFC 2046 §5.1.1), read
    by the same rules as a message's."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        raise SIPParseError("header section is not UTF-8") from None
    headers = Headers()
    _read_fields(text.replace("\r\n", "\n").split("\n"), headers, None, True)
    return headers


def _parse_start_line(start: str) -> Message:
    parts = start.split(" ", 2)
    if len(parts) == 3 and parts[0].upper().startswith("SIP/"):
        if parts[0].upper() != "SIP/2.0" or not (len(parts[1]) == 3 and is_number(parts[1])):
            raise SIPParseError("bad status line")
        return Response(int(parts[1]), parts[2])
    if len(parts) == 3 and parts[2].upper().startswith("SIP/"):
        method, uri, version = parts
        if not _is_token(method) or not uri or _SPACE_RE.search(uri):
            raise SIPParseError("bad request line")
        request = Request(method, uri, version=version)
        if version.upper() != "SIP/2.0":
            raise VersionNotSupported("unsupported SIP version", request)
        return request
    raise SIPParseError("bad start line")


#: Field names as they arrive (before stripping) → canonical key, for names already found to
#: be tokens: a phone sends the same dozen names every time, checked once.
_FIELD_KEYS: dict[str, str] = {}


def _field_key(raw_name: str, line: str, partial: Request | None) -> str:
    """The canonical key of a field name as it arrived; a name that is no token is an error."""
    key = _FIELD_KEYS.get(raw_name)
    if key is None:
        name = raw_name.strip()
        if not _is_token(name):
            raise SIPParseError(f"malformed header line {line[:40]!r}", partial)
        key = canonical_key(name)
        if len(_FIELD_KEYS) < 4096:
            _FIELD_KEYS[raw_name] = key
    return key


def field_key(raw_name: str) -> str:
    """The canonical key of a header name as it arrived, read as the parser reads it
    (:class:`SIPParseError` when it is not a token): for a scan that reads lines itself."""
    return _field_key(raw_name, raw_name, None)


def _read_fields(
    lines: list[str], headers: Headers, partial: Request | None, may_have_ctl: bool
) -> None:
    """Header lines into ``headers``, unfolding continuation lines (RFC 3261 §7.3.1).

    ``may_have_ctl`` False: the whole section was found free of control characters, so no
    value needs checking one by one.
    """
    items = headers._items
    current_key: str | None = None
    current_value: list[str] = []
    for line in lines:
        if line[:1] in (" ", "\t"):
            if current_key is None:
                raise SIPParseError("continuation line before any header", partial)
            current_value.append(line.strip())
            continue
        if current_key is not None:
            items.append((current_key, " ".join(current_value)))
        line = line.rstrip("\r")
        if not line:
            current_key = None
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise SIPParseError(f"malformed header line {line[:40]!r}", partial)
        current_key = _field_key(name, line, partial)
        if may_have_ctl and _CTL_RE.search(value):
            raise SIPParseError("control character in header value", partial)
        current_value = [value.strip()]
    if current_key is not None:
        items.append((current_key, " ".join(current_value)))


def content_length(msg: Message) -> int | None:
    """The one reader of Content-Length, for the parser and the stream framer alike.

    None when absent. A second one (it is not a list header, RFC 3261 §7.3.1), even with the
    same value, or a value that is not a plain number is an error: on a stream, where the
    message ends could not be trusted (request smuggling).
    """
    values = msg.headers.get_all("content-length")
    if not values:
        return None
    if len(values) > 1:
        raise SIPParseError("more than one Content-Length", _as_partial(msg))
    raw = values[0].strip()
    if not is_number(raw) or len(raw) > 9:
        raise SIPParseError("bad Content-Length", _as_partial(msg))
    return int(raw)


def _as_partial(msg: Message) -> Request | None:
    return msg if isinstance(msg, Request) else None


class StreamFramer:
    """Cut a TCP/TLS byte stream into whole messages (RFC 3261 §18.3).

    Each header section is read by :func:`parse_head` and its length by
    :func:`content_length`, exactly as a datagram's would be. CRLFs between messages (RFC 5626
    keep-alive pings) are skipped. Anything that makes the end of a message uncertain is a
    framing error (:class:`SIPParseError`; :class:`MessageTooLarge` for a header section or
    declared body over ``max_size``): the stream cannot be resynchronised, so the framer
    stops there for good and the caller answers (when it can) and closes, as h11 does.
    """

    __slots__ = ("_buf", "_error", "_head", "_max", "keepalives")

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._max = max_size
        self.keepalives = 0
        self._head: tuple[Message, int, int] | None = None  # read, awaiting its body
        self._error: SIPParseError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """Whole messages' bytes, in order; a framing error is raised instead."""
        framed, error = self._frame(data)
        if error is not None:
            raise error
        return [raw for raw, _ in framed]

    def messages(self, data: bytes) -> tuple[list[Message], SIPParseError | None]:
        """Whole messages, parsed (each head read once), and the framing error that ends
        the stream after them, if any (then and on every later call)."""
        framed, error = self._frame(data)
        return [msg for _, msg in framed], error

    def _frame(self, data: bytes) -> tuple[list[tuple[bytes, Message]], SIPParseError | None]:
        if self._error is not None:
            return [], self._error
        self._buf += data
        out: list[tuple[bytes, Message]] = []
        try:
            while (framed := self._next()) is not None:
                out.append(framed)
        except SIPParseError as exc:
            self._error = exc
            self._buf.clear()
            self._head = None
        return out, self._error

    def _next(self) -> tuple[bytes, Message] | None:
        if self._head is None:
            self._skip_keepalives()
            self._head = self._read_head()
            if self._head is None:
                return None
        msg, body_at, total = self._head
        if len(self._buf) < total:
            return None
        self._head = None
        raw = bytes(self._buf[:total])
        del self._buf[:total]
        msg.body = raw[body_at:]
        return raw, msg

    def _skip_keepalives(self) -> None:
        start = 0
        while start < len(self._buf) and self._buf[start] in (0x0D, 0x0A):
            start += 1
        if start:
            self.keepalives += 1
            del self._buf[:start]

    def _read_head(self) -> tuple[Message, int, int] | None:
        """The next message's head, where its body starts and where it ends; None: not yet."""
        if not self._buf:
            return None
        found = _head_end(self._buf)
        if found is None:
            if len(self._buf) > self._max:
                raise MessageTooLarge("header section exceeds the size limit")
            return None
        end, sep = found
        msg = parse_head(bytes(self._buf[:end]))
        total = end + sep + (content_length(msg) or 0)
        if total > self._max:
            raise MessageTooLarge(f"message of {total} bytes exceeds {self._max}", _as_partial(msg))
        return msg, end + sep, total

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def incomplete(self) -> bool:
        """Part of a message has arrived and the rest has not (yet)."""
        return self._error is None and (self._head is not None or bool(self._buf))

    def give_up(self, reason: str) -> SIPParseError:
        """End the stream on a message that never completed (a Content-Length larger than
        what was sent, a header section never ended): the framing error to answer with,
        carrying the request's head when it was read, as every later call returns it."""
        partial = _as_partial(self._head[0]) if self._head is not None else None
        self._error = SIPParseError(reason, partial)
        self._buf.clear()
        self._head = None
        return self._error


def _partial_request(head: bytes) -> Request | None:
    """The request in a header section, when readable (to answer 400/513)."""
    try:
        msg = parse_head(head)
    except SIPParseError as exc:
        return exc.partial
    return _as_partial(msg)


# --- structured header values -------------------------------------------------------------


_SPLITTERS: dict[str, re.Pattern[str]] = {}


def _splitter(sep: str) -> re.Pattern[str]:
    """A run of quoted strings, ``<...>`` and plain characters, up to the next ``sep``."""
    rx = _SPLITTERS.get(sep)
    if rx is None:
        plain = re.escape(sep)
        # Runs of ordinary characters are taken whole, not one per alternation (the same
        # language, several times faster on a long Contact), and possessively (``++``,
        # ``*+``): an unterminated quote must fail at once, not after exponential backtracking.
        quoted = r'"(?:[^"\\]++|\\.)*+"'
        angle = r"<(?:[^\">]++|" + quoted + r")*+>?"
        rx = re.compile(r'(?:[^"<' + plain + r"]++|" + quoted + "|" + angle + r")*+", re.DOTALL)
        _SPLITTERS[sep] = rx
    return rx


def split_unquoted(s: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes (with backslash escapes) and ``<...>``."""
    if '"' not in s and "<" not in s:
        return s.split(sep)  # the common case (Via, plain params): no quoting to honour
    match = _splitter(sep).match
    out: list[str] = []
    pos, end_of_text = 0, len(s)
    while True:
        end = match(s, pos).end()  # type: ignore[union-attr]  # a * pattern always matches
        out.append(s[pos:end])
        if end >= end_of_text:
            return out
        if s[end] != sep:  # only an opening quote with no closing one stops the run
            raise SIPParseError("unterminated quoted string")
        pos = end + 1


Params = list[tuple[str, str | None]]


def parse_params(s: str) -> Params:
    """``;a=1;b;c="x;y"`` (leading ';' optional) → ordered (name, value) pairs."""
    out: Params = []
    if not s:
        return out  # most URIs and addresses have none
    names = _PARAM_NAMES
    for piece in split_unquoted(s, ";"):
        piece = piece.strip()
        if not piece:
            continue
        raw, sep, value = piece.partition("=")
        name = names.get(raw)
        if name is None:
            name = raw.strip()
            if not name or _BAD_PARAM_RE.search(name):
                raise SIPParseError(f"bad parameter {piece[:40]!r}")
            if len(names) < 4096:
                names[raw] = name
        out.append((name, value.strip() if sep else None))
    return out


#: Parameter names as they arrive → stripped, for names already found good: the same dozen
#: every time (branch, rport, tag, expires, +sip.instance...), each checked once.
_PARAM_NAMES: dict[str, str] = {}


def format_params(params: Params) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params)


def param(params: Sequence[tuple[str, str | None]], name: str) -> str | None:
    """The value of a parameter (case-insensitive name), unquoted; '' for a flag."""
    lname = name.lower()
    for k, v in params:
        if k.lower() == lname:
            return "" if v is None else unquote(v)
    return None


def params_by_name(params: Sequence[tuple[str, str | None]]) -> dict[str, str]:
    """Every parameter by lower-case name, read as :func:`param` reads it (unquoted, '' for a
    flag, the first of a name wins): for a caller that asks several, each name lowered once."""
    out: dict[str, str] = {}
    for k, v in params:
        out.setdefault(k.lower(), "" if v is None else unquote(v))
    return out


def has_param(params: Sequence[tuple[str, str | None]], name: str) -> bool:
    lname = name.lower()
    return any(k.lower() == lname for k, _ in params)


def unquote(v: str) -> str:
    if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        inner = v[1:-1]
        if "\\" not in inner:
            return inner
        out: list[str] = []
        escaped = False
        for ch in inner:
            if escaped:
                out.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            else:
                out.append(ch)
        return "".join(out)
    return v


def quote(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Via:
    transport: str  # upper case: UDP, TCP, TLS
    host: str
    port: int | None
    params: tuple[tuple[str, str | None], ...]

    @property
    def branch(self) -> str | None:
        return param(self.params, "branch")

    def with_params(self, params: Params) -> Via:
        return Via(self.transport, self.host, self.port, tuple(params))

    def __str__(self) -> str:
        hostport = self.host if self.port is None else f"{self.host}:{self.port}"
        return f"SIP/2.0/{self.transport} {hostport}{format_params(list(self.params))}"


def parse_via(value: str) -> Via:
    """One Via value: ``SIP/2.0/UDP host[:port];params``."""
    proto, _, rest = value.strip().partition(" ")
    bits = proto.split("/")
    if len(bits) != 3 or bits[0].strip().upper() != "SIP" or not bits[2].strip():
        raise SIPParseError("bad Via protocol")
    rest = rest.strip()
    hostport, _, params = rest.partition(";")
    host, port = _split_hostport(hostport.strip())
    return Via(bits[2].strip().upper(), host, port, tuple(parse_params(params)))


def _split_hostport(hp: str) -> tuple[str, int | None]:
    if not hp:
        raise SIPParseError("empty host")
    if hp.startswith("["):
        end = hp.find("]")
        if end < 0:
            raise SIPParseError("bad IPv6 reference")
        host, rest = hp[: end + 1], hp[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise SIPParseError("bad host:port")
        port_s = rest[1:]
    else:
        host, sep, port_s = hp.partition(":")
        if not sep:
            port_s = ""
        if not host:
            raise SIPParseError("empty host")
        if sep and not port_s:
            raise SIPParseError("empty port")
    if _BAD_HOST_RE.search(host):
        raise SIPParseError("bad host")
    if not port_s:
        return host, None
    if not is_number(port_s) or len(port_s) > 5 or not 0 < int(port_s) < 65536:
        raise SIPParseError("bad port")
    return host, int(port_s)


@dataclass(frozen=True)
class SipURI:
    scheme: str  # "sip" or "sips", lower case
    user: str | None
    host: str  # lower case
    port: int | None
    params: tuple[tuple[str, str | None], ...] = ()

    @property
    def aor(self) -> str:
        """The address-of-record form: ``sip:user@host`` without port or parameters."""
        return (
            f"{self.scheme}:{self.user}@{self.host}" if self.user else f"{self.scheme}:{self.host}"
        )

    def __str__(self) -> str:
        userinfo = f"{self.user}@" if self.user else ""
        port = "" if self.port is None else f":{self.port}"
        return f"{self.scheme}:{userinfo}{self.host}{port}{format_params(list(self.params))}"


def parse_uri(value: str) -> SipURI:
    """A sip: or sips: URI (RFC 3261 §19.1); password and ?headers are dropped."""
    v = value.strip()
    scheme, sep, rest = v.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in ("sip", "sips"):
        raise SIPParseError("not a sip: or sips: URI")
    rest = rest.split("?", 1)[0]
    user: str | None = None
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        user = _pct_decode(userinfo.split(":", 1)[0])
        if not user:
            raise SIPParseError("empty user part")
    hostport, _, params = rest.partition(";")
    host, port = _split_hostport(hostport)
    return SipURI(scheme, user, host.lower(), port, tuple(parse_params(params)))


def _pct_decode(s: str) -> str:
    if "%" not in s:
        return s
    out = bytearray()
    i = 0
    raw = s.encode("utf-8")
    while i < len(raw):
        if raw[i] == 0x25 and _ishex(raw[i + 1 : i + 3]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise SIPParseError("bad escape in user part") from None


def _ishex(b: bytes) -> bool:
    return len(b) == 2 and all(c in b"0123456789abcdefABCDEF" for c in b)


@dataclass(frozen=True, slots=True)
class NameAddr:
    """``"Display" <uri>;params`` or ``uri;params`` (From, To, Contact)."""

    display: str | None
    uri: str
    params: tuple[tuple[str, str | None], ...] = ()

    def param(self, name: str) -> str | None:
        return param(self.params, name)

    def with_params(self, params: Params) -> NameAddr:
        return NameAddr(self.display, self.uri, tuple(params))

    def __str__(self) -> str:
        display = f"{self.display} " if self.display else ""
        return f"{display}<{self.uri}>{format_params(list(self.params))}"


def parse_name_addr(value: str) -> NameAddr:
    v = value.strip()
    if not v:
        raise SIPParseError("empty address")
    lt = v.find("<")
    if lt > 0 and '"' in v[:lt]:
        lt = _find_unquoted(v, "<")  # a display name in quotes may hold a '<'
    if lt >= 0:
        gt = v.find(">", lt)
        if gt < 0:
            raise SIPParseError("unterminated <uri>")
        display = v[:lt].strip() or None
        uri = v[lt + 1 : gt].strip()
        params = v[gt + 1 :].strip()
        if params and not params.startswith(";"):
            raise SIPParseError("junk after <uri>")
    else:
        # addr-spec form: parameters after the URI belong to the header, not the URI.
        uri, _, params = v.partition(";")
        uri = uri.strip()
        display = None
        if _SPACE_RE.search(uri):
            raise SIPParseError("bad addr-spec")
    if not uri or ":" not in uri:
        raise SIPParseError("address without a URI scheme")
    return NameAddr(display, uri, tuple(parse_params(params)))


def _find_unquoted(s: str, ch: str) -> int:
    in_quote = False
    escaped = False
    for i, c in enumerate(s):
        if escaped:
            escaped = False
        elif in_quote and c == "\\":
            escaped = True
        elif c == '"':
            in_quote = not in_quote
        elif c == ch and not in_quote:
            return i
    return -1


WILDCARD = "*"


def parse_contact_list(headers: Headers) -> list[NameAddr] | str:
    """All Contact values: a list of addresses, or the string ``"*"`` for the lone wildcard.

    ``*`` mixed with anything else raises :class:`SIPParseError` (RFC 3261 §10.2.2).
    """
    values = headers.values("contact")
    if any(v.strip() == WILDCARD for v in values):
        if len(values) != 1:
            raise SIPParseError("Contact: * must be the only contact")
        return WILDCARD
    return [parse_name_addr(v) for v in values]


@dataclass(frozen=True)
class CSeq:
    number: int
    method: str


def parse_cseq(value: str) -> CSeq:
    parts = value.split()
    if len(parts) != 2 or not is_number(parts[0]) or len(parts[0]) > 10:
        raise SIPParseError("bad CSeq")
    number = int(parts[0])
    if number >= 2**31:
        raise SIPParseError("CSeq out of range")
    return CSeq(number, parts[1])


def response_to(
    request: Request, status: int, reason: str = "", to_tag: str | None = None
) -> Response:
    """A response skeleton copying Via, From, To, Call-ID and CSeq (RFC 3261 §8.2.6.2)."""
    headers = Headers()
    for key, value in request.headers:
        if key in ("via", "from", "call-id", "cseq"):
            headers._items.append((key, value))
        elif key == "to":
            if to_tag is not None and ";tag=" not in value.replace(" ", "").lower():
                value = f"{value};tag={to_tag}"
            headers._items.append((key, value))
    return Response(status, reason or REASONS.get(status, ""), headers)
