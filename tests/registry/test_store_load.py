"""The start-up load reads every device in one pass (``_devices``): same records as ``_device``.

With 100,000 devices the daemon's start is mostly this load, so it parses the lines columns
in one JSON document and maps enums from dicts; what it builds must not differ in any field.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest_twisted
from callboard.daemon.registry.model import DeviceState, Line, Onboarding
from callboard.daemon.registry.registry import DeviceSpec, Registry
from callboard.daemon.registry.store import (
    _SELECT_DEVICES,
    PutDevice,
    SQLiteStore,
    _device,
    _devices,
)

NOW = 1_800_000_000.0


@pytest_twisted.async_yield_fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "callboard.sqlite3")
    yield s
    await s.close()


@pytest_twisted.ensureDeferred
async def test_bulk_load_builds_the_same_devices_as_one_row_at_a_time(
    store: SQLiteStore, tmp_path: Path
) -> None:
    registry = Registry(store, lambda: NOW)
    specs = [
        DeviceSpec(model="8841"),
        DeviceSpec(
            model="8845",
            mac="00AABBCCDD01",
            description='a "quoted", desk',
            owner_user="alice",
            lines=(Line("1001", "Alice", "alice", "s3cret"), Line("1002")),
        ),
        DeviceSpec(model="8841", mac="00AABBCCDD02", requires_activation=False),
    ]
    added = await registry.add_devices(specs)
    special = replace(
        added[2],
        state=DeviceState.ACTIVE,
        activated_at=NOW + 1,
        mic_sha256="ab" * 32,
        allow_remote=True,
        token_generation=3,
        refresh_serial=7,
        onboarding=Onboarding.AUTOREGISTRATION,
        version=added[2].version + 1,
    )
    await store.apply([PutDevice(special)])
    with sqlite3.connect(tmp_path / "callboard.sqlite3") as db:
        rows = db.execute(_SELECT_DEVICES).fetchall()
    assert len(rows) == 3
    assert _devices(rows) == [_device(r) for r in rows]
    loaded = {d.id: d for d in store.load().devices}
    assert loaded[special.id] == special
    assert loaded[added[1].id] == added[1]
    assert [ln.directory_number for ln in added[1].lines] == ["1001", "1002"]


@pytest_twisted.ensureDeferred
async def test_loaded_records_hold_repeated_values_once(store: SQLiteStore, tmp_path: Path) -> None:
    """What 100,000 records repeat is one object in memory, not one per row: the model and
    owner names, a line's auth name that is its number, the time of devices imported together
    (and an untouched record's update time), and a code's device id (the device's own)."""
    registry = Registry(store, lambda: NOW)
    await registry.add_devices(
        [DeviceSpec(model="8841", owner_user="alice", lines=(Line(f"10{i}"),)) for i in range(3)]
    )
    reopened = SQLiteStore(tmp_path / "callboard.sqlite3")
    try:
        snapshot = reopened.load()
    finally:
        await reopened.close()
    devices = snapshot.devices
    assert len(devices) == 3 and len(snapshot.codes) == 3
    assert devices[0].model is devices[1].model is devices[2].model
    assert devices[0].owner_user is devices[1].owner_user is devices[2].owner_user
    for device in devices:
        (line,) = device.lines
        assert line.auth_name == line.directory_number
        assert line.auth_name is line.directory_number
        assert device.updated_at is device.created_at
        assert device.created_at is devices[0].created_at  # imported together
    by_id = {d.id: d for d in devices}
    for code in snapshot.codes:
        assert code.device_id is by_id[code.device_id].id
