"""Cisco's SIP bodies and headers (protocols/sip/cisco.py) against TechNote 214535's 7821 trace:
the Reason alarm, remotecc optionsind and its CUCM answer, the alarm REFER body, and the XML
parser that refuses what a hostile phone could abuse."""

from __future__ import annotations

import contextlib
import os

import pytest
from callboard.protocols.sip.cisco import (
    MAX_ELEMENTS,
    CiscoBodyError,
    device_tl_info_alarm,
    format_reason_alarm,
    optionsind_response,
    parse_alarm,
    parse_reason_alarm,
    parse_remotecc_response,
    parse_xml,
    read_remotecc_request,
    remotecc_register_body,
    shown,
)
from callboard.protocols.sip.multipart import body_parts
from hypothesis import given, settings
from hypothesis import strategies as st

#: CUCM 11.5's 200 body to a 7821 on 12.1.1, as the TechNote's phone log shows it.
CUCM_OPTIONSIND_ANSWER = (
    b"<x-cisco-remotecc-response>\n<response>\n<code>200</code>\n<optionsind>\n"
    b'<combine max="6">\n<remotecc><status/></remotecc>\n<service-control/>\n</combine>\n'
    b'<dialog usage="hook status"><unot/></dialog>\n'
    b'<dialog usage="shared line"><unot/></dialog>\n'
    b'<presence usage="blf speed dial"><unot/></presence>\n'
    b"<joinreq></joinreq>\n<ix/>\n<bfcp/>\n</optionsind>\n</response>\n"
    b"</x-cisco-remotecc-response>\n\r\n"
)

#: The trace's DeviceTLInfo alarm (line breaks as logged).
DEVICE_TL_INFO = b"""<?xml version="1.0" encoding="UTF-8"?>
<x-cisco-alarm>
<Alarm Name="DeviceTLInfo">
<ParameterList>
<String name="DeviceName">SEPC80084AA8743</String>
<String name="IPv4Address">192.168.7.104</String>
<String name="IPv6Address"></String>
<String name="CTL_Signature">Not Installed</String>
<String name="CTL_TFTP_Server">N/A</String>
<String name="ITL_Signature">1B A1 C9 07 E9 9E 4D 3C 53 9D C8 14 24 AF 6C 9F 7D CE 4D 6D </String>
<String name="ITL_TFTP_Server">cucm-115.home.lab</String>
<String name="StatusCode">3</String>
</ParameterList>
</Alarm>
</x-cisco-alarm>
"""


def test_reason_alarm_of_a_7821() -> None:
    value = (
        'SIP;cause=200;text="cisco-alarm:23 Name=SEPC80084AA8743 '
        "ActiveLoad=sip78xx.12-1-1-12.loads InactiveLoad=sip78xx.10-3-1-12.loads "
        'Last=reset-restart"'
    )
    alarm = parse_reason_alarm([value])
    assert alarm is not None
    assert (alarm.code, alarm.name, alarm.last) == ("23", "SEPC80084AA8743", "reset-restart")
    assert (alarm.active_load, alarm.inactive_load) == ("sip78xx.12-1-1-12", "sip78xx.10-3-1-12")
    assert (
        format_reason_alarm(
            "SEPC80084AA8743", "sip78xx.12-1-1-12", "sip78xx.10-3-1-12.loads", "reset-restart"
        )
        == value
    )


def test_reason_alarm_variants() -> None:
    # A 79xx on CME: Load= instead of ActiveLoad=; the Reason list may hold other reasons.
    old = parse_reason_alarm(
        [
            'Q.850;cause=16, SIP;cause=200;text="cisco-alarm:23 Name=SEP001B2A893698 '
            'Load=SIP70.8-4-2-30S Last=reset-restart"'
        ]
    )
    assert old is not None and old.active_load == "SIP70.8-4-2-30S" and old.inactive_load is None
    # Not a cisco-alarm, unreadable, or nothing at all: None (never a refusal).
    for values in (
        [],
        ['SIP;cause=200;text="hello"'],
        ['SIP;cause=200;text="cisco-alarm:23 Name=unterminated'],
        ["Q.850;cause=16"],
        ["SIP;cause=200;;=;text"],
    ):
        assert parse_reason_alarm(values) is None, values
    bare = parse_reason_alarm(['SIP;cause=200;text="cisco-alarm:23"'])
    assert bare is not None and bare.code == "23" and bare.name is bare.last is None


def test_optionsind_answer_is_cucms() -> None:
    content_type, body = remotecc_register_body()
    request = read_remotecc_request(body_parts(content_type, body))
    assert request is not None and request.bulk_register and request.optionsind is not None
    answer = optionsind_response(request.optionsind)
    assert answer == CUCM_OPTIONSIND_ANSWER and len(answer) == 381  # the trace's Content-Length
    parsed = parse_remotecc_response(answer)
    assert parsed.code == 200
    assert parsed.options == (
        "combine",
        "dialog:hook status",
        "dialog:shared line",
        "presence:blf speed dial",
        "joinreq",
        "ix",
        "bfcp",
    )


def test_optionsind_answers_only_what_was_offered() -> None:
    offered = parse_xml(
        b'<optionsind><combine max="9"><service-control/></combine>'
        b'<dialog usage="shared line"><sub/></dialog>'
        b'<presence usage="blf speed dial"><unot/></presence><bfcp/><mystery/></optionsind>'
    )
    answer = parse_remotecc_response(optionsind_response(offered))
    assert answer.options == ("combine", "presence:blf speed dial", "bfcp")
    text = optionsind_response(offered).decode()
    assert '<combine max="6">' in text and "<remotecc>" not in text
    empty = parse_remotecc_response(optionsind_response(parse_xml(b"<optionsind/>")))
    assert empty.code == 200 and empty.options == ()


