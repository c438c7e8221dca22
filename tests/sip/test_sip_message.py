"""The SIP codec: parsing, serializing, the stream framer, digest, and a hypothesis fuzz."""

from __future__ import annotations

import contextlib
import os

import pytest
from callboard.protocols.sip.digest import (
    DigestAuthenticator,
    Verdict,
    build_authorization,
    digest_response,
    parse_challenge,
)
from callboard.protocols.sip.message import (
    WILDCARD,
    Headers,
    MessageTooLarge,
    Request,
    Response,
    SIPParseError,
    StreamFramer,
    parse_contact_list,
    parse_message,
    parse_name_addr,
    parse_uri,
    parse_via,
)
from callboard.protocols.sip.registrar import PolicyDecision, Registrar, RegistrationRequest, Source
from hypothesis import given, settings
from hypothesis import strategies as st

CISCO = (
    b"REGISTER sip:192.168.20.172 SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 192.168.110.240:50057;branch=z9hG4bK0259a19a\r\n"
    b"From: <sip:1003@192.168.20.172>;tag=9c57ad12a4e0004563e5c512-44f61251\r\n"
    b"To: <sip:1003@192.168.20.172>\r\n"
    b"Call-ID: 9c57ad12-a4e00002-7f50d2cf-489bc75f@192.168.110.240\r\n"
    b"Max-Forwards: 70\r\n"
    b"Date: Fri, 29 Mar 2019 00:31:26 GMT\r\n"
    b"CSeq: 155 REGISTER\r\n"
    b"User-Agent: Cisco-CP8851/12.1.1\r\n"
    b"Contact: <sip:f0ae9f65-9fa6-4a32-84ba-4d40048f79c8@192.168.110.240:50057;transport=tcp>"
    b';+sip.instance="<urn:uuid:00000000-0000-0000-0000-9c57ad12a4e0>"'
    b';+u.sip!devicename.ccm.cisco.com="SEP9C57AD12A4E0";+u.sip!model.ccm.cisco.com="684"\r\n'
    b"Supported: replaces,join,sdp-anat,norefersub,X-cisco-callinfo\r\n"
    b"Content-Length: 0\r\n"
    b"Expires: 3600\r\n\r\n"
)


def test_parse_cisco_register() -> None:
    msg = parse_message(CISCO)
    assert isinstance(msg, Request)
    assert msg.method == "REGISTER" and msg.uri == "sip:192.168.20.172"
    assert msg.headers.get("EXPIRES") == "3600"
    assert msg.headers.values("supported")[:2] == ["replaces", "join"]
    [c] = parse_contact_list(msg.headers)  # type: ignore[misc]
    assert c.param("+sip.instance") == "<urn:uuid:00000000-0000-0000-0000-9c57ad12a4e0>"
    assert c.param("+u.sip!devicename.ccm.cisco.com") == "SEP9C57AD12A4E0"
    assert c.param("+U.SIP!MODEL.CCM.CISCO.COM") == "684"
    via = parse_via(msg.headers.values("v")[0])
    assert (via.transport, via.host, via.port, via.branch) == (
        "TCP",
        "192.168.110.240",
        50057,
        "z9hG4bK0259a19a",
    )


def test_compact_forms_folding_and_lists() -> None:
    raw = (
        b"REGISTER sip:example.com SIP/2.0\n"
        b"v: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKa, SIP/2.0/UDP 192.0.2.2;branch=z9hG4bKb\n"
        b"f: <sip:1@example.com>;tag=1\n"
        b"t: <sip:1@example.com>\n"
        b"i: abc\n"
        b"CSEQ: 1 REGISTER\n"
        b'm: "A, b" <sip:a@192.0.2.1>;q=0.5,\n'
        b"  <sip:b@192.0.2.2>\n"
        b"k: path\n"
        b"l: 4\n\nbodyEXTRA"
    )
    msg = parse_message(raw)
    assert isinstance(msg, Request)
    assert len(msg.headers.values("via")) == 2
    assert msg.headers.get("call-id") == "abc" and msg.body == b"body"
    contacts = parse_contact_list(msg.headers)
    assert isinstance(contacts, list)
    assert [c.uri for c in contacts] == ["sip:a@192.0.2.1", "sip:b@192.0.2.2"]
    assert contacts[0].display == '"A, b"' and contacts[0].param("q") == "0.5"
    out = msg.to_bytes()
    assert b"Call-ID: abc\r\n" in out and out.endswith(b"Content-Length: 4\r\n\r\nbody")
    again = parse_message(out)
    assert isinstance(again, Request) and again.headers.values("contact") == msg.headers.values(
        "contact"
    )


