"""The verified MIC issuer cache: a storm's MICs do not re-walk their issuer's path, and a
reloaded trust store (issuer removed) never answers from the old cache."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from callboard.daemon import certs
from callboard.protocols.tvs.activation import ManufacturingTrust

NOW = dt.datetime.now(dt.UTC)


def test_second_mic_of_an_issuer_is_served_from_the_cache() -> None:
    lab = certs.make_lab_ca()
    trust = ManufacturingTrust(lab.certificates)
    first = certs.issue_mic(lab, model="8841", mac="0A0000000001")
    second = certs.issue_mic(lab, model="8841", mac="0A0000000002")
    assert trust.check(first.cert, [], NOW, allow_sha1=False).ok
    assert trust.issuer_cache_hits == 0
    verdict = trust.check(second.cert, [], NOW, allow_sha1=False)
    assert verdict.ok and verdict.common_name == "CP-8841-SEP0A0000000002"
    assert trust.issuer_cache_hits == 1


def test_an_impostor_with_the_same_issuer_name_is_not_served_from_the_cache() -> None:
    lab = certs.make_lab_ca(root_cn="Lab Root", ca_cn="Lab CA")
    impostor = certs.make_lab_ca(root_cn="Lab Root", ca_cn="Lab CA")  # same names, other keys
    trust = ManufacturingTrust(lab.certificates)
    assert trust.check(certs.issue_mic(lab, model="8841", mac="0A0000000001").cert, [], NOW,
                       allow_sha1=False).ok  # fmt: skip
    rogue = certs.issue_mic(impostor, model="8841", mac="0A0000000003")
    verdict = trust.check(rogue.cert, [impostor.ca], NOW, allow_sha1=False)
    assert not verdict.ok and "does not chain" in verdict.reason
    assert trust.issuer_cache_hits == 0


def test_an_expired_mic_from_a_cached_issuer_is_still_refused() -> None:
    lab = certs.make_lab_ca()
    trust = ManufacturingTrust(lab.certificates)
    assert trust.check(certs.issue_mic(lab, model="8841", mac="0A0000000001").cert, [], NOW,
                       allow_sha1=False).ok  # fmt: skip
    old = certs.issue_mic(lab, model="8841", mac="0A0000000004",
                          not_after=NOW - dt.timedelta(days=1))  # fmt: skip
    assert "expired" in trust.check(old.cert, [], NOW, allow_sha1=False).reason


def test_an_issuer_removed_by_a_reload_is_not_served_from_the_cache(tmp_path: Path) -> None:
    lab, other = certs.make_lab_ca(), certs.make_lab_ca(root_cn="Other Root", ca_cn="Other CA")
    store = tmp_path / "trust"
    certs.write_lab_ca(store, lab)
    before = certs.load_trust_store(store)
    mics = [certs.issue_mic(lab, model="8841", mac=f"0A000000001{i}") for i in range(3)]
    assert all(before.check(m.cert, [], NOW, allow_sha1=False).ok for m in mics)
    assert before.issuer_cache_hits == 2

    for pem in list(store.iterdir()):  # the operator replaces the trust store, then SIGHUP
        pem.unlink()
    certs.write_lab_ca(store, other)
    after = certs.load_trust_store(store)  # what the daemon's reload builds
    verdict = after.check(mics[0].cert, [], NOW, allow_sha1=False)
    assert not verdict.ok and "does not chain" in verdict.reason
    assert after.issuer_cache_hits == 0
