"""The in-memory location service on its own: bindings by AoR and device, expiry by the sweep."""

from __future__ import annotations

import copy
import pickle
import random
import sys

import pytest
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
    refreshed = old.replace(expires_at=300.0)
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


def test_a_binding_reads_back_every_field_and_stays_immutable() -> None:
    b = binding("sip:1@h", "a", 100.0)
    assert (b.aor, b.key, b.contact, b.call_id, b.source) == (
        "sip:1@h",
        "a",
        "<sip:a@192.0.2.1>",
        "cid",
        "192.0.2.1:5060",
    )
    assert (b.cseq, b.expires_at, b.registered_at, b.device_name) == (
        1,
        100.0,
        1553819486.0,
        "SEPA",
    )
    assert (b.transport, b.user_agent, b.client_cert_fingerprint) == ("udp", None, None)
    assert b == binding("sip:1@h", "a", 100.0) and hash(b) == hash(binding("sip:1@h", "a", 100.0))
    assert b != binding("sip:1@h", "a", 101.0) and b != "not a binding"
    assert repr(b).startswith("Binding(aor='sip:1@h', key='a', contact='<sip:a@192.0.2.1>'")
    with pytest.raises(AttributeError):
        b.expires_at = 5.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        b.other = 1  # type: ignore[attr-defined]
    assert copy.copy(b) == b and pickle.loads(pickle.dumps(b)) == b


def test_replace_changes_only_what_it_names() -> None:
    b = binding("sip:1@h", "a", 100.0)
    moved = b.replace(source="198.51.100.7:5061", contact='<sip:a@h>;+sip.instance="<x\ny>"')
    assert moved.source == "198.51.100.7:5061" and moved.call_id == "cid"
    assert moved.contact == '<sip:a@h>;+sip.instance="<x\ny>"'  # whatever the contact holds
    assert moved.replace(source=b.source, contact=b.contact) == b
    with pytest.raises(TypeError):
        b.replace(expiry=5.0)


def test_call_id_and_source_are_single_line() -> None:
    with pytest.raises(ValueError):
        binding("sip:1@h", "a", 100.0).replace(call_id="a\nb")
    with pytest.raises(ValueError):
        binding("sip:1@h", "a", 100.0).replace(source="192.0.2.1\n:5060")


def test_a_refresh_storm_does_not_grow_the_expiry_calendar() -> None:
    loc = MemoryLocationService()
    for n in range(1000):  # every line refreshed 1000 times, each to a later expiry
        for line in range(3):
            aor = f"sip:{line}@h"
            loc.replace(aor, {"a": binding(aor, "a", 3600.0 + n)})
    assert sum(len(aors) for aors in loc._due.values()) == 3  # one entry per binding
    assert loc.sweep(4000.0) == [] and loc.count() == 3  # the old second: filed again
    assert sum(len(aors) for aors in loc._due.values()) == 3
    assert [b.aor for b in loc.sweep(4599.0)] == ["sip:0@h", "sip:1@h", "sip:2@h"]
    assert loc.count() == 0 and not loc._due


def test_sweep_agrees_with_a_plain_scan_of_every_binding() -> None:
    """Random replaces, removals and sweeps (fractional times, shortened and lengthened
    expiries, several bindings per AoR): each sweep returns exactly the held bindings due
    by then, in expiry order, as a scan of all of them would."""
    rng = random.Random(13)
    loc = MemoryLocationService()
    held: dict[str, dict[str, Binding]] = {}
    now = 0.0
    for _ in range(3000):
        aor = f"sip:{rng.randrange(40)}@h"
        op = rng.random()
        if op < 0.6:
            bindings = dict(held.get(aor, {}))
            key = rng.choice("abc")
            bindings[key] = binding(aor, key, now + rng.choice((0.3, 1.0, 2.5, 7.0, 30.0)))
            if rng.random() < 0.2:
                bindings.pop(rng.choice("abc"), None)
            loc.replace(aor, bindings)
            held[aor] = bindings
        elif op < 0.65:
            loc.replace(aor, {})
            held.pop(aor, None)
        else:
            now += rng.choice((0.0, 0.2, 0.5, 1.0, 3.0))
            due = sorted(
                (b for bs in held.values() for b in bs.values() if b.expires_at <= now),
                key=lambda b: (b.expires_at, b.aor, b.key),
            )
            assert loc.sweep(now) == due
            for b in due:
                del held[b.aor][b.key]
            held = {a: bs for a, bs in held.items() if bs}
        assert loc.count() == sum(len(bs) for bs in held.values())
    assert sum(len(aors) for aors in loc._due.values()) <= 4 * loc.count() + 3 * 40


