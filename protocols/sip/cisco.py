"""What Cisco SIP firmware adds to a REGISTER and sends beside it (sans-I/O, both sides).

Protocol notes §10 and §16 (TechNote 214535's 7821 trace, the CME bulk-registration guide):

- ``Reason: SIP;cause=200;text="cisco-alarm:23 Name=SEP… ActiveLoad=… InactiveLoad=… Last=…"``
  on a REGISTER: the phone's own account of itself and why it last restarted
  (:func:`parse_reason_alarm`). Informational: never used to decide who the phone is.
- A ``multipart/mixed`` body of ``application/x-cisco-remotecc-request+xml`` parts:
  ``<bulkregisterreq>`` (register every line at once; CUCM does not, and each line registers
  itself) and ``<optionsind>`` (the options the phone can use), read by
  :func:`read_remotecc_request`. CUCM answers the options it takes, in an
  ``application/x-cisco-remotecc-response+xml`` body of the 200 (:func:`optionsind_response`).
- The out-of-dialog ``REFER`` with an ``application/x-cisco-alarm+xml`` body
  (``<x-cisco-alarm><Alarm Name="DeviceTLInfo"><ParameterList>…``) that phones send before
  registering, read by :func:`parse_alarm`; CUCM answers ``202 Accepted``.

XML is parsed by :func:`parse_xml`: the standard library's expat, with a size limit, a depth
and element limit, and any DTD, entity declaration or undefined entity refused (so no entity
expansion and no external fetch: what defusedxml would refuse). Every malformed body raises
:class:`CiscoBodyError`, whose ``reason`` is the text of the 400 the registrar sends.

The emulated phone's side (what a 7821 sends, what it reads back) is here too, so both ends
share one description of the wire format: :func:`remotecc_register_body`,
:func:`device_tl_info_alarm`, :func:`format_reason_alarm`, :func:`parse_remotecc_response`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from xml.etree import ElementTree as ET
from xml.parsers import expat

from callboard.protocols.sip.message import (
    SIPParseError,
    param,
    parse_params,
    split_unquoted,
)
from callboard.protocols.sip.multipart import Part, build_multipart

REMOTECC_REQUEST = "application/x-cisco-remotecc-request+xml"
REMOTECC_RESPONSE = "application/x-cisco-remotecc-response+xml"
ALARM = "application/x-cisco-alarm+xml"
#: CUCM's ``Supported`` in a 200 to REGISTER (TechNote 214535).
CUCM_SUPPORTED = "X-cisco-srtp-fallback,X-cisco-sis-8.0.0"
#: What a 7821/88xx on 12.x puts in ``Supported`` (TechNote 214535).
PHONE_SUPPORTED = (
    "replaces,join,sdp-anat,norefersub,resource-priority,extended-refer,X-cisco-callinfo,"
    "X-cisco-serviceuri,X-cisco-escapecodes,X-cisco-service-control,X-cisco-srtp-fallback,"
    "X-cisco-monrec,X-cisco-config,X-cisco-sis-7.0.0,X-cisco-xsi-8.5.1"
)
#: The Contact parameter of a keep-alive REGISTER to a backup node (``expires=0`` beside it).
KEEPALIVE_PARAM = "cisco-keep-alive"

MAX_XML = 16 * 1024  # a 7821's bodies are under 1 KiB each
MAX_DEPTH = 16
MAX_ELEMENTS = 512
_SHOWN = 96  # characters of a phone-supplied value that reach a log line

_PRINTABLE_RE = re.compile(r"[^\x20-\x7e]")


class CiscoBodyError(ValueError):
    """A Cisco XML body that cannot be used; ``reason`` says why (the 4xx Warning text)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def shown(value: str | None, limit: int = _SHOWN) -> str | None:
    """A phone-supplied value made safe for a log line: printable ASCII, bounded length."""
    if value is None:
        return None
    clean = _PRINTABLE_RE.sub("?", value)
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


# --- safe XML ---------------------------------------------------------------------------------


