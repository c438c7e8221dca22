"""multipart/mixed bodies: the 7821's REGISTER body, the edge cases RFC 2046 allows, and every
malformed body ending as MultipartError (a 400 at the registrar), never another exception."""

from __future__ import annotations

import contextlib
import os

import pytest
from callboard.protocols.sip.cisco import REMOTECC_REQUEST, remotecc_register_body
from callboard.protocols.sip.message import Response, parse_message
from callboard.protocols.sip.multipart import (
    MAX_PARTS,
    MultipartError,
    body_parts,
    build_multipart,
    parse_media_type,
    parse_multipart,
)
from callboard.protocols.sip.registrar import (
    PolicyDecision,
    Registrar,
    RegistrationRequest,
    Source,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from .conftest import build_register  # type: ignore[import-not-found]

CT = "multipart/mixed; boundary=uniqueBoundary"


def test_the_7821_register_body() -> None:
    content_type, body = remotecc_register_body()
    assert content_type == CT
    assert len(body) == 1313  # TechNote 214535: Content-Length: 1313
    parts = body_parts(content_type, body)
    assert [p.content_type for p in parts] == [REMOTECC_REQUEST, REMOTECC_REQUEST]
    assert [p.headers.get("content-disposition") for p in parts] == [
        "session;handling=optional"
    ] * 2
    assert parts[0].body.endswith(b"</x-cisco-remotecc-request>\n")
    assert b"<bulkregisterreq>" in parts[0].body
    assert len(parts[1].body) == 856  # the trace's "Framed buffer: length = 856"
    assert parts[1].body.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
    assert parts[1].body.endswith(b"</x-cisco-remotecc-request>")


def test_media_type() -> None:
    m = parse_media_type('Multipart/Mixed ; Boundary="a b;c" ; x=1')
    assert m.type == "multipart/mixed" and m.param("boundary") == "a b;c" and m.param("X") == "1"
    assert parse_media_type("application/x-cisco-alarm+xml").type == "application/x-cisco-alarm+xml"
    for bad in ("", "text", "text/", "/xml", "te xt/plain", 'a/b;c="x'):
        with pytest.raises(MultipartError):
            parse_media_type(bad)


def test_lenient_where_phones_are() -> None:
    body = (
        b"preamble, ignored\n"
        b"--b \t\n"  # transport padding, bare LF
        b"Content-Type: text/plain\n"
        b"\n"
        b"one\n"
        b"--b\r\n"
        b"\r\n"  # no headers at all: text/plain
        b"two\r\n--bx is content, not a delimiter\r\n"
        b"--b--\r\n"
        b"epilogue, ignored --b\r\n"
    )
    one, two = parse_multipart(body, "b")
    assert one.body == b"one" and one.content_type == "text/plain"
    assert two.body == b"two\r\n--bx is content, not a delimiter"
    assert len(two.headers) == 0 and two.content_type == "text/plain"
    # A part of headers only (RFC 2046 allows the CRLF and body to be absent).
    [only] = parse_multipart(b"--b\r\nContent-Type: a/b\r\n--b--", "b")
    assert only.content_type == "a/b" and only.body == b""


def test_body_parts_single_and_empty() -> None:
    assert body_parts(None, b"") == []
    assert body_parts("application/sdp", b"") == []
    [part] = body_parts("application/x-cisco-alarm+xml; charset=utf-8", b"<x/>")
    assert part.content_type == "application/x-cisco-alarm+xml" and part.body == b"<x/>"


def test_build_round_trip() -> None:
    fields = [("Content-Type", "a/b"), ("Content-ID", "<1@h>")]
    body = build_multipart([(fields, b"x\r\ny"), ([], b"")], "q'(+_,-./:=?)")
    one, two = body_parts('multipart/mixed;boundary="q\'(+_,-./:=?)"', body)
    assert one.body == b"x\r\ny" and one.headers.get("content-id") == "<1@h>"
    assert two.body == b"" and two.content_type == "text/plain"
    with pytest.raises(ValueError):
        build_multipart([([], b"--b inside")], "b")
    with pytest.raises(ValueError):
        build_multipart([], "bad boundary ")


MALFORMED = [
    ("multipart/mixed", b"--b\r\n\r\nx\r\n--b--"),  # no boundary parameter
    ("multipart/mixed; boundary=", b"--\r\n\r\nx\r\n----"),  # empty boundary
    ("multipart/mixed; boundary=" + "b" * 71, b"x"),  # boundary too long
    ('multipart/mixed; boundary="ends in space "', b"x"),
    (CT, b"no delimiter at all"),
    (CT, b"--uniqueBoundary\r\nContent-Type: a/b\r\n\r\nno close delimiter"),
    (CT, b"--uniqueBoundary--\r\n"),  # no part
    (CT, b"--uniqueBoundary\r\nnot a header line\r\n\r\nx\r\n--uniqueBoundary--"),
    (CT, b"--uniqueBoundary\r\nContent-Type: nonsense\r\n\r\nx\r\n--uniqueBoundary--"),
    (CT, b"--uniqueBoundary\r\nX: \xff\xfe\r\n\r\nx\r\n--uniqueBoundary--"),
    (CT, b"--uniqueBoundary\r\n continuation first\r\n\r\nx\r\n--uniqueBoundary--"),
    (CT, b"x--uniqueBoundary\r\n\r\nx\r\nx--uniqueBoundary--"),  # never at a line start
    (
        CT,
        b"--uniqueBoundary\r\n\r\n"
        + b"x\r\n--uniqueBoundary\r\n\r\n" * MAX_PARTS
        + b"--uniqueBoundary--",
    ),
    (None, b"a body without a Content-Type"),
    ("not-a-type", b"x"),
]


@pytest.mark.parametrize(("content_type", "body"), MALFORMED)
def test_malformed_is_multipart_error(content_type: str | None, body: bytes) -> None:
    with pytest.raises(MultipartError) as info:
        body_parts(content_type, body)
    assert info.value.reason


@settings(max_examples=int(os.environ.get("SIP_FUZZ_EXAMPLES", "400")), deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.lists(
            st.sampled_from(
                [b"--b", b"--b--", b"\r\n", b"\n", b" ", b"Content-Type: a/b", b"X:", b"\r\n\r\n",
                 b"text", b"--", b"Content-Type: ;", b"\xff", b"\t"]
            ),
            max_size=30,
        ).map(b"".join),
    ),
    st.sampled_from(["multipart/mixed; boundary=b", "multipart/mixed;boundary=\"b\"", "text/x"]),
)  # fmt: skip
def test_fuzz_only_multipart_error(body: bytes, content_type: str) -> None:
    with contextlib.suppress(MultipartError):
        for part in body_parts(content_type, body):
            assert isinstance(part.body, bytes)


