"""The SDP answerer and the user agent server behind the registrar's request-handler hook
(issue 14): unit tests on task.Clock, no sockets."""

from __future__ import annotations

import time
from typing import Any

import pytest
from callboard.protocols.sip.dialog import (
    CallRefused,
    Dialog,
    DialogServer,
    IncomingCall,
    MediaAddress,
)
from callboard.protocols.sip.message import Response, parse_message
from callboard.protocols.sip.registrar import PolicyDecision, Registrar, Reply, Source
from callboard.protocols.sip.sdp import SDPError, answer_sdp, negotiate, parse_sdp
from twisted.internet.task import Clock

OFFER = (
    "v=0\r\no=phone 1 1 IN IP4 192.0.2.5\r\ns=-\r\nc=IN IP4 192.0.2.5\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP {formats}\r\na=rtpmap:101 telephone-event/8000\r\n"
    "a=rtpmap:96 opus/48000/2\r\n"
)


def test_negotiate_prefers_the_offer_order_and_keeps_telephone_event() -> None:
    agreement = negotiate(parse_sdp(OFFER.format(formats="8 0 101").encode()))
    assert (agreement.codec, agreement.payload_type, agreement.event_payload_type) == (
        "PCMA",
        8,
        101,
    )
    assert (agreement.remote_host, agreement.remote_port) == ("192.0.2.5", 40000)
    answer = answer_sdp(agreement, "192.0.2.1", 30000, 7).decode()
    assert "m=audio 30000 RTP/AVP 8 101\r\n" in answer and "c=IN IP4 192.0.2.1" in answer
    assert "a=rtpmap:101 telephone-event/8000" in answer


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (OFFER.format(formats="96 101"), 488),  # opus only
        (OFFER.format(formats="18"), 488),
        (OFFER.format(formats="0").replace("RTP/AVP", "RTP/SAVP"), 488),
        ("v=0\r\nm=audio 1 RTP/AVP 0\r\n", 400),  # no c=
        ("hello", 400),
        ("v=0\r\nc=IN IP4 not-an-ip\r\n", 400),
        (OFFER.format(formats="0").replace("40000", "99999"), 400),
        ("v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 1 RTP/AVP 0\r\na=rtpmap:x PCMU\r\n", 400),
        ("v=0\r\nc=IN IP4 1.2.3.4\r\nm=video 1 RTP/AVP 31\r\n", 488),
        ("\xff", 400),
    ],
)
def test_bad_offers_carry_their_status(body: str, status: int) -> None:
    with pytest.raises(SDPError) as err:
        negotiate(parse_sdp(body.encode("latin-1")))
    assert err.value.status == status


class Handler:
    """What the UAS told the call handler (the adapter below implements the interface)."""

    def __init__(self) -> None:
        self.calls: list[IncomingCall] = []
        self.answered: list[Dialog] = []
        self.digits: list[str] = []
        self.ended: list[str] = []
        self.refuse: CallRefused | None = None

    def accept(self, call: IncomingCall) -> MediaAddress:
        if self.refuse:
            raise self.refuse
        self.calls.append(call)
        return MediaAddress("192.0.2.1", 30000)


class Policy:
    def decide(self, request: Any) -> PolicyDecision:
        return PolicyDecision.allow("x")


class Rig:
    """A registrar with the UAS plugged in; what goes out on the 'wire' is collected."""

    def __init__(self, transport: str = "udp") -> None:
        self.clock = Clock()
        self.handler = Handler()
        self.uas = DialogServer(_Adapter(self.handler), self.clock, answer_delay=0.5)
        self.registrar = Registrar(Policy(), now=self.clock.seconds, wall_now=time.time)
        self.registrar.request_handler = self.uas
        self.wire: list[Reply] = []
        self.source = Source(transport, "192.0.2.5", 5062, send=self.wire.append)

    def send(self, text: str, body: str = "") -> Response | None:
        data = text.replace("\n", "\r\n").encode() + body.encode()
        reply = self.registrar.handle_bytes(data, self.source)
        if reply is None:
            return None
        assert isinstance(reply, Reply)
        msg = parse_message(reply.data)
        assert isinstance(msg, Response)
        return msg

    def responses(self) -> list[Response]:
        out = []
        for r in self.wire:
            m = parse_message(r.data)
            if isinstance(m, Response):
                out.append(m)
        return out


