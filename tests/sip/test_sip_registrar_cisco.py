"""The registrar answering Cisco firmware as CUCM does (protocol notes §10, §16), sans-I/O:
the 7821's REGISTER (Reason, Contact parameters, the multipart remotecc body), refreshes and
second lines, the keep-alive to a backup node, the alarm REFER, MD5 digest by default, and the
same exchange through the stream protocol over a StringTransport."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from callboard.protocols.sip.cisco import remotecc_register_body
from callboard.protocols.sip.digest import build_authorization, parse_challenge
from callboard.protocols.sip.message import Response, StreamFramer, parse_message
from callboard.protocols.sip.registrar import Registrar, Source
from callboard.protocols.sip.transports import SIPStreamProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, Logger, formatEvent

from .conftest import ACTIVE, ACTIVE_MAC, build_register  # type: ignore[import-not-found]
from .test_sip_cisco import CUCM_OPTIONSIND_ANSWER, DEVICE_TL_INFO  # type: ignore[import-not-found]

SRC = Source("udp", "192.0.2.50", 50057)
REASON = (
    'Reason: SIP;cause=200;text="cisco-alarm:23 Name=SEP001122334455 '
    'ActiveLoad=sip88xx.14-2-1-0001-14.loads InactiveLoad=sip88xx.12-8-1.loads Last=initialized"'
)
CONTACT = (
    "<sip:f0ae9f65-9fa6-4a32-84ba-4d40048f79c8@192.0.2.50:50057;transport=udp>"
    ';+sip.instance="<urn:uuid:00000000-0000-0000-0000-001122334455>"'
    ';+u.sip!devicename.ccm.cisco.com="SEP001122334455";+u.sip!model.ccm.cisco.com="683"'
)


def with_body(data: bytes, content_type: str, body: bytes, *headers: str) -> bytes:
    """Give a request built with ``Content-Length: 0`` a body (and more headers)."""
    end = b"Content-Length: 0\r\n\r\n"
    assert data.endswith(end)
    extra = "".join(f"{h}\r\n" for h in headers)
    head = f"{extra}Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return data[: -len(end)] + head.encode() + body


def cisco_register(**kw: Any) -> bytes:
    """The 7821's first REGISTER: Reason, the Cisco Supported list, the remotecc body."""
    content_type, body = remotecc_register_body()
    data = build_register(extra=(REASON,), **kw)
    return with_body(data, content_type, body, "Mime-Version: 1.0")


def send(reg: Registrar, data: bytes, source: Source = SRC) -> Response:
    reply = reg.handle_bytes(data, source)
    assert reply is not None
    msg = parse_message(reply.data)
    assert isinstance(msg, Response)
    return msg


def capture(reg: Registrar) -> list[LogEvent]:
    events: list[LogEvent] = []
    reg.log = Logger(namespace="test", observer=events.append)  # type: ignore[misc]
    return events


def test_first_register_answered_as_cucm(make_registrar: Any) -> None:
    reg = make_registrar()
    events = capture(reg)
    resp = send(reg, cisco_register())
    assert resp.status == 200
    assert resp.headers.get("date") == "Fri, 29 Mar 2019 00:31:26 GMT"
    assert resp.headers.get("expires") == "120"  # CUCM's keep-alive interval, not the 3600 asked
    assert resp.headers.get_all("contact") == [CONTACT + ";expires=3600;x-cisco-newreg"]
    assert resp.headers.get_all("supported") == ["X-cisco-srtp-fallback,X-cisco-sis-8.0.0"]
    assert resp.headers.get("content-type") == "application/x-cisco-remotecc-response+xml"
    assert resp.body == CUCM_OPTIONSIND_ANSWER
    assert reg.counters.remotecc_answers == 1 and reg.counters.registrations == 1
    # The Reason alarm is logged, for the policy's device.
    [said] = [e for e in events if "cisco-alarm" in e["log_format"]]
    assert formatEvent(said) == (
        "SIP SEP001122334455 reports cisco-alarm 23: name=SEP001122334455 "
        "active_load=sip88xx.14-2-1-0001-14 inactive_load=sip88xx.12-8-1 last=initialized"
    )


