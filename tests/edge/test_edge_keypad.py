"""Activation by voice through the edge (issues 14 and 15): a stock phone with a trusted MIC
and no token fetches its bootstrap config through the edge, registers the bootstrap account
over the edge's SIP over TLS with digest, calls the activation number and keys its code as
SIP INFO; the IVR's rules decide. Python's ``ssl`` is the phone (Debian's sipp has no TLS),
with lab MICs; the real service tree runs on loopback sockets."""

from __future__ import annotations

import re
import secrets
import socket
import ssl
import time
import wave
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
import structlog
from callboard.daemon import certs
from callboard.daemon.config import load_config
from callboard.daemon.edge.settings import RemoteSettings
from callboard.daemon.registry.model import DeviceState, Line, Onboarding
from callboard.daemon.registry.registry import DeviceSpec
from callboard.daemon.service import CallboardService
from callboard.protocols.rtp.events import DIGITS, encode_event
from callboard.protocols.rtp.packet import RTPPacket
from callboard.protocols.sip.digest import build_authorization, parse_challenge
from cryptography.hazmat.primitives import hashes
from support.edge import get_config
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

T = TypeVar("T")
Mic = tuple[Path, Path]
MAC = "00AABBCCDD65"  # the stock phone (8865, onboarding ivr)
MAC_OTHER = "00AABBCCDD66"
HOST = "127.0.0.1"
TIMEOUT = 15.0  # seconds any one read from the edge may take


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("keypad-lab")
    trusted = certs.make_lab_ca()
    certs.write_lab_ca(base / "trust", trusted)
    stranger = certs.make_lab_ca(root_cn="Stranger Root", ca_cn="Stranger CA")

    def mic(label: str, ca: certs.LabCA, mac: str) -> Mic:
        return certs.write_mic(base / label, certs.issue_mic(ca, model="8865", mac=mac))

    return {
        "trust": base / "trust",
        "phone": mic("phone", trusted, MAC),
        "other": mic("other", trusted, MAC_OTHER),  # trusted, but another MAC
        "stranger": mic("stranger", stranger, MAC),  # names the MAC, untrusted chain
        "twin": mic("twin", trusted, MAC),  # trusted, same MAC, not the one activated with
    }


