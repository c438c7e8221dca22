"""Plain GETs answered without twisted.web's request machinery: the same bytes as twisted.web,
over real loopback sockets, and twisted.web for everything else on the connection."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from callboard.protocols.filesource import (
    DirectorySource,
    FileNotFound,
    MemoryBody,
    Opened,
    Requester,
)
from callboard.protocols.http.plain import PlainFront, parse_plain_get
from callboard.protocols.http.resource import CHUNK, ProvisioningResource, provisioning_site
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.testing import MemoryReactorClock, StringTransport

BIG = random.Random(7).randbytes(3 * CHUNK + 5)
CONFIG = b"<device><loadInformation>sip88xx</loadInformation></device>\n"


class Source:
    """Files on disk, plus names answered later (a Deferred) or by a failing source."""

    def __init__(self, root: Path) -> None:
        self._disk = DirectorySource(str(root))

    def open(self, name: str, requester: Requester) -> Opened:
        if name.startswith("later/"):  # prepared off the reactor, say
            later: defer.Deferred[Any] = defer.Deferred()
            body = self._disk.open(name.removeprefix("later/"), requester)
            reactor.callLater(0, later.callback, body)  # type: ignore[attr-defined]
            return later
        if name == "broken.bin":
            raise RuntimeError("the source failed")
        if name == "gone-later.bin":
            d: defer.Deferred[Any] = defer.Deferred()
            reactor.callLater(0, d.errback, FileNotFound(name))  # type: ignore[attr-defined]
            return d
        if name == "memory.xml":
            return MemoryBody(CONFIG)
        return self._disk.open(name, requester)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plainroot")
    (path / "SEP001122334455.cnf.xml").write_bytes(CONFIG)
    (path / "big.loads").write_bytes(BIG)
    (path / "empty.txt").write_bytes(b"")
    return path


class _Collector(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


class _Built(protocol.Factory):
    """A site's factory that records what it builds, optionally without the plain front."""

    def __init__(self, site: Any, *, general: bool) -> None:
        self.site = site
        self.general = general
        self.built: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        built = self.site.buildProtocol(addr)
        self.built.append(built)
        return built.inner if self.general else built


@pytest.fixture
def servers(root: Path) -> Iterator[tuple[int, _Built, int]]:
    """Two listeners on one site: with the plain front (the daemon's) and without."""
    site = provisioning_site(Source(root))  # type: ignore[arg-type]
    plain, general = _Built(site, general=False), _Built(site, general=True)
    ports = [
        pytest_twisted.blockon(serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(f))
        for f in (plain, general)
    ]
    yield ports[0].getHost().port, plain, ports[1].getHost().port
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