def test_refresh_and_second_line_are_not_new(make_registrar: Any, policy: Any) -> None:
    reg = make_registrar()
    assert "x-cisco-newreg" in send(reg, cisco_register(cseq=101)).headers.get_all("contact")[0]
    # A refresh (no body, as the phone sends it): no newreg, no body.
    refresh = send(reg, build_register(cseq=102))
    assert refresh.status == 200 and refresh.headers.get_all("contact") == [
        CONTACT + ";expires=3600"
    ]
    assert refresh.body == b"" and "content-type" not in refresh.headers
    # A refresh that asks for options again gets them, still without newreg.
    again = send(reg, cisco_register(cseq=103))
    assert again.body == CUCM_OPTIONSIND_ANSWER
    assert "x-cisco-newreg" not in again.headers.get_all("contact")[0]
    # The device's second line (digest: one MD5 challenge by default): not new either.
    first = send(reg, build_register(user="1002", call_id="line2", cseq=1))
    [challenge] = first.headers.get_all("www-authenticate")
    assert first.status == 401 and "algorithm=MD5" in challenge and 'qop="auth"' in challenge
    auth = build_authorization(
        parse_challenge([challenge]),
        method="REGISTER",
        uri="sip:192.0.2.10",
        username="a1002",
        password="pw",
    )
    second = send(
        reg, build_register(user="1002", call_id="line2", cseq=2, extra=(f"Authorization: {auth}",))
    )
    assert second.status == 200
    assert "x-cisco-newreg" not in second.headers.get_all("contact")[0]
    # While line 1002 holds a binding, line 1001 coming back is still not new...
    assert send(reg, build_register(contacts=["*"], expires=0, cseq=104)).status == 200
    back = send(reg, build_register(cseq=105)).headers.get_all("contact")
    assert back == [CONTACT + ";expires=3600"]


def test_new_again_once_every_binding_is_gone(make_registrar: Any, clock: Any) -> None:
    """...but once the device holds none (removed, or expired: a daemon restart looks the
    same), the next REGISTER is new again, which tells the phone to resend its state."""
    reg = make_registrar()
    assert send(reg, cisco_register(cseq=1)).headers.get_all("contact")[0].endswith("newreg")
    assert send(reg, build_register(contacts=["*"], expires=0, cseq=2)).status == 200
    assert send(reg, build_register(cseq=3)).headers.get_all("contact")[0].endswith("newreg")
    clock.advance(3601)
    reg.sweep()
    assert send(reg, build_register(cseq=4)).headers.get_all("contact")[0].endswith("newreg")


def test_reason_is_not_identity(make_registrar: Any, policy: Any) -> None:
    reg = make_registrar()
    events = capture(reg)
    lie = REASON.replace("Name=SEP001122334455", "Name=SEP999999999999")
    resp = send(reg, build_register(extra=(lie,)))
    assert resp.status == 200
    assert policy.seen[-1].device_name == ACTIVE and policy.seen[-1].mac == ACTIVE_MAC
    [b] = reg.bindings_for_device(ACTIVE)
    assert b.device_name == ACTIVE and reg.bindings_for_device("SEP999999999999") == []
    [said] = [e for e in events if "cisco-alarm" in e["log_format"]]
    assert said["device"] == ACTIVE and said["name"] == "SEP999999999999"


BAD_BODIES = [
    ("multipart/mixed", b"--b\r\n\r\nx\r\n--b--"),
    ("multipart/mixed; boundary=uniqueBoundary", b"--uniqueBoundary\r\n\r\nno close delimiter"),
    (
        "multipart/mixed; boundary=b",
        b"--b\r\nContent-Type: application/x-cisco-remotecc-request+xml\r\n\r\n"
        b"<x-cisco-remotecc-request><optionsind>\r\n--b--",
    ),
    (
        "multipart/mixed; boundary=b",
        b"--b\r\nContent-Type: application/x-cisco-remotecc-request+xml\r\n\r\n"
        b'<!DOCTYPE x [<!ENTITY a "a">]><x-cisco-remotecc-request/>\r\n--b--',
    ),
    ("application/x-cisco-remotecc-request+xml", b"<wrong-root/>"),
    ("not a media type", b"x"),
]


@pytest.mark.parametrize(("content_type", "body"), BAD_BODIES)
def test_malformed_body_is_400(
    make_registrar: Any, policy: Any, content_type: str, body: bytes
) -> None:
    reg = make_registrar()
    resp = send(reg, with_body(build_register(), content_type, body))
    assert resp.status == 400
    assert (resp.headers.get("warning") or "").startswith('399 callboard "REGISTER body: ')
    assert reg.binding_count() == 0 and policy.seen == []  # refused before anyone was asked


