"""The emulated phone's SIP UA against the real registrar over loopback TCP (and TLS)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
from callboard.phone.sip_ua import SipUserAgent
from callboard.protocols.sip.registrar import Registrar, RegistrarSettings
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