def parse_xml(data: bytes, max_size: int = MAX_XML) -> ET.Element:
    """An XML document as an element tree, refusing what a hostile phone could abuse.

    Refused: more than ``max_size`` bytes, nesting deeper than :data:`MAX_DEPTH`, more than
    :data:`MAX_ELEMENTS` elements, any DOCTYPE (so no internal or external entities) and any
    undefined entity reference. Only the five predefined entities and character references
    are expanded.
    """
    if len(data) > max_size:
        raise CiscoBodyError(f"XML body of {len(data)} bytes exceeds {max_size}")
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    depth = 0
    elements = 0

    def refuse(*_: object) -> int:
        raise CiscoBodyError("XML with a DOCTYPE or entity declarations is refused")

    def start(tag: str, attrs: dict[str, str]) -> None:
        nonlocal depth, elements
        depth += 1
        elements += 1
        if depth > MAX_DEPTH:
            raise CiscoBodyError(f"XML nested deeper than {MAX_DEPTH}")
        if elements > MAX_ELEMENTS:
            raise CiscoBodyError(f"XML with more than {MAX_ELEMENTS} elements")
        builder.start(tag, attrs)

    def end(tag: str) -> None:
        nonlocal depth
        depth -= 1
        builder.end(tag)

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = builder.data
    try:
        # Leading blank lines are not XML, but harmless: phones and hand-written tests add them.
        parser.Parse(data.lstrip(b" \t\r\n"), True)
    except CiscoBodyError:
        raise
    except expat.ExpatError as exc:
        raise CiscoBodyError(f"malformed XML: {expat.ErrorString(exc.code)}") from None
    except (ValueError, LookupError) as exc:  # a declared encoding Python has no codec for
        raise CiscoBodyError(f"unreadable XML: {exc}") from None
    root: ET.Element = builder.close()
    return root


# --- Reason: SIP;cause=200;text="cisco-alarm:…" ---------------------------------------------


@dataclass(frozen=True)
class ReasonAlarm:
    """The cisco-alarm a REGISTER's ``Reason`` carries (values as sent, ``.loads`` dropped)."""

    code: str
    name: str | None
    active_load: str | None
    inactive_load: str | None
    last: str | None


def parse_reason_alarm(values: Sequence[str]) -> ReasonAlarm | None:
    """The first ``Reason`` value whose text is a cisco-alarm; None when there is none or it
    cannot be read (it is information, not something to refuse a REGISTER for)."""
    for value in values:
        try:
            pieces = split_unquoted(value, ",")
        except SIPParseError:
            continue
        for piece in pieces:
            alarm = _reason_piece(piece)
            if alarm is not None:
                return alarm
    return None


def _reason_piece(piece: str) -> ReasonAlarm | None:
    protocol, _, rest = piece.strip().partition(";")
    if protocol.strip().upper() != "SIP":
        return None
    try:
        text = param(parse_params(rest), "text")
    except SIPParseError:
        return None
    if text is None or not text.lower().startswith("cisco-alarm:"):
        return None
    code, _, rest = text[len("cisco-alarm:") :].strip().partition(" ")
    fields: dict[str, str] = {}
    for word in rest.split():
        key, sep, val = word.partition("=")
        if sep and key and key not in fields:
            fields[key] = val
    return ReasonAlarm(
        code=code,
        name=fields.get("Name"),
        active_load=_load_name(fields.get("ActiveLoad") or fields.get("Load")),
        inactive_load=_load_name(fields.get("InactiveLoad")),
        last=fields.get("Last"),
    )


def _load_name(raw: str | None) -> str | None:
    """``sip78xx.12-1-1-12.loads`` → ``sip78xx.12-1-1-12`` (as the usecallmanager patch)."""
    if not raw:
        return None
    return raw[: -len(".loads")] if raw.lower().endswith(".loads") else raw


def format_reason_alarm(name: str, active_load: str, inactive_load: str, last: str) -> str:
    """The ``Reason`` value a 7821 on 12.x sends on its first REGISTER after a restart."""
    return (
        f'SIP;cause=200;text="cisco-alarm:23 Name={name} ActiveLoad={_loads(active_load)} '
        f'InactiveLoad={_loads(inactive_load)} Last={last}"'
    )


def _loads(load: str) -> str:
    return load if load.lower().endswith(".loads") else f"{load}.loads"


# --- remotecc in REGISTER ---------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteccRequest:
    """The remotecc parts of a REGISTER body."""

    bulk_register: bool
    optionsind: ET.Element | None  # the phone's ``<optionsind>``, when it sent one


