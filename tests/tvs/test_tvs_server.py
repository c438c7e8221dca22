"""TVS over real TLS on 127.0.0.1 with the Callboard client and an in-memory authority."""

from __future__ import annotations

import datetime as dt
import struct
from typing import Any

import pytest_twisted
from callboard.protocols.tvs import client
from callboard.protocols.tvs.activation import Redemption, TVSSettings
from callboard.protocols.tvs.codec import (
    ActivateResponse,
    ActivateStatus,
    Command,
    DeviceName,
    Frame,
    VerifyStatus,
    encode_frame,
)
from callboard.protocols.tvs.itl import Role
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, task

from .conftest import (  # type: ignore[import-not-found]
    DEVICE,
    GOOD_CODE,
    MAC,
    FakeAuthority,
    FakeClock,
    Pki,
    mic_tuple,
    reactor,
)


def _activate(
    server: Any, pki: Pki, mic: Any, *, device: DeviceName = DEVICE, code: str = GOOD_CODE
) -> defer.Deferred[ActivateResponse]:
    return client.activate(
        reactor,
        "127.0.0.1",
        server.port,
        device=device,
        code=code,
        pinned_der=pki.tvs_der,
        mic=mic_tuple(mic) if mic is not None else None,
        timeout=30,
    )


@pytest_twisted.inlineCallbacks
def test_happy_path(pki: Pki, start_server: Any) -> Any:
    server = start_server()
    server.authority.add(GOOD_CODE, mac=MAC)
    resp = yield _activate(server, pki, pki.mic)
    assert resp.status == ActivateStatus.ACTIVATED
    assert resp.device_name_assigned == f"SEP{MAC}"
    assert server.authority.calls[0]["mac"] == MAC
    assert server.authority.calls[0]["model"] == "8841"
    assert len(server.authority.calls[0]["mic"]) == 64


async def _raw_exchange(
    server: Any, pki: Pki, payload: bytes, mic: Any = None
) -> tuple[list[Frame], bool]:
    """Send raw bytes after the handshake; collect frames until the server closes."""
    proto = await client.connect(
        reactor, "127.0.0.1", server.port, pinned_der=pki.tvs_der, mic=mic, timeout=30
    )
    proto.transport.write(payload)  # type: ignore[union-attr]
    closed = proto.closed
    closed.addTimeout(30, reactor)
    await closed
    return proto.frames, True


def _status(frames: list[Frame]) -> int:
    assert len(frames) == 1, frames
    value = frames[0].get(0x07)
    assert value is not None
    return value[0]


@pytest_twisted.inlineCallbacks
def test_refusals_map_to_status_1_with_one_wording(pki: Pki, start_server: Any) -> Any:
    auth = FakeAuthority()
    auth.add("1111111111111111", mac=MAC, used=True)
    auth.add("2222222222222222", mac=MAC, released=True)
    auth.add("3333333333333333", mac=MAC, expired=True)
    auth.add("4444444444444444", mac="00AABBCCDDFF")  # bound to another MAC
    auth.add("5555555555555555", model="8861")  # BAT record, other model
    server = start_server(TVSSettings(throttle_budget=100), authority=auth)
    reasons = set()
    for code in [
        "9999999999999999",
        "1111111111111111",
        "2222222222222222",
        "3333333333333333",
        "4444444444444444",
        "5555555555555555",
    ]:
        resp = yield _activate(server, pki, pki.mic, code=code)
        assert resp.status == ActivateStatus.REJECTED
        assert resp.device_name_assigned is None
        assert code not in resp.reason
        reasons.add(resp.reason)
    assert len(reasons) == 1  # a guesser learns nothing from the wording either


@pytest_twisted.inlineCallbacks
def test_bat_record_bound_to_model_activates(pki: Pki, start_server: Any) -> Any:
    server = start_server()
    server.authority.add(GOOD_CODE, model="8865NR")
    device = DeviceName("8865NR", "00AABBCCDD01")
    resp = yield _activate(server, pki, pki.rsa_mic, device=device)
    assert resp.status == ActivateStatus.ACTIVATED, resp.reason
    assert resp.device_name_assigned == "SEP00AABBCCDD01"


@pytest_twisted.inlineCallbacks
def test_no_client_certificate_is_status_2(pki: Pki, start_server: Any) -> Any:
    server = start_server()
    server.authority.add(GOOD_CODE, mac=MAC)
    resp = yield _activate(server, pki, None)
    assert resp.status == ActivateStatus.CERTIFICATE_NOT_ACCEPTED
    assert "no client certificate" in resp.reason
    assert server.authority.calls == []


