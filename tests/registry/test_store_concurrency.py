"""The store under concurrency: conditional writes, durability and the change feed.

Two :class:`SQLiteStore` instances on one file stand in for two processes: each has its own
connection and store thread, and SQLite's file lock is all they share.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from callboard.daemon.registry.model import (
    ActivationCode,
    CodeState,
    Device,
    DeviceState,
    Line,
    Onboarding,
    Stale,
)
from callboard.daemon.registry.registry import DeviceSpec, Registry
from callboard.daemon.registry.store import (
    ABSENT,
    CodeExpectation,
    ConditionFailed,
    PutCode,
    PutDevice,
    SQLiteStore,
)
from twisted.application.internet import TimerService
from twisted.internet import defer, reactor, task

NOW = 1_800_000_000.0
TIMEOUT = 10.0


class Opened:
    """Stores opened by a test, closed at its end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stores: list[SQLiteStore] = []

    def store(self) -> SQLiteStore:
        store = SQLiteStore(self.path)
        self.stores.append(store)
        return store

    def registry(self) -> Registry:
        return Registry(self.store(), lambda: NOW)


@pytest_twisted.async_yield_fixture
async def opened(tmp_path: Path) -> AsyncIterator[Opened]:
    o = Opened(tmp_path / "callboard.sqlite3")
    yield o
    for store in o.stores:
        await store.close()


def with_timeout(d: defer.Deferred[object]) -> defer.Deferred[object]:
    return d.addTimeout(TIMEOUT, reactor)


async def code_of(registry: Registry, spec: DeviceSpec) -> tuple[Device, ActivationCode]:
    device = await registry.add_device(spec)
    code = registry.outstanding_code(device)
    assert code is not None
    return device, code


def used_codes(path: Path) -> list[tuple[str, str]]:
    """What a separate connection sees on disk (the test's own, independent reader)."""
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT id, state FROM codes WHERE state = 'used'").fetchall()
    finally:
        db.close()


# -- one redemption, two writers ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_stores_race_one_redemption_and_exactly_one_wins(opened: Opened) -> None:
    first = opened.registry()
    _, code = await code_of(first, DeviceSpec(model="8841"))
    second = opened.registry()  # a second process that loaded the code while still issued
    assert second.outstanding_codes()[0][1] == code
    attempts = [
        first.redeem(mac="001122334455", model="8841", code=code.code, mic_sha256="a"),
        second.redeem(mac="0011223344AA", model="8841", code=code.code, mic_sha256="b"),
    ]
    results = await with_timeout(defer.gatherResults(attempts))
    assert sorted(r.ok for r in results) == [False, True]
    (lost,) = [r for r in results if not r.ok]
    assert lost.reason == "activation code is used"
    assert len(used_codes(opened.path)) == 1
    # The winner's phone is the one on disk, and the loser's view catches up with it.
    winner = "SEP001122334455" if results[0].ok else "SEP0011223344AA"
    loser = second if results[0].ok else first
    await with_timeout(loser.refresh())
    assert loser.get(winner).state is DeviceState.ACTIVE
    assert loser.outstanding_codes() == []


@pytest_twisted.ensureDeferred
async def test_concurrent_redemptions_in_one_registry_use_the_code_once(opened: Opened) -> None:
    registry = opened.registry()
    _, code = await code_of(registry, DeviceSpec(model="8841"))
    attempts = [
        registry.redeem(mac=f"0011223344{i:02X}", model="8841", code=code.code, mic_sha256="")
        for i in range(5)
    ]
    results = await with_timeout(defer.gatherResults(attempts))
    assert sum(r.ok for r in results) == 1
    assert {r.reason for r in results if not r.ok} == {"activation code is used"}
    assert len(used_codes(opened.path)) == 1
    assert len([d for d in registry.devices() if d.state is DeviceState.ACTIVE]) == 1


@pytest_twisted.ensureDeferred
async def test_a_stale_admin_write_is_refused_and_writes_nothing(opened: Opened) -> None:
    first = opened.registry()
    device = await first.add_device(DeviceSpec(model="8841", requires_activation=False))
    second = opened.registry()
    await first.set_mac(device.name, "001122334455")
    with pytest.raises(Stale, match="changed meanwhile"):
        await second.set_mac(device.name, "0011223344AA")  # read before the rename
    await with_timeout(second.refresh())
    assert second.find(device.name) is None
    assert second.get("SEP001122334455").id == device.id