def test_the_device_index_agrees_with_a_plain_scan() -> None:
    """Random replaces (one binding or several, same device or another, keys kept or
    changed, expiries earlier or later) and removals: ``by_device`` and the index give what
    a scan of every held binding gives, and each binding is filed by its expiry."""
    rng = random.Random(7)
    loc = MemoryLocationService()
    held: dict[str, dict[str, Binding]] = {}
    devices = ("SEPA", "SEPB", "SEPC", None)
    for _ in range(4000):
        aor = f"sip:{rng.randrange(12)}@h"
        op = rng.random()
        if op < 0.6:  # one binding: a line binding or refreshing, or its key changing
            key = rng.choice("ab")
            bindings = {key: binding(aor, key, rng.choice((5.0, 50.0, 500.0)), rng.choice(devices))}
        elif op < 0.9:
            bindings = dict(held.get(aor, {}))
            key = rng.choice("abc")
            bindings[key] = binding(aor, key, rng.choice((5.0, 50.0, 500.0)), rng.choice(devices))
        else:
            bindings = {}
        loc.replace(aor, bindings)
        held[aor] = bindings
        for device in devices[:-1]:
            scan = [b for a in sorted(held) for b in held[a].values() if b.device_name == device]
            assert loc.by_device(device, 0.0) == scan
            indexed = loc._by_device.get(device, ())
            indexed = {indexed} if isinstance(indexed, str) else set(indexed)
            assert indexed == {b.aor for b in scan}
        for b in bindings.values():  # filed at or before its expiry, so the sweep sees it
            assert any(second <= b.expires_at and aor in aors for second, aors in loc._due.items())
    assert loc.count() == sum(len(bs) for bs in held.values())


CISCO_CONTACT = (
    "<sip:1001@192.0.2.1:5060;transport=udp>"
    ';+sip.instance="<urn:uuid:00000000-0000-0000-0000-00ab00000001>"'
    ';+u.sip!devicename.ccm.cisco.com="SEP00AB00000001";+u.sip!model.ccm.cisco.com="683"'
    ';+u.sip!devicename.ccm.cisco.com="again"'
)


@pytest.mark.parametrize(
    "contact",
    [
        CISCO_CONTACT,
        CISCO_CONTACT.upper(),  # other spellings are kept as they are
        '<sip:a@h>;+SIP.INSTANCE="<urn:uuid:1>";+u.sip!model.ccm.cisco.com=683',
        "<sip:a@h>",
    ],
)
def test_a_contact_reads_back_exactly_as_bound(contact: str) -> None:
    b = binding("sip:1@h", "a", 100.0).replace(contact=contact)
    assert b.contact == contact and b.call_id == "cid" and b.source == "192.0.2.1:5060"
    assert b == b.replace(contact=contact)


def test_a_cisco_contact_is_held_in_fewer_bytes() -> None:
    b = binding("sip:1@h", "a", 100.0).replace(contact=CISCO_CONTACT)
    assert sys.getsizeof(b._text) < sys.getsizeof(CISCO_CONTACT) - 100


def test_a_contact_with_control_characters_is_refused() -> None:
    with pytest.raises(ValueError):
        binding("sip:1@h", "a", 100.0).replace(contact="<sip:a@h>;x=\x02")