def test_wildcard_and_bad_contacts() -> None:
    assert parse_contact_list(Headers([("Contact", "*")])) == WILDCARD
    with pytest.raises(SIPParseError):
        parse_contact_list(Headers([("Contact", "*"), ("m", "<sip:a@b>")]))
    with pytest.raises(SIPParseError):
        parse_name_addr("<sip:a@b")
    with pytest.raises(SIPParseError):
        parse_name_addr('"unterminated <sip:a@b>')


def test_uri() -> None:
    u = parse_uri("sip:%31001:pw@Example.COM:5060;transport=tcp?x=y")
    assert (u.user, u.host, u.port, u.aor) == ("1001", "example.com", 5060, "sip:1001@example.com")
    assert parse_uri("sips:[2001:db8::1]:5061").host == "[2001:db8::1]"
    for bad in ("http://x", "sip:", "sip:a@", "sip:host:99999", "sip:@host"):
        with pytest.raises(SIPParseError):
            parse_uri(bad)


def test_response_roundtrip() -> None:
    r = Response(200, "OK", Headers([("Via", "SIP/2.0/UDP a;branch=z9hG4bKx")]))
    msg = parse_message(r.to_bytes())
    assert isinstance(msg, Response) and msg.status == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"REGISTER\r\n\r\n",
        b"REGISTER sip:a SIP/3.0\r\n\r\n",
        b"SIP/2.0 2000 OK\r\n\r\n",
        b"REGISTER sip:a SIP/2.0\r\n continuation-first\r\n\r\n",
        b"REGISTER sip:a SIP/2.0\r\nNo colon here\r\n\r\n",
        b"REGISTER sip:a SIP/2.0\r\nContent-Length: x\r\n\r\n",
        b"REGISTER sip:a SIP/2.0\r\nContent-Length: 1\r\nl: 2\r\n\r\nab",
        b"REG\xffISTER sip:a SIP/2.0\r\n\r\n",
    ],
)
def test_malformed_raise_parse_error(raw: bytes) -> None:
    with pytest.raises(SIPParseError):
        parse_message(raw)


def test_framer() -> None:
    f = StreamFramer(max_size=400)
    one = b"OPTIONS sip:a SIP/2.0\r\nl: 3\r\n\r\nabc"
    two = b"OPTIONS sip:b SIP/2.0\r\nContent-Length: 0\r\n\r\n"
    stream = b"\r\n\r\n" + one + b"\r\n" + two
    out: list[bytes] = []
    for i in range(len(stream)):  # byte by byte
        out += f.feed(stream[i : i + 1])
    assert out == [one, two] and f.buffered == 0 and f.keepalives >= 2
    assert f.feed(one + two + one[:10]) == [one, two] and f.buffered == 10
    with pytest.raises(MessageTooLarge):
        StreamFramer(max_size=100).feed(b"OPTIONS sip:a SIP/2.0\r\nl: 500\r\n\r\n")
    with pytest.raises(MessageTooLarge):
        StreamFramer(max_size=100).feed(b"X" * 200)
    with pytest.raises(SIPParseError):
        StreamFramer().feed(b"OPTIONS sip:a SIP/2.0\r\nContent-Length: -1\r\n\r\n")


def test_digest_known_vector() -> None:
    # RFC 2617 §3.5 example.
    assert (
        digest_response(
            algorithm="MD5",
            username="Mufasa",
            realm="testrealm@host.com",
            password="Circle Of Life",
            method="GET",
            uri="/dir/index.html",
            nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
            qop="auth",
            nc="00000001",
            cnonce="0a4f113b",
        )
        == "6629fae49393a05397450978507c4ef1"
    )


def test_digest_roundtrip_and_tamper() -> None:
    auth = DigestAuthenticator("r", b"k" * 32, lifetime=10)
    other = DigestAuthenticator("r", b"z" * 32, lifetime=10)
    ch = parse_challenge(auth.challenges(100.0))
    value = build_authorization(ch, method="REGISTER", uri="sip:x", username="u", password="p")
    kw = {"method": "REGISTER", "username": "u", "password": "p"}
    assert auth.verify([value], now=105.0, **kw) is Verdict.OK  # type: ignore[arg-type]
    assert auth.verify([value], now=111.0, **kw) is Verdict.STALE  # type: ignore[arg-type]
    assert other.verify([value], now=105.0, **kw) is Verdict.BAD_NONCE  # type: ignore[arg-type]
    assert auth.verify([], now=105.0, **kw) is Verdict.MISSING  # type: ignore[arg-type]
    assert (
        auth.verify([value], now=105.0, method="REGISTER", username="u", password="q")
        is Verdict.WRONG
    )
    assert auth.verify(['Digest realm="r", nonce'], now=1.0, **kw) is Verdict.MALFORMED  # type: ignore[arg-type]


