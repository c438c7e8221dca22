"""One scan over the bytes of a common REGISTER: the lines the registrar needs, or None.

The general parser (:func:`~callboard.protocols.sip.message.parse_message`) builds a
:class:`~callboard.protocols.sip.message.Request` with an indexed header map, which the
registrar then asks a dozen times; for the REGISTER every phone sends every few minutes
that costs more than answering it. :func:`scan_register` reads that one shape straight from
the datagram: a ``REGISTER ... SIP/2.0`` request line, CRLF line ends, one Via, one
Contact (no list, no wildcard), no body, each header it reads present once, in ASCII. It
gives up (None) on anything else — folding, a tab, a control character, a header it does
not read but that matters to a REGISTER (Authorization, Require, Reason, a body's
Content-Type...), a duplicate, a number out of the shape — and the caller then takes the
general path, unchanged. It never raises, and never judges what the general path would
refuse: anything it would answer with an error is left to it.

Values come out as the general parser would give them (stripped), the header names as it
would key them (:func:`~callboard.protocols.sip.message.field_key`), so an answer built from
them is the general path's answer, byte for byte (``tests/sip/test_sip_lean.py`` holds the
two to it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from callboard.protocols.sip.message import (
    CANONICAL_NAMES,
    SIPParseError,
    field_key,
    is_number,
)

#: The headers a response copies from its request (RFC 3261 §8.2.6.2), each with the way a
#: response writes its name.
COPIED = {key: CANONICAL_NAMES[key] + ": " for key in ("via", "from", "to", "call-id", "cseq")}
#: Headers read once each; a second one sends the request down the general path.
_SINGLE = COPIED.keys() | {"contact", "expires", "max-forwards", "content-length", "user-agent"}
#: Headers that change what a REGISTER gets (credentials, extensions, a body, an alarm):
#: the general path reads them.
_UNUSUAL = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "require",
        "proxy-require",
        "reason",
        "content-type",
        "content-encoding",
    }
)
#: The control characters a line may not hold, tabs included (the general parser refuses
#: most of them and reads tabs its own way: left to it), CR and LF among them: once the
#: CRLF pairs are taken out, none may be left.
_CONTROLS = bytes([*range(0x20), 0x7F])
_START = "REGISTER "
_VERSION = " SIP/2.0"


@dataclass(slots=True)
class RegisterLines:
    """What a common REGISTER says, each value stripped as the general parser strips it.

    ``fields`` holds the fields read by key, in the order they came: a response repeats
    the Via, From, To, Call-ID and CSeq ones (:data:`COPIED`) in that order.
    """

    uri: str
    fields: dict[str, str]
    via: str
    to: str
    call_id: str
    cseq: int
    contact: str
    expires: int | None  # the Expires header (capped as the registrar caps it)
    user_agent: str | None


def scan_register(data: bytes, max_size: int) -> RegisterLines | None:
    """The lines of a common REGISTER datagram; None for anything else."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 != len(data) or len(data) > max_size or not data.isascii():
        return None  # a body, no blank line, too large, not ASCII
    head = data[:end]
    unpaired = head.replace(b"\r\n", b"")
    if len(unpaired.translate(None, _CONTROLS)) != len(unpaired):
        return None  # a control character, or a CR or LF outside a CRLF pair
    lines = head.decode("ascii").split("\r\n")
    start = lines[0]
    if not (start.startswith(_START) and start.endswith(_VERSION)):
        return None
    uri = start[len(_START) : -len(_VERSION)]
    if not uri or " " in uri:
        return None
    fields = _fields(lines)
    if fields is None:
        return None
    return _register_lines(uri, fields)


def _fields(lines: list[str]) -> dict[str, str] | None:
    """The header fields the registrar reads, by key, in arrival order; None when one is
    unusual, repeated, folded or malformed."""
    fields: dict[str, str] = {}
    keys = _KEYS
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or line[0] == " ":
            return None
        key = keys.get(name) or _key(name)
        if key in _SINGLE:
            if key in fields:
                return None
            fields[key] = value.strip()
        elif not key or key in _UNUSUAL:
            return None
    return fields


