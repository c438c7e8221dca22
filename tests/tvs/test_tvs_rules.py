"""Sans-I/O rules: the throttle, MIC chain checks and the handler, without sockets."""

from __future__ import annotations

import datetime as dt
from typing import Any

from callboard.daemon import certs
from callboard.protocols.tvs import codec
from callboard.protocols.tvs.activation import (
    ManufacturingTrust,
    Outcome,
    PeerContext,
    Redemption,
    Throttle,
    ThrottleStore,
    TVSHandler,
    TVSSettings,
)
from callboard.protocols.tvs.codec import ActivateRequest, ActivateResponse, ActivateStatus
from twisted.internet.defer import Deferred, fail

from .conftest import (  # type: ignore[import-not-found]
    DEVICE,
    GOOD_CODE,
    MAC,
    FakeAuthority,
    Pki,
    settled,
)

NOW = dt.datetime.now(dt.UTC)


def test_throttle_budget_window_and_doubling() -> None:
    t = Throttle(budget=3, window=100, base_lockout=10, max_lockout=35)
    for i in range(2):
        t.failure("k", i)
    assert t.locked_for("k", 2) == 0
    t.failure("k", 2)
    assert t.locked_for("k", 2) == 10
    assert t.locked_for("k", 12.5) == 0
    for i in range(3):
        t.failure("k", 13 + i)
    assert t.locked_for("k", 15) == 20  # doubled
    for i in range(3):
        t.failure("k", 40 + i)
    assert t.locked_for("k", 42) == 35  # capped
    assert t.locked_for("other", 42) == 0


def test_throttle_window_forgets_old_failures_and_strikes() -> None:
    t = Throttle(budget=3, window=100, base_lockout=10)
    t.failure("k", 0)
    t.failure("k", 1)
    t.failure("k", 150)  # the first two fell out of the window
    assert t.locked_for("k", 150) == 0
    t.failure("k", 151)
    t.failure("k", 152)
    assert t.locked_for("k", 152) == 10
    for i in range(3):
        t.failure("k", 1000 + i)  # long quiet: strikes reset, base lockout again
    assert t.locked_for("k", 1002) == 10


def test_throttle_memory_is_bounded() -> None:
    t = Throttle(max_keys=10)
    for i in range(100):
        t.failure(f"k{i}", 0)
    assert len(t._entries) == 10


def test_trust_split_roots_and_intermediates(pki: Pki) -> None:
    trust = ManufacturingTrust([*pki.lab.certificates, pki.lab.root])
    assert trust.roots == (pki.lab.root,) and trust.intermediates == (pki.lab.ca,)
    assert len(trust) == 2


def test_chain_checks(pki: Pki) -> None:
    trust = pki.trust
    ok = trust.check(pki.mic.cert, [], NOW, allow_sha1=False)
    assert ok.ok and ok.common_name == "CP-8841-SEP00AABBCCDDEE" and ok.sha256
    assert trust.check(pki.legacy_mic.cert, [], NOW, allow_sha1=False).ok
    assert not trust.check(None, [], NOW, allow_sha1=False).ok
    assert "expired" in trust.check(pki.expired_mic.cert, [], NOW, allow_sha1=False).reason
    assert "SHA-1" in trust.check(pki.sha1_mic.cert, [], NOW, allow_sha1=False).reason
    assert trust.check(pki.sha1_mic.cert, [], NOW, allow_sha1=True).ok
    assert not trust.check(pki.rogue_mic.cert, [], NOW, allow_sha1=True).ok
    # the phone may send its intermediate; trust only the root then
    root_only = ManufacturingTrust([pki.lab.root])
    assert not root_only.check(pki.mic.cert, [], NOW, allow_sha1=False).ok
    assert root_only.check(pki.mic.cert, [pki.lab.ca], NOW, allow_sha1=False).ok
    # an empty store refuses everything, with a reason
    assert "empty" in ManufacturingTrust([]).check(pki.mic.cert, [], NOW, allow_sha1=False).reason
    # a rogue intermediate sent by the phone does not help
    assert not root_only.check(pki.rogue_mic.cert, [pki.rogue_lab.ca], NOW, allow_sha1=False).ok