@pytest_twisted.inlineCallbacks
def test_untrusted_ca_is_status_2(pki: Pki, start_server: Any) -> Any:
    server = start_server()
    server.authority.add(GOOD_CODE, mac=MAC)
    resp = yield _activate(server, pki, pki.rogue_mic)
    assert resp.status == ActivateStatus.CERTIFICATE_NOT_ACCEPTED
    assert "does not chain" in resp.reason and "Rogue CA" in resp.reason
    assert server.authority.calls == []


@pytest_twisted.inlineCallbacks
def test_expired_mic_is_status_2(pki: Pki, start_server: Any) -> Any:
    server = start_server()
    server.authority.add(GOOD_CODE, mac=MAC)
    resp = yield _activate(server, pki, pki.expired_mic)
    assert resp.status == ActivateStatus.CERTIFICATE_NOT_ACCEPTED
    assert "expired" in resp.reason


@pytest_twisted.inlineCallbacks
def test_cn_must_match_device_name(pki: Pki, start_server: Any) -> Any:
    server = start_server()
    server.authority.add(GOOD_CODE, mac=MAC)
    resp = yield _activate(server, pki, pki.other_mac_mic)  # MIC for ...DDFF, claims ...DDEE
    assert resp.status == ActivateStatus.CERTIFICATE_NOT_ACCEPTED
    assert "does not match device name" in resp.reason
    assert server.authority.calls == []


@pytest_twisted.inlineCallbacks
def test_legacy_ca_without_aki_ski_or_pathlen_is_accepted(pki: Pki, start_server: Any) -> Any:
    server = start_server()
    server.authority.add(GOOD_CODE, model="7965G")
    resp = yield _activate(server, pki, pki.legacy_mic, device=DeviceName("7965G", "00AABBCCDD02"))
    assert resp.status == ActivateStatus.ACTIVATED, resp.reason


@pytest_twisted.inlineCallbacks
def test_sha1_mic_needs_the_setting(pki: Pki, start_server: Any) -> Any:
    off = start_server()
    off.authority.add(GOOD_CODE, mac=MAC)
    resp = yield _activate(off, pki, pki.sha1_mic)
    assert resp.status == ActivateStatus.CERTIFICATE_NOT_ACCEPTED
    assert "SHA-1" in resp.reason
    on = start_server(TVSSettings(allow_sha1_mic=True))
    on.authority.add(GOOD_CODE, mac=MAC)
    resp = yield _activate(on, pki, pki.sha1_mic)
    assert resp.status == ActivateStatus.ACTIVATED, resp.reason


@pytest_twisted.inlineCallbacks
def test_sha1_setting_does_not_rescue_an_untrusted_chain(pki: Pki, start_server: Any) -> Any:
    server = start_server(TVSSettings(allow_sha1_mic=True))
    server.authority.add(GOOD_CODE, mac=MAC)
    resp = yield _activate(server, pki, pki.rogue_mic)
    assert resp.status == ActivateStatus.CERTIFICATE_NOT_ACCEPTED


@pytest_twisted.inlineCallbacks
def test_verify_request_for_own_and_foreign_certificates(pki: Pki, start_server: Any) -> Any:
    server = start_server(TVSSettings(verify_ttl=3600))
    der = pki.server.ccm_tftp.cert.public_bytes(serialization.Encoding.DER)
    resp = yield client.verify(
        reactor,
        "127.0.0.1",
        server.port,
        certificate_der=der,
        device_name="CP-8841-SEP" + MAC,
        pinned_der=pki.tvs_der,
    )
    assert resp.status == VerifyStatus.TRUSTED
    assert resp.roles == (Role.CCM_TFTP,)
    assert resp.ttl == 3600
    foreign = pki.mic.cert.public_bytes(serialization.Encoding.DER)
    resp = yield client.verify(
        reactor,
        "127.0.0.1",
        server.port,
        certificate_der=foreign,
        device_name=None,
        pinned_der=pki.tvs_der,
    )
    assert resp.status == VerifyStatus.NOT_TRUSTED
    assert resp.roles == () and resp.ttl is None