#: Field names as they arrive → their key ("": not a token), the dozen a phone sends
#: looked up once.
_KEYS: dict[str, str] = {}


def _key(name: str) -> str:
    try:
        key = field_key(name)
    except SIPParseError:
        key = ""
    if len(_KEYS) < 4096:
        _KEYS[name] = key
    return key


def _register_lines(uri: str, fields: dict[str, str]) -> RegisterLines | None:
    """The fields checked for the common shape: every one needed, numbers as numbers."""
    via, to, contact = fields.get("via"), fields.get("to"), fields.get("contact")
    call_id, cseq = fields.get("call-id"), fields.get("cseq")
    if not (via and to and contact and call_id and cseq and "from" in fields):
        return None
    if "," in via or "," in contact or contact == "*":
        return None  # a list of Vias or contacts
    number, _, method = cseq.partition(" ")
    if method != "REGISTER" or not is_number(number) or len(number) > 10:
        return None
    if int(number) >= 2**31:
        return None
    if fields.get("content-length", "0") != "0":
        return None
    hops = fields.get("max-forwards")
    if hops is not None and not (is_number(hops) and int(hops) > 0):
        return None
    expires = fields.get("expires")
    if expires is not None and not is_number(expires):
        return None
    return RegisterLines(
        uri=uri,
        fields=fields,
        via=via,
        to=to,
        call_id=call_id,
        cseq=int(number),
        contact=contact,
        expires=None if expires is None else min(int(expires), 2**32 - 1),
        user_agent=fields.get("user-agent"),
    )


# --- the common shapes of To and Contact, each read by one regular expression -------------
#
# What :func:`~callboard.protocols.sip.message.parse_name_addr` and ``parse_uri`` would give
# for them, read without splitting, stripping and checking piece by piece; anything else
# (a display name, spaces, escapes, a port in the To...) gives None and the caller uses
# those general readers.

_TOKEN = r"[A-Za-z0-9.!%*_+`'~-]+"
_PLAIN_TO_RE = re.compile(
    r"<sip:([A-Za-z0-9._~!*'()+-]+)@([A-Za-z0-9.-]+)>(?:;tag=" + _TOKEN + ")?"
)
_QUOTED = r'[^"\\\x00-\x1f]*'  # inside the quotes: no escapes, no controls
_WORD = r"[A-Za-z0-9.!%*_+`'~:/\[\]-]+"
_VALUE = f'(?:"{_QUOTED}"|{_WORD})'
_PLAIN_CONTACT_RE = re.compile(r'<(sip:[^\s<>"]+)>((?:;' + _TOKEN + "(?:=" + _VALUE + ")?)*)")
#: One parameter: its name, then its value unquoted (a quoted one) or as written.
_PARAM_RE = re.compile(f';({_TOKEN})(?:=(?:"({_QUOTED})"|({_WORD})))?')


def read_plain_to(value: str) -> tuple[str, str] | None:
    """``<sip:user@host>`` (perhaps with a tag): its user and its AoR (``sip:user@host``,
    the host in lower case); None for any other form."""
    m = _PLAIN_TO_RE.fullmatch(value)
    if m is None:
        return None
    user = m.group(1)
    return user, f"sip:{user}@{m.group(2).lower()}"


def read_plain_contact(value: str) -> tuple[str, dict[str, str]] | None:
    """``<sip:...>;name=value;name="quoted";flag``: its URI and its parameters by lower-case
    name, as ``parse_name_addr`` and ``params_by_name`` read them (no address object made:
    the binding keeps ``value`` itself, which is what ``str()`` of that address gives); None
    for any other form."""
    m = _PLAIN_CONTACT_RE.fullmatch(value)
    if m is None:
        return None
    named: dict[str, str] = {}
    # A flag reads "", as ``=""`` does; a quoted value holds no escape to undo.
    for name, quoted, word in _PARAM_RE.findall(m.group(2)):
        named.setdefault(name.lower(), quoted or word)
    return m.group(1), named