class _Adapter:
    def __init__(self, h: Handler) -> None:
        self.h = h

    def accept(self, call: IncomingCall) -> MediaAddress:
        return self.h.accept(call)

    def answered(self, dialog: Dialog) -> None:
        self.h.answered.append(dialog)

    def digit(self, dialog: Dialog, digit: str) -> None:
        self.h.digits.append(digit)

    def ended(self, dialog: Dialog, why: str) -> None:
        self.h.ended.append(why)


def request(method: str, *, branch: str = "b1", to_tag: str = "", cseq: int = 1,
            ctype: str = "", body: str = "", call_id: str = "c1") -> str:  # fmt: skip
    tag = f";tag={to_tag}" if to_tag else ""
    lines = [
        f"{method} sip:activate@192.0.2.1:5060 SIP/2.0",
        f"Via: SIP/2.0/UDP 192.0.2.5:5062;branch=z9hG4bK{branch};rport",
        "From: <sip:bootstrap-00aabb112233@192.0.2.1>;tag=ph1",
        f"To: <sip:activate@192.0.2.1>{tag}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        "Contact: <sip:phone@192.0.2.5:5062>",
        "Max-Forwards: 70",
    ]
    if ctype:
        lines.append(f"Content-Type: {ctype}")
    lines.append(f"Content-Length: {len(body.encode())}")
    return "\n".join(lines) + "\n\n"


def invite(rig: Rig, formats: str = "0 8 101", **kw: Any) -> Response | None:
    body = OFFER.format(formats=formats)
    return rig.send(request("INVITE", ctype="application/sdp", body=body, **kw), body)


def answered_call(rig: Rig) -> str:
    assert invite(rig) is None
    rig.clock.advance(0.5)
    statuses = [r.status for r in rig.responses()]
    assert statuses == [100, 180, 200]
    ok = rig.responses()[-1]
    assert b"m=audio 30000 RTP/AVP 0 101" in ok.body
    assert ok.headers.get("content-type") == "application/sdp"
    tag = (ok.headers.get("to") or "").split("tag=")[1]
    assert rig.send(request("ACK", branch="ack", to_tag=tag)) is None
    assert len(rig.handler.answered) == 1
    return tag


def test_invite_ack_info_digits_and_bye() -> None:
    rig = Rig()
    tag = answered_call(rig)
    rig.clock.advance(10)  # the ACK came: no 200 retransmissions
    assert [r.status for r in rig.responses()] == [100, 180, 200]
    for i, (ctype, body) in enumerate(
        [("application/dtmf-relay", "Signal=5\r\nDuration=160\r\n"),
         ("application/dtmf-relay", "Signal=11\r\n"), ("application/dtmf", "*")], start=2
    ):  # fmt: skip
        resp = rig.send(request("INFO", branch=f"i{i}", to_tag=tag, cseq=i, ctype=ctype,
                                body=body), body)  # fmt: skip
        assert resp is not None and resp.status == 200
    assert rig.handler.digits == ["5", "#", "*"]
    bad = rig.send(request("INFO", branch="i9", to_tag=tag, cseq=9, ctype="text/plain", body="x"),
                   "x")  # fmt: skip
    assert bad is not None and bad.status == 415
    bye = rig.send(request("BYE", branch="bye", to_tag=tag, cseq=10))
    assert bye is not None and bye.status == 200
    assert rig.handler.ended == ["caller hung up"]
    again = rig.send(request("BYE", branch="bye2", to_tag=tag, cseq=11))
    assert again is not None and again.status == 481


def test_200_retransmitted_until_ack_then_bye_after_timeout() -> None:
    rig = Rig()
    invite(rig)
    rig.clock.advance(0.5)
    for _ in range(40):
        rig.clock.advance(1)
    oks = [r for r in rig.responses() if r.status == 200]
    assert 5 <= len(oks) <= 12
    byes = [parse_message(r.data) for r in rig.wire if r.data.startswith(b"BYE ")]
    assert byes and rig.handler.ended == ["no ACK"]


