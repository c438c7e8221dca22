"""The phone's HTTP/1.1 wire format: the GET it sends, the responses it reads (no sockets)."""

from __future__ import annotations

import pytest
from callboard.phone.http_wire import (
    BodyTooLarge,
    HttpResponse,
    HttpWireError,
    ResponseReader,
    get_request,
)


def read(data: bytes, *, max_size: int = 1 << 20, step: int = 0) -> HttpResponse | None:
    """Feed ``data`` whole, or ``step`` bytes at a time; the response if it completed."""
    reader = ResponseReader(max_size)
    if not step:
        return reader.feed(data)
    response = None
    for i in range(0, len(data), step):
        got = reader.feed(data[i : i + step])
        assert response is None or got is None, "a response completes once"
        response = response or got
    return response


def test_get_request_names_the_file_quoted_and_the_host() -> None:
    raw = get_request("127.0.0.1", 6970, "SEP0A.cnf.xml", "Cisco-CP8841/x", keep_alive=True)
    assert raw == (
        b"GET /SEP0A.cnf.xml HTTP/1.1\r\nHost: 127.0.0.1:6970\r\nUser-Agent: Cisco-CP8841/x\r\n"
        b"Connection: keep-alive\r\n\r\n"
    )
    raw = get_request("::1", 6971, "/a b?.xml", "UA", keep_alive=False)
    assert raw.startswith(b"GET /a%20b%3F.xml HTTP/1.1\r\nHost: [::1]:6971\r\n")
    assert b"Connection: close\r\n" in raw


LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/xml\r\n\r\nhello"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;ext=1\r\nhel\r\n2\r\nlo\r\n0\r\nX-Trailer: t\r\n\r\n"
)


@pytest.mark.parametrize("step", [0, 1, 2, 7])
@pytest.mark.parametrize("raw", [LENGTH, CHUNKED], ids=["content-length", "chunked"])
def test_a_whole_response_however_it_is_split(raw: bytes, step: int) -> None:
    assert read(raw, step=step) == HttpResponse(200, b"hello", keep_alive=True)


def test_a_body_up_to_the_end_of_the_connection() -> None:
    reader = ResponseReader(100)
    assert reader.feed(b"HTTP/1.0 200 OK\r\n\r\nhel") is None
    assert reader.feed(b"lo") is None
    assert reader.closed() == HttpResponse(200, b"hello", keep_alive=False)


def test_keep_alive_follows_the_version_and_the_connection_header() -> None:
    assert read(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n") == HttpResponse(
        404, b"", True
    )
    close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx"
    assert read(close) == HttpResponse(200, b"x", False)
    old = b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx"
    assert read(old) == HttpResponse(200, b"x", False)
    old_kept = b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\nx"
    assert read(old_kept) == HttpResponse(200, b"x", True)
    stray = LENGTH + b"HTTP/1.1"  # bytes after the response: not reused
    assert read(stray) == HttpResponse(200, b"hello", False)


def test_interim_answers_are_skipped_and_204_has_no_body() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\n" + LENGTH
    assert read(raw, step=3) == HttpResponse(200, b"hello", True)
    assert read(b"HTTP/1.1 204 No Content\r\n\r\n") == HttpResponse(204, b"", True)


def test_an_incomplete_response_at_the_end_of_the_connection_is_an_error() -> None:
    for partial in (b"", b"HTTP/1.1 200 OK\r\nContent-Le", LENGTH[:-1], CHUNKED[:-4]):
        reader = ResponseReader(100)
        assert reader.feed(partial) is None
        with pytest.raises(HttpWireError, match="closed before the response was complete"):
            reader.closed()


def test_received_tells_whether_any_byte_came() -> None:
    reader = ResponseReader(100)
    assert not reader.received
    reader.feed(b"H")
    assert reader.received


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
    ],
)
def test_what_is_not_http_is_refused(raw: bytes) -> None:
    with pytest.raises(HttpWireError):
        read(raw)


def test_an_endless_head_is_refused() -> None:
    reader = ResponseReader(100)
    reader.feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(HttpWireError, match="head too large"):
        for _ in range(2000):
            reader.feed(b"X-Filler: " + b"a" * 60 + b"\r\n")


def test_a_body_past_the_limit_is_refused_whatever_its_framing() -> None:
    with pytest.raises(BodyTooLarge):
        read(LENGTH, max_size=4)  # announced: refused before reading it
    with pytest.raises(BodyTooLarge):
        read(CHUNKED, max_size=4, step=1)
    reader = ResponseReader(4)
    reader.feed(b"HTTP/1.1 200 OK\r\n\r\nabcd")
    with pytest.raises(BodyTooLarge):
        reader.feed(b"e")
    assert read(LENGTH, max_size=5) == HttpResponse(200, b"hello", True)