def test_leaf_that_is_not_a_ca_cannot_issue(pki: Pki) -> None:
    # a MIC used as an issuer: the chain must fail (basicConstraints CA required)
    fake_ca = certs.LabCA(pki.lab.root, pki.lab.root_key, pki.mic.cert, pki.mic.key)
    child = certs.issue_mic(fake_ca, model="8841", mac="00AABBCCDD99")
    trust = ManufacturingTrust([pki.lab.root, pki.lab.ca])
    assert not trust.check(child.cert, [pki.mic.cert], NOW, allow_sha1=True).ok


def _frame(req: ActivateRequest) -> codec.Frame:
    return codec.decode_frame(req.encode())[0]


def test_handler_checks_chain_once_per_connection(pki: Pki) -> None:
    auth = FakeAuthority()
    auth.add(GOOD_CODE, mac=MAC)
    handler = TVSHandler(trust=pki.trust, authority=auth, role_certs=[], settings=TVSSettings())
    peer = PeerContext("192.0.2.1", pki.mic.cert, [])
    out = settled(
        handler.handle(
            _frame(ActivateRequest(1, DEVICE, "0000000000000000")), peer, NOW.timestamp()
        )
    )
    assert ActivateResponse.from_frame(codec.decode_frame(out.response)[0]).status == 1
    verdict = peer.verdict
    assert verdict is not None
    out = settled(
        handler.handle(_frame(ActivateRequest(2, DEVICE, GOOD_CODE)), peer, NOW.timestamp())
    )
    assert peer.verdict is verdict
    resp = ActivateResponse.from_frame(codec.decode_frame(out.response)[0])
    assert resp.status == ActivateStatus.ACTIVATED and resp.session_id == 2


def test_authority_failure_is_a_refusal_without_details(pki: Pki) -> None:
    class Broken:
        def redeem(self, *, mac: str, model: str, code: str, mic_sha256: str) -> object:
            raise RuntimeError(f"db down while checking {code}")

    handler = TVSHandler(
        trust=pki.trust,
        authority=Broken(),
        role_certs=[],
        settings=TVSSettings(),  # type: ignore[arg-type]
    )
    peer = PeerContext("192.0.2.1", pki.mic.cert, [])
    out = settled(
        handler.handle(_frame(ActivateRequest(1, DEVICE, GOOD_CODE)), peer, NOW.timestamp())
    )
    resp = ActivateResponse.from_frame(codec.decode_frame(out.response)[0])
    assert resp.status == ActivateStatus.REJECTED and GOOD_CODE not in resp.reason


def test_logs_never_contain_the_code(pki: Pki) -> None:
    from twisted.logger import globalLogPublisher

    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        auth = FakeAuthority()
        auth.add(GOOD_CODE, mac=MAC)
        handler = TVSHandler(trust=pki.trust, authority=auth, role_certs=[], settings=TVSSettings())
        for mic, code in [
            (pki.mic, "0000000000000000"),
            (pki.rogue_mic, GOOD_CODE),
            (pki.mic, GOOD_CODE),
        ]:
            peer = PeerContext("192.0.2.7", mic.cert, [])
            handler.handle(_frame(ActivateRequest(1, DEVICE, code)), peer, NOW.timestamp())
    finally:
        globalLogPublisher.removeObserver(events.append)
    mine = [e for e in events if e.get("log_namespace") == "callboard.tvs"]
    assert len(mine) == 3
    assert {e["outcome"] for e in mine} == {"rejected", "certificate_not_accepted", "activated"}
    for e in mine:
        assert e["device"] == "CP-8841-SEP00AABBCCDDEE" and e["source"] == "192.0.2.7"
        flat = repr(e)
        assert GOOD_CODE not in flat and "0000000000000000" not in flat


