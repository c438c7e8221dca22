"""Registry.update_device: description, owner and lines, conditional on the version read;
and the accounts tables sharing the store's writer."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from callboard.daemon.registry.accounts import AccountStore, ApiToken, User
from callboard.daemon.registry.model import Conflict, Line, NotFound, RegistryError, Stale
from callboard.daemon.registry.registry import DeviceSpec, Registry, RegistrySettings
from callboard.daemon.registry.store import SQLiteStore
from twisted.internet import reactor

NOW = 1_800_000_000.0


class Opened:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.stores: list[SQLiteStore] = []

    def store(self) -> SQLiteStore:
        store = SQLiteStore(self.path)
        self.stores.append(store)
        return store

    def registry(self, **settings: bool) -> Registry:
        return Registry(self.store(), lambda: NOW, RegistrySettings(**settings))


@pytest_twisted.async_yield_fixture
async def opened(tmp_path: Path) -> AsyncIterator[Opened]:
    o = Opened(tmp_path / "callboard.sqlite3")
    yield o
    for store in o.stores:
        await store.close()


def on_disk(path: Path, name: str) -> tuple[str, str, str, int]:
    db = sqlite3.connect(path)
    try:
        row = db.execute(
            "SELECT description, owner_user, lines, version FROM devices WHERE name = ?", (name,)
        ).fetchone()
    finally:
        db.close()
    return row  # type: ignore[no-any-return]


@pytest_twisted.ensureDeferred
async def test_update_changes_only_the_fields_given_and_is_durable(opened: Opened) -> None:
    registry = opened.registry()
    device = await registry.add_device(
        DeviceSpec(model="8841", description="lobby", owner_user="al", lines=(Line("1001"),))
    )
    code = registry.outstanding_code(device)
    changed = await registry.update_device(device.name, description="  front desk ")
    assert (changed.description, changed.owner_user) == ("front desk", "al")
    assert changed.lines == device.lines and changed.version == device.version + 1
    assert registry.outstanding_code(changed) == code  # the code is untouched
    changed = await registry.update_device(
        device.name, owner_user="", lines=[Line(" 2002 ", "Desk"), Line("2003")]
    )
    assert changed.owner_user == ""
    assert [(ln.directory_number, ln.auth_name) for ln in changed.lines] == [
        ("2002", "2002"),
        ("2003", "2003"),
    ]
    description, owner, lines, version = on_disk(opened.path, device.name)
    assert (description, owner, version) == ("front desk", "", device.version + 2)
    assert '"2002"' in lines and '"1001"' not in lines
    # Nothing to change: no write, the same device back.
    same = await registry.update_device(device.name, description="front desk")
    assert same is registry.get(device.name) and same.version == device.version + 2


@pytest_twisted.ensureDeferred
async def test_update_checks_lines_as_an_add_does(opened: Opened) -> None:
    registry = opened.registry(unique_directory_numbers=True)
    first = await registry.add_device(DeviceSpec(model="8841", lines=(Line("1001"),)))
    second = await registry.add_device(DeviceSpec(model="8841", lines=(Line("1002"),)))
    with pytest.raises(RegistryError, match="twice"):
        await registry.update_device(first.name, lines=[Line("3001"), Line("3001")])
    with pytest.raises(RegistryError):
        await registry.update_device(first.name, lines=[Line("12 34")])
    with pytest.raises(Conflict, match="1002 is already in use"):
        await registry.update_device(first.name, lines=[Line("1001"), Line("1002")])
    # Keeping its own number is not a clash with itself.
    kept = await registry.update_device(first.name, lines=[Line("1001", "Renamed")])
    assert kept.lines[0].display_name == "Renamed"
    with pytest.raises(NotFound):
        await registry.update_device("BAT000000000000", description="x")
    assert registry.get(second.name).lines == second.lines


@pytest_twisted.ensureDeferred
async def test_an_update_read_before_another_writers_change_is_refused(opened: Opened) -> None:
    first = opened.registry()
    device = await first.add_device(DeviceSpec(model="8841", description="old"))
    second = opened.registry()  # another process, loaded before the change below
    await first.update_device(device.name, description="first")
    with pytest.raises(Stale):
        await second.update_device(device.name, description="second")
    assert on_disk(opened.path, device.name)[0] == "first"
    await second.refresh()
    assert second.get(device.name).description == "first"


@pytest_twisted.ensureDeferred
async def test_accounts_write_through_the_registry_store(opened: Opened) -> None:
    store = opened.store()
    registry = Registry(store, lambda: NOW)
    accounts = AccountStore(store, lambda: NOW, reactor)
    # Both kinds of write queue on the one store thread and land in order.
    writes = [
        accounts.put_user(User("al", "Al", created_at=NOW, updated_at=NOW)),
        registry.add_device(DeviceSpec(model="8841", owner_user="al")),
        accounts.put_user(User("bo", created_at=NOW, updated_at=NOW)),
    ]
    for d in writes:
        await d
    db = sqlite3.connect(opened.path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        names = [r[0] for r in db.execute("SELECT name FROM users ORDER BY name")]
    finally:
        db.close()
    assert names == ["al", "bo"]
    assert sorted(AccountStore(opened.store(), lambda: NOW, reactor).users) == ["al", "bo"]
    # A failing transaction writes nothing and leaves memory as it was.
    with pytest.raises(sqlite3.IntegrityError):
        await accounts.put_token(ApiToken("t1", "same", created_at=NOW))
        await accounts.put_token(ApiToken("t2", "same", created_at=NOW))
    assert list(accounts.tokens) == ["t1"]
