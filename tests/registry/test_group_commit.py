"""Group commit: writes waiting together share one transaction, each still conditional.

The store thread is held busy (a job that waits on an event) while the writes queue up, so
the test decides what forms a group instead of racing the thread.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest_twisted
from callboard.daemon.registry.model import CodeState, DeviceState
from callboard.daemon.registry.registry import DeviceSpec, Registry
from callboard.daemon.registry.store import (
    CodeExpectation,
    ConditionFailed,
    PutCode,
    SQLiteStore,
)
from twisted.internet import defer, reactor
from twisted.python.failure import Failure

NOW = 1_800_000_000.0
TIMEOUT = 10.0


@pytest_twisted.async_yield_fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "callboard.sqlite3")
    yield s
    await s.close()


class Held:
    """Keeps the store thread busy until :meth:`release`, so writes queue behind it."""

    def __init__(self, store: SQLiteStore) -> None:
        self.event = threading.Event()
        self.done = store._thread.submit(lambda: self.event.wait(TIMEOUT))

    async def release(self) -> None:
        self.event.set()
        await self.done


def on_disk(path: Path, sql: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def gathered(ds: list[defer.Deferred[object]]) -> defer.Deferred[list[object]]:
    return defer.gatherResults(ds).addTimeout(TIMEOUT, reactor)


@pytest_twisted.ensureDeferred
async def test_redemptions_of_distinct_codes_share_one_transaction(store: SQLiteStore) -> None:
    registry = Registry(store, lambda: NOW)
    specs = [DeviceSpec(model="8841") for _ in range(20)]
    devices = await registry.add_devices(specs)
    codes = [registry.outstanding_code(d) for d in devices]
    before = store.transactions

    held = Held(store)
    attempts: list[defer.Deferred[object]] = [
        registry.redeem(mac=f"0011223300{i:02X}", model="8841", code=c.code, mic_sha256="x")
        for i, c in enumerate(codes)
        if c is not None
    ]
    assert not any(d.called for d in attempts)  # nothing acknowledged before the commit
    await held.release()
    results = await gathered(attempts)

    assert all(r.ok for r in results)  # type: ignore[attr-defined]
    assert store.transactions - before == 1 < len(attempts)
    assert len(on_disk(store.path, "SELECT id FROM codes WHERE state = 'used'")) == 20
    assert sum(d.state is DeviceState.ACTIVE for d in registry.devices()) == 20
    # The feed positions of the group's writes follow each other: the view stays current.
    assert registry.seq == on_disk(store.path, "SELECT MAX(seq) FROM changes")[0][0]


@pytest_twisted.ensureDeferred
async def test_one_code_raced_in_one_group_has_one_winner(store: SQLiteStore) -> None:
    registry = Registry(store, lambda: NOW)
    device = await registry.add_device(DeviceSpec(model="8841"))
    code = registry.outstanding_code(device)
    assert code is not None
    other = await registry.add_device(DeviceSpec(model="8841"))
    other_code = registry.outstanding_code(other)
    assert other_code is not None

    held = Held(store)
    attempts: list[defer.Deferred[object]] = [
        registry.redeem(mac=f"00112233AA{i:02X}", model="8841", code=code.code, mic_sha256="")
        for i in range(30)
    ]
    attempts.append(
        registry.redeem(mac="00112233BB00", model="8841", code=other_code.code, mic_sha256="")
    )
    await held.release()
    results = await gathered(attempts)

    raced = results[:30]
    assert sum(r.ok for r in raced) == 1  # type: ignore[attr-defined]
    assert {r.reason for r in raced if not r.ok} == {"activation code is used"}  # type: ignore[attr-defined]
    assert results[30].ok  # type: ignore[attr-defined]  # a failed neighbour fails alone
    assert len(on_disk(store.path, "SELECT id FROM codes WHERE state = 'used'")) == 2
    active = [d.name for d in registry.devices() if d.state is DeviceState.ACTIVE]
    assert len(active) == 2 and "SEP00112233BB00" in active


@pytest_twisted.ensureDeferred
async def test_a_failed_write_in_a_group_is_rolled_back_alone(store: SQLiteStore) -> None:
    registry = Registry(store, lambda: NOW)
    devices = await registry.add_devices([DeviceSpec(model="8841") for _ in range(3)])
    codes = [registry.outstanding_code(d) for d in devices]
    assert all(codes)
    first, wrong, third = codes
    assert first is not None and wrong is not None and third is not None
    used = [replace(c, state=CodeState.USED, used_at=NOW) for c in codes if c]

    held = Held(store)
    ds = [
        store.apply([PutCode(used[0], CodeExpectation(digits=first.code))]),
        store.apply([PutCode(used[1], CodeExpectation(digits="0" * 16))]),  # wrong digits
        store.apply([PutCode(used[2], CodeExpectation(digits=third.code))]),
    ]
    outcomes: list[object] = []
    for d in ds:
        d.addBoth(outcomes.append)
    await held.release()
    await gathered(ds)

    assert isinstance(outcomes[1], Failure) and outcomes[1].check(ConditionFailed)
    assert not isinstance(outcomes[0], Failure) and not isinstance(outcomes[2], Failure)
    states = dict(on_disk(store.path, "SELECT id, state FROM codes"))  # type: ignore[arg-type]
    assert states == {first.id: "used", wrong.id: "issued", third.id: "used"}
    assert store.transactions >= 1
    # Each committed write got its own feed rows, without gaps between them.
    seqs = on_disk(store.path, "SELECT seq FROM changes ORDER BY seq")
    assert [s[0] for s in seqs] == list(range(1, len(seqs) + 1))