def short_prompts(directory: Path) -> None:
    """0.1 s prompts in the state directory (replaceable prompts): the call is quick."""
    directory.mkdir(parents=True)
    for name in ("enter-code", "accepted", "rejected", "too-many"):
        with wave.open(str(directory / f"{name}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(b"\x10\x00" * 800)


class Edge:
    def __init__(self, service: CallboardService) -> None:
        self.service = service

    def port(self, label: str) -> int:
        for listener in self.service.listeners:
            address = listener.address()
            if listener.label == label and address is not None:
                return address[1]
        raise AssertionError(label)

    @property
    def base(self) -> str:
        return f"https://{HOST}:{self.port('edge')}"

    async def stock_phone(
        self, *, allow_remote: bool = True, lines: tuple[Line, ...] = (Line("4711"),)
    ) -> str:
        """An 8865 (onboarding ivr) waiting for its code: the code's digits."""
        registry = self.service.registry
        await registry.set_default("8865", Onboarding.IVR)
        device = await registry.add_device(
            DeviceSpec(
                model="8865",
                mac=MAC,
                lines=lines,
                requires_activation=True,
                allow_remote=allow_remote,
            )
        )
        code = registry.current_code(device)
        assert code is not None
        return code.code


@pytest_twisted.async_yield_fixture
async def edge(tmp_path: Path, lab: dict[str, Any]) -> AsyncIterator[Edge]:
    state = tmp_path / "state"
    short_prompts(state / "prompts")
    ports = ("tftp", "http", "tvs", "sip", "sip_tls")
    config = load_config(
        None,
        {
            "state_dir": str(state),
            "network.listen_addresses": [HOST],
            **{f"network.{name}_port": 0 for name in ports},
            "edge.port": 0,
            "edge.sip_oauth_port": 0,
            "tvs.manufacturing_trust": str(lab["trust"]),
            "tvs.failure_budget": 3,
            "tvs.failure_budget_per_source": 50,
            "ivr.answer_delay": 0.05,
            "ivr.rtp_address": HOST,
        },
    )
    service = CallboardService(config, reactor)
    service.startService()
    try:
        yield Edge(service)
    finally:
        await service.stopService()


async def in_thread(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    d = deferToThread(call, *args, **kwargs)
    d.addTimeout(60, reactor)
    return await d


# --- the phone: SIP over TLS with Python's ssl ------------------------------------------


@dataclass
class Message:
    first: str
    headers: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""

    @property
    def status(self) -> int:
        return int(self.first.split()[1]) if self.first.startswith("SIP/2.0") else 0

    @property
    def method(self) -> str:
        return "" if self.first.startswith("SIP/2.0") else self.first.split()[0]

    def header(self, name: str) -> str:
        return self.headers[name.lower()][0]


class TLSPhone:
    """One TLS connection to the edge's SIP port, presenting ``mic`` (or no certificate)."""

    def __init__(self, port: int, mic: Mic | None, user: str) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if mic is not None:
            context.load_cert_chain(str(mic[0]), str(mic[1]))
        raw = socket.create_connection((HOST, port), timeout=TIMEOUT)
        self.tls = context.wrap_socket(raw)
        self.local = "{}:{}".format(*self.tls.getsockname()[:2])
        self.port = port
        self.user = user
        self.call_id = secrets.token_hex(8)
        self.tag = secrets.token_hex(4)
        self.cseq = 0
        self._buffer = b""

    def close(self) -> None:
        self.tls.close()

    def send(self, first: str, headers: list[tuple[str, str]], body: bytes = b"") -> None:
        lines = [first, *(f"{n}: {v}" for n, v in headers), f"Content-Length: {len(body)}"]
        self.tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def read(self) -> Message:
        while b"\r\n\r\n" not in self._buffer:
            self._fill()
        head, _, rest = self._buffer.partition(b"\r\n\r\n")
        first, *lines = head.decode().split("\r\n")
        headers: dict[str, list[str]] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        length = int(headers.get("content-length", ["0"])[0])
        while len(rest) < length:
            self._fill()
            rest = self._buffer.partition(b"\r\n\r\n")[2]
        self._buffer = rest[length:]
        return Message(first, headers, rest[:length])

    def _fill(self) -> None:
        chunk = self.tls.recv(65536)
        if not chunk:
            raise ConnectionError("the edge closed the connection")
        self._buffer += chunk

    def final(self) -> Message:
        """The final response to the request just sent (provisional ones skipped)."""
        while True:
            msg = self.read()
            if msg.status >= 200:
                return msg

    def _dialog_headers(
        self, method: str, to: str, cseq: int | None = None
    ) -> list[tuple[str, str]]:
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        return [
            ("Via", f"SIP/2.0/TLS {self.local};branch=z9hG4bK{secrets.token_hex(8)};rport"),
            ("Max-Forwards", "70"),
            ("From", f"<sip:{self.user}@{HOST}>;tag={self.tag}"),
            ("To", to),
            ("Call-ID", self.call_id),
            ("CSeq", f"{cseq} {method}"),
            ("User-Agent", "Cisco-CP8865/14.2.1"),
        ]

    def register(self, password: str | None, aor: str | None = None) -> Message:
        """REGISTER (answering one digest challenge when a password is given)."""
        aor = aor or self.user
        to = f"<sip:{aor}@{HOST}>"
        instance = f'"<urn:uuid:00000000-0000-0000-0000-{MAC.lower()}>"'
        extra = [
            ("Contact", f"<sip:{aor}@{self.local};transport=tls>;+sip.instance={instance}"),
            ("Expires", "3600"),
        ]
        self.send(f"REGISTER sip:{HOST} SIP/2.0", [*self._dialog_headers("REGISTER", to), *extra])
        answer = self.final()
        if answer.status != 401 or password is None:
            return answer
        challenge = parse_challenge(answer.headers.get("www-authenticate", []))
        auth = build_authorization(
            challenge, method="REGISTER", uri=f"sip:{HOST}", username=aor, password=password
        )
        headers = [*self._dialog_headers("REGISTER", to), *extra, ("Authorization", auth)]
        self.send(f"REGISTER sip:{HOST} SIP/2.0", headers)
        return self.final()

    def invite(self, number: str, rtp_port: int) -> Message:
        self.call_id = secrets.token_hex(8)
        sdp = (
            f"v=0\r\no=phone 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
            f"m=audio {rtp_port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
            "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\n"
        ).encode()
        headers = [
            *self._dialog_headers("INVITE", f"<sip:{number}@{HOST}>"),
            ("Contact", f"<sip:{self.user}@{self.local};transport=tls>"),
            ("Content-Type", "application/sdp"),
        ]
        self.send(f"INVITE sip:{number}@{HOST}:{self.port} SIP/2.0", headers, sdp)
        return self.final()

    def ack(self, number: str, ok: Message) -> None:
        cseq = int(ok.header("cseq").split()[0])
        self.send(f"ACK sip:{number}@{HOST} SIP/2.0",
                  self._dialog_headers("ACK", ok.header("to"), cseq))  # fmt: skip

    def info(self, number: str, to: str, digit: str) -> Message:
        headers = [
            *self._dialog_headers("INFO", to),
            ("Content-Type", "application/dtmf-relay"),
        ]
        self.send(
            f"INFO sip:{number}@{HOST} SIP/2.0",
            headers,
            f"Signal={digit}\r\nDuration=160\r\n".encode(),
        )
        return self.final()

    def answer(self, request: Message, status: int = 200) -> None:
        """Answer a request of the edge's (BYE, NOTIFY) on this connection."""
        headers = [
            (name, request.header(name)) for name in ("via", "from", "to", "call-id", "cseq")
        ]
        self.send(f"SIP/2.0 {status} OK", headers)


def bootstrap_account(config: bytes) -> tuple[str, str]:
    """(authName, authPassword) of the bootstrap config's one line."""
    text = config.decode()
    name = re.search(r"<authName>([^<]+)</authName>", text)
    password = re.search(r"<authPassword>([^<]+)</authPassword>", text)
    assert name is not None and password is not None
    return name.group(1), password.group(1)


@dataclass
class CallRecord:
    register_challenge: Message
    register: Message
    invite: Message
    infos: list[list[int]] = field(default_factory=list)  # each code's INFO answers
    requests: list[Message] = field(default_factory=list)  # the edge's, answered 200
    bye: Message | None = None  # the answer to our BYE, when we hung up
    rtp_packets: int = 0


def rfc4733(rtp: socket.socket, port: int, keys: str) -> None:
    """Each key as one telephone-event (payload type 101, as our SDP offered): a start
    packet, then the end packet three times (RFC 4733 §2.5.1.4), 60 ms apart per key."""
    ssrc, sequence = secrets.randbits(32), secrets.randbits(15)
    for n, key in enumerate(keys):
        event = DIGITS.index(key)
        for i, (end, length) in enumerate([(False, 160), (True, 800), (True, 800), (True, 800)]):
            payload = encode_event(event, end=end, duration=length)
            packet = RTPPacket(101, sequence, 8000 * (n + 1), ssrc, payload, marker=i == 0)
            rtp.sendto(packet.to_bytes(), (HOST, port))
            sequence += 1
        time.sleep(0.06)


def keypad_activation(
    port: int, mic: Mic, user: str, password: str, codes: list[str], *, activates: bool = True
) -> CallRecord:
    """The stock phone's whole conversation on one TLS connection: REGISTER (challenge, then
    digest), INVITE the activation number, each code as SIP INFO digits then ``#`` (or, for
    ``rtp:<digits>``, as RFC 4733 events); then the
    edge's BYE and NOTIFY answered, or (``activates`` false) our own BYE a second later."""
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp.bind((HOST, 0))
    rtp.settimeout(0.01)
    phone = TLSPhone(port, mic, user)
    try:
        record = CallRecord(phone.register(None), phone.register(password), Message(""))
        record.invite = ok = phone.invite("activate", rtp.getsockname()[1])
        if ok.status != 200:
            return record
        phone.ack("activate", ok)
        to = ok.header("to")
        media = int(re.search(rb"m=audio (\d+)", ok.body).group(1))  # type: ignore[union-attr]
        for code in codes:
            if code.startswith("rtp:"):  # RFC 4733 events from the port our SDP named
                rfc4733(rtp, media, code.removeprefix("rtp:") + "#")
                continue
            record.infos.append([phone.info("activate", to, d).status for d in [*code, "#"]])
        if activates:
            while not any(r.method == "NOTIFY" for r in record.requests):
                request = phone.read()  # the BYE after the confirmation, then the NOTIFY
                record.requests.append(request)
                phone.answer(request)
        else:
            time.sleep(1.0)  # the verdict and the "not accepted" prompt
            phone.send(f"BYE sip:activate@{HOST} SIP/2.0", phone._dialog_headers("BYE", to))
            record.bye = phone.final()
        while True:
            try:
                rtp.recvfrom(2048)
            except TimeoutError:
                break
            record.rtp_packets += 1
        return record
    finally:
        phone.close()
        rtp.close()


def one_register(
    port: int, mic: Mic | None, user: str, password: str | None, aor: str | None = None
) -> Message:
    phone = TLSPhone(port, mic, user)
    try:
        return phone.register(password, aor)
    finally:
        phone.close()


def register_then(
    port: int, mic: Mic | None, user: str, password: str, then: Callable[[TLSPhone], Message]
) -> tuple[Message, Message]:
    phone = TLSPhone(port, mic, user)
    try:
        return phone.register(password), then(phone)
    finally:
        phone.close()


# --- the tests --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_stock_phone_activates_by_keypad_over_the_edge(
    edge: Edge, lab: dict[str, Any]
) -> None:
    code = await edge.stock_phone()
    served = await in_thread(get_config, edge.base, f"SEP{MAC}.cnf.xml", lab["phone"], None)
    assert served.status == 200, served.body
    user, password = bootstrap_account(served.body)
    assert user == f"bootstrap-{MAC.lower()}"
    # The hotline's dial template the bootstrap config names comes through the edge too.
    assert b"ivr-hotline.xml" in served.body
    hotline = await in_thread(get_config, edge.base, "ivr-hotline.xml", lab["phone"], None)
    assert hotline.status == 200 and b"<TEMPLATE" in hotline.body, hotline.body
    port = edge.port("sip-oauth")

    # A wrong code first (SIP INFO), then the right one as RFC 4733 events.
    codes = ["1111222233334444", f"rtp:{code}"]
    record = await in_thread(keypad_activation, port, lab["phone"], user, password, codes)
    # Digest, not Bearer, for the bootstrap account; then 200.
    assert record.register_challenge.status == 401
    (challenge,) = record.register_challenge.headers["www-authenticate"]
    assert challenge.startswith("Digest ")
    assert record.register.status == 200, record.register.headers
    assert record.invite.status == 200 and b"telephone-event/8000" in record.invite.body
    assert record.infos == [[200] * 17]
    assert [r.method for r in record.requests] == ["BYE", "NOTIFY"]
    assert record.requests[1].header("event") == "check-sync"
    assert record.rtp_packets > 0  # the prompts reached the phone's RTP port

    registry = edge.service.registry
    device = registry.get(f"SEP{MAC}")
    assert device.state is DeviceState.ACTIVE
    mic_sha256 = certs.load_certificate(lab["phone"][0]).fingerprint(hashes.SHA256()).hex()
    assert device.mic_sha256 == mic_sha256  # bound to the MIC that proved the MAC
    assert edge.service.registrar.bindings_for_device(user) == []
    # The wrong code counted in the TVS budget (one failure of three): the device is free.
    assert edge.service.tvs.handler.throttle.locked_for(f"dev:SEP{MAC}", reactor.seconds()) == 0

    # The bootstrap account is gone: its REGISTER and its call are 403, and no bootstrap
    # config is served any more (the real one is, to the pinned MIC: see the tests below).
    again = await in_thread(one_register, port, lab["phone"], user, password)
    assert again.status == 403
    registered, call = await in_thread(
        register_then, port, lab["phone"], user, password, lambda p: p.invite("activate", 9)
    )
    assert registered.status == 403 and call.status == 403
    gone = await in_thread(get_config, edge.base, f"SEP{MAC}.cnf.xml", lab["phone"], None)
    assert gone.status == 200 and b"bootstrap" not in gone.body and b"4711" in gone.body


@pytest_twisted.ensureDeferred
async def test_the_bootstrap_account_needs_the_mic_of_its_own_mac(
    edge: Edge, lab: dict[str, Any]
) -> None:
    await edge.stock_phone()
    served = await in_thread(get_config, edge.base, f"SEP{MAC}.cnf.xml", lab["phone"], None)
    user, password = bootstrap_account(served.body)
    port = edge.port("sip-oauth")

    for mic in (lab["other"], lab["stranger"], None):  # another MAC, untrusted, none
        hotline = await in_thread(get_config, edge.base, "ivr-hotline.xml", mic, None)
        assert hotline.status == 401, (mic, hotline.body)
        refused = await in_thread(one_register, port, mic, user, password)
        assert refused.status == 403, (mic, refused.first)
        assert "www-authenticate" not in refused.headers
    # A call from the account on a connection without its MIC: 403 before the IVR.
    for mic in (lab["other"], None):
        _, call = await in_thread(
            register_then, port, mic, user, password, lambda p: p.invite("activate", 9)
        )
        assert call.status == 403, call.first
        assert "certificate" in call.header("warning")  # the edge's MIC check, before the IVR
    # Line AoRs keep the bearer challenge (RFC 8898), even on the phone's own MIC.
    bearer = await in_thread(one_register, port, lab["phone"], "4711", None)
    assert bearer.status == 401
    assert bearer.header("www-authenticate").startswith('Bearer realm="callboard"')

    # With its MIC: registered; another number, or another method, is 403.
    registered, elsewhere = await in_thread(
        register_then, port, lab["phone"], user, password, lambda p: p.invite("4711", 9)
    )
    assert registered.status == 200 and elsewhere.status == 403

    def message(phone: TLSPhone) -> Message:
        phone.send(f"MESSAGE sip:4711@{HOST} SIP/2.0",
                   phone._dialog_headers("MESSAGE", f"<sip:4711@{HOST}>"), b"hi")  # fmt: skip
        return phone.final()

    _, messaged = await in_thread(register_then, port, lab["phone"], user, password, message)
    assert messaged.status == 403
    assert edge.service.registry.get(f"SEP{MAC}").state is DeviceState.AWAITING_ACTIVATION

    # The enterprise switch closes the door.
    edge.service.config = replace(edge.service.config, remote=RemoteSettings(enabled=False))
    off = await in_thread(one_register, port, lab["phone"], user, password)
    assert off.status == 403


@pytest_twisted.ensureDeferred
async def test_a_device_not_allowed_remotely_gets_no_bootstrap_account_on_the_edge(
    edge: Edge, lab: dict[str, Any]
) -> None:
    await edge.stock_phone(allow_remote=False)
    served = await in_thread(get_config, edge.base, f"SEP{MAC}.cnf.xml", lab["phone"], None)
    assert served.status == 401  # no bootstrap config through the edge
    account = edge.service.ivr.accounts.for_mac(MAC) if edge.service.ivr else None
    assert account is not None  # the LAN would give one
    refused = await in_thread(
        one_register, edge.port("sip-oauth"), lab["phone"], account.user, account.password
    )
    assert refused.status == 403


@pytest_twisted.ensureDeferred
async def test_an_unknown_phone_claims_a_bat_record_only_if_it_allows_remote_activation(
    edge: Edge, lab: dict[str, Any]
) -> None:
    """``ivr.unknown_phones``: the BAT case through the edge. The model comes from the
    phone's REGISTER (User-Agent), the code names the BAT record, and the redemption is a
    remote one: a BAT record without ``--allow-remote`` is not claimed over the edge."""
    service = edge.service
    assert service.ivr is not None
    accounts = service.ivr.accounts
    accounts.settings = replace(accounts.settings, unknown_phones=True)
    registry = service.registry
    await registry.set_default("8865", Onboarding.IVR)

    async def bat(allow_remote: bool) -> str:
        spec = DeviceSpec(model="8865", lines=(Line("4712"),), requires_activation=True,
                          allow_remote=allow_remote)  # fmt: skip
        code = registry.current_code(await registry.add_device(spec))
        assert code is not None
        return code.code

    local_code = await bat(False)
    served = await in_thread(get_config, edge.base, f"SEP{MAC}.cnf.xml", lab["phone"], None)
    assert served.status == 200, served.body
    user, password = bootstrap_account(served.body)
    port = edge.port("sip-oauth")
    with structlog.testing.capture_logs() as logs:
        refused = await in_thread(keypad_activation, port, lab["phone"], user, password,
                                  [local_code], activates=False)  # fmt: skip
    assert refused.invite.status == 200 and refused.infos == [[200] * 17]
    assert refused.bye is not None and refused.bye.status == 200
    assert registry.find(f"SEP{MAC}") is None  # not claimed
    assert any("remote activation not allowed" in str(e.get("reason")) for e in logs)
    assert all(local_code not in repr(e) for e in logs)

    remote_code = await bat(True)
    record = await in_thread(keypad_activation, port, lab["phone"], user, password,
                             [remote_code])  # fmt: skip
    assert [r.method for r in record.requests] == ["BYE", "NOTIFY"], record
    device = registry.get(f"SEP{MAC}")
    assert device.state is DeviceState.ACTIVE and device.model == "8865"
    assert [ln.directory_number for ln in device.lines] == ["4712"]


# --- after activation: the pinned MIC (docs/REMOTE.md section 9) --------------------------


@pytest_twisted.ensureDeferred
async def test_after_keypad_activation_the_pinned_mic_fetches_the_config_and_registers_lines(
    edge: Edge, lab: dict[str, Any]
) -> None:
    line_password = secrets.token_hex(8)
    code = await edge.stock_phone(lines=(Line("4711", "Desk", "4711", line_password),))
    served = await in_thread(get_config, edge.base, f"SEP{MAC}.cnf.xml", lab["phone"], None)
    user, password = bootstrap_account(served.body)
    port = edge.port("sip-oauth")
    record = await in_thread(keypad_activation, port, lab["phone"], user, password, [code])
    assert record.register.status == 200 and [r.method for r in record.requests][-1] == "NOTIFY"
    registry = edge.service.registry
    assert registry.get(f"SEP{MAC}").state is DeviceState.ACTIVE

    # The real config through the edge with the MIC alone: the edge's SIP over TLS.
    name = f"SEP{MAC}.cnf.xml"
    config = await in_thread(get_config, edge.base, name, lab["phone"], None)
    assert config.status == 200, config.body
    assert f"<sipPort>{port}</sipPort>".encode() in config.body
    assert b"<transportLayerProtocol>3</transportLayerProtocol>" in config.body
    assert b"4711" in config.body and b"bootstrap" not in config.body
    signed = await in_thread(get_config, edge.base, f"{name}.sgn", lab["phone"], None)
    itl = await in_thread(get_config, edge.base, "ITLFile.tlv", lab["phone"], None)
    assert signed.status == 200 and itl.status == 200 and itl.body
    # Another trusted MIC naming the same MAC, or another MAC: not the one pinned, 401.
    for mic in (lab["twin"], lab["other"]):
        refused = await in_thread(get_config, edge.base, name, mic, None)
        assert refused.status == 401, mic
        assert refused.headers["www-authenticate"].startswith("Bearer realm=")

    # The line over the edge's SIP over TLS: digest with the line's password.
    ok = await in_thread(one_register, port, lab["phone"], "4711", line_password)
    assert ok.status == 200, ok.headers
    assert [b.device_name for b in edge.service.registrar.bindings_for_device(f"SEP{MAC}")] == [
        f"SEP{MAC}"
    ]
    challenge = await in_thread(one_register, port, lab["phone"], "4711", None)
    assert challenge.status == 401
    assert challenge.header("www-authenticate").startswith("Digest ")
    wrong = await in_thread(one_register, port, lab["phone"], "4711", "not-the-password")
    assert wrong.status in (401, 403)
    twin = await in_thread(one_register, port, lab["twin"], "4711", None)  # no digest offered
    assert twin.status == 401 and twin.header("www-authenticate").startswith("Bearer ")

    # revoke-tokens unpins the MIC: no config, no registration; the bindings are dropped.
    revoked = await registry.revoke_tokens(f"SEP{MAC}")
    assert revoked.mic_sha256 is None
    assert edge.service.registrar.bindings_for_device(f"SEP{MAC}") == []
    gone = await in_thread(get_config, edge.base, name, lab["phone"], None)
    assert gone.status == 401 and gone.headers["www-authenticate"].startswith("Bearer realm=")
    after = await in_thread(one_register, port, lab["phone"], "4711", None)
    assert after.status == 401 and after.header("www-authenticate").startswith("Bearer ")


@pytest_twisted.ensureDeferred
async def test_blanking_the_mac_unpins_the_mic(edge: Edge, lab: dict[str, Any]) -> None:
    """Re-onboarding: the record loses its MAC and its pinned MIC (no call needed: the pin
    is set here as an activation sets it)."""
    registry = edge.service.registry
    await edge.stock_phone()
    mic_sha256 = certs.load_certificate(lab["phone"][0]).fingerprint(hashes.SHA256()).hex()
    device = registry.get(f"SEP{MAC}")
    code = registry.current_code(device)
    assert code is not None
    redeemed = await registry.redeem(
        mac=MAC, model="8865", code=code.code, mic_sha256=mic_sha256, remote=True
    )
    assert redeemed.ok
    name = f"SEP{MAC}.cnf.xml"
    assert (await in_thread(get_config, edge.base, name, lab["phone"], None)).status == 200
    blanked = await registry.set_mac(f"SEP{MAC}", None)
    assert blanked.mic_sha256 is None and blanked.mac is None
    assert (await in_thread(get_config, edge.base, name, lab["phone"], None)).status == 401