class HeldAuthority:
    """An authority whose answers wait until the test releases them (a slow, durable write)."""

    def __init__(self) -> None:
        self.pending: list[Deferred[Redemption]] = []

    def redeem(self, *, mac: str, model: str, code: str, mic_sha256: str) -> Deferred[Redemption]:
        d: Deferred[Redemption] = Deferred()
        self.pending.append(d)
        return d


def _status_of(outcome: Outcome) -> ActivateResponse:
    return ActivateResponse.from_frame(codec.decode_frame(outcome.response)[0])


def test_activated_is_answered_only_when_the_authority_has_answered(pki: Pki) -> None:
    auth = HeldAuthority()
    handler = TVSHandler(trust=pki.trust, authority=auth, role_certs=[], settings=TVSSettings())
    peer = PeerContext("192.0.2.1", pki.mic.cert, [])
    answer = handler.handle(_frame(ActivateRequest(1, DEVICE, GOOD_CODE)), peer, NOW.timestamp())
    assert isinstance(answer, Deferred) and not answer.called
    results: list[Outcome] = []
    answer.addCallback(results.append)
    assert results == []
    auth.pending[0].callback(Redemption(True, f"SEP{MAC}", "activated"))
    assert _status_of(results[0]).status == ActivateStatus.ACTIVATED


def test_a_refusal_counts_against_the_throttle_when_it_arrives(pki: Pki) -> None:
    auth = HeldAuthority()
    settings = TVSSettings(throttle_budget=1)
    handler = TVSHandler(trust=pki.trust, authority=auth, role_certs=[], settings=settings)
    peer = PeerContext("192.0.2.1", pki.mic.cert, [])
    now = NOW.timestamp()
    answer = handler.handle(_frame(ActivateRequest(1, DEVICE, GOOD_CODE)), peer, now)
    assert handler.throttle.locked_for(f"dev:{DEVICE.name}", now) == 0
    auth.pending[0].callback(Redemption(False, None, "activation code is used"))
    assert _status_of(settled(answer)).status == ActivateStatus.REJECTED
    assert handler.throttle.locked_for(f"dev:{DEVICE.name}", now) > 0


def test_a_failed_authority_deferred_is_a_refusal_without_details(pki: Pki) -> None:
    class Failing:
        def redeem(self, **_: Any) -> Deferred[Redemption]:
            return fail(RuntimeError(f"disk I/O error while storing {GOOD_CODE}"))

    handler = TVSHandler(
        trust=pki.trust,
        authority=Failing(),  # type: ignore[arg-type]
        role_certs=[],
        settings=TVSSettings(),
    )
    peer = PeerContext("192.0.2.1", pki.mic.cert, [])
    out = settled(
        handler.handle(_frame(ActivateRequest(1, DEVICE, GOOD_CODE)), peer, NOW.timestamp())
    )
    resp = _status_of(out)
    assert (
        resp.status == ActivateStatus.REJECTED and resp.reason == "activation service unavailable"
    )


def test_the_throttle_stores_can_be_supplied(pki: Pki) -> None:
    class Recording:
        def __init__(self) -> None:
            self.failures: list[str] = []

        def locked_for(self, key: str, now: float) -> float:
            return 0.0

        def failure(self, key: str, now: float) -> None:
            self.failures.append(key)

    device_store, source_store = Recording(), Recording()
    stores: tuple[ThrottleStore, ThrottleStore] = (device_store, source_store)
    handler = TVSHandler(
        trust=pki.trust,
        authority=FakeAuthority(),
        role_certs=[],
        settings=TVSSettings(),
        device_throttle=stores[0],
        source_throttle=stores[1],
    )
    peer = PeerContext("192.0.2.9", pki.mic.cert, [])
    settled(handler.handle(_frame(ActivateRequest(1, DEVICE, GOOD_CODE)), peer, NOW.timestamp()))
    assert device_store.failures == [f"dev:{DEVICE.name}"]
    assert source_store.failures == ["src:192.0.2.9"]