async def exchange(port: int, writes: list[bytes], answers: int) -> tuple[bytes, bool]:
    """Send each write, waiting for the answers it completes, until ``answers`` answers (or
    the server closes); returns what came back and whether the server closed."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    client = _Collector()
    d = endpoint.connect(protocol.Factory.forProtocol(lambda: client))
    await d.addTimeout(10, reactor)
    sent = b""
    for write in writes:
        client.transport.write(write)  # type: ignore[union-attr]
        sent += write
        wanted = min(answers, sent.count(b"\r\n\r\n"))
        deadline = reactor.seconds() + 5  # type: ignore[attr-defined]
        if not write.endswith(b"\r\n\r\n"):  # let it arrive alone, not with the next write
            pause: defer.Deferred[None] = defer.Deferred()
            reactor.callLater(0.05, pause.callback, None)  # type: ignore[attr-defined]
            await pause
        heads = {i for i, r in enumerate(sent.split(b"\r\n\r\n")) if r.startswith(b"HEAD")}
        while _complete(client.data, heads) < wanted and not client.closed.called:
            assert reactor.seconds() < deadline, client.data  # type: ignore[attr-defined]
            waiting: defer.Deferred[None] = defer.Deferred()
            reactor.callLater(0.005, waiting.callback, None)  # type: ignore[attr-defined]
            await waiting
    closed = client.closed.called
    client.transport.loseConnection()  # type: ignore[union-attr]
    return client.data, closed


def _complete(data: bytes, heads: set[int] = frozenset()) -> int:  # type: ignore[assignment]
    """How many whole answers ``data`` holds (Content-Length or chunked; none of a body
    for the answers numbered in ``heads``)."""
    count = 0
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return count
        length = re.search(rb"\r\nContent-Length: (\d+)", head)
        if length is not None:
            size = int(length.group(1))
            size = 0 if count in heads else size
            if len(rest) < size:
                return count
            data = rest[size:]
        elif b"Transfer-Encoding: chunked" in head:
            end = rest.find(b"0\r\n\r\n")
            if end < 0:
                return count
            data = rest[end + 5 :]
        else:
            return count
        count += 1


def _masked(data: bytes) -> bytes:
    return re.sub(rb"Date: [^\r]*", b"Date: -", data)


PLAIN = [
    b"GET /SEP001122334455.cnf.xml HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /sep001122334455.CNF.xml?x=1&y HTTP/1.1\r\nHost: x\r\nUser-Agent: Cisco\r\n\r\n",
    b"GET /memory.xml HTTP/1.1\r\nConnection: keep-alive\r\n\r\n",
    b"GET /big.loads HTTP/1.1\r\nHost: x\r\n\r\n",  # streamed by the pull producer
    b"GET /big.loads HTTP/1.1\r\nRange: bytes=10-19\r\n\r\n",
    b"GET /big.loads HTTP/1.1\r\nrange: bytes=-5\r\n\r\n",
    b"GET /big.loads HTTP/1.1\r\nRange: bytes=99999999-\r\n\r\n",  # 416
    b"GET /empty.txt HTTP/1.1\r\n\r\n",
    b"GET /CTLSEP001122334455.tlv HTTP/1.1\r\nHost: x\r\n\r\n",  # 404
    b"GET /%2e%2e/outside.txt HTTP/1.1\r\n\r\n",  # 403
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET /broken.bin HTTP/1.1\r\n\r\n",  # 500 from the resource
    b"GET /later/SEP001122334455.cnf.xml HTTP/1.1\r\n\r\n",  # a Deferred body
    b"GET /later/big.loads HTTP/1.1\r\n\r\n",
    b"GET /gone-later.bin HTTP/1.1\r\n\r\n",  # a Deferred that fails: 404
]


# Answered later (NOT_DONE_YET: a Deferred body or a streamed one): twisted.web goes on.
LATER = {PLAIN[3], *PLAIN[12:]}


@pytest.mark.parametrize("request_bytes", PLAIN)
@pytest_twisted.ensureDeferred
async def test_a_plain_get_gets_twisted_webs_bytes(
    servers: tuple[int, _Built, int], request_bytes: bytes
) -> None:
    plain_port, plain, general_port = servers
    assert parse_plain_get(request_bytes) is not None
    twice = [request_bytes, request_bytes]  # and the connection takes another one after it
    fast, fast_closed = await exchange(plain_port, twice, 2)
    slow, slow_closed = await exchange(general_port, twice, 2)
    assert _complete(fast) == 2 and not fast_closed
    assert _masked(fast) == _masked(slow)
    assert (fast_closed, slow_closed) == (False, False)
    front = plain.built[-1]
    assert isinstance(front, PlainFront)
    # Answered by the front itself unless the answer came later (then twisted.web goes on).
    assert front._handing_over is (request_bytes in LATER)


NOT_PLAIN = [
    b"HEAD /SEP001122334455.cnf.xml HTTP/1.1\r\n\r\n",
    b"POST /SEP001122334455.cnf.xml HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    b"GET /SEP001122334455.cnf.xml HTTP/1.0\r\n\r\n",
    b"GET /SEP001122334455.cnf.xml HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"GET /SEP001122334455.cnf.xml HTTP/1.1\r\nConnection: Keep-Alive, close\r\n\r\n",
    b"GET /SEP001122334455.cnf.xml HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /SEP001122334455.cnf.xml HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
    b"GET http://x/SEP001122334455.cnf.xml HTTP/1.1\r\n\r\n",
    b"GET  /SEP001122334455.cnf.xml HTTP/1.1\r\n\r\n",
    b"GET /SEP001122334455.cnf.xml HTTP/1.1\r\nBad Name: x\r\n\r\n",
    b"GET /SEP001122334455.cnf.xml HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
    b"GET /SEP001122334455.cnf.xml HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
    b"GET /SEP001122334455.cnf.xml HTTP/1.1\r\nHost\r\n\r\n",
    b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n",  # pipelined
    b"GET /SEP001122334455.cnf.xml HTTP/1.1\r\n",  # not complete yet
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", NOT_PLAIN)
def test_anything_else_is_not_plain(request_bytes: bytes) -> None:
    assert parse_plain_get(request_bytes) is None


@pytest.mark.parametrize(
    "requests",
    [
        [NOT_PLAIN[0], PLAIN[0]],  # HEAD, then a plain GET: twisted.web answers both
        [NOT_PLAIN[3], PLAIN[0]],  # Connection: close: twisted.web closes after it
        [NOT_PLAIN[1], PLAIN[0]],  # 405, then a GET
        [NOT_PLAIN[8]],  # two spaces: twisted.web's 400
        [NOT_PLAIN[13].replace(b"/a", b"/SEP001122334455.cnf.xml").replace(b"/b", b"/empty.txt")],
        [PLAIN[0][:20], PLAIN[0][20:]],  # one request in two writes
        [PLAIN[0], NOT_PLAIN[0], PLAIN[0]],  # plain, HEAD, plain again
    ],
)
@pytest_twisted.ensureDeferred
async def test_the_rest_of_the_connection_is_twisted_webs(
    servers: tuple[int, _Built, int], requests: list[bytes]
) -> None:
    plain_port, plain, general_port = servers
    answers = b"".join(requests).count(b"\r\n\r\n")
    fast, fast_closed = await exchange(plain_port, requests, answers)
    slow, slow_closed = await exchange(general_port, requests, answers)
    assert fast and _masked(fast) == _masked(slow)
    assert fast_closed == slow_closed
    assert plain.built[-1]._handing_over


def test_plain_gets_keep_the_connection_alive_as_twisted_web_does() -> None:
    """Each plain GET restarts the site's idle timeout, as twisted.web's parser would."""
    clock = MemoryReactorClock()
    site = provisioning_site(Source(Path("/nonexistent")), timeout=60.0)  # type: ignore[arg-type]
    site.reactor = clock
    front = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
    front.makeConnection(transport)
    for _ in range(3):
        clock.advance(50)
        front.dataReceived(b"GET /memory.xml HTTP/1.1\r\n\r\n")
        assert transport.value().endswith(CONFIG)
        transport.clear()
        assert not transport.disconnecting
    clock.advance(59)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting  # idle for 60 s: twisted.web's timeout closes it
    front.connectionLost(Exception("closed"))


def test_the_resource_sees_a_request_like_twisted_webs() -> None:
    """What the front hands the resource answers what the resource asks of a Request."""
    seen: list[Any] = []

    class Recording(ProvisioningResource):
        def render(self, request: Any) -> Any:
            seen.append(
                (request.method, request.path, request.uri, request.getHeader(b"RANGE"),
                 request.getHeader(b"x-missing"), request.getClientAddress().port)
            )  # fmt: skip
            return super().render(request)

    site = provisioning_site(Source(Path("/nonexistent")))  # type: ignore[arg-type]
    site.resource = Recording(Source(Path("/nonexistent")))  # type: ignore[arg-type]
    front = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5001))
    front.makeConnection(transport)
    front.dataReceived(b"GET /memory.xml?a=b HTTP/1.1\r\nRange: bytes=0-3\r\n\r\n")
    assert seen == [(b"GET", b"/memory.xml", b"/memory.xml?a=b", b"bytes=0-3", None, 5001)]
    assert transport.value().startswith(b"HTTP/1.1 206 Partial Content\r\nServer: TwistedWeb/")
    assert transport.value().endswith(b"\r\n\r\n" + CONFIG[:4])