def read_remotecc_request(parts: Sequence[Part]) -> RemoteccRequest | None:
    """What the ``application/x-cisco-remotecc-request+xml`` parts ask; None without any."""
    seen = False
    bulk = False
    optionsind: ET.Element | None = None
    for part in parts:
        if part.content_type != REMOTECC_REQUEST:
            continue
        seen = True
        root = parse_xml(part.body)
        if root.tag != "x-cisco-remotecc-request":
            raise CiscoBodyError(f"remotecc request part with a <{shown(root.tag, 40)}> root")
        for child in root:
            if child.tag == "bulkregisterreq":
                bulk = True
            elif child.tag == "optionsind" and optionsind is None:
                optionsind = child
    return RemoteccRequest(bulk, optionsind) if seen else None


#: The options CUCM takes, in the order and spelling of its answer (TechNote 214535): each is
#: answered only when the phone offered it.
_CUCM_DIALOG_USAGES = ("hook status", "shared line")
_CUCM_PRESENCE_USAGES = ("blf speed dial",)
_COMBINE_MAX = 6


def optionsind_response(offered: ET.Element) -> bytes:
    """CUCM's ``x-cisco-remotecc-response`` to an optionsind: code 200 and the offered options
    it takes (combined remotecc status and service-control, unsolicited NOTIFY for hook status,
    shared line and BLF presence, join, ix, bfcp). Ignores what it does not know, as CME does.
    """
    options: list[str] = []
    combine = offered.find("combine")
    if combine is not None:
        inner = []
        if combine.find("remotecc/status") is not None:
            inner.append("<remotecc><status/></remotecc>")
        if combine.find("service-control") is not None:
            inner.append("<service-control/>")
        if inner:
            options += [f'<combine max="{_combine_max(combine.get("max"))}">', *inner, "</combine>"]
    for kind, usages in (("dialog", _CUCM_DIALOG_USAGES), ("presence", _CUCM_PRESENCE_USAGES)):
        for usage in usages:
            for el in offered.findall(kind):
                if el.get("usage") == usage and el.find("unot") is not None:
                    options.append(f'<{kind} usage="{usage}"><unot/></{kind}>')
                    break
    if offered.find("joinreq") is not None:
        options.append("<joinreq></joinreq>")
    for flag in ("ix", "bfcp"):
        if offered.find(flag) is not None:
            options.append(f"<{flag}/>")
    lines = [
        "<x-cisco-remotecc-response>",
        "<response>",
        "<code>200</code>",
        "<optionsind>",
        *options,
        "</optionsind>",
        "</response>",
        "</x-cisco-remotecc-response>",
    ]
    # CUCM's body ends in LF CR LF: 381 bytes for a 7821's offer, as in TechNote 214535.
    return ("\n".join(lines) + "\n\r\n").encode("ascii")


def _combine_max(raw: str | None) -> int:
    """The phone's ``max``, capped at CUCM's 6 (a bad value reads as 6)."""
    if raw is None or not raw.strip().isascii() or not raw.strip().isdigit():
        return _COMBINE_MAX
    return max(1, min(int(raw.strip()), _COMBINE_MAX))


@dataclass(frozen=True)
class RemoteccResponse:
    """What the emulated phone reads in a 200's remotecc body."""

    code: int | None
    options: tuple[str, ...]  # the optionsind children's tags, with ``usage`` where given


def parse_remotecc_response(body: bytes) -> RemoteccResponse:
    root = parse_xml(body)
    if root.tag != "x-cisco-remotecc-response":
        raise CiscoBodyError(f"remotecc response with a <{shown(root.tag, 40)}> root")
    code_text = (root.findtext("response/code") or "").strip()
    code = int(code_text) if code_text.isascii() and code_text.isdigit() else None
    options: list[str] = []
    for el in root.findall("response/optionsind/*"):
        usage = el.get("usage")
        options.append(f"{el.tag}:{usage}" if usage else el.tag)
    return RemoteccResponse(code, tuple(options))


#: A 7821's optionsind and bulkregisterreq on 12.1.1, byte for byte (TechNote 214535: 856
#: and 184 bytes, a 1313-byte body).
_PHONE_OPTIONSIND = """<?xml version="1.0" encoding="UTF-8"?>
<x-cisco-remotecc-request>
  <optionsind>
    <combine max="6">
      <remotecc>
        <status></status>
      </remotecc>
      <service-control></service-control>
    </combine>
    <dialog usage="hook status">
      <unot></unot>
      <sub></sub>
    </dialog>
    <dialog usage="shared line">
      <unot></unot>
      <sub></sub>
    </dialog>
    <presence usage="blf speed dial">
      <unot></unot>
      <sub></sub>
    </presence>
    <joinreq></joinreq>
    <cfwdall-anyline></cfwdall-anyline>
    <coaching></coaching>
    <oosalarm></oosalarm>
    <rpid-orig-called></rpid-orig-called>
    <x-cisco-number></x-cisco-number>
    <bfcp></bfcp>
    <ix></ix>
    <gatewayrecording></gatewayrecording>
    <conferenceDisplayInstance></conferenceDisplayInstance>
  </optionsind>
</x-cisco-remotecc-request>"""