@pytest_twisted.inlineCallbacks
def test_several_requests_on_one_connection_echo_session_ids(pki: Pki, start_server: Any) -> Any:
    from callboard.protocols.tvs.codec import ActivateRequest, VerifyRequest, VerifyResponse

    server = start_server()
    server.authority.add(GOOD_CODE, mac=MAC)
    proto = yield client.connect(
        reactor, "127.0.0.1", server.port, pinned_der=pki.tvs_der, mic=mic_tuple(pki.mic)
    )
    tvs_der = pki.tvs_der
    f1 = yield proto.request(VerifyRequest(0xDEADBEEF, None, tvs_der).encode())
    f2 = yield proto.request(ActivateRequest(0x01020304, DEVICE, GOOD_CODE).encode())
    proto.close()
    assert f1.session_id == 0xDEADBEEF and VerifyResponse.from_frame(f1).roles == (Role.TVS,)
    assert f2.session_id == 0x01020304
    assert ActivateResponse.from_frame(f2).status == ActivateStatus.ACTIVATED


@pytest_twisted.inlineCallbacks
def test_pin_mismatch_refuses_before_sending(pki: Pki, start_server: Any) -> Any:
    server = start_server()
    server.authority.add(GOOD_CODE, mac=MAC)
    wrong = pki.server.ccm_tftp.cert.public_bytes(serialization.Encoding.DER)
    d = client.activate(
        reactor,
        "127.0.0.1",
        server.port,
        device=DEVICE,
        code=GOOD_CODE,
        pinned_der=wrong,
        mic=mic_tuple(pki.mic),
    )
    try:
        yield d
    except client.PinMismatch:
        pass
    else:
        raise AssertionError("pin mismatch not detected")
    assert server.authority.calls == []


@pytest_twisted.ensureDeferred
async def test_malformed_frames_get_status_4_and_close(pki: Pki, start_server: Any) -> None:
    server = start_server()
    cases = [
        b"\x00" * 12,  # not a TVS header
        encode_frame(Command.ACTIVATE_REQUEST, 7, [(0x01, b"\x01CP-8841-SEP00AABBCCDDEE")]),
        encode_frame(Command.ACTIVATE_REQUEST, 7, [(0x01, b"\x01nonsense"), (0x81, b"1" * 16)]),
        encode_frame(
            Command.ACTIVATE_REQUEST, 7, [(0x01, b"\x01CP-8841-SEP00AABBCCDDEE"), (0x81, b"12345")]
        ),
        encode_frame(0x33, 7, []),  # unknown command
        struct.pack(">BBBBIH", 0x57, 1, 0x81, 0, 7, 4) + b"\x01\x00\x09x",  # element overrun
    ]
    for payload in cases:
        frames, closed = await _raw_exchange(server, pki, payload, mic_tuple(pki.mic))
        assert closed
        assert _status(frames) == ActivateStatus.MALFORMED
    frames, _ = await _raw_exchange(server, pki, encode_frame(Command.VERIFY_REQUEST, 9, []))
    assert frames[0].command == Command.VERIFY_RESPONSE and _status(frames) == 4
    assert server.authority.calls == []


@pytest_twisted.ensureDeferred
async def test_oversize_message_is_refused_on_its_header(pki: Pki, start_server: Any) -> None:
    server = start_server(TVSSettings(max_message=1024))
    header = struct.pack(">BBBBIH", 0x57, 1, 0x81, 0, 5, 2000)
    frames, closed = await _raw_exchange(server, pki, header)  # body never sent
    assert closed and _status(frames) == ActivateStatus.MALFORMED
    assert frames[0].session_id == 5
    default = start_server()
    header = struct.pack(">BBBBIH", 0x57, 1, 0x81, 0, 6, 0xFFFF)  # 65545 > 64 KiB
    frames, closed = await _raw_exchange(default, pki, header)
    assert closed and _status(frames) == ActivateStatus.MALFORMED


@pytest_twisted.ensureDeferred
async def test_idle_connection_is_closed(pki: Pki, start_server: Any) -> None:
    server = start_server(TVSSettings(idle_timeout=0.3))
    start = reactor.seconds()
    frames, closed = await _raw_exchange(server, pki, b"\x57\x01")  # half a header, then silence
    assert closed and frames == []
    assert 0.25 <= reactor.seconds() - start < 5


@pytest_twisted.ensureDeferred
async def test_connection_cap(pki: Pki, start_server: Any) -> None:
    server = start_server(TVSSettings(max_connections=2))
    first = await client.connect(reactor, "127.0.0.1", server.port, pinned_der=pki.tvs_der)
    second = await client.connect(reactor, "127.0.0.1", server.port, pinned_der=pki.tvs_der)
    d = client.connect(reactor, "127.0.0.1", server.port, pinned_der=pki.tvs_der, timeout=10)
    try:
        await d
    except Exception:
        pass
    else:
        raise AssertionError("third connection accepted over the cap")
    first.close()
    second.close()
    await first.closed
    await second.closed
    server.authority.add(GOOD_CODE, mac=MAC)
    resp = await _activate(server, pki, pki.mic)
    assert resp.status == ActivateStatus.ACTIVATED


