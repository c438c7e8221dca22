"""A policy that answers later (a Deferred, as autoregistration's store write will).

The registrar answers when the Deferred fires, keeps the REGISTERs of one AoR in the order
received while one is pending, absorbs retransmissions meanwhile, and lets other AoRs through
at once. The transports send those late replies: a stream in order, pausing its reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from callboard.protocols.sip.message import Response, parse_message
from callboard.protocols.sip.registrar import (
    MAX_WAITING_PER_AOR,
    PolicyDecision,
    Registrar,
    RegistrarSettings,
    RegistrationRequest,
    Reply,
    Source,
)
from callboard.protocols.sip.transports import (
    SIPDatagramProtocol,
    SIPRegistrarService,
    make_tls_server_options,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.logger import globalLogPublisher

from .conftest import (  # type: ignore[import-not-found]
    FakeClock,
    MemoryPolicy,
    open_stream,
    stream_responses,
)
from .test_sip_loopback import TIMEOUT, Peer  # type: ignore[import-not-found]

SRC = Source("udp", "192.0.2.50", 50057)


class HandPolicy:
    """Answers REGISTERs of ``deferred_users`` with a Deferred the test fires by hand (from the
    in-memory policy's decision); the others at once."""

    def __init__(self, inner: MemoryPolicy, deferred_users: frozenset[str]) -> None:
        self.inner = inner
        self.deferred_users = deferred_users
        self.pending: list[tuple[RegistrationRequest, Deferred[PolicyDecision]]] = []
        self.asked: DeferredQueue[RegistrationRequest] = DeferredQueue()

    def decide(self, request: RegistrationRequest) -> PolicyDecision | Deferred[PolicyDecision]:
        if request.aor_user not in self.deferred_users:
            return self.inner.decide(request)
        d: Deferred[PolicyDecision] = Deferred()
        self.pending.append((request, d))
        self.asked.put(request)
        return d

    def answer(self) -> RegistrationRequest:
        request, d = self.pending.pop(0)
        d.callback(self.inner.decide(request))
        return request

    def fail(self) -> None:
        _, d = self.pending.pop(0)
        d.errback(RuntimeError("store unavailable"))


@pytest.fixture
def hand(policy: MemoryPolicy) -> HandPolicy:
    return HandPolicy(policy, frozenset({"1001"}))


@pytest.fixture
def registrar(hand: HandPolicy, clock: FakeClock) -> Registrar:
    return Registrar(hand, RegistrarSettings(), now=clock, wall_now=lambda: 1553819486.0)


class Later:
    """Collects what a Deferred answer fires with."""

    def __init__(self, answer: Any) -> None:
        assert isinstance(answer, Deferred), f"expected a Deferred, got {answer!r}"
        self.results: list[Reply] = []
        self.failures: list[Any] = []
        answer.addCallbacks(self.results.append, self.failures.append)

    @property
    def response(self) -> Response:
        [reply] = self.results
        msg = parse_message(reply.data)
        assert isinstance(msg, Response)
        return msg


def status_of(reply: Any) -> int:
    assert isinstance(reply, Reply)
    msg = parse_message(reply.data)
    assert isinstance(msg, Response)
    return msg.status


def test_answered_when_the_policy_fires(
    registrar: Registrar, hand: HandPolicy, make_register: Callable[..., bytes]
) -> None:
    later = Later(registrar.handle_bytes(make_register(), SRC))
    assert later.results == [] and registrar.binding_count() == 0
    hand.answer()
    resp = later.response
    assert resp.status == 200 and resp.headers.values("contact")[0].endswith("x-cisco-newreg")
    [b] = registrar.bindings_for_device("SEP001122334455")
    assert b.registered_at == 1553819486.0 and b.expires_in == 3600


def test_one_aor_in_the_order_received(
    registrar: Registrar, hand: HandPolicy, make_register: Callable[..., bytes]
) -> None:
    # CSeq 2 arrives first; CSeq 1 of the same Call-ID must not overtake it.
    first = Later(registrar.handle_bytes(make_register(cseq=2), SRC))
    second = Later(registrar.handle_bytes(make_register(cseq=1), SRC))
    assert len(hand.pending) == 1  # the second waits without asking the policy
    hand.answer()
    assert first.response.status == 200 and second.results == []
    assert len(hand.pending) == 1  # now the second is asked
    hand.answer()
    assert second.response.status == 400
    assert "CSeq not higher" in (second.response.headers.get("warning") or "")
    # A removal queued behind an addition removes what the addition made.
    add = Later(registrar.handle_bytes(make_register(call_id="c2", cseq=1), SRC))
    remove = Later(
        registrar.handle_bytes(make_register(call_id="c2", cseq=2, contacts=["*"], expires=0), SRC)
    )
    hand.answer()
    hand.answer()
    assert add.response.status == 200 and remove.response.status == 200
    assert registrar.binding_count() == 0 and hand.pending == []


def test_retransmissions_absorbed_while_pending(
    registrar: Registrar, hand: HandPolicy, make_register: Callable[..., bytes]
) -> None:
    data = make_register(branch="z9hG4bKpending1")
    first = Later(registrar.handle_bytes(data, SRC))
    assert registrar.handle_bytes(data, SRC) is None  # no second policy question
    assert len(hand.pending) == 1 and registrar.counters.retransmissions == 1
    hand.answer()
    assert registrar.handle_bytes(data, SRC) == first.results[0]  # then the cached reply
    assert registrar.counters.registrations == 1


def test_other_aors_are_not_held_up(
    registrar: Registrar, hand: HandPolicy, make_register: Callable[..., bytes]
) -> None:
    pending = Later(registrar.handle_bytes(make_register(), SRC))
    # Another line of the same phone, answered at once by the policy: a reply now, no Deferred.
    reply = registrar.handle_bytes(make_register(user="1002", call_id="l2"), SRC)
    assert status_of(reply) == 401
    assert status_of(registrar.handle_bytes(make_register(method="OPTIONS"), SRC)) == 200
    hand.answer()
    assert pending.response.status == 200


def test_policy_failure_answers_500_and_the_next_goes_on(
    registrar: Registrar, hand: HandPolicy, make_register: Callable[..., bytes]
) -> None:
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        first = Later(registrar.handle_bytes(make_register(cseq=1), SRC))
        second = Later(registrar.handle_bytes(make_register(cseq=2), SRC))
        hand.fail()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert first.response.status == 500 and registrar.counters.policy_failed_500 == 1
    assert any("log_failure" in e for e in logged)
    hand.answer()
    assert second.response.status == 200 and registrar.binding_count() == 1


def test_too_many_waiting_on_one_aor_get_503(
    registrar: Registrar, hand: HandPolicy, make_register: Callable[..., bytes]
) -> None:
    Later(registrar.handle_bytes(make_register(cseq=1), SRC))
    waiting = [
        Later(registrar.handle_bytes(make_register(cseq=2 + i), SRC))
        for i in range(MAX_WAITING_PER_AOR)
    ]
    busy = registrar.handle_bytes(make_register(cseq=100), SRC)
    assert status_of(busy) == 503 and registrar.counters.busy_503 == 1
    for _ in range(MAX_WAITING_PER_AOR + 1):
        hand.answer()
    assert [w.response.status for w in waiting] == [200] * MAX_WAITING_PER_AOR
    [b] = registrar.bindings_for_device("SEP001122334455")
    assert b.cseq == 1 + MAX_WAITING_PER_AOR


def test_an_already_fired_deferred_is_answered_at_once(
    policy: MemoryPolicy, clock: FakeClock, make_register: Callable[..., bytes]
) -> None:
    class Prompt:
        def decide(self, request: RegistrationRequest) -> Deferred[PolicyDecision]:
            d: Deferred[PolicyDecision] = Deferred()
            d.callback(policy.decide(request))
            return d

    reg = Registrar(Prompt(), now=clock, wall_now=lambda: 0.0)
    assert Later(reg.handle_bytes(make_register(), SRC)).response.status == 200
    # The AoR is free again: the next REGISTER is not queued behind anything.
    assert Later(reg.handle_bytes(make_register(cseq=102), SRC)).response.status == 200


# --- the transports send late replies ---------------------------------------------------


def test_stream_answers_in_order_and_pauses_reading(
    registrar: Registrar, hand: HandPolicy, make_register: Callable[..., bytes]
) -> None:
    proto, transport = open_stream(registrar)
    register = make_register(transport="TCP")
    options = make_register(transport="TCP", method="OPTIONS", user="2001")
    proto.dataReceived(register + options)
    assert transport.value() == b"" and transport.producerState == "paused"
    hand.answer()
    got = stream_responses(transport.value())
    assert [(r.status, r.headers.get("cseq")) for r in got] == [
        (200, "101 REGISTER"),
        (200, "101 OPTIONS"),
    ]
    assert transport.producerState == "producing" and not transport.disconnecting


def test_stream_late_reply_after_the_connection_is_gone(
    registrar: Registrar, hand: HandPolicy, make_register: Callable[..., bytes]
) -> None:
    proto, transport = open_stream(registrar)
    proto.dataReceived(make_register(transport="TCP"))
    transport.loseConnection()
    proto.connectionLost(None)
    hand.answer()  # the binding is made; the reply has nowhere to go and is dropped quietly
    assert transport.value() == b"" and registrar.binding_count() == 1


class DatagramTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


def test_datagram_late_reply(
    registrar: Registrar, hand: HandPolicy, make_register: Callable[..., bytes]
) -> None:
    proto = SIPDatagramProtocol(registrar)
    transport = DatagramTransport()
    proto.transport = transport  # type: ignore[assignment]
    proto.datagramReceived(make_register(), ("192.0.2.50", 50057))
    assert transport.sent == []
    hand.answer()
    [(data, addr)] = transport.sent
    assert addr == ("192.0.2.50", 50057) and status_of(Reply(data, *addr)) == 200


@pytest.mark.parametrize("transport", ["tcp", "tls"])
@pytest_twisted.ensureDeferred
async def test_late_replies_in_order_over_loopback(
    transport: str,
    policy: MemoryPolicy,
    server_cert: tuple[bytes, bytes],
    make_register: Callable[..., bytes],
) -> None:
    hand = HandPolicy(policy, frozenset({"1001"}))
    registrar = Registrar(
        hand,
        now=reactor.seconds,  # type: ignore[attr-defined]
        wall_now=time.time,
    )
    svc = SIPRegistrarService(
        registrar,
        reactor,
        udp_port=None,
        tcp_port=0,
        tls_port=0,
        interface="127.0.0.1",
        tls_options=make_tls_server_options(*server_cert),
    )
    svc.startService()
    port = svc.tcp_port if transport == "tcp" else svc.tls_port
    assert port is not None
    peer = Peer(transport, port)
    try:
        await peer.open()
        host = f"127.0.0.1:{peer.local_port}"
        T = transport.upper()
        peer.send(
            make_register(transport=T, contact_host=host)
            + make_register(transport=T, contact_host=host, method="OPTIONS", user="2001")
        )
        asked = hand.asked.get()
        asked.addTimeout(TIMEOUT, reactor)
        await asked
        hand.answer()
        first, second = await peer.recv(), await peer.recv()
        assert (first.status, first.headers.get("cseq")) == (200, "101 REGISTER")
        assert (second.status, second.headers.get("cseq")) == (200, "101 OPTIONS")
        # Reading resumed: the connection still serves (a synchronous answer this time).
        r = await peer.request(make_register(transport=T, contact_host=host, user="2001"))
        assert r.status == 403
    finally:
        await peer.close()
        await svc.stopService()