def test_remotecc_request_errors() -> None:
    def parts(xml: bytes) -> list:  # type: ignore[type-arg]
        return body_parts("application/x-cisco-remotecc-request+xml", xml)

    assert read_remotecc_request(body_parts("application/sdp", b"v=0")) is None
    only_bulk = read_remotecc_request(
        parts(b"<x-cisco-remotecc-request><bulkregisterreq/></x-cisco-remotecc-request>")
    )
    assert only_bulk is not None and only_bulk.bulk_register and only_bulk.optionsind is None
    for bad in (b"<x-cisco-remotecc-response/>", b"<x-cisco-remotecc-request>", b"not xml"):
        with pytest.raises(CiscoBodyError):
            read_remotecc_request(parts(bad))


def test_alarm_of_the_trace() -> None:
    alarm = parse_alarm(DEVICE_TL_INFO)
    assert alarm.name == "DeviceTLInfo" and alarm.device_name == "SEPC80084AA8743"
    assert alarm.status == "3" and alarm.reason is None and alarm.loads == ()
    assert alarm.get("ITL_TFTP_Server") == "cucm-115.home.lab" and len(alarm.params) == 8
    # Another alarm, with Enum parameters and an escaped value.
    other = parse_alarm(
        b'<x-cisco-alarm><Alarm Name="LastOutOfServiceInformation"><ParameterList>'
        b'<String name="DeviceName">SEP002699438F62</String>'
        b'<Enum name="ReasonForOutOfService">14</Enum>'
        b'<String name="ActiveLoad">sip88xx.14-2-1</String>'
        b'<String name="LastProtocolEventSent">Sent:REGISTER &lt;id&gt; &amp; route</String>'
        b"<String>nameless, skipped</String>"
        b"</ParameterList></Alarm></x-cisco-alarm>"
    )
    assert other.reason == "14" and other.loads == (("ActiveLoad", "sip88xx.14-2-1"),)
    assert other.get("LastProtocolEventSent") == "Sent:REGISTER <id> & route"
    assert len(other.params) == 4


def test_device_tl_info_round_trip() -> None:
    body = device_tl_info_alarm(
        "SEP001122334455", "192.0.2.50", itl_signature="1B A1", itl_tftp_server="cb<1>"
    )
    alarm = parse_alarm(body)
    assert alarm.name == "DeviceTLInfo" and alarm.device_name == "SEP001122334455"
    assert alarm.get("ITL_TFTP_Server") == "cb<1>" and alarm.get("CTL_Signature") == "Not Installed"
    assert [k for k, _ in alarm.params] == [k for k, _ in parse_alarm(DEVICE_TL_INFO).params]


BAD_ALARMS = [
    b"",
    b"<x-cisco-alarm>",  # unclosed
    b"<x-cisco-alarm/>",  # no Alarm
    b'<x-cisco-alarm><Alarm Name=""/></x-cisco-alarm>',
    b"<other/>",
    b'<x-cisco-alarm><Alarm Name="a">&undefined;</Alarm></x-cisco-alarm>',
    # Entity expansion ("billion laughs") and external entities are refused at the DOCTYPE.
    b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
    b'<x-cisco-alarm><Alarm Name="&b;"/></x-cisco-alarm>',
    b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><x-cisco-alarm>&e;</x-cisco-alarm>',
    b'<!DOCTYPE x SYSTEM "http://192.0.2.1/x.dtd"><x-cisco-alarm/>',
    b'<?xml version="1.0" encoding="no-such-codec"?><x-cisco-alarm/>',
    b"<x-cisco-alarm>" + b"<a>" * 20 + b"</a>" * 20 + b"</x-cisco-alarm>",  # too deep
    b"<x-cisco-alarm>" + b"<a/>" * MAX_ELEMENTS + b"</x-cisco-alarm>",  # too many elements
    b'<x-cisco-alarm><Alarm Name="a"/></x-cisco-alarm>' + b" " * 20000,  # too large
    b"\xff\xfe<\x00x\x00/\x00>",
]


@pytest.mark.parametrize("body", BAD_ALARMS)
def test_bad_alarm_is_refused(body: bytes) -> None:
    with pytest.raises(CiscoBodyError) as info:
        parse_alarm(body)
    assert info.value.reason


def test_shown_makes_log_values_safe() -> None:
    assert shown(None) is None
    assert shown("SEP001122334455") == "SEP001122334455"
    assert shown("a\r\nb\x1b[31m") == "a??b?[31m"
    assert shown("x" * 500, 10) == "x" * 9 + "…"


@settings(max_examples=int(os.environ.get("SIP_FUZZ_EXAMPLES", "400")), deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.lists(
            st.sampled_from(
                [b"<x-cisco-alarm>", b"</x-cisco-alarm>", b'<Alarm Name="n">', b"</Alarm>",
                 b"<ParameterList>", b"</ParameterList>", b'<String name="s">', b"</String>",
                 b"&amp;", b"&x;", b"<!DOCTYPE x>", b"<?xml version='1.0'?>", b"\xff", b"<"]
            ),
            max_size=20,
        ).map(b"".join),
    )
)  # fmt: skip
def test_fuzz_only_cisco_body_error(data: bytes) -> None:
    with contextlib.suppress(CiscoBodyError):
        parse_alarm(data)
    with contextlib.suppress(CiscoBodyError):
        parse_remotecc_response(data)
    with contextlib.suppress(CiscoBodyError):
        read_remotecc_request(body_parts("application/x-cisco-remotecc-request+xml", data or b"x"))
