"""The 6970 provisioning resource over a real loopback TCP socket, with curl and Agent."""

from __future__ import annotations

import mimetypes
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from callboard.protocols.filesource import DirectorySource
from callboard.protocols.http.channel import origin_form
from callboard.protocols.http.resource import (
    CHUNK,
    content_type,
    parse_range,
    provisioning_site,
)
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

CONFIG = b"<device><loadInformation>sip88xx</loadInformation></device>\n"
BIG = random.Random(5).randbytes(2 * 1024 * 1024 + 13)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("httproot")
    (path / "SEP001122334455.cnf.xml").write_bytes(CONFIG)
    (path / "big.loads").write_bytes(BIG)
    (path / "empty.txt").write_bytes(b"")
    (path / "one-chunk.bin").write_bytes(BIG[:CHUNK])  # answered from render, with its headers
    (path / "two-chunks.bin").write_bytes(BIG[: CHUNK + 1])  # streamed by the pull producer
    (path.parent / "outside.txt").write_bytes(b"secret")
    (path / "escape").symlink_to(path.parent / "outside.txt")
    return path


@pytest.fixture
def base(root: Path) -> Iterator[str]:
    endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
    port = pytest_twisted.blockon(endpoint.listen(provisioning_site(DirectorySource(str(root)))))
    yield f"http://127.0.0.1:{port.getHost().port}"
    pytest_twisted.blockon(port.stopListening())


async def get(url: str, method: bytes = b"GET", **headers: str) -> tuple[int, Any, bytes]:
    agent = Agent(reactor)
    h = Headers({k.replace("_", "-").encode(): [v.encode()] for k, v in headers.items()})
    d = agent.request(method, url.encode(), h)
    d.addTimeout(10, reactor)
    response = await d
    body = await readBody(response)
    headers = response.headers.copy()
    if isinstance(response.length, int):  # Agent moves Content-Length to .length
        headers.setRawHeaders(b"content-length", [str(response.length).encode()])
    return response.code, headers, body


@pytest_twisted.ensureDeferred
async def test_get_whole_file(base: str) -> None:
    code, headers, body = await get(f"{base}/SEP001122334455.cnf.xml")
    assert code == 200 and body == CONFIG
    assert headers.getRawHeaders(b"content-length") == [str(len(CONFIG)).encode()]
    assert headers.getRawHeaders(b"accept-ranges") == [b"bytes"]


@pytest_twisted.ensureDeferred
async def test_big_file_with_curl(base: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    d = getProcessOutputAndValue(
        "/usr/bin/curl", ("-sS", "-f", "-o", str(out), f"{base}/big.loads"), env=dict(os.environ)
    )
    d.addTimeout(30, reactor)
    _, err, code = await d
    assert code == 0, err
    assert out.read_bytes() == BIG


@pytest_twisted.ensureDeferred
async def test_curl_range(base: str) -> None:
    d = getProcessOutputAndValue(
        "/usr/bin/curl",
        ("-sS", "-r", "100-199", "-w", "%{http_code}", f"{base}/big.loads"),
        env=dict(os.environ),
    )
    d.addTimeout(30, reactor)
    out, err, code = await d
    assert code == 0, err
    assert out == BIG[100:200] + b"206"


@pytest_twisted.ensureDeferred
async def test_curl_absolute_form_target(base: str) -> None:
    """RFC 9112 §3.2.2: a server accepts a target in absolute form (as sent through proxies);
    its path names the file, the authority and scheme do not."""
    for target in (f"{base}/SEP001122334455.cnf.xml", "HTTP://elsewhere/SEP001122334455.cnf.xml"):
        d = getProcessOutputAndValue(
            "/usr/bin/curl",
            ("-sS", "--request-target", target, "-w", "%{http_code}", f"{base}/ignored"),
            env=dict(os.environ),
        )
        d.addTimeout(30, reactor)
        out, err, code = await d
        assert code == 0, err
        assert out == CONFIG + b"200", target
    assert origin_form(b"http://h:6970") == b"/" and origin_form(b"/a?b") == b"/a?b"
    assert origin_form(b"https://h/x?y=1") == b"/x?y=1"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/CTLSEP001122334455.tlv", 404),
        ("/", 404),
        ("/%2e%2e/outside.txt", 403),
        ("/..%5c..%5cetc%5cpasswd", 403),
        ("/escape", 403),
        ("/SEP%01.cnf.xml", 403),
    ],
)
@pytest_twisted.ensureDeferred
async def test_errors_match_tftp(base: str, path: str, status: int) -> None:
    code, _, _ = await get(base + path)
    assert code == status


@pytest_twisted.ensureDeferred
async def test_method_not_allowed(base: str) -> None:
    code, headers, _ = await get(f"{base}/SEP001122334455.cnf.xml", b"POST")
    assert code == 405 and headers.getRawHeaders(b"allow") == [b"GET, HEAD"]


