"""A minimal SDP (RFC 4566) reader and RFC 3264 answerer for one audio stream.

Only what a voice-prompt call needs: the ``c=`` address, the first ``m=audio`` stream with
its ``rtpmap``s, and the choice of G.711 (PCMU, else PCMA, in the offer's order) plus
``telephone-event/8000`` when offered. Errors carry the status to answer: an SDP that cannot
be read is 400, one with nothing we can speak is 488 (RFC 3261 §21.4.26).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

#: Static payload types of RFC 3551 that a phone may offer without an rtpmap.
STATIC = {0: ("PCMU", 8000), 8: ("PCMA", 8000)}
CODECS = ("PCMU", "PCMA")
MAX_SDP = 16 * 1024


class SDPError(ValueError):
    """An offer we refuse; ``status`` is the SIP answer (400 unreadable, 488 nothing common)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class MediaDescription:
    kind: str
    port: int
    proto: str
    formats: tuple[int, ...]
    rtpmap: dict[int, tuple[str, int]] = field(default_factory=dict)
    connection: str | None = None
    direction: str = "sendrecv"


@dataclass(frozen=True)
class SessionDescription:
    origin: str
    connection: str | None
    media: tuple[MediaDescription, ...]

    def audio(self) -> MediaDescription | None:
        return next((m for m in self.media if m.kind == "audio" and m.port != 0), None)


@dataclass(frozen=True)
class Agreement:
    """What both ends use: the remote RTP address, our codec and its payload type, and the
    telephone-event payload type (None when the phone offered none)."""

    remote_host: str
    remote_port: int
    codec: str
    payload_type: int
    event_payload_type: int | None
    direction: str


def parse_sdp(body: bytes) -> SessionDescription:
    if len(body) > MAX_SDP:
        raise SDPError(400, "SDP too large")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SDPError(400, "SDP is not UTF-8") from None
    lines = [ln.rstrip("\r") for ln in text.split("\n") if ln.strip()]
    if not lines or lines[0] != "v=0":
        raise SDPError(400, "SDP must start with v=0")
    origin = ""
    session_c: str | None = None
    media: list[dict[str, object]] = []
    session_direction = "sendrecv"
    for line in lines[1:]:
        if len(line) < 2 or line[1] != "=" or not line[0].isalpha():
            raise SDPError(400, "SDP line is not type=value")
        kind, value = line[0], line[2:].strip()
        target = media[-1] if media else None
        if kind == "o":
            origin = value
        elif kind == "c":
            address = _connection(value)
            if target is None:
                session_c = address
            else:
                target["c"] = address
        elif kind == "m":
            media.append(_media_line(value))
        elif kind == "a":
            name, _, rest = value.partition(":")
            if name in ("sendrecv", "sendonly", "recvonly", "inactive"):
                if target is None:
                    session_direction = name
                else:
                    target["direction"] = name
            elif name == "rtpmap" and target is not None:
                pt, mapping = _rtpmap(rest)
                rtpmap = target["rtpmap"]
                assert isinstance(rtpmap, dict)
                rtpmap[pt] = mapping
    return SessionDescription(
        origin,
        session_c,
        tuple(
            MediaDescription(
                kind=str(m["kind"]),
                port=int(str(m["port"])),
                proto=str(m["proto"]),
                formats=tuple(m["formats"]),  # type: ignore[arg-type]
                rtpmap=dict(m["rtpmap"]),  # type: ignore[call-overload]
                connection=m.get("c") or session_c,  # type: ignore[arg-type]
                direction=str(m.get("direction", session_direction)),
            )
            for m in media
        ),
    )


def _connection(value: str) -> str:
    bits = value.split()
    if len(bits) != 3 or bits[0] != "IN" or bits[1] not in ("IP4", "IP6"):
        raise SDPError(400, "bad c= line")
    address = bits[2].split("/")[0]
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise SDPError(400, "c= address is not an IP address") from None
    return address


def _media_line(value: str) -> dict[str, object]:
    bits = value.split()
    if len(bits) < 4:
        raise SDPError(400, "bad m= line")
    port = bits[1].split("/")[0]
    if not port.isdigit() or int(port) > 65535:
        raise SDPError(400, "bad m= port")
    formats: list[int] = []
    for f in bits[3:]:
        if f.isdigit() and int(f) < 128:
            formats.append(int(f))
        elif bits[2].startswith("RTP/"):
            raise SDPError(400, "bad RTP payload type in m=")
    return {"kind": bits[0], "port": int(port), "proto": bits[2], "formats": formats,
            "rtpmap": {}}  # fmt: skip


def _rtpmap(rest: str) -> tuple[int, tuple[str, int]]:
    pt, _, encoding = rest.strip().partition(" ")
    name, _, clock = encoding.strip().partition("/")
    clock = clock.split("/")[0]
    if not pt.isdigit() or int(pt) > 127 or not name or not clock.isdigit():
        raise SDPError(400, "bad a=rtpmap")
    return int(pt), (name, int(clock))


def negotiate(offer: SessionDescription) -> Agreement:
    """RFC 3264 §6: pick our codec from the offer's audio stream, or 488."""
    audio = offer.audio()
    if audio is None or audio.proto not in ("RTP/AVP", "RTP/SAVP", "RTP/AVPF"):
        raise SDPError(488, "no RTP audio stream offered")
    if audio.proto != "RTP/AVP":
        raise SDPError(488, "only plain RTP/AVP is supported")
    if audio.connection is None:
        raise SDPError(400, "no c= address for the audio stream")
    named = {pt: audio.rtpmap.get(pt) or STATIC.get(pt) for pt in audio.formats}
    codec_pt = next(
        (
            pt
            for pt in audio.formats
            if (m := named[pt]) and m[0].upper() in CODECS and m[1] == 8000
        ),
        None,
    )
    if codec_pt is None:
        raise SDPError(488, "no common codec (PCMU or PCMA)")
    event_pt = next(
        (
            pt
            for pt in audio.formats
            if (m := named[pt]) and m[0].lower() == "telephone-event" and m[1] == 8000
        ),
        None,
    )
    codec = named[codec_pt]
    assert codec is not None
    return Agreement(audio.connection, audio.port, codec[0].upper(), codec_pt, event_pt,
                     audio.direction)  # fmt: skip


_ANSWER_DIRECTION = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly",
                     "inactive": "inactive"}  # fmt: skip


def answer_sdp(
    agreement: Agreement, address: str, port: int, session_id: int, version: int = 1
) -> bytes:
    """Our answer: one audio stream with the chosen codec and telephone-event when offered."""
    family = "IP6" if ":" in address else "IP4"
    formats = [agreement.payload_type]
    attrs = [f"a=rtpmap:{agreement.payload_type} {agreement.codec}/8000"]
    if agreement.event_payload_type is not None:
        pt = agreement.event_payload_type
        formats.append(pt)
        attrs += [f"a=rtpmap:{pt} telephone-event/8000", f"a=fmtp:{pt} 0-15"]
    attrs += ["a=ptime:20", f"a={_ANSWER_DIRECTION.get(agreement.direction, 'sendrecv')}"]
    lines = [
        "v=0",
        f"o=callboard {session_id} {version} IN {family} {address}",
        "s=callboard",
        f"c=IN {family} {address}",
        "t=0 0",
        f"m=audio {port} RTP/AVP {' '.join(map(str, formats))}",
        *attrs,
    ]
    return ("\r\n".join(lines) + "\r\n").encode("ascii")
