"""The lean REGISTER path against the general one: the same answers, byte for byte, and the
same state after each request (bindings, counters, cached answers, what the policy was
asked, how many times).

Two registrars, one with the lean path (the default) and one without, are fed the same
datagrams on the same clock with the same To tags; every answer and every piece of state
must match. The corpus of ``test_sip_register_corpus`` is replayed this way, then
hypothesis generates REGISTER sequences around the common shape: header orders, Expires
forms, Via forms, Cisco and plain contacts, duplicates, credentials, extensions, policies
that refuse, challenge, cap or answer later.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from typing import Any

from callboard.protocols.sip.lean import read_plain_contact, read_plain_to, scan_register
from callboard.protocols.sip.message import params_by_name, parse_name_addr, parse_uri
from callboard.protocols.sip.registrar import (
    PolicyDecision,
    Registrar,
    RegistrarSettings,
    RegistrationRequest,
    Reply,
    Source,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed

from .test_sip_register_corpus import CASES, CISCO, DEVICE, CorpusPolicy, register

NONCE = re.compile(rb'nonce="[^"]*"')
TAGS = bytes(range(256)) * 16  # the To tags both registrars draw, in the same order


class RecordingPolicy(CorpusPolicy):
    """The corpus policy, plus a capped line (1005), one answered later (1009) and one that
    names no device (1006), noting every request it is asked."""

    def __init__(self) -> None:
        self.asked: list[RegistrationRequest] = []

    def decide(  # type: ignore[override]
        self, request: RegistrationRequest
    ) -> PolicyDecision | Deferred[PolicyDecision]:
        self.asked.append(request)
        decision = super().decide(request)
        if not decision.allowed or request.aor_user == "1002":
            return decision
        if request.aor_user == "1005":
            return PolicyDecision(True, device_name=DEVICE, max_expires=300)
        if request.aor_user == "1009":
            return succeed(PolicyDecision.allow(DEVICE))
        return PolicyDecision.allow(DEVICE.lower() if request.aor_user == "1006" else None)


class Pair:
    """A lean and a general registrar side by side on one clock."""

    def __init__(self) -> None:
        self.clock = [1000.0]
        self.lean = self._registrar(lean=True)
        self.general = self._registrar(lean=False)

    def _registrar(self, lean: bool) -> Registrar:
        r = Registrar(
            RecordingPolicy(),
            RegistrarSettings(nonce_secret=b"k" * 32, max_expires=7200, max_contacts=3),
            now=lambda: self.clock[0],
            wall_now=lambda: 1553819486.0 + self.clock[0],
            lean=lean,
        )
        r._tag_pool, r._tag_at = TAGS, 0
        answered: list[int] = []
        r.on_register_answer = answered.append
        r.answered = answered  # type: ignore[attr-defined]
        return r

    def feed(self, data: bytes, source: Source) -> None:
        """Both answer ``data``; the answers and the state after must be the same."""
        got = [_masked(_answer(r.handle_bytes(data, source))) for r in (self.lean, self.general)]
        assert got[0] == got[1], data
        assert state(self.lean) == state(self.general), data


def _answer(answer: Any) -> Reply | None:
    if isinstance(answer, Deferred):
        fired: list[Reply] = []
        answer.addCallback(fired.append)
        assert fired, "a policy answered with a fired Deferred is answered at once"
        return fired[0]
    return answer  # type: ignore[no-any-return]


def _masked(reply: Reply | None) -> Reply | None:
    """The reply with its digest nonce masked (random: the rest must match)."""
    if reply is None:
        return None
    return replace(reply, data=NONCE.sub(b'nonce="NONCE"', reply.data))


def state(r: Registrar) -> dict[str, Any]:
    """Everything a REGISTER may change, in order where order shows."""
    location = r.location
    return {
        "bindings": list(location._bindings.items()),  # type: ignore[attr-defined]
        "by_device": list(location._by_device.items()),  # type: ignore[attr-defined]
        "due": list(location._due.items()),  # type: ignore[attr-defined]
        "counters": dict(r.counters_snapshot()),
        "answers": [(k, _masked(r._transactions.get(k))) for k in r._transactions._answers],
        "tags drawn": r._tag_at,
        "asked": r.policy.asked,  # type: ignore[attr-defined]
        "answered": r.answered,  # type: ignore[attr-defined]
        "waiting": list(r._waiting),
    }


def test_the_corpus_gets_the_same_answers_and_state_on_both_paths() -> None:
    pair = Pair()
    for _name, transport, data in CASES:
        pair.feed(data, Source(transport, "192.0.2.50", 5060))


def test_the_common_register_takes_the_lean_path() -> None:
    """Not parsed as a message: the lean path answered it (and only it)."""
    registrar = Pair().lean
    parsed: list[bytes] = []
    general = registrar._parse_and_handle
    registrar._parse_and_handle = lambda data, *a: parsed.append(data) or general(data, *a)  # type: ignore[method-assign]
    common = register()
    assert scan_register(common, 65536) is not None
    reply = registrar.handle_bytes(common, Source("udp", "192.0.2.50", 5060))
    assert isinstance(reply, Reply) and reply.data.startswith(b"SIP/2.0 200 OK\r\n")
    assert parsed == []
    refused = register(user="1003", call_id="c2", branch="z9hG4bK-2")
    registrar.handle_bytes(refused, Source("udp", "192.0.2.50", 5060))
    assert parsed == [refused]  # handed over with the policy's answer: asked once
    assert len(registrar.policy.asked) == 2  # type: ignore[attr-defined]


def test_unusual_shapes_are_left_to_the_general_path() -> None:
    common = register()
    for unusual in (
        common.replace(b"\r\n\r\n", b"\r\nAuthorization: Digest x\r\n\r\n"),
        common.replace(b"\r\n\r\n", b"\r\nRequire: path\r\n\r\n"),
        common.replace(b"Content-Length: 0", b"Content-Length: 2") + b"hi",
        common.replace(b"CSeq: 1 REGISTER", b"CSeq: 1 register"),
        common.replace(b"Max-Forwards: 70", b"Max-Forwards: 0"),
        common.replace(b"Expires: 3600", b"Expires: 3600\r\nExpires: 60"),
        common.replace(b"Via:", b"v:").replace(b"\r\n", b"\n"),
        common.replace(b"To:", b"To:\r\n "),
        common.replace(b"Call-ID:", b"Call-ID:\t"),
        common.replace(b"14.2.1", b"14.2.\xc3\xa9"),
        b"\r\n" + common,
    ):
        assert scan_register(unusual, 65536) is None, unusual


# --- generated REGISTER sequences ---------------------------------------------------------

MACS = ("001122334455", "00aabbccddee")
CONTACTS = (
    f"<sip:{'a' * 8}@192.0.2.50:5060;transport=udp>{CISCO}",
    f"<sip:{'b' * 8}@192.0.2.50:5060;transport=udp>{CISCO}".replace(MACS[0], MACS[1]),
    f"<sip:{'a' * 8}@192.0.2.50:5060;transport=udp>{CISCO};expires=600",
    f"<sip:{'a' * 8}@192.0.2.50:5060;transport=udp>{CISCO};expires=0",
    f"<sip:{'a' * 8}@192.0.2.50:5060;transport=udp>{CISCO};expires=30",
    f"<sip:{'a' * 8}@192.0.2.50:5060;transport=udp>{CISCO};expires=x",
    f"<sip:{'a' * 8}@192.0.2.50:5060;transport=udp>{CISCO};x-cisco-newreg",
    f"<sip:{'a' * 8}@192.0.2.50:5060>{CISCO};expires=0;cisco-keep-alive",
    f'"Desk" <sip:{"c" * 8}@192.0.2.52>{CISCO}',
    f'<sip:{"d" * 8}@192.0.2.53>  ;  +sip.instance="<urn:uuid:1>"{CISCO}',
    "<sip:1001@192.0.2.51:5062>",
    "<sip:1001@192.0.2.51:5062>;expires=120",
    "sip:1001@192.0.2.54;q=0.5",
    f"<sip:x@192.0.2.52>{CISCO}, <sip:y@192.0.2.53:5070>",
    "*",
    f"<sip:%61b@192.0.2.55>{CISCO}",
)
VIAS = (
    "Via: SIP/2.0/UDP 192.0.2.50:5060;branch={branch};rport",
    "Via: SIP/2.0/UDP 192.0.2.50:5060;branch={branch}",
    "Via: SIP/2.0/UDP 198.51.100.7;branch={branch}",
    "Via: SIP/2.0/UDP 10.0.0.1;received=1.2.3.4;rport=9;branch={branch}",
    "Via: SIP/2.0/TCP 192.0.2.50:5061;branch={branch};rport",
    "Via: SIP/2.0/UDP 192.0.2.50:5060;branch={branch}\r\n"
    "Via: SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK-x",
    "Via: SIP/2.0/UDP 192.0.2.50:5060;branch={branch}, SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK-y",
    "v: SIP/2.0/UDP 192.0.2.50:5060;branch={branch};rport",
    "Via:  SIP/2.0/UDP [2001:db8::1]:5060;branch={branch};rport ",
    "Via: SIP/2.0/UDP 192.0.2.50:5060;branch=old-{branch}",
)
EXTRAS = (
    "X-Note: hello",
    'Authorization: Digest username="a1002"',
    "Require: path",
    "Proxy-Require: x",
    'Reason: SIP;cause=200;text="cisco-alarm:24 Name=SEP001122334455 Load=SIP88xx.14-2"',
    "Supported: path, outbound",
    "Content-Type: application/x-foo",
    "Expires: 60",
    "To: <sip:1004@192.0.2.10>",
    "Content-Length: 0",
    "max-forwards: 0",
    "P-Bad Name: x",
)


@st.composite
def registers(draw: st.DrawFn) -> tuple[bytes, Source]:
    common = draw(st.booleans())  # the shape the lean path takes, mostly
    user = draw(st.sampled_from(("1001", "1001", "1002", "1003", "1004", "1005", "1006", "1009")))
    cseq = draw(st.integers(1, 4))
    branch = f"z9hG4bK-{draw(st.integers(1, 5))}"
    to_tag = draw(st.sampled_from(("", "", ";tag=x1", " ; tag = y")))
    lines = [
        draw(st.sampled_from(VIAS[:5] + VIAS[8:] if common else VIAS)).format(branch=branch),
        f"From: <sip:{user}@192.0.2.10>;tag=f{cseq}",
        f"To: <sip:{user}@192.0.2.10>{to_tag}",
        f"Call-ID: {draw(st.sampled_from(('c1@192.0.2.50', 'c2')))}",
        f"CSeq: {cseq} REGISTER",
    ]
    one = st.lists(st.sampled_from(CONTACTS[:3] + CONTACTS[6:7] + CONTACTS[10:13]), min_size=1)
    contacts = one if common else st.lists(st.sampled_from(CONTACTS), max_size=2)
    lines += [f"Contact: {c}" for c in draw(contacts)[: 2 - common]]
    expires = draw(
        st.sampled_from((None, "3600", "999999", " 120"))
        if common
        else st.sampled_from((None, "3600", "0", "30", "999999", "soon", " 120"))
    )
    if expires is not None:
        lines.append(f"Expires: {expires}")
    hops = draw(st.sampled_from((None, "70", "70", "0", "x")[: 3 if common else 5]))
    if hops is not None:
        lines.append(f"Max-Forwards: {hops}")
    if draw(st.booleans()):
        lines.append("User-Agent: Cisco-CP8841/14.2.1")
    lines += draw(st.lists(st.sampled_from(EXTRAS[:1] if common else EXTRAS), max_size=2))
    lines = draw(st.permutations(lines))
    if draw(st.booleans()):
        lines.append("Content-Length: 0")
    ruri = draw(st.sampled_from(("sip:192.0.2.10", "sip:192.0.2.10:5060", "tel:1", "sip:")))
    eol = "\r\n" if common else draw(st.sampled_from(("\r\n", "\n")))
    data = (eol.join([f"REGISTER {ruri} SIP/2.0", *lines]) + eol + eol).encode()
    transport = draw(st.sampled_from(("udp", "udp", "udp", "tcp")))
    host = draw(st.sampled_from(("192.0.2.50", "198.51.100.9")))
    return data, Source(transport, host, draw(st.sampled_from((5060, 5062))))


@settings(max_examples=int(os.environ.get("SIP_LEAN_EXAMPLES", "300")), deadline=None)
@given(st.lists(st.tuples(registers(), st.integers(0, 40)), min_size=1, max_size=6))
def test_generated_registers_get_the_same_answers_and_state_on_both_paths(
    steps: list[tuple[tuple[bytes, Source], int]],
) -> None:
    pair = Pair()
    for (data, source), later in steps:
        pair.feed(data, source)
        pair.clock[0] += later
        pair.lean.sweep()
        pair.general.sweep()
        assert state(pair.lean) == state(pair.general)


# --- the plain To and Contact readers against the general ones ------------------------------

_PIECES = st.sampled_from(
    ("sip:", "sips:", "a", "B", "1", ".", "-", "@", ":", ";", "=", '"', "<", ">", " ", "%41",
     "\\", "tag", "x1", "+sip.instance", "<urn:uuid:1>", "expires", ",", "[::1]", "*", "\t")
)  # fmt: skip


@st.composite
def addresses(draw: st.DrawFn) -> str:
    """Mostly near the plain forms, with a piece of anything anywhere."""
    user = "".join(draw(st.lists(_PIECES, max_size=3))) or "u"
    host = draw(st.sampled_from(("192.0.2.10", "Example.COM", "h", "")))
    params = "".join(
        f";{draw(st.sampled_from(('tag', 'x', '+u.sip!m.c', 'expires', 'lr')))}"
        + draw(st.sampled_from(("", "=1", '="<a;b>"', "=a:b", '=""', "=")))
        for _ in range(draw(st.integers(0, 3)))
    )
    noise = draw(st.lists(_PIECES, max_size=2))
    text = f"<sip:{user}@{host}>{params}"
    at = draw(st.integers(0, len(text)))
    return text[:at] + "".join(noise) + text[at:]


@settings(max_examples=int(os.environ.get("SIP_LEAN_EXAMPLES", "300")), deadline=None)
@given(addresses())
def test_plain_readers_read_as_the_general_ones(value: str) -> None:
    to = read_plain_to(value)
    if to is not None:
        uri = parse_uri(parse_name_addr(value).uri)
        assert to == (uri.user, uri.aor)
    contact = read_plain_contact(value)
    if contact is not None:
        address = parse_name_addr(value)
        assert contact == (address.uri, params_by_name(address.params))
        assert str(address) == value


def test_plain_readers_read_the_cisco_forms() -> None:
    assert read_plain_to("<sip:2000001@Example.com>;tag=x") == (
        "2000001",
        "sip:2000001@example.com",
    )
    cisco = f"<sip:{'a' * 8}@192.0.2.50:5060;transport=udp>{CISCO}"
    address = parse_name_addr(cisco)
    assert read_plain_contact(cisco) == (address.uri, params_by_name(address.params))
    assert str(address) == cisco