@pytest_twisted.ensureDeferred
async def test_head(base: str) -> None:
    d = getProcessOutputAndValue(
        "/usr/bin/curl", ("-sS", "-I", f"{base}/big.loads"), env=dict(os.environ)
    )
    d.addTimeout(30, reactor)
    out, err, code = await d
    assert code == 0, err
    assert out.startswith(b"HTTP/1.1 200 ")
    assert f"Content-Length: {len(BIG)}\r\n".encode() in out
    status, _, body = await get(f"{base}/big.loads", b"HEAD")
    assert status == 200 and body == b""


@pytest.mark.parametrize(
    ("header", "status", "content", "content_range"),
    [
        ("bytes=0-9", 206, BIG[:10], f"bytes 0-9/{len(BIG)}"),
        ("bytes=-5", 206, BIG[-5:], f"bytes {len(BIG) - 5}-{len(BIG) - 1}/{len(BIG)}"),
        ("bytes=2097150-", 206, BIG[2097150:], f"bytes 2097150-{len(BIG) - 1}/{len(BIG)}"),
        (f"bytes={len(BIG)}-", 416, None, f"bytes */{len(BIG)}"),
        ("bytes=0-1,5-6", 200, BIG, None),  # several ranges: whole file
        ("items=1-2", 200, BIG, None),
    ],
)
@pytest_twisted.ensureDeferred
async def test_ranges(
    base: str, header: str, status: int, content: bytes | None, content_range: str | None
) -> None:
    code, headers, body = await get(f"{base}/big.loads", Range=header)
    assert code == status
    if content is not None:
        assert body == content
    expected = [content_range.encode()] if content_range else None
    assert headers.getRawHeaders(b"content-range") == expected


@pytest_twisted.ensureDeferred
async def test_empty_file(base: str) -> None:
    code, headers, body = await get(f"{base}/empty.txt")
    assert code == 200 and body == b""
    assert headers.getRawHeaders(b"content-length") == [b"0"]


@pytest_twisted.ensureDeferred
async def test_one_chunk_and_streamed_answers_look_alike(base: str) -> None:
    """A body sent at once from render and one streamed chunk by chunk: the same headers,
    one keep-alive connection for both (curl reuses it), every byte right."""
    d = getProcessOutputAndValue(
        "/usr/bin/curl",
        ("-sS", "-i", "--http1.1", "-w", "%{num_connects}\\n",
         f"{base}/one-chunk.bin", f"{base}/two-chunks.bin"),
        env=dict(os.environ),
    )  # fmt: skip
    d.addTimeout(30, reactor)
    out, err, code = await d
    assert code == 0, err
    answers = []
    rest = out
    for size in (CHUNK, CHUNK + 1):
        head, _, rest = rest.partition(b"\r\n\r\n")
        body, rest = rest[:size], rest[size:]
        connects, _, rest = rest.partition(b"\n")
        lines = head.split(b"\r\n")
        fields = dict(line.split(b": ", 1) for line in lines[1:])
        answers.append((lines[0], fields, body, connects))
    (status1, one, body1, connects1), (status2, two, body2, connects2) = answers
    assert status1 == status2 == b"HTTP/1.1 200 OK"
    assert (body1, body2) == (BIG[:CHUNK], BIG[: CHUNK + 1])
    assert one.pop(b"Content-Length") == str(CHUNK).encode()
    assert two.pop(b"Content-Length") == str(CHUNK + 1).encode()
    one.pop(b"Date"), two.pop(b"Date")
    assert list(one.items()) == list(two.items())  # same fields, same order
    assert (connects1, connects2) == (b"1", b"0")  # the second over the first's connection


@pytest_twisted.ensureDeferred
async def test_one_chunk_range(base: str) -> None:
    code, headers, body = await get(f"{base}/one-chunk.bin", Range="bytes=10-19")
    assert (code, body) == (206, BIG[10:20])
    assert headers.getRawHeaders(b"content-range") == [f"bytes 10-19/{CHUNK}".encode()]
    assert headers.getRawHeaders(b"content-length") == [b"10"]


def test_parse_range_edges() -> None:
    assert parse_range("bytes=5-2", 10) is None
    assert parse_range("bytes=-0", 10) is False
    assert parse_range("bytes=0-100", 10) == (0, 9)
    assert parse_range("bytes=-", 10) is None


@pytest.mark.parametrize(
    "name",
    [
        "ITLSEP0A0000000007.tlv", "SEP0A0000000007.cnf.xml.sgn", "XMLDefault.cnf.xml",
        "sip88xx.14-2-1.loads", "firmware.tar.gz", "a.tgz", "b.svgz", "ring.raw", "x.gz",
        "noextension", ".hidden", ".hidden.xml", "dir/file.xml", "dir.d/file", "a..gz",
        "data:text/plain.xml", "DATA.txt", "http.xml", "weird\\name.PNG", "UPPER.XML", "a.b:c",
    ],
)  # fmt: skip
def test_content_type_is_what_mimetypes_says(name: str) -> None:
    expected = mimetypes.guess_type(name)[0] or "application/octet-stream"
    assert content_type(name) == expected.encode()