@pytest_twisted.ensureDeferred
async def test_the_same_mac_added_by_two_writers_is_one_device(opened: Opened) -> None:
    first, second = opened.registry(), opened.registry()
    attempts = [
        first.add_device(DeviceSpec(model="8841", mac="001122334455")),
        second.add_device(DeviceSpec(model="8851", mac="001122334455")),
    ]
    results = await with_timeout(
        defer.DeferredList(attempts, consumeErrors=True)  # type: ignore[arg-type]
    )
    outcomes = [ok for ok, _ in results]
    assert sorted(outcomes) == [False, True]
    (failure,) = [value for ok, value in results if not ok]
    assert failure.check(Stale) and "already exists" in str(failure.value)


# -- conditions are data --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_failed_condition_writes_nothing_of_the_transaction(opened: Opened) -> None:
    registry = opened.registry()
    device, code = await code_of(registry, DeviceSpec(model="8841"))
    store = opened.store()
    seq = store.load().seq
    renamed = device.changed(NOW, description="should not stick")
    wrong_digits = CodeExpectation(CodeState.ISSUED, digits="0" * 16, live_at=NOW)
    with pytest.raises(ConditionFailed, match="unknown activation code"):
        await store.apply(
            [
                PutDevice(renamed, expect_version=device.version),
                PutCode(code, wrong_digits),
            ]
        )
    expired = CodeExpectation(CodeState.ISSUED, digits=code.code, live_at=code.expires_at)
    with pytest.raises(ConditionFailed, match="expired"):
        await store.apply([PutCode(code, expired)])
    with pytest.raises(ConditionFailed, match="already exists"):
        await store.apply([PutDevice(device, expect_version=ABSENT)])
    after = store.load()
    assert after.seq == seq  # not even a feed row
    assert [d.description for d in after.devices] == [""]


# -- durability ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_memory_changes_only_after_the_commit_is_on_disk(opened: Opened) -> None:
    registry = opened.registry()
    pending = registry.add_device(DeviceSpec(model="8841", mac="001122334455"))
    # The write is on the store thread: the view must not show it yet.
    assert not pending.called
    assert registry.find("SEP001122334455") is None
    device = await with_timeout(pending)
    assert registry.get("SEP001122334455") == device
    # A connection of its own (another process) sees the committed row.
    db = sqlite3.connect(opened.path)
    try:
        row = db.execute("SELECT name, version FROM devices WHERE id = ?", (device.id,)).fetchone()
    finally:
        db.close()
    assert row == ("SEP001122334455", 1)
    reopened = Registry(opened.store(), lambda: NOW)
    assert reopened.get("SEP001122334455") == device


@pytest_twisted.ensureDeferred
async def test_a_refused_write_leaves_memory_as_it_was(opened: Opened) -> None:
    first = opened.registry()
    _, code = await code_of(first, DeviceSpec(model="8841"))
    second = opened.registry()
    assert (await first.redeem(mac="001122334455", model="8841", code=code.code, mic_sha256="")).ok
    heard: list[str] = []
    second.subscribe(lambda _old, new: heard.append(new.name if new else "-"))
    result = await second.redeem(mac="0011223344AA", model="8841", code=code.code, mic_sha256="")
    assert not result.ok and result.reason == "activation code is used"
    # Nothing of the refused redemption reached the view (the catch-up brings the winner's).
    assert second.find("SEP0011223344AA") is None
    assert "SEP0011223344AA" not in heard
    assert len(second) == 1


