"""Bad SIP input to the real daemon over loopback UDP and TCP gets a clear answer: a header
section that is not UTF-8 → 400, another SIP version → 505, an extension required of the
registrar → 420 with Unsupported, a method nobody here answers → 405 whose Allow names
every method the daemon answers (as OPTIONS does); and the daemon stays up."""

from __future__ import annotations

import os
import socket
from typing import Any


def _request(
    method: str,
    transport: str = "UDP",
    *,
    version: bytes = b"SIP/2.0",
    extra: bytes = b"",
) -> bytes:
    branch = os.urandom(4).hex().encode()
    return (
        method.encode() + b" sip:127.0.0.1 " + version + b"\r\n"
        b"Via: SIP/2.0/" + transport.encode() + b" 127.0.0.1:5999;branch=z9hG4bK-" + branch
        + b";rport\r\n"
        b"From: <sip:1001@127.0.0.1>;tag=w8\r\n"
        b"To: <sip:1001@127.0.0.1>\r\n"
        b"Call-ID: w8-" + branch + b"@127.0.0.1\r\n"
        b"CSeq: 3 " + method.encode() + b"\r\n"
        b"Max-Forwards: 70\r\n" + extra + b"Content-Length: 0\r\n\r\n"
    )  # fmt: skip


def _udp(port: int, data: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.bind(("127.0.0.1", 0))
        s.sendto(data, ("127.0.0.1", port))
        return s.recv(65535)


def _tcp(port: int, data: bytes) -> tuple[bytes, bool]:
    """The answer, and whether the daemon closed the connection after it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(65535)
            if not chunk:
                return got, True
            got += chunk
        s.settimeout(1)
        try:
            return got, s.recv(1) == b""
        except TimeoutError:
            return got, False


def _status(answer: bytes) -> int:
    start = answer.split(b"\r\n", 1)[0]
    assert start.startswith(b"SIP/2.0 "), answer[:200]
    return int(start.split()[1])


def _header(answer: bytes, name: bytes) -> bytes | None:
    for line in answer.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def _still_up(port: int) -> None:
    assert _status(_udp(port, _request("OPTIONS"))) == 200


def test_a_header_section_that_is_not_utf8_is_answered_400(daemon: Any) -> None:
    port = daemon.port("sip-udp")
    bad = b"X-Junk: \xff\xfe\xc3\r\n"
    answer = _udp(port, _request("OPTIONS", extra=bad))
    assert _status(answer) == 400
    assert b"not UTF-8" in (_header(answer, b"Warning") or b"")
    assert _header(answer, b"CSeq") == b"3 OPTIONS"
    answer, closed = _tcp(daemon.port("sip"), _request("REGISTER", "TCP", extra=bad))
    assert _status(answer) == 400 and closed  # a stream cannot be trusted after it
    _still_up(port)
    assert "Traceback" not in daemon.log()


def test_another_sip_version_is_answered_505(daemon: Any) -> None:
    port = daemon.port("sip-udp")
    answer = _udp(port, _request("REGISTER", version=b"SIP/3.0"))
    assert _status(answer) == 505
    assert _header(answer, b"Call-ID") is not None
    answer, closed = _tcp(daemon.port("sip"), _request("OPTIONS", "TCP", version=b"SIP/1.0"))
    assert _status(answer) == 505 and closed
    _still_up(port)


def test_an_extension_required_of_the_registrar_is_answered_420(daemon: Any) -> None:
    port = daemon.port("sip-udp")
    for method in ("OPTIONS", "REGISTER"):
        answer = _udp(port, _request(method, extra=b"Require: path, foo\r\n"))
        assert _status(answer) == 420, method
        assert _header(answer, b"Unsupported") == b"path, foo"
    _still_up(port)


def test_405_allows_what_options_allows(daemon: Any) -> None:
    port = daemon.port("sip-udp")
    allowed = _header(_udp(port, _request("OPTIONS")), b"Allow")
    assert allowed is not None and b"REGISTER" in allowed
    for method in ("SUBSCRIBE", "PUBLISH", "FOO"):
        answer = _udp(port, _request(method))
        assert _status(answer) == 405, method
        assert _header(answer, b"Allow") == allowed, method


def test_a_datagram_over_8_kib_is_read_whole(daemon: Any) -> None:
    """Twisted reads 8 KiB of a datagram unless told otherwise: a larger OPTIONS was cut and
    answered 400 for what the cut lost (here its CSeq, after a large header)."""
    port = daemon.port("sip-udp")
    padded = _request("OPTIONS", extra=b"X-Pad: " + b"p" * 20_000 + b"\r\n")
    padded = padded.replace(b"CSeq: 3 OPTIONS\r\n", b"").replace(
        b"Content-Length: 0\r\n", b"CSeq: 3 OPTIONS\r\nContent-Length: 0\r\n"
    )
    answer = _udp(port, padded)
    assert _status(answer) == 200, answer[:300]
    assert _header(answer, b"CSeq") == b"3 OPTIONS"
    _still_up(port)
