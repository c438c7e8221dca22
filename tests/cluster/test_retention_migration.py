"""A database of schema version 8 (before feed retention) upgrades to 9 and keeps its feed.

On a real SQLite file and a real PostgreSQL database: the old feed rows stay (with no time:
they count as old), the horizon starts at 0, a follower anywhere in the old feed is not
behind, and the first prune treats the untimed rows as old.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_twisted
from callboard.daemon.registry.model import Device, DeviceState
from callboard.daemon.registry.pgstore import PG_MIGRATIONS, PostgreSQLStore, _run_script
from callboard.daemon.registry.registry import Registry
from callboard.daemon.registry.store import (
    _DEVICE_COLUMNS,
    MIGRATIONS,
    SCHEMA_VERSION,
    SQLiteStore,
    _device_row,
)
from support.postgres import PGServer
from twisted.internet import reactor

NOW = 1_800_000_000.0
HOUR = 3600.0
OLD_DEVICES = [
    Device(
        id=f"d{n}",
        name=f"SEP00112233000{n}",
        model="8841",
        requires_activation=False,
        state=DeviceState.PROVISIONED,
        created_at=100.0,
        updated_at=100.0,
    )
    for n in range(3)
]


def make_v8_sqlite(path: Path) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    for migration in MIGRATIONS[:8]:
        migration(db)
    marks = ", ".join("?" * len(_DEVICE_COLUMNS.split(",")))
    for device in OLD_DEVICES:
        db.execute(f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES ({marks})", _device_row(device))
        db.execute("INSERT INTO changes (kind, key) VALUES ('device', ?)", (device.id,))
    db.execute("PRAGMA user_version = 8")
    db.execute("COMMIT")
    db.close()


def make_v8_postgresql(dsn: str) -> None:
    marks = ", ".join(["%s"] * len(_DEVICE_COLUMNS.split(",")))
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.execute("CREATE TABLE callboard_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO callboard_schema VALUES (8)")
        with conn.cursor() as cur:
            for script in PG_MIGRATIONS[:8]:
                _run_script(cur, script)
        for device in OLD_DEVICES:
            conn.execute(
                f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES ({marks})".encode(),
                _device_row(device),
            )
            conn.execute("INSERT INTO changes (kind, key) VALUES ('device', %s)", (device.id,))


@pytest.fixture(params=["sqlite", "postgresql"])
def old_database(request: Any, tmp_path: Path) -> tuple[str, str]:
    if request.param == "sqlite":
        path = tmp_path / "old.sqlite3"
        make_v8_sqlite(path)
        return "sqlite", str(path)
    server: PGServer = request.getfixturevalue("pg_server")
    if not server.running():
        server.start()
    dsn = server.new_database()
    make_v8_postgresql(dsn)
    return "postgresql", dsn


@pytest_twisted.async_yield_fixture
async def upgraded(
    old_database: tuple[str, str],
) -> AsyncIterator[SQLiteStore | PostgreSQLStore]:
    kind, where = old_database
    store: SQLiteStore | PostgreSQLStore
    if kind == "sqlite":
        store = SQLiteStore(Path(where), reactor, clock=lambda: NOW)
    else:
        store = PostgreSQLStore(where, reactor, listen=False, clock=lambda: NOW)
    yield store
    await store.close()


@pytest_twisted.ensureDeferred
async def test_a_version_8_database_upgrades_and_keeps_its_feed(
    upgraded: SQLiteStore | PostgreSQLStore,
) -> None:
    store = upgraded
    assert SCHEMA_VERSION == 9 and store.schema_version == 9
    old_rows = store.read(lambda db: db.execute("SELECT seq, at FROM changes").fetchall())
    assert len(old_rows) == 3 and all(at is None for _, at in old_rows)
    horizon = store.read(
        lambda db: db.execute("SELECT pruned_through FROM feed_horizon").fetchall()
    )
    assert [tuple(r) for r in horizon] == [(0,)]

    registry = Registry(store, lambda: NOW)
    assert [d.id for d in registry.devices()] == ["d0", "d1", "d2"]
    last = max(seq for seq, _ in old_rows)
    assert registry.seq == last
    batch = await store.changes_since(0)  # a follower at the very start: not behind
    assert not batch.behind_horizon and {d.id for d in batch.devices} == {"d0", "d1", "d2"}

    # New rows are stamped; the untimed old ones count as old and go first.
    await registry.update_device("SEP001122330000", description="after the upgrade")
    stamped = store.read(
        lambda db: db.execute(f"SELECT at FROM changes WHERE seq > {last}").fetchall()
    )
    assert [tuple(r) for r in stamped] == [(NOW,)]
    assert await store.prune_feed(1, HOUR) == 3
    assert (await store.changes_since(0)).behind_horizon
    assert not (await store.changes_since(last)).behind_horizon
