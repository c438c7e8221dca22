"""Stream framing on its own and in the stream protocol (StringTransport, no sockets).

The framer and the parser read Content-Length with one function, so they cannot disagree on
where a message ends; any framing error is answered (when readable) and closes the stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from callboard.protocols.sip.message import (
    Request,
    SIPParseError,
    StreamFramer,
    parse_message,
)

from .conftest import (  # type: ignore[import-not-found]
    open_stream,
    smuggling,
    stream_responses,
)


def test_smuggled_request_is_not_processed(
    make_registrar: Any, make_register: Callable[..., bytes], policy: Any
) -> None:
    reg = make_registrar()
    proto, transport = open_stream(reg)
    proto.dataReceived(smuggling())
    [answer] = stream_responses(transport.value())
    assert answer.status == 400 and "Content-Length" in (answer.headers.get("warning") or "")
    assert transport.disconnecting
    # Nothing of the body was read as a request: one message seen, no binding, no question.
    assert reg.counters.requests == 0 and reg.binding_count() == 0 and policy.seen == []
    proto.dataReceived(make_register(transport="TCP", cseq=900))  # late bytes: ignored
    assert len(stream_responses(transport.value())) == 1


def test_framing_error_answered_after_the_messages_before_it(
    make_registrar: Any, make_register: Callable[..., bytes]
) -> None:
    reg = make_registrar()
    proto, transport = open_stream(reg)
    good = make_register(transport="TCP", method="OPTIONS")
    bad = make_register(transport="TCP", cseq=5).replace(
        b"Content-Length: 0", b"Content-Length: 0\r\nl: 0"
    )
    proto.dataReceived(good + bad + make_register(transport="TCP", cseq=6))
    got = stream_responses(transport.value())
    assert [(r.status, r.headers.get("cseq")) for r in got] == [
        (200, "101 OPTIONS"),
        (400, "5 REGISTER"),
    ]
    assert transport.disconnecting and reg.binding_count() == 0


def test_unreadable_head_closes_without_an_answer(make_registrar: Any) -> None:
    proto, transport = open_stream(make_registrar())
    proto.dataReceived(b"NOT A START LINE\r\nContent-Length: 0\r\n\r\n")
    assert transport.value() == b"" and transport.disconnecting


def test_a_well_framed_bad_request_keeps_the_stream(
    make_registrar: Any, make_register: Callable[..., bytes]
) -> None:
    # A header value the registrar cannot use is not a framing error: 400, stream stays.
    proto, transport = open_stream(make_registrar())
    bad = make_register(transport="TCP").replace(b"CSeq: 101 REGISTER", b"CSeq: x REGISTER")
    proto.dataReceived(bad + make_register(transport="TCP", method="OPTIONS"))
    assert [r.status for r in stream_responses(transport.value())] == [400, 200]
    assert not transport.disconnecting


# --- the framer and the parser agree ------------------------------------------------------


@pytest.mark.parametrize(
    "lengths",
    [
        b"Content-Length: 0\r\nContent-Length: 12\r\n",
        b"Content-Length: 12\r\nl: 0\r\n",
        b"Content-Length: 0\r\nContent-Length: 0\r\n",  # duplicate, even equal
        b"Content-Length: 0, 12\r\n",
        b"Content-Length: \xc2\xb2\r\n",  # '²' passes str.isdigit
        b"Content-Length:\r\n 12\r\n",  # folded: read the same way by both
    ],
)
def test_one_reader_of_content_length(lengths: bytes) -> None:
    head = b"OPTIONS sip:a SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bKx\r\n" + lengths
    data = head + b"\r\nOPTIONS sip:b"
    try:
        parsed = parse_message(data + b" SIP/2.0\r\n\r\n")
    except SIPParseError:
        parsed = None
    framer = StreamFramer()
    if parsed is None:
        framed, error = framer.messages(data)
        assert framed == [] and error is not None
        assert isinstance(error.partial, Request)  # readable enough to answer 400
        with pytest.raises(SIPParseError):
            framer.feed(b"more")  # the stream stays broken
    else:
        [msg] = framer.messages(data + b" SIP/2.0\r\n\r\n")[0]
        assert msg.body == parsed.body


def test_framer_and_parser_cut_at_the_same_blank_line() -> None:
    # A bare-LF blank line before a CRLF one: both end the header section at the first.
    data = b"OPTIONS sip:a SIP/2.0\nl: 4\n\nbody\r\n\r\n"
    [raw] = StreamFramer().feed(data)
    assert raw == b"OPTIONS sip:a SIP/2.0\nl: 4\n\nbody"
    msg = parse_message(data)
    assert msg.body == b"body"


def test_framer_returns_messages_before_an_error() -> None:
    one = b"OPTIONS sip:a SIP/2.0\r\nl: 0\r\n\r\n"
    framer = StreamFramer()
    messages, error = framer.messages(one + b"OPTIONS sip:b SIP/2.0\r\nl: 1\r\nl: 2\r\n\r\nab")
    assert len(messages) == 1 and isinstance(messages[0], Request)
    assert error is not None and error.reason == "more than one Content-Length"
    assert framer.messages(one) == ([], error)
