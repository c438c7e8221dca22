"""The in-memory location service on its own: bindings by AoR and device, expiry by the sweep."""

from __future__ import annotations

from dataclasses import replace

from callboard.protocols.sip.location import Binding, LocationService, MemoryLocationService


def binding(aor: str, key: str, expires_at: float, device: str | None = "SEPA") -> Binding:
    return Binding(
        aor=aor,
        key=key,
        contact=f"<sip:{key}@192.0.2.1>",
        call_id="cid",
        cseq=1,
        expires_at=expires_at,
        registered_at=1553819486.0,
        device_name=device,
        transport="udp",
        source="192.0.2.1:5060",
        user_agent=None,
        client_cert_fingerprint=None,
    )


def test_replace_lookup_and_by_device() -> None:
    loc: LocationService = MemoryLocationService()
    a1, a2 = binding("sip:1@h", "a", 100.0), binding("sip:1@h", "b", 50.0)
    loc.replace("sip:1@h", {"a": a1, "b": a2})
    loc.replace("sip:2@h", {"c": binding("sip:2@h", "c", 100.0, device="SEPB")})
    assert loc.lookup("sip:1@h", 10.0) == {"a": a1, "b": a2}
    assert loc.lookup("sip:1@h", 60.0) == {"a": a1}  # expired, not yet swept: not live
    assert loc.count() == 3
    assert loc.by_device("SEPA", 10.0) == [a1, a2]
    assert [b.aor for b in loc.by_device("SEPB", 10.0)] == ["sip:2@h"]
    # Replacing with an empty set removes the AoR; the device no longer holds anything there.
    loc.replace("sip:1@h", {})
    assert loc.lookup("sip:1@h", 10.0) == {} and loc.by_device("SEPA", 10.0) == []
    assert loc.count() == 1


def test_sweep_skips_refreshed_and_removed() -> None:
    loc = MemoryLocationService()
    old = binding("sip:1@h", "a", 100.0)
    loc.replace("sip:1@h", {"a": old, "b": binding("sip:1@h", "b", 100.0)})
    refreshed = replace(old, expires_at=300.0)
    loc.replace("sip:1@h", {"a": refreshed})  # b removed, a refreshed
    assert loc.sweep(150.0) == []  # both heap entries are stale
    assert loc.lookup("sip:1@h", 150.0) == {"a": refreshed}
    assert loc.sweep(300.0) == [refreshed]
    assert loc.count() == 0 and loc.by_device("SEPA", 0.0) == []


def test_remove_device_keeps_other_devices() -> None:
    loc = MemoryLocationService()
    mine, theirs = binding("sip:1@h", "a", 100.0), binding("sip:1@h", "b", 100.0, "SEPB")
    loc.replace("sip:1@h", {"a": mine, "b": theirs})
    loc.replace("sip:2@h", {"c": binding("sip:2@h", "c", 100.0)})
    assert [b.key for b in loc.remove_device("SEPA")] == ["a", "c"]
    assert loc.lookup("sip:1@h", 0.0) == {"b": theirs} and loc.count() == 1
    assert loc.remove_device("SEPA") == []
    assert loc.sweep(1000.0) == [theirs]