# --- fuzz -----------------------------------------------------------------------------------


class _AllowAll:
    def decide(self, request: RegistrationRequest) -> PolicyDecision:
        return PolicyDecision.allow(request.device_name, ("u", "p"))


_REGISTRAR = Registrar(_AllowAll(), now=lambda: 1.0, wall_now=lambda: 1553819486.0)
_SRC = Source("udp", "127.0.0.1", 5060)

_HEADER_NAMES = st.sampled_from(
    ["Via", "v", "From", "f", "To", "t", "Call-ID", "i", "CSeq", "Contact", "m", "Expires",
     "Max-Forwards", "Content-Length", "l", "Authorization", "X-Junk"]
)  # fmt: skip
_VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "SIP/2.0/UDP 1.2.3.4:5060;branch=z9hG4bKx;rport",
            "<sip:1001@h>;tag=1",
            "<sip:1001@h>",
            "1 REGISTER",
            "*",
            "0",
            "3600",
            '<sip:a@b>;+sip.instance="<urn:uuid:00000000-0000-0000-0000-001122334455>"',
            'Digest username="u", realm="callboard", nonce="x", uri="sip:h", response="0"',
        ]
    ),
)


@st.composite
def sip_like(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["REGISTER", "OPTIONS", "INVITE", "ACK", "X", ""]))
    lines = [f"{method} {draw(st.sampled_from(['sip:h', 'sips:h:1', 'x', '']))} SIP/2.0"]
    for _ in range(draw(st.integers(0, 12))):
        lines.append(f"{draw(_HEADER_NAMES)}: {draw(_VALUES)}")
    body = draw(st.binary(max_size=20))
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogatepass") + body
    return data


@settings(max_examples=int(os.environ.get("SIP_FUZZ_EXAMPLES", "400")), deadline=None)
@given(st.one_of(st.binary(max_size=300), sip_like()))
def test_fuzz_parse_never_raises_other(data: bytes) -> None:
    with contextlib.suppress(SIPParseError):
        parse_message(data)
    with contextlib.suppress(SIPParseError):
        StreamFramer(max_size=256).feed(data)
    messages, _ = StreamFramer(max_size=256).messages(data)  # the server's side never raises
    for msg in messages:
        _REGISTRAR.handle_message(msg, _SRC)
    # The whole registrar path answers or drops; it never raises.
    reply = _REGISTRAR.handle_bytes(data, _SRC)
    if reply is not None:
        assert isinstance(parse_message(reply.data), Response)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('<sip:a@h>;+sip.instance="<urn:uuid:1>";x', ['<sip:a@h>;+sip.instance="<urn:uuid:1>";x']),
        ('<sip:a@h>;q="a,b"', ['<sip:a@h>;q="a,b"']),
        ("<sip:a@h>, <sip:b@h>", ["<sip:a@h>", "<sip:b@h>"]),
        ('"A \\" B" <sip:a@h>', ['"A \\" B" <sip:a@h>']),
        ("  <sip:a@h>  ", ["<sip:a@h>"]),
        ("", []),
    ],
)
def test_list_values_split_only_where_a_comma_is_unquoted(value: str, expected: list[str]) -> None:
    assert Headers([("Contact", value)]).values("m") == expected


def test_an_unterminated_quote_in_a_list_value_is_an_error_with_or_without_a_comma() -> None:
    for value in ('SIP/2.0/UDP h;x="abc', 'SIP/2.0/UDP h;x="a,bc'):
        with pytest.raises(SIPParseError):
            Headers([("Via", value)]).values("via")


def test_lookups_by_any_spelling_of_a_name() -> None:
    h = Headers([("v", "SIP/2.0/UDP h"), ("Call-ID", "c1"), ("X-Custom", "1")])
    for name in ("via", "Via", "VIA", "v", "V"):
        assert name in h and h.get(name) == "SIP/2.0/UDP h" and h.get_all(name) == ["SIP/2.0/UDP h"]
    assert h.get("i") == h.get("call-id") == "c1" and h.get("x-custom") == "1"
    assert "to" not in h and "t" not in h and h.get("t") is None and h.values("to") == []


def test_name_addr_angle_inside_a_quoted_display_name_and_padded_parameter_names() -> None:
    na = parse_name_addr('"a <b>" <sip:x@h>; tag = 1 ;lr')
    assert (na.display, na.uri, na.params) == ('"a <b>"', "sip:x@h", (("tag", "1"), ("lr", None)))
    assert parse_name_addr("Bob <sip:b@h>").display == "Bob"
    with pytest.raises(SIPParseError):
        parse_name_addr("<sip:x@h>;a b=1")
