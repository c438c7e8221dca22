"""The registrar's policy over the registry: plain answers, and a Deferred only when an
auto-registration has to write the new device first."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted
from callboard.daemon.registry.model import DeviceState, Line, Onboarding
from callboard.daemon.registry.registry import DeviceSpec, Registry
from callboard.daemon.registry.store import SQLiteStore
from callboard.daemon.sip_policy import AutoRegistration, RegistryPolicy
from callboard.protocols.sip.registrar import PolicyDecision, RegistrationRequest
from twisted.internet import defer, reactor

MODEL_ID_8841 = "683"


@pytest_twisted.async_yield_fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    store = SQLiteStore(tmp_path / "db.sqlite3")
    yield Registry(store, lambda: 1_800_000_000.0)
    await store.close()


def register(mac: str, dn: str = "9999") -> RegistrationRequest:
    return RegistrationRequest(
        device_name=f"SEP{mac.upper()}",
        mac=mac.lower(),
        model_id=MODEL_ID_8841,
        aor_user=dn,
        source="192.0.2.1:5060",
        transport="tcp",
    )


@pytest_twisted.ensureDeferred
async def test_known_devices_are_answered_at_once(registry: Registry) -> None:
    await registry.add_device(
        DeviceSpec(
            model="8841", mac="001122334455", lines=(Line("1001"),), requires_activation=False
        )
    )
    policy = RegistryPolicy(registry, AutoRegistration("2000", "2009"))
    decision = policy.decide(register("001122334455", "1001"))
    assert isinstance(decision, PolicyDecision) and decision.allowed
    unknown = policy.decide(register("0011223344FF"))  # its model still uses codes
    assert isinstance(unknown, PolicyDecision) and unknown.status == 404


@pytest_twisted.ensureDeferred
async def test_auto_registration_answers_once_the_device_is_stored(registry: Registry) -> None:
    await registry.set_default("8841", Onboarding.AUTOREGISTRATION)
    policy = RegistryPolicy(registry, AutoRegistration("2000", "2009"))
    pending = policy.decide(register("0000000000A1"))
    assert isinstance(pending, defer.Deferred) and not pending.called
    assert registry.find("SEP0000000000A1") is None  # not before the commit
    decision = await pending.addTimeout(10, reactor)
    assert decision.allowed and decision.device_name == "SEP0000000000A1"
    device = registry.get("SEP0000000000A1")
    assert device.state is DeviceState.ACTIVE and device.lines[0].directory_number == "2000"


@pytest_twisted.ensureDeferred
async def test_concurrent_auto_registrations_draw_different_numbers(registry: Registry) -> None:
    await registry.set_default("8841", Onboarding.AUTOREGISTRATION)
    policy = RegistryPolicy(registry, AutoRegistration("2000", "2001"))
    answers = [policy.decide(register(f"0000000000A{i}")) for i in range(1, 4)]
    # The third finds the range taken by the two writes still in flight.
    assert isinstance(answers[2], PolicyDecision) and answers[2].status == 403
    decisions = await defer.gatherResults(answers[:2]).addTimeout(10, reactor)  # type: ignore[arg-type]
    assert all(d.allowed for d in decisions)
    numbers = sorted(d.lines[0].directory_number for d in registry.devices())
    assert numbers == ["2000", "2001"]


@pytest_twisted.ensureDeferred
async def test_a_repeated_register_waits_for_the_first_write(registry: Registry) -> None:
    await registry.set_default("8841", Onboarding.AUTOREGISTRATION)
    policy = RegistryPolicy(registry, AutoRegistration("2000", "2009"))
    first = policy.decide(register("0000000000A1"))
    again = policy.decide(register("0000000000A1", "2000"))  # the retransmission, on its DN
    assert isinstance(first, defer.Deferred) and isinstance(again, defer.Deferred)
    results = await defer.gatherResults([first, again]).addTimeout(10, reactor)
    assert [d.allowed for d in results] == [True, True]
    assert len(registry) == 1


@pytest_twisted.ensureDeferred
async def test_a_shared_registry_reads_the_feed_before_refusing_a_phone(tmp_path: Path) -> None:
    """Workers and nodes: a phone activated through another one a moment ago registers here."""
    path = tmp_path / "shared.sqlite3"
    stores = [SQLiteStore(path), SQLiteStore(path)]
    try:
        writer, view = Registry(stores[0], lambda: 1.8e9), Registry(stores[1], lambda: 1.8e9)
        view.shared = True
        policy = RegistryPolicy(view, None)
        await writer.add_device(
            DeviceSpec(model="8841", mac="001122334455", lines=(Line("1001"),),
                       requires_activation=False)
        )  # fmt: skip
        pending = policy.decide(register("001122334455", "1001"))
        assert isinstance(pending, defer.Deferred)  # not in this view yet: read first
        decision = await pending.addTimeout(10, reactor)
        assert decision.allowed and decision.device_name == "SEP001122334455"
        now_known = policy.decide(register("001122334455", "1001"))
        assert isinstance(now_known, PolicyDecision) and now_known.allowed  # no read now
        unknown = await defer.maybeDeferred(policy.decide, register("0011223344FF"))
        assert unknown.status == 404  # still refused after the read
    finally:
        for store in stores:
            await store.close()


@pytest_twisted.ensureDeferred
async def test_the_instance_mac_must_be_the_devices_own(registry: Registry) -> None:
    """The MAC check (read from the SEP name at once) agrees with ``Device.mac`` in every
    case: either case matches, another MAC or none is refused."""
    await registry.add_device(
        DeviceSpec(
            model="8841", mac="00112233AABB", lines=(Line("1001"),), requires_activation=False
        )
    )
    policy = RegistryPolicy(registry, None)
    for mac in ("00112233aabb", "00112233AABB"):
        request = RegistrationRequest(
            "SEP00112233AABB", mac, MODEL_ID_8841, "1001", "192.0.2.1:5060", "udp"
        )
        decision = policy.decide(request)
        assert isinstance(decision, PolicyDecision) and decision.allowed, mac
    for mac in ("00112233aabc", None, ""):
        request = RegistrationRequest(
            "SEP00112233AABB", mac, MODEL_ID_8841, "1001", "192.0.2.1:5060", "udp"
        )
        decision = policy.decide(request)
        assert isinstance(decision, PolicyDecision) and decision.status == 403, mac
        assert "MAC does not match" in decision.warning
