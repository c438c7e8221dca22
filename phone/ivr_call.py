"""The emulated phone's activation call: dial the hotline, key the code, hear the answer.

With ``phone boot --ivr`` a phone that gets a bootstrap config (one "Activate" line, the
hotline dial template) does what a user at a stock SIP phone does: lift the handset (the
hotline dials the activation number), listen, key the code and ``#``. Here that is: the
bootstrap line's :class:`~callboard.phone.sip_ua.SipUserAgent` (already registered) sends
the INVITE on its own connection, with an SDP offer of G.711 and ``telephone-event``; the
200's answer names the IVR's RTP address; the code goes out as RFC 4733 events (the
:mod:`callboard.protocols.rtp` codec), each a few packets 20 ms apart with the end packet
sent three times; the IVR's prompts are received on our RTP socket and noted (arrival time,
sequence, silence or not); the server's BYE and its ``NOTIFY`` (``check-sync``, Cisco's
``service-control``) are answered 200. The boot then fetches its config again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from callboard.protocols.rtp.events import DIGITS, encode_event
from callboard.protocols.rtp.packet import RTPError, RTPPacket, parse_rtp
from callboard.protocols.sip.message import (
    Headers,
    Request,
    Response,
    SIPParseError,
    parse_name_addr,
)
from callboard.protocols.sip.sdp import SDPError, parse_sdp
from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol

from .sip_ua import SipRegistrationError, SipUserAgent

#: What G.711 silence looks like in each law (the IVR's frames between prompts).
_SILENCE = {0: 0xFF, 8: 0xD5}
EVENT_PT = 101
PACKET_INTERVAL = 0.020


@dataclass
class Heard:
    """One RTP packet from the IVR: when it came, its header, whether it was speech."""

    at: float
    sequence: int
    timestamp: int
    speech: bool


@dataclass
class VoiceCallResult:
    """How the activation call went (``detail`` is the boot step's line)."""

    ok: bool
    detail: str
    status: int | None = None  # the INVITE's final status
    codec: str = ""
    keys_sent: int = 0
    bye: bool = False  # the server hung up (after the confirmation)
    notify_events: list[str] = field(default_factory=list)  # check-sync, service-control
    heard: list[Heard] = field(default_factory=list)
    code_sent_at: float | None = None

    @property
    def speech_after_code(self) -> float:
        """Seconds of non-silent audio heard after the code was keyed (the answer)."""
        if self.code_sent_at is None:
            return 0.0
        return sum(0.02 for h in self.heard if h.speech and h.at > self.code_sent_at)


class _RTPSocket(DatagramProtocol):
    """Our end of the call's audio: notes the IVR's packets, sends our events."""

    def __init__(self, result: VoiceCallResult, now: Callable[[], float]) -> None:
        self.result = result
        self.now = now
        self.remote: tuple[str, int] | None = None
        self.first: defer.Deferred[None] = defer.Deferred()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            packet = parse_rtp(datagram)
        except RTPError:
            return
        silence = _SILENCE.get(packet.payload_type)
        speech = silence is None or packet.payload != bytes([silence]) * len(packet.payload)
        self.result.heard.append(Heard(self.now(), packet.sequence, packet.timestamp, speech))
        if not self.first.called:
            self.first.callback(None)

    def send(self, packet: RTPPacket) -> None:
        if self.transport is not None and self.remote is not None:
            self.transport.write(packet.to_bytes(), self.remote)


async def _sleep(reactor: Any, seconds: float) -> None:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


def _offer(host: str, port: int) -> bytes:
    lines = [
        "v=0", f"o=phone {int(time.time())} 1 IN IP4 {host}", "s=-", f"c=IN IP4 {host}",
        "t=0 0", f"m=audio {port} RTP/AVP 0 8 {EVENT_PT}", "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000", f"a=rtpmap:{EVENT_PT} telephone-event/8000",
        f"a=fmtp:{EVENT_PT} 0-15", "a=ptime:20", "a=sendrecv",
    ]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n").encode()


def _branch(req: Request) -> str:
    via = req.headers.get("via") or ""
    return next((p[len("branch=") :] for p in via.split(";") if p.startswith("branch=")), "")


def _answer_to(req: Request, status: int = 200) -> Response:
    resp = Response(status)
    for name in ("via", "from", "to", "call-id", "cseq"):
        for value in req.headers.get_all(name):
            resp.headers.add(name, value)
    return resp


class ActivationCall:
    """One call to the activation number from a registered bootstrap line."""

    def __init__(self, reactor: Any, ua: SipUserAgent, number: str, code: str, *,
                 timeout: float = 30.0) -> None:  # fmt: skip
        self.reactor = reactor
        self.ua = ua
        self.number = number
        self.code = code
        self.timeout = timeout
        self.result = VoiceCallResult(False, "")
        self.rtp = _RTPSocket(self.result, reactor.seconds)
        self.call_id = f"{os.urandom(8).hex()}@callboard-phone"
        self.tag = os.urandom(6).hex()
        self.bye: defer.Deferred[None] = defer.Deferred()
        self.remote_target = ""  # the IVR's Contact, once answered
        self.remote_to = ""  # its To, with its tag
        self.notified: defer.Deferred[None] = defer.Deferred()

    async def run(self) -> VoiceCallResult:
        local = self.ua.local_address
        if local is None:
            return self._failed("the bootstrap line's connection is gone")
        port = self.reactor.listenUDP(0, self.rtp, interface=local[0])
        self.ua.set_request_handler(self._request)
        try:
            return await self._call(local, port.getHost().port)
        except (SipRegistrationError, defer.TimeoutError) as exc:
            return self._failed(f"no answer: {exc or 'timed out'}")
        finally:
            self.ua.set_request_handler(None)
            await port.stopListening()

    def _failed(self, why: str) -> VoiceCallResult:
        self.result.ok = False
        self.result.detail = f"activation call to {self.number}: {why}"
        return self.result

    async def _call(self, local: tuple[str, int], rtp_port: int) -> VoiceCallResult:
        user = self.ua.line_users[0][0]
        server = f"{self.ua.host}:{self.ua.port}"
        transport = self.ua.transport
        target = f"sip:{self.number}@{server}"
        invite = Request("INVITE", target, Headers())
        h = invite.headers
        h.add("Via", f"SIP/2.0/{transport.upper()} {local[0]}:{local[1]};branch=z9hG4bK"
                     f"{os.urandom(6).hex()}")  # fmt: skip
        h.add("From", f"<sip:{user}@{self.ua.host}>;tag={self.tag}")
        h.add("To", f"<sip:{self.number}@{self.ua.host}>")
        h.add("Call-ID", self.call_id)
        h.add("CSeq", "1 INVITE")
        h.add("Max-Forwards", "70")
        h.add("Contact", f"<sip:{user}@{local[0]}:{local[1]};transport={transport}>")
        h.add("User-Agent", f"Cisco-CP{self.ua.model}/{self.ua.load}")
        h.add("Content-Type", "application/sdp")
        invite.body = _offer(local[0], rtp_port)
        ok = await self.ua.request(invite)
        self.result.status = ok.status
        if ok.status != 200:
            # A non-2xx final response is ACKed in its transaction (RFC 3261 §17.1.1.3).
            self._ack(ok, target, local, branch=_branch(invite))
            return self._failed(f"answered {ok.status} {ok.reason}")
        try:
            media = self._media(ok)
        except SDPError as exc:
            return self._failed(f"unusable SDP answer: {exc}")
        self.rtp.remote = media
        self._ack(ok, target, local)
        self.remote_to = ok.headers.get("to") or ""
        # Listen to the start of the prompt (a person waits for the voice), then key.
        heard = self.rtp.first
        heard.addTimeout(min(5.0, self.timeout), self.reactor)
        try:
            await heard
        except defer.TimeoutError:
            self._hang_up(local)
            return self._failed("answered, but no audio came from the IVR")
        await _sleep(self.reactor, 0.3)
        await self._key(self.code + "#")
        self.result.code_sent_at = self.reactor.seconds()
        bye = self.bye
        bye.addTimeout(self.timeout, self.reactor)
        try:
            await bye
        except defer.TimeoutError:
            self._hang_up(local)  # as a user would, at last
            return self._failed(f"keyed {self.result.keys_sent} keys; the IVR never hung up")
        notified = self.notified
        notified.addTimeout(min(5.0, self.timeout), self.reactor)
        try:
            await notified
        except defer.TimeoutError:
            return self._failed("the IVR hung up without telling the phone to resync")
        r = self.result
        r.ok = True
        r.detail = (
            f"called {self.number}: answered {r.codec}, {r.keys_sent} keys sent as RFC 4733 "
            f"events, heard {len(r.heard)} RTP packets ({r.speech_after_code:.1f} s of speech "
            f"after the code), BYE, NOTIFY {', '.join(r.notify_events)}"
        )
        return r

    def _media(self, ok: Response) -> tuple[str, int]:
        answer = parse_sdp(ok.body)
        audio = answer.audio()
        if audio is None or audio.connection is None or not audio.formats:
            raise SDPError(488, "no audio stream in the answer")
        codec = audio.rtpmap.get(audio.formats[0])
        self.result.codec = (
            codec[0]
            if codec
            else {0: "PCMU", 8: "PCMA"}.get(audio.formats[0], str(audio.formats[0]))
        )
        self.event_pt = next(
            (pt for pt, (name, _) in audio.rtpmap.items() if name.lower() == "telephone-event"),
            None,
        )
        if self.event_pt is None:
            raise SDPError(488, "the answer has no telephone-event")
        return audio.connection, audio.port

    def _hang_up(self, local: tuple[str, int]) -> None:
        """Our BYE (not waited for: the call is over for the phone either way)."""
        bye = Request("BYE", self.remote_target or f"sip:{self.number}@{self.ua.host}", Headers())
        h = bye.headers
        h.add("Via", f"SIP/2.0/{self.ua.transport.upper()} {local[0]}:{local[1]};branch=z9hG4bK"
                     f"{os.urandom(6).hex()}")  # fmt: skip
        h.add("From", f"<sip:{self.ua.line_users[0][0]}@{self.ua.host}>;tag={self.tag}")
        h.add("To", self.remote_to or f"<sip:{self.number}@{self.ua.host}>")
        h.add("Call-ID", self.call_id)
        h.add("CSeq", "2 BYE")
        h.add("Max-Forwards", "70")
        self.ua.send_message(bye)

    def _ack(self, ok: Response, target: str, local: tuple[str, int], branch: str = "") -> None:
        contact = ok.headers.get("contact")
        uri = target
        if branch:  # the ACK of a failure goes where the INVITE went
            contact = None
        if contact:
            try:
                uri = parse_name_addr(contact).uri
            except SIPParseError:
                uri = target
        self.remote_target = uri
        ack = Request("ACK", uri, Headers())
        h = ack.headers
        branch = branch or f"z9hG4bK{os.urandom(6).hex()}"
        h.add("Via", f"SIP/2.0/{self.ua.transport.upper()} {local[0]}:{local[1]};branch={branch}")
        h.add("From", f"<sip:{self.ua.line_users[0][0]}@{self.ua.host}>;tag={self.tag}")
        h.add("To", ok.headers.get("to") or f"<sip:{self.number}@{self.ua.host}>")
        h.add("Call-ID", self.call_id)
        h.add("CSeq", "1 ACK")
        h.add("Max-Forwards", "70")
        self.ua.send_message(ack)

    async def _key(self, keys: str) -> None:
        """Each key as one RFC 4733 event: two packets while held, the end packet three
        times (RFC 4733 §2.5.1.4), 20 ms apart; a new timestamp for each key."""
        assert self.event_pt is not None
        ssrc = int.from_bytes(os.urandom(4), "big")
        seq, stamp = int.from_bytes(os.urandom(2), "big"), int.from_bytes(os.urandom(3), "big")
        for key in keys:
            event = DIGITS.index(key)
            packets = [(False, 160), (False, 320), (True, 480), (True, 480), (True, 480)]
            for i, (end, duration) in enumerate(packets):
                payload = encode_event(event, end=end, duration=duration)
                self.rtp.send(RTPPacket(self.event_pt, seq & 0xFFFF, stamp & 0xFFFFFFFF, ssrc,
                                        payload, marker=i == 0))  # fmt: skip
                seq += 1
                await _sleep(self.reactor, PACKET_INTERVAL)
            stamp += 160 * 8  # the next key starts 160 ms of audio later
            self.result.keys_sent += 1
            await _sleep(self.reactor, 2 * PACKET_INTERVAL)

    def _request(self, req: Request) -> None:
        """The server's requests on our connection: its BYE ends the call; its NOTIFYs
        tell the phone to resync; anything else is answered, not acted on."""
        method = req.method.upper()
        if method == "BYE" and (req.headers.get("call-id") or "").strip() == self.call_id:
            self.ua.send_message(_answer_to(req))
            self.result.bye = True
            if not self.bye.called:
                self.bye.callback(None)
            return
        if method == "NOTIFY":
            self.ua.send_message(_answer_to(req))
            event = (req.headers.get("event") or "").split(";")[0].strip()
            self.result.notify_events.append(event)
            if event == "check-sync" and not self.notified.called:
                self.notified.callback(None)
            return
        self.ua.send_message(_answer_to(req, 200 if method == "OPTIONS" else 481))


async def activation_call(reactor: Any, ua: SipUserAgent, number: str, code: str, *,
                          timeout: float = 30.0) -> VoiceCallResult:  # fmt: skip
    """Call ``number`` from the registered bootstrap line of ``ua`` and key ``code`` + ``#``."""
    return await ActivationCall(reactor, ua, number, code, timeout=timeout).run()