def test_other_bodies_are_ignored(make_registrar: Any) -> None:
    reg = make_registrar()
    resp = send(reg, with_body(build_register(), "application/sdp", b"v=0\r\n"))
    assert resp.status == 200 and resp.body == b""


def keepalive(**kw: Any) -> bytes:
    return build_register(
        contacts=[CONTACT.replace("f0ae9f65", "0badcafe") + ";expires=0;cisco-keep-alive"],
        expires=0,
        **kw,
    )


def test_keepalive_to_a_backup_removes_nothing(make_registrar: Any, clock: Any) -> None:
    reg = make_registrar()
    send(reg, cisco_register(cseq=101))
    [before] = reg.bindings_for_device(ACTIVE)
    clock.advance(30)
    resp = send(reg, keepalive(call_id="keepalive-1", cseq=5))
    assert resp.status == 200
    assert "contact" not in resp.headers and "expires" not in resp.headers and resp.body == b""
    [after] = reg.bindings_for_device(ACTIVE)
    assert after.expires_at == before.expires_at and after.contact == before.contact
    c = reg.counters
    assert (c.keepalives, c.unregistrations, c.registrations) == (1, 0, 1)
    # Even for a phone this node has never seen (it answers before the policy: nothing changes).
    unknown = keepalive(call_id="keepalive-2").replace(b"001122334455", b"00000000aaaa")
    assert send(reg, unknown).status == 200 and reg.binding_count() == 1
    # Without the marker, the same expires=0 is a removal (so the test above can fail).
    removal = build_register(contacts=[CONTACT + ";expires=0"], expires=0, cseq=102)
    assert send(reg, removal).status == 200 and reg.binding_count() == 0