_PHONE_BULKREGISTER = """<?xml version="1.0" encoding="UTF-8"?>
<x-cisco-remotecc-request>
<bulkregisterreq>
<contact all="true">
<register></register>
</contact>
</bulkregisterreq>
</x-cisco-remotecc-request>
"""

PHONE_BOUNDARY = "uniqueBoundary"


def remotecc_register_body(boundary: str = PHONE_BOUNDARY) -> tuple[str, bytes]:
    """(Content-Type, body) of a 7821's first REGISTER: bulkregisterreq and optionsind."""
    fields = [
        ("Content-Type", REMOTECC_REQUEST),
        ("Content-Disposition", "session;handling=optional"),
    ]
    body = build_multipart(
        [(fields, _PHONE_BULKREGISTER.encode()), (fields, _PHONE_OPTIONSIND.encode())], boundary
    )
    return f"multipart/mixed; boundary={boundary}", body


# --- the alarm REFER ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CiscoAlarm:
    """One ``<x-cisco-alarm>``: its name and its parameters (name, text) in order."""

    name: str
    params: tuple[tuple[str, str], ...]

    def get(self, name: str) -> str | None:
        return next((v for k, v in self.params if k == name), None)

    @property
    def device_name(self) -> str | None:
        return self.get("DeviceName")

    @property
    def status(self) -> str | None:
        return self.get("StatusCode") or self.get("Status")

    @property
    def reason(self) -> str | None:
        return self.get("ReasonForOutOfService") or self.get("Reason")

    @property
    def loads(self) -> tuple[tuple[str, str], ...]:
        """Parameters naming firmware loads (ActiveLoad, InactiveLoad, LoadId, …)."""
        return tuple((k, v) for k, v in self.params if "load" in k.lower() and v)


def parse_alarm(body: bytes) -> CiscoAlarm:
    """``<x-cisco-alarm><Alarm Name="…"><ParameterList><String name="…">…`` (String, Enum, …
    elements alike: any child of ParameterList with a ``name``)."""
    root = parse_xml(body)
    if root.tag != "x-cisco-alarm":
        raise CiscoBodyError(f"alarm body with a <{shown(root.tag, 40)}> root")
    alarm = root.find("Alarm")
    name = alarm.get("Name") if alarm is not None else None
    if alarm is None or not name:
        raise CiscoBodyError("alarm body without <Alarm Name=...>")
    params = tuple(
        (p.get("name", ""), (p.text or "").strip())
        for p in alarm.findall("ParameterList/*")
        if p.get("name")
    )
    return CiscoAlarm(name, params)


def device_tl_info_alarm(
    device_name: str,
    ipv4: str,
    *,
    itl_signature: str | None = None,
    itl_tftp_server: str | None = None,
    ctl_signature: str | None = None,
    ctl_tftp_server: str | None = None,
    status_code: int = 3,
) -> bytes:
    """The DeviceTLInfo alarm a 7821 REFERs before registering (TechNote 214535): the trust
    lists it holds, by signature (hex bytes, space-separated) and TFTP server."""

    def esc(text: str) -> str:
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    strings = [
        ("DeviceName", device_name),
        ("IPv4Address", ipv4),
        ("IPv6Address", ""),
        ("CTL_Signature", ctl_signature or "Not Installed"),
        ("CTL_TFTP_Server", ctl_tftp_server or "N/A"),
        ("ITL_Signature", itl_signature or "Not Installed"),
        ("ITL_TFTP_Server", itl_tftp_server or "N/A"),
        ("StatusCode", str(status_code)),
    ]
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        "<x-cisco-alarm>",
        '<Alarm Name="DeviceTLInfo">',
        "<ParameterList>",
        *(f'<String name="{k}">{esc(v)}</String>' for k, v in strings),
        "</ParameterList>",
        "</Alarm>",
        "</x-cisco-alarm>",
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")
