"""Schema migrations run forward on an old database file and keep its data."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import pytest_twisted
from callboard.daemon.registry.model import Onboarding
from callboard.daemon.registry.registry import Registry
from callboard.daemon.registry.store import SCHEMA_VERSION, SQLiteStore, StoreError

V1_SCHEMA = """
CREATE TABLE devices (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, model TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '', owner_user TEXT NOT NULL DEFAULT '',
    lines TEXT NOT NULL DEFAULT '[]', requires_activation INTEGER NOT NULL,
    state TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    version INTEGER NOT NULL);
CREATE TABLE codes (
    id TEXT PRIMARY KEY, device_id TEXT NOT NULL, code TEXT NOT NULL,
    issued_at REAL NOT NULL, expires_at REAL NOT NULL, state TEXT NOT NULL, used_at REAL);
CREATE INDEX codes_by_device ON codes(device_id);
CREATE TABLE model_defaults (model TEXT PRIMARY KEY, onboarding TEXT NOT NULL);
PRAGMA user_version = 1;
"""


def make_v1_file(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.execute(
        "INSERT INTO devices VALUES ('d1', 'BAT0123456789AB', '8841', 'lobby', 'al',"
        ' \'[{"directory_number": "1001", "display_name": "Lobby", "auth_name": "1001",'
        ' "auth_password": ""}]\', 1, \'awaiting-activation\', 100.0, 100.0, 1)'
    )
    db.execute(
        "INSERT INTO codes VALUES ('c1', 'd1', '1234567812345678', 100.0, 9e12, 'issued', NULL)"
    )
    db.commit()
    db.close()


@pytest_twisted.ensureDeferred
async def test_a_version_1_file_is_migrated_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    make_v1_file(path)
    store = SQLiteStore(path)
    assert store.schema_version == SCHEMA_VERSION == 9
    registry = Registry(store, lambda: 200.0)
    device = registry.get("BAT0123456789AB")
    assert device.description == "lobby" and device.lines[0].display_name == "Lobby"
    assert device.activated_at is None and device.mic_sha256 is None
    result = await registry.redeem(
        mac="001122334455", model="8841", code="1234567812345678", mic_sha256="f" * 64
    )
    assert result.ok
    await store.close()
    again = SQLiteStore(path)
    reopened = Registry(again, lambda: 300.0)
    assert reopened.get("SEP001122334455").mic_sha256 == "f" * 64
    await again.close()


def make_v2_file(path: Path) -> None:
    make_v1_file(path)
    db = sqlite3.connect(path)
    db.executescript(
        """
        ALTER TABLE devices ADD COLUMN activated_at REAL;
        ALTER TABLE devices ADD COLUMN mic_sha256 TEXT;
        UPDATE devices SET state = 'active', activated_at = 150.0, mic_sha256 = 'ab';
        PRAGMA user_version = 2;
        """
    )
    db.commit()
    db.close()


@pytest_twisted.ensureDeferred
async def test_a_version_2_file_gains_the_change_feed(tmp_path: Path) -> None:
    path = tmp_path / "v2.sqlite3"
    make_v2_file(path)
    store = SQLiteStore(path)
    assert store.schema_version == SCHEMA_VERSION
    snapshot = store.load()
    assert snapshot.seq == 0  # an empty feed: followers start from here
    (device,) = snapshot.devices
    assert (device.name, device.activated_at, device.mic_sha256) == ("BAT0123456789AB", 150.0, "ab")
    # Version 4: remote activation off, token generation and refresh serial at 0.
    assert (device.allow_remote, device.token_generation, device.refresh_serial) == (False, 0, 0)
    assert device.onboarding is None  # version 6: the model's default
    assert [c.id for c in snapshot.codes] == ["c1"]
    # A write through another connection is now visible on the feed.
    other = SQLiteStore(path)
    await Registry(other, lambda: 200.0).set_default("8841", Onboarding.AUTOREGISTRATION)
    batch = await store.changes_since(0)
    assert batch.seq == 1 and batch.defaults == {"8841": Onboarding.AUTOREGISTRATION}
    db = sqlite3.connect(path)
    assert db.execute("SELECT seq, kind, key FROM changes").fetchall() == [(1, "default", "8841")]
    db.close()
    await other.close()
    await store.close()


def make_v3_file(path: Path) -> None:
    make_v2_file(path)
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, key TEXT NOT NULL);
        INSERT INTO changes (kind, key) VALUES ('device', 'd1');
        PRAGMA user_version = 3;
        """
    )
    db.commit()
    db.close()


@pytest_twisted.ensureDeferred
async def test_a_version_3_file_gains_users_and_tokens_and_keeps_its_feed(tmp_path: Path) -> None:
    from callboard.daemon.registry.accounts import AccountStore, User
    from twisted.internet import reactor

    path = tmp_path / "v3.sqlite3"
    make_v3_file(path)
    store = SQLiteStore(path)
    assert store.schema_version == SCHEMA_VERSION
    snapshot = store.load()
    assert snapshot.seq == 1 and [d.name for d in snapshot.devices] == ["BAT0123456789AB"]
    db = sqlite3.connect(path)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    assert {"users", "api_tokens", "changes", "devices", "codes"} <= tables
    accounts = AccountStore(store, lambda: 100.0, reactor)
    await accounts.put_user(User("al", "Al", created_at=100.0, updated_at=100.0))
    await store.close()
    again = SQLiteStore(path)
    assert list(AccountStore(again, lambda: 200.0, reactor).users) == ["al"]
    await again.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StoreError, match="newer"):
        SQLiteStore(path)


@pytest_twisted.ensureDeferred
async def test_a_device_keeps_its_own_onboarding_across_a_reopen(tmp_path: Path) -> None:
    from callboard.daemon.registry.registry import DeviceSpec

    path = tmp_path / "own.sqlite3"
    store = SQLiteStore(path)
    registry = Registry(store, lambda: 100.0)
    await registry.set_default("8841", Onboarding.AUTOREGISTRATION)
    (own,) = await registry.add_devices(
        [DeviceSpec(model="8841", mac="001122334455", onboarding=Onboarding.IVR)]
    )
    (plain,) = await registry.add_devices([DeviceSpec(model="8841", mac="001122334466")])
    # Its own method decides whether a code is needed; the model's default does otherwise.
    assert own.requires_activation and not plain.requires_activation
    await store.close()
    again = SQLiteStore(path)
    reopened = Registry(again, lambda: 200.0)
    assert reopened.get("SEP001122334455").onboarding is Onboarding.IVR
    assert reopened.onboarding_of(reopened.get("SEP001122334455")) is Onboarding.IVR
    assert reopened.get("SEP001122334466").onboarding is None
    assert reopened.onboarding_of(reopened.get("SEP001122334466")) is Onboarding.AUTOREGISTRATION
    await again.close()