def test_cancel_before_answer_gives_487() -> None:
    rig = Rig()
    invite(rig)
    cancel = rig.send(request("CANCEL", cseq=1))
    assert cancel is not None and cancel.status == 200
    assert [r.status for r in rig.responses()] == [100, 180, 487]
    rig.clock.advance(5)
    assert [r.status for r in rig.responses()] == [100, 180, 487]  # never answered
    assert rig.handler.ended == ["cancelled"]
    late = rig.send(request("CANCEL", branch="zz", cseq=1))
    assert late is not None and late.status == 481


def test_reinvite_refused_politely_and_our_bye_is_retransmitted() -> None:
    rig = Rig()
    tag = answered_call(rig)
    body = OFFER.format(formats="0")
    re = rig.send(request("INVITE", branch="re", to_tag=tag, cseq=2, ctype="application/sdp",
                          body=body), body)  # fmt: skip
    assert re is not None and re.status == 488
    dialog = next(iter(rig.uas.dialogs.values()))
    rig.uas.hangup(dialog, "done")
    rig.clock.advance(0.5)
    rig.clock.advance(1.0)
    byes = [r for r in rig.wire if r.data.startswith(b"BYE sip:phone@192.0.2.5:5062 ")]
    assert len(byes) == 3  # sent, then retransmitted at T1 and 2·T1
    bye = parse_message(byes[0].data)
    branch = (bye.headers.get("via") or "").split("branch=")[1].split(";")[0]
    ok = (
        f"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch={branch}\r\n"
        f"From: {bye.headers.get('from')}\r\nTo: {bye.headers.get('to')}\r\n"
        f"Call-ID: c1\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n"
    )
    rig.registrar.handle_bytes(ok.encode(), rig.source)
    rig.clock.advance(10)
    assert len([r for r in rig.wire if r.data.startswith(b"BYE ")]) == 3
    assert not rig.clock.getDelayedCalls()


@pytest.mark.parametrize(("formats", "status"), [("96", 488), ("18 101", 488)])
def test_no_common_codec_is_488(formats: str, status: int) -> None:
    rig = Rig()
    resp = invite(rig, formats=formats)
    assert resp is not None and resp.status == status and rig.handler.calls == []


def test_malformed_sdp_is_400_and_no_offer_is_488() -> None:
    rig = Rig()
    resp = rig.send(request("INVITE", ctype="application/sdp", body="v=1"), "v=1")
    assert resp is not None and resp.status == 400
    resp = rig.send(request("INVITE", branch="b2", call_id="c2"))
    assert resp is not None and resp.status == 488


def test_refused_call_and_info_without_a_call() -> None:
    rig = Rig()
    rig.handler.refuse = CallRefused(403, "not allowed")
    resp = invite(rig)
    assert resp is not None and resp.status == 403
    assert "not allowed" in (resp.headers.get("warning") or "")
    info = rig.send(request("INFO", branch="x", to_tag="nope", ctype="application/dtmf", body="1"),
                    "1")  # fmt: skip
    assert info is not None and info.status == 481


def test_unknown_methods_405_and_the_registrar_keeps_405_without_a_handler() -> None:
    rig = Rig()
    resp = rig.send(request("MESSAGE"))
    assert resp is not None and resp.status == 405 and "INVITE" in (resp.headers.get("allow") or "")
    rig.registrar.request_handler = None
    resp = invite(rig, branch="b3")
    assert resp is not None and resp.status == 405
    assert rig.handler.calls == []


def test_a_flood_of_info_digits_is_answered_and_passed_on() -> None:
    rig = Rig()
    tag = answered_call(rig)
    for i in range(500):
        text = request("INFO", branch=f"f{i}", to_tag=tag, cseq=2 + i,
                       ctype="application/dtmf-relay", body="Signal=1")  # fmt: skip
        resp = rig.send(text, "Signal=1")
        assert resp is not None and resp.status == 200
    assert len(rig.handler.digits) == 500
