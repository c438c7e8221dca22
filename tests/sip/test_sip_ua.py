"""The emulated phone's SIP UA against the real registrar over loopback TCP (and TLS)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from callboard.phone.sip_ua import SipUserAgent
from callboard.protocols.sip.cisco import PHONE_SUPPORTED, parse_alarm, parse_reason_alarm
from callboard.protocols.sip.message import Message, Request
from callboard.protocols.sip.multipart import body_parts
from callboard.protocols.sip.registrar import Registrar, RegistrarSettings, Source
from callboard.protocols.sip.transports import SIPRegistrarService, make_tls_server_options
from twisted.internet import reactor, ssl, task


@pytest_twisted.async_yield_fixture
async def ua_server(
    policy: Any, server_cert: tuple[bytes, bytes]
) -> AsyncIterator[SIPRegistrarService]:
    registrar = Registrar(
        policy,
        RegistrarSettings(min_expires=1, sweep_interval=0.2),
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
    yield svc
    await svc.stopService()


def make_ua(svc: SIPRegistrarService, transport: str = "tcp", **kw: Any) -> SipUserAgent:
    port = svc.tcp_port if transport == "tcp" else svc.tls_port
    assert port is not None
    args: dict[str, Any] = {
        "device_name": "SEP001122334455",
        "mac": "001122334455",
        "model_id": "683",
        "model": "8841",
        "lines": [("1001", "", ""), ("1002", "a1002", "pw")],
        "load": "sip88xx.14-2-1",
    }
    args.update(kw)
    if transport == "tls":
        args["tls_options"] = ssl.CertificateOptions(verify=False)
    return SipUserAgent(reactor, "127.0.0.1", port, transport, **args)


@pytest_twisted.ensureDeferred
async def test_ua_register_digest_refresh_unregister(ua_server: SIPRegistrarService) -> None:
    reg = ua_server.registrar
    ua = make_ua(ua_server, expires=3, refresh_delta=2)
    try:
        d = ua.register()
        d.addTimeout(5, reactor)
        result = await d
        assert result.ok, result
        assert [line.status for line in result.lines] == [200, 200]
        assert result.lines[0].newreg and not result.lines[1].newreg
        assert result.lines[0].keepalive == 120 and result.lines[0].expires == 3
        bindings = reg.bindings_for_device("SEP001122334455")
        assert sorted(b.aor for b in bindings) == ["sip:1001@127.0.0.1", "sip:1002@127.0.0.1"]
        assert all(b.user_agent == "Cisco-CP8841/sip88xx.14-2-1" for b in bindings)
        assert reg.counters.challenged_401 == 1
        first_cseq = {b.aor: b.cseq for b in bindings}
        # Refresh at max(3 - 2, 1.5) = 1.5 s, before the 3 s expiry; wait past the expiry.
        await task.deferLater(reactor, 3.5, lambda: None)
        assert ua.refreshes >= 1
        bindings = reg.bindings_for_device("SEP001122334455")
        assert len(bindings) == 2
        assert all(b.cseq > first_cseq[b.aor] for b in bindings)
        assert reg.counters.expired == 0
        d = ua.unregister()
        d.addTimeout(5, reactor)
        result = await d
        assert result.ok and all(line.expires == 0 for line in result.lines)
        assert reg.bindings_for_device("SEP001122334455") == []
        assert not ua.registered
    finally:
        d2 = ua.close()
        d2.addTimeout(5, reactor)
        await d2


@pytest_twisted.ensureDeferred
async def test_ua_refused_and_tls(ua_server: SIPRegistrarService) -> None:
    ua = make_ua(
        ua_server, device_name="SEP00AABBCCDDEE", mac="00AABBCCDDEE", lines=[("2001", "", "")]
    )
    try:
        d = ua.register()
        d.addTimeout(5, reactor)
        result = await d
        assert not result.ok and result.status == 403
        assert result.lines[0].warning is not None and "not activated" in result.lines[0].warning
    finally:
        await ua.close()
    ua = make_ua(ua_server, "tls")
    try:
        d = ua.register()
        d.addTimeout(5, reactor)
        result = await d
        assert result.ok
        assert {
            b.transport for b in ua_server.registrar.bindings_for_device("SEP001122334455")
        } == {"tls"}
    finally:
        await ua.close()


class RecordingRegistrar(Registrar):
    """The real registrar, remembering every request it was handed (what the phone sent)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.seen: list[Request] = []

    def handle_message(self, msg: Message, source: Source) -> Any:
        if isinstance(msg, Request):
            self.seen.append(msg)
        return super().handle_message(msg, source)


