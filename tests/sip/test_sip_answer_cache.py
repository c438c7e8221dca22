"""The UDP answer cache: what a retransmission gets back, kept compactly for Timer J."""

from __future__ import annotations

import pytest
from callboard.protocols.sip.registrar import AnswerCache, Reply


def answer(n: int) -> bytes:
    return (
        f"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.9.8.7:5060;branch=z9hG4bK{n};rport=5060\r\n"
        f"Call-ID: {n}@phone\r\nContent-Length: 5\r\n\r\nbody\n"
    ).encode()


@pytest.mark.parametrize("deflate_from", [0, 1000])
def test_answers_come_back_byte_for_byte_with_their_destination(deflate_from: int) -> None:
    cache = AnswerCache(32.0, deflate_from)
    replies = [
        Reply(answer(1), "192.0.2.50", 5060),
        Reply(answer(2), "2001:db8::5", 65535, close=True),
        Reply(b"", "h", 1),
        Reply(bytes(range(256)) * 4, "198.51.100.1", 40000),  # nothing like the dictionary
        Reply(answer(3), "h" * 300, 5060),  # a long destination
    ]
    for i, reply in enumerate(replies):
        cache.keep(f"REGISTER k{i}", reply, 100.0)
    for i, reply in enumerate(replies):
        assert f"REGISTER k{i}" in cache
        assert cache.get(f"REGISTER k{i}") == reply
    assert "REGISTER other" not in cache


def test_a_typical_answer_is_kept_in_a_fraction_of_its_size_once_many_are() -> None:
    cache = AnswerCache(32.0, deflate_from=1)
    data = (
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bK-1-7;rport=5060\r\n"
        b"From: <sip:2000007@192.0.2.1>;tag=1SIPpTag007\r\n"
        b"To: <sip:2000007@192.0.2.1>;tag=3372ffc2\r\nCall-ID: 1-7@192.0.2.7\r\n"
        b"CSeq: 1 REGISTER\r\nDate: Fri, 15 Jan 2027 08:00:00 GMT\r\nServer: Callboard\r\n"
        b'Contact: <sip:2000007@192.0.2.7:5060;transport=udp>;+sip.instance="<urn:uuid:'
        b'00000000-0000-0000-0000-00AC00000007>";+u.sip!devicename.ccm.cisco.com='
        b'"SEP00AC00000007";+u.sip!model.ccm.cisco.com="683";expires=3600;x-cisco-newreg\r\n'
        b"Expires: 120\r\nSupported: X-cisco-srtp-fallback,X-cisco-sis-8.0.0\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    cache.keep("first", Reply(data, "192.0.2.7", 5060), 0.0)  # few kept yet: as it is
    cache.keep("k", Reply(data, "192.0.2.7", 5060), 0.0)
    assert len(cache._answers["first"] or b"") > len(data)
    assert len(cache._answers["k"] or b"") < len(data) // 3
    assert cache.get("k") == cache.get("first") == Reply(data, "192.0.2.7", 5060)


def test_pending_then_answered_and_expiry_by_the_second() -> None:
    cache = AnswerCache(32.0)
    cache.keep("a", None, 10.2)  # pending: absorbed
    assert "a" in cache and cache.get("a") is None
    cache.keep("b", Reply(answer(2), "h", 2), 10.7)
    cache.keep("c", Reply(answer(3), "h", 3), 11.5)
    cache.keep("a", Reply(answer(1), "h", 1), 12.0)  # answered: keeps its place
    assert cache.get("a") == Reply(answer(1), "h", 1)
    cache.expire(42.9)  # nothing is forgotten before ``linger`` has passed
    assert len(cache) == 3
    cache.expire(43.0)  # the second a and b were stored in
    assert "a" not in cache and "b" not in cache and "c" in cache
    cache.expire(43.9)
    assert "c" in cache
    cache.expire(44.0)
    assert len(cache) == 0
    cache.keep("d", None, 50.0)
    cache.clear()
    cache.expire(1000.0)
    assert len(cache) == 0