# -- the change feed ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_changes_reach_the_other_view_through_the_feed(opened: Opened) -> None:
    writer, follower = opened.registry(), opened.registry()
    heard: list[tuple[str | None, str | None]] = []
    follower.subscribe(lambda old, new: heard.append((old and old.name, new and new.name)))
    device = await writer.add_device(
        DeviceSpec(model="8841", lines=(Line("1001", "Lobby"),), requires_activation=True)
    )
    await writer.set_default("7821", Onboarding.AUTOREGISTRATION)
    assert follower.find(device.name) is None
    assert await with_timeout(follower.refresh()) == 3  # the device, its code, the default
    assert follower.get(device.name) == device
    assert follower.outstanding_code(device) == writer.outstanding_code(device)
    assert follower.onboarding("7821") is Onboarding.AUTOREGISTRATION
    code = writer.outstanding_code(device)
    assert code is not None
    assert (await writer.redeem(mac="001122334455", model="8841", code=code.code, mic_sha256="")).ok
    await writer.delete("SEP001122334455")
    await with_timeout(follower.refresh())
    # The rename and the delete happened before this poll: it sees the device gone.
    assert heard == [(None, device.name), (device.name, None)]
    assert len(follower) == 0 and follower.seq == writer.seq


@pytest_twisted.ensureDeferred
async def test_a_registry_does_not_reapply_its_own_commits(opened: Opened) -> None:
    registry = opened.registry()
    heard: list[object] = []
    registry.subscribe(lambda old, new: heard.append(new))
    await registry.add_device(DeviceSpec(model="8841", mac="001122334455"))
    await registry.set_default("8841", Onboarding.AUTOREGISTRATION)
    version = registry.defaults_version
    assert await with_timeout(registry.refresh()) == 0
    assert len(heard) == 1 and registry.defaults_version == version
    assert registry.seq > 0


@pytest_twisted.ensureDeferred
async def test_a_timer_drives_the_feed_into_the_view(opened: Opened) -> None:
    writer, follower = opened.registry(), opened.registry()
    arrived: defer.Deferred[str] = defer.Deferred()
    follower.subscribe(lambda _old, new: new is not None and arrived.callback(new.name))
    clock = task.Clock()
    timer = TimerService(1.0, follower.follow)
    timer.clock = clock
    timer.startService()  # polls once at start, then every second of ``clock``
    try:
        await with_timeout(follower.refresh())  # waits for the first poll to finish
        device = await writer.add_device(DeviceSpec(model="8841", mac="001122334455"))
        assert not arrived.called
        clock.advance(1.0)
        assert await with_timeout(arrived) == device.name
    finally:
        await timer.stopService()


@pytest_twisted.ensureDeferred
async def test_a_refresh_asked_during_another_reads_again_after_it(opened: Opened) -> None:
    writer, follower = opened.registry(), opened.registry()
    await writer.add_device(DeviceSpec(model="8841"))
    first, second = follower.refresh(), follower.refresh()
    assert await with_timeout(defer.gatherResults([first, second])) == [2, 0]
    assert len(follower) == 1


# -- a shared view reads the feed before it refuses -----------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_shared_view_finds_a_code_issued_by_another_writer_a_moment_ago(
    opened: Opened,
) -> None:
    writer, other = opened.registry(), opened.registry()
    _, code = await code_of(writer, DeviceSpec(model="8841", lines=(Line("1001", "Lobby"),)))
    # Not shared: the refusal comes from this view alone (no store round trip).
    stale = await other.redeem(mac="001122334455", model="8841", code=code.code, mic_sha256="")
    assert (stale.ok, stale.reason) == (False, "unknown activation code")
    shared = opened.registry()
    shared.shared = True
    done = await with_timeout(
        shared.redeem(mac="001122334455", model="8841", code=code.code, mic_sha256="")
    )
    assert done.ok and done.device is not None and done.device.name == "SEP001122334455"
    # A wrong code is still refused, after the one read.
    wrong = await with_timeout(
        shared.redeem(mac="001122334466", model="8841", code="1" * 16, mic_sha256="")
    )
    assert not wrong.ok
    assert [state for _, state in used_codes(opened.path)] == ["used"]


@pytest_twisted.ensureDeferred
async def test_a_shared_view_settles_by_reading_the_feed_and_an_unshared_one_at_once(
    opened: Opened,
) -> None:
    writer, view = opened.registry(), opened.registry()
    device = await writer.add_device(DeviceSpec(model="8841", mac="001122334455"))
    settled = view.settled()
    assert settled.called  # nobody else writes: nothing to read
    assert view.find(device.name) is None
    view.shared = True
    await with_timeout(view.settled())
    assert view.get(device.name) == device