def refer(
    *,
    content_type: str | None = "application/x-cisco-alarm+xml",
    body: bytes = DEVICE_TL_INFO,
    **kw: Any,
) -> bytes:
    headers = {
        "Require": "norefersub",
        "Referred-By": '"1001" <sip:1001@192.0.2.50>',
        "Refer-To": "cid:5098d8fa@192.0.2.50",
        "Content-Id": "<5098d8fa@192.0.2.50>",
        "Expires": "10",
    }
    headers.update({k: v for k, v in kw.items() if v is not None})
    drop = {k for k, v in kw.items() if v is None}
    lines = [
        "REFER sip:192.0.2.10 SIP/2.0",
        f"Via: SIP/2.0/TCP 192.0.2.50:50057;branch=z9hG4bK{os.urandom(4).hex()}",
        'From: "1001" <sip:1001@192.0.2.50>;tag=00112233445500122cd20b33-123852dd',
        "To: <sip:192.0.2.10>",
        "Call-ID: 00112233-44550006-1a48a291-451dd0ff@192.0.2.50",
        "CSeq: 1000 REFER",
        "Max-Forwards: 70",
        "User-Agent: Cisco-CP8841/12.8.1",
        "Contact: <sip:f0ae9f65@192.0.2.50:50057;transport=tcp>"
        ';+u.sip!devicename.ccm.cisco.com="SEP001122334455"',
        *(f"{k}: {v}" for k, v in headers.items() if k not in drop),
        *([f"Content-Type: {content_type}"] if content_type else []),
        "Content-Disposition: session;handling=required",
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


TCP = Source("tcp", "192.0.2.50", 50057)


def test_alarm_refer_accepted_logged_counted(make_registrar: Any, policy: Any) -> None:
    reg = make_registrar()
    events = capture(reg)
    resp = send(reg, refer(), TCP)
    assert resp.status == 202 and resp.reason == "Accepted"
    assert resp.headers.get("contact") == "<sip:192.0.2.10:5060;transport=tcp>"
    assert ";tag=" in (resp.headers.get("to") or "") and resp.headers.get("date")
    assert resp.headers.get("cseq") == "1000 REFER" and resp.body == b""
    snapshot = reg.counters_snapshot()
    assert snapshot["alarms"] == 1 and snapshot["refer"] == 1 and snapshot["bindings"] == 0
    assert policy.seen == []  # an alarm binds nothing and asks nothing
    [logged] = [e for e in events if "SIP alarm" in e["log_format"]]
    assert formatEvent(logged) == "SIP alarm DeviceTLInfo from SEPC80084AA8743: status=3"
    assert logged["contact_device"] == "SEP001122334455" and logged["parameters"] == 8
    # An alarm with a reason and loads shows them; one with neither, how much it carried.
    events.clear()
    lost = DEVICE_TL_INFO.replace(b'"StatusCode">3', b'"ReasonForOutOfService">14').replace(
        b'"IPv6Address">', b'"ActiveLoad">sip88xx.14-2-1'
    )
    assert send(reg, refer(body=lost), TCP).status == 202
    [logged] = [e for e in events if "SIP alarm" in e["log_format"]]
    assert formatEvent(logged).endswith(": reason=14 ActiveLoad=sip88xx.14-2-1")
    events.clear()
    bare = b'<x-cisco-alarm><Alarm Name="X"><ParameterList/></Alarm></x-cisco-alarm>'
    assert send(reg, refer(body=bare), TCP).status == 202
    [logged] = [e for e in events if "SIP alarm" in e["log_format"]]
    assert formatEvent(logged) == "SIP alarm X from SEP001122334455: 0 parameters"


@pytest.mark.parametrize(
    ("kw", "status", "check"),
    [
        ({"content_type": None, "body": b""}, 415, "accept"),
        ({"content_type": "application/sdp", "body": b"v=0"}, 415, "accept"),
        ({"content_type": "a;b"}, 415, "accept"),
        ({"body": b"<x-cisco-alarm><Alarm Name='x'>"}, 400, "warning"),
        ({"body": b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///x">]><x>&e;</x>'}, 400, "warning"),
        ({"body": b"<x-cisco-alarm/>"}, 400, "warning"),
        ({"Refer-To": None}, 400, "warning"),
        ({"Refer-To": "<sip:1002@192.0.2.10>"}, 400, "warning"),
        ({"Require": "norefersub, 100rel"}, 420, "unsupported"),
    ],
)  # fmt: skip
def test_refer_refused_clearly(
    make_registrar: Any, kw: dict[str, Any], status: int, check: str
) -> None:
    reg = make_registrar()
    resp = send(reg, refer(**kw), TCP)
    assert resp.status == status
    if check == "accept":
        assert resp.headers.get("accept") == "application/x-cisco-alarm+xml"
        assert reg.counters.unsupported_415 == 1
    elif check == "unsupported":
        assert resp.headers.get("unsupported") == "100rel"
    else:
        assert (resp.headers.get("warning") or "").startswith("399 callboard ")
    assert reg.counters.alarms == 0


def test_two_refer_to_is_400_and_other_methods_405(make_registrar: Any) -> None:
    reg = make_registrar()
    data = refer().replace(b"Refer-To:", b"Refer-To: cid:1@h\r\nRefer-To:", 1)
    assert send(reg, data, TCP).status == 400
    for method in ("SUBSCRIBE", "INVITE", "NOTIFY"):
        resp = send(reg, build_register(method=method))
        assert resp.status == 405 and resp.headers.get("allow") == "REGISTER, OPTIONS, REFER"


def test_the_exchange_over_a_stream(make_registrar: Callable[..., Registrar]) -> None:
    """REFER then REGISTER pipelined in odd-sized chunks: answered in order, on one stream."""
    reg = make_registrar()
    proto = SIPStreamProtocol(reg, "tcp")
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.50", 50057))
    proto.makeConnection(transport)
    data = refer() + cisco_register(transport="TCP") + build_register(transport="TCP", cseq=102)
    for i in range(0, len(data), 97):
        proto.dataReceived(data[i : i + 97])
    answers = [parse_message(raw) for raw in StreamFramer().feed(transport.value())]
    assert [a.status for a in answers if isinstance(a, Response)] == [202, 200, 200]
    _, first, refresh = answers
    assert isinstance(first, Response) and isinstance(refresh, Response)
    assert first.body == CUCM_OPTIONSIND_ANSWER
    assert first.headers.get_all("contact")[0].endswith(";x-cisco-newreg")
    assert not refresh.headers.get_all("contact")[0].endswith(";x-cisco-newreg")
    assert not transport.disconnecting and reg.counters.alarms == 1