_PARTS = st.lists(
    st.sampled_from(
        [b"--b", b"--b--", b"\r\n", b"Content-Type: application/x-cisco-remotecc-request+xml",
         b"<x-cisco-remotecc-request>", b"</x-cisco-remotecc-request>", b"<optionsind>",
         b"</optionsind>", b"<bulkregisterreq/>", b"<!DOCTYPE x>", b"&e;", b"\xff", b"<"]
    ),
    max_size=24,
).map(b"".join)  # fmt: skip


@settings(max_examples=int(os.environ.get("SIP_FUZZ_EXAMPLES", "400")), deadline=None)
@given(_PARTS)
def test_fuzz_register_bodies_are_200_or_400(body: bytes) -> None:
    """Through the whole registrar: a REGISTER with any such body is answered, 200 or 400."""
    registrar = Registrar(_AllowAll(), now=lambda: 1.0, wall_now=lambda: 1553819486.0)
    data = build_register()
    head = data[: -len(b"Content-Length: 0\r\n\r\n")]
    data = head + b"Content-Type: multipart/mixed;boundary=b\r\n"
    data += f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    reply = registrar.handle_bytes(data, Source("udp", "192.0.2.50", 50057))
    assert reply is not None
    answer = parse_message(reply.data)
    assert isinstance(answer, Response) and answer.status in (200, 400)
    if answer.status == 200 and b"<optionsind>" in answer.body:
        assert answer.headers.get("content-type") == "application/x-cisco-remotecc-response+xml"


class _AllowAll:
    def decide(self, request: RegistrationRequest) -> PolicyDecision:
        return PolicyDecision.allow(request.device_name)