@pytest_twisted.ensureDeferred
async def test_lockout_after_failures_and_its_expiry(pki: Pki, start_server: Any) -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC).timestamp())
    settings = TVSSettings(throttle_budget=3, throttle_window=900, throttle_base_lockout=60)
    server = start_server(settings, clock=clock)
    server.authority.add(GOOD_CODE, mac=MAC)
    for _ in range(3):
        resp = await _activate(server, pki, pki.mic, code="0000000000000000")
        assert resp.status == ActivateStatus.REJECTED
    # locked: even the right code is refused with status 3, and the authority is not asked
    calls = len(server.authority.calls)
    resp = await _activate(server, pki, pki.mic)
    assert resp.status == ActivateStatus.RATE_LIMITED
    assert len(server.authority.calls) == calls
    clock.advance(61)
    resp = await _activate(server, pki, pki.mic)
    assert resp.status == ActivateStatus.ACTIVATED
    # status 2 failures count too, and the second lockout is twice as long
    for _ in range(3):
        resp = await _activate(server, pki, pki.rogue_mic)
        assert resp.status == ActivateStatus.CERTIFICATE_NOT_ACCEPTED
    resp = await _activate(server, pki, pki.rogue_mic)
    assert resp.status == ActivateStatus.RATE_LIMITED
    clock.advance(61)
    resp = await _activate(server, pki, pki.rogue_mic)
    assert resp.status == ActivateStatus.RATE_LIMITED
    clock.advance(60)
    resp = await _activate(server, pki, pki.rogue_mic)
    assert resp.status == ActivateStatus.CERTIFICATE_NOT_ACCEPTED


@pytest_twisted.ensureDeferred
async def test_single_use_under_200_concurrent_clients(pki: Pki, start_server: Any) -> None:
    server = start_server(TVSSettings(max_connections=1024))
    server.authority.add(GOOD_CODE, mac=MAC)
    attempts = [_activate(server, pki, pki.mic) for _ in range(200)]
    results = await defer.gatherResults(attempts, consumeErrors=True)
    statuses = [r.status for r in results]
    assert statuses.count(ActivateStatus.ACTIVATED) == 1
    assert all(
        s in (ActivateStatus.REJECTED, ActivateStatus.RATE_LIMITED)
        for s in statuses
        if s != ActivateStatus.ACTIVATED
    )
    assert statuses.count(ActivateStatus.RATE_LIMITED) > 0  # the throttle engaged


@pytest_twisted.ensureDeferred
async def test_trust_reload_swaps_the_store(pki: Pki, start_server: Any) -> None:
    from callboard.daemon.certs import load_trust_store

    server = start_server()
    server.authority.add(GOOD_CODE, mac=MAC)
    server.factory.set_trust(load_trust_store(pki.lab_dir))  # only the EC lab CA now
    resp = await _activate(server, pki, pki.legacy_mic, device=DeviceName("7965G", "00AABBCCDD02"))
    assert resp.status == ActivateStatus.CERTIFICATE_NOT_ACCEPTED
    resp = await _activate(server, pki, pki.mic)
    assert resp.status == ActivateStatus.ACTIVATED


@pytest_twisted.ensureDeferred
async def test_activated_is_sent_only_after_the_authority_fires(
    pki: Pki, start_server: Any
) -> None:
    held: list[defer.Deferred[Redemption]] = []

    class Held(FakeAuthority):
        def redeem(
            self, *, mac: str, model: str, code: str, mic_sha256: str
        ) -> defer.Deferred[Redemption]:
            d: defer.Deferred[Redemption] = defer.Deferred()
            held.append(d)
            return d

    server = start_server(authority=Held())
    answer = _activate(server, pki, pki.mic)
    while not held:  # until the request has reached the authority
        await task.deferLater(reactor, 0.01, lambda: None)
    for _ in range(5):
        await task.deferLater(reactor, 0.01, lambda: None)
    assert not answer.called  # the phone hears nothing while the commit is on its way
    held[0].callback(Redemption(True, f"SEP{MAC}", "activated"))
    resp = await answer
    assert resp.status == ActivateStatus.ACTIVATED and resp.device_name_assigned == f"SEP{MAC}"