@pytest_twisted.async_yield_fixture
async def recording_server(policy: Any) -> AsyncIterator[SIPRegistrarService]:
    registrar = RecordingRegistrar(
        policy,
        RegistrarSettings(keepalive_expires=30),
        now=reactor.seconds,  # type: ignore[attr-defined]
        wall_now=time.time,
    )
    svc = SIPRegistrarService(
        registrar, reactor, udp_port=None, tcp_port=0, tls_port=None, interface="127.0.0.1"
    )
    svc.startService()
    yield svc
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_ua_speaks_like_a_7821(recording_server: SIPRegistrarService) -> None:
    """The alarm REFER first, then the first line's REGISTER with Reason and the remotecc
    body; the second line and the refresh without them; the answers read back."""
    reg = recording_server.registrar
    assert isinstance(reg, RecordingRegistrar)
    ua = make_ua(recording_server, inactive_load="sip88xx.12-8-1", itl_tftp_server="cb.example")
    try:
        d = ua.register()
        d.addTimeout(5, reactor)
        result = await d
        assert result.ok and result.alarm_status == 202
        refer, first, challenged, authed = reg.seen
        # The DeviceTLInfo REFER (TechNote 214535's headers).
        assert refer.method == "REFER" and refer.headers.get("require") == "norefersub"
        assert (refer.headers.get("refer-to") or "").startswith("cid:")
        assert refer.headers.get("content-id") == f"<{refer.headers.get('refer-to', '')[4:]}>"
        assert refer.headers.get("content-type") == "application/x-cisco-alarm+xml"
        alarm = parse_alarm(refer.body)
        assert (alarm.name, alarm.device_name) == ("DeviceTLInfo", "SEP001122334455")
        assert alarm.get("ITL_TFTP_Server") == "cb.example" and alarm.get("IPv4Address")
        assert reg.counters.alarms == 1
        # The first REGISTER: Reason, Supported, Session-ID, the two-part remotecc body.
        assert first.method == "REGISTER" and first.headers.get("supported") == PHONE_SUPPORTED
        said = parse_reason_alarm(first.headers.get_all("reason"))
        assert said is not None and said.name == "SEP001122334455" and said.last == "initialized"
        assert (said.active_load, said.inactive_load) == ("sip88xx.14-2-1", "sip88xx.12-8-1")
        assert (first.headers.get("session-id") or "").startswith(ua.session_id + ";remote=")
        assert first.headers.get("mime-version") == "1.0" and len(first.body) == 1313
        parts = body_parts(first.headers.get("content-type"), first.body)
        assert [p.content_type for p in parts] == ["application/x-cisco-remotecc-request+xml"] * 2
        # The second line: plain, as a 7821 sends it; its digest answer is MD5.
        for plain in (challenged, authed):
            assert "reason" not in plain.headers and plain.body == b""
        assert "algorithm=MD5" in (authed.headers.get("authorization") or "")
        # What the phone read back.
        line1, line2 = result.lines
        assert line1.newreg and not line2.newreg and line1.keepalive == 30
        assert line1.remotecc is not None and line1.remotecc.code == 200
        assert "presence:blf speed dial" in line1.remotecc.options and line2.remotecc is None
        # SIPCC refreshes at the lowest of asked, granted and the keep-alive (30 s, less 5 s).
        assert ua._refresh is not None
        assert ua._refresh.getTime() - reactor.seconds() == pytest.approx(25, abs=1)  # type: ignore[attr-defined]
        # A refresh: no REFER, no Reason, no body, not new.
        reg.seen.clear()
        d = ua.register()
        d.addTimeout(5, reactor)
        again = await d
        assert again.ok and again.alarm_status is None and not again.newreg
        assert [r.method for r in reg.seen] == ["REGISTER"] * 3  # line 2 challenged again
        assert all("reason" not in r.headers and r.body == b"" for r in reg.seen)
        assert reg.counters.alarms == 1 and reg.counters.remotecc_answers == 1
    finally:
        await ua.close()


class DeafToRefer(Registrar):
    """A registrar that never answers REFER (an older one, or a lost answer)."""

    def handle_message(self, msg: Message, source: Source) -> Any:
        if isinstance(msg, Request) and msg.method == "REFER":
            return None
        return super().handle_message(msg, source)


@pytest_twisted.ensureDeferred
async def test_ua_registers_when_the_alarm_goes_unanswered(policy: Any) -> None:
    registrar = DeafToRefer(
        policy,
        now=reactor.seconds,  # type: ignore[attr-defined]
        wall_now=time.time,
    )
    svc = SIPRegistrarService(
        registrar, reactor, udp_port=None, tcp_port=0, tls_port=None, interface="127.0.0.1"
    )
    svc.startService()
    ua = make_ua(svc, lines=[("1001", "", "")], response_timeout=1.0)
    try:
        d = ua.register()
        d.addTimeout(5, reactor)
        result = await d
        assert result.ok and result.alarm_status is None and result.lines[0].newreg
        assert len(registrar.bindings_for_device("SEP001122334455")) == 1
    finally:
        await ua.close()
        await svc.stopService()
