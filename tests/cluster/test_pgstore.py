"""The registry on a real PostgreSQL: races, the NOTIFY feed, lost connections, outages.

Each :class:`PostgreSQLStore` has its own connections and threads, as a separate node would;
the server is a real PostgreSQL (``support.postgres``).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psycopg
import pytest
import pytest_twisted
from callboard.daemon.registry.model import DeviceState, Stale
from callboard.daemon.registry.pgstore import PostgreSQLStore, StoreUnavailable
from callboard.daemon.registry.registry import DeviceSpec, Registry
from callboard.daemon.registry.store import SCHEMA_VERSION, SQLiteStore, StoreError
from support.postgres import PGServer
from twisted.internet import defer, reactor, task

NOW = 1_800_000_000.0
TIMEOUT = 10.0


class Nodes:
    """Stores (nodes) opened by a test on one database, closed at its end."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.stores: list[PostgreSQLStore] = []

    def store(self) -> PostgreSQLStore:
        store = PostgreSQLStore(self.dsn, connect_timeout=2)
        self.stores.append(store)
        return store

    def registry(self, *, follow: bool = True) -> Registry:
        store = self.store()
        registry = Registry(store, lambda: NOW)
        if follow:
            store.on_change = registry.follow
        return registry


@pytest_twisted.async_yield_fixture
async def nodes(pg_dsn: str) -> AsyncIterator[Nodes]:
    n = Nodes(pg_dsn)
    yield n
    for store in n.stores:
        await store.close()


def with_timeout(d: defer.Deferred[object]) -> defer.Deferred[object]:
    return d.addTimeout(TIMEOUT, reactor)


async def eventually(check: Callable[[], bool], within: float) -> float:
    """Wait (on the reactor) until ``check()`` holds; how long it took. Fails after ``within``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within:
            raise AssertionError(f"not within {within}s")
        await task.deferLater(reactor, 0.01, lambda: None)
    return time.monotonic() - start


def rows(dsn: str, query: str) -> list[tuple[object, ...]]:
    """What an independent connection sees."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(query.encode()).fetchall()


# -- races ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_nodes_race_one_redemption_and_exactly_one_wins(nodes: Nodes) -> None:
    a = nodes.registry()
    device = await a.add_device(DeviceSpec(model="8841"))
    code = a.outstanding_code(device)
    assert code is not None
    b = nodes.registry()  # loaded while the code is still issued
    assert b.outstanding_codes()[0][1] == code
    attempts = []
    for i in range(20):  # interleaved: half on each node, every one with the right digits
        registry = a if i % 2 else b
        attempts.append(
            registry.redeem(mac=f"0011223344{i:02X}", model="8841", code=code.code, mic_sha256="")
        )
    results = await with_timeout(defer.gatherResults(attempts))
    assert sum(r.ok for r in results) == 1
    assert {r.reason for r in results if not r.ok} <= {
        "activation code is used",
        f"code is bound to another MAC ({next(r for r in results if r.ok).device.name})",  # type: ignore[union-attr]
    }
    assert rows(nodes.dsn, "SELECT count(*) FROM codes WHERE state = 'used'") == [(1,)]
    assert rows(nodes.dsn, "SELECT count(*) FROM devices WHERE state = 'active'") == [(1,)]


@pytest_twisted.ensureDeferred
async def test_the_same_mac_added_on_two_nodes_is_one_device(nodes: Nodes) -> None:
    a, b = nodes.registry(), nodes.registry()
    results = await with_timeout(
        defer.DeferredList(  # type: ignore[arg-type]
            [
                a.add_device(DeviceSpec(model="8841", mac="001122334455")),
                b.add_device(DeviceSpec(model="8851", mac="001122334455")),
            ],
            consumeErrors=True,
        )
    )
    assert sorted(ok for ok, _ in results) == [False, True]
    (failure,) = [value for ok, value in results if not ok]
    assert failure.check(Stale) and "already exists" in str(failure.value)
    assert rows(nodes.dsn, "SELECT count(*) FROM devices") == [(1,)]


@pytest_twisted.ensureDeferred
async def test_a_stale_admin_write_on_another_node_is_refused(nodes: Nodes) -> None:
    a = nodes.registry()
    device = await a.add_device(DeviceSpec(model="8841", requires_activation=False))
    b = nodes.registry(follow=False)
    await a.set_mac(device.name, "001122334455")
    with pytest.raises(Stale, match="changed meanwhile"):
        await b.set_mac(device.name, "0011223344AA")
    await with_timeout(b.refresh())
    assert b.get("SEP001122334455").id == device.id


# -- the feed ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_device_added_on_one_node_appears_on_the_other_within_a_second(
    nodes: Nodes,
) -> None:
    a, b = nodes.registry(), nodes.registry()
    await task.deferLater(reactor, 0.2, lambda: None)  # the listeners are listening
    device = await a.add_device(DeviceSpec(model="8841", mac="001122334455"))
    took = await eventually(lambda: b.find(device.name) is not None, within=1.0)
    assert took < 1.0
    assert b.get(device.name) == device
    # And the way back, a change rather than an insert.
    await b.set_requires_activation(device.name, False)
    await eventually(lambda: not a.get(device.name).requires_activation, within=1.0)


@pytest_twisted.ensureDeferred
async def test_a_node_resynchronises_after_its_connections_are_killed(nodes: Nodes) -> None:
    a, b = nodes.registry(), nodes.registry()
    await task.deferLater(reactor, 0.2, lambda: None)
    with psycopg.connect(nodes.dsn, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'callboard' AND pid <> pg_backend_pid()"
        ).fetchone()
    assert killed is not None and killed[0] >= 4  # two nodes, a pool and a listener each
    # Both nodes reconnect by themselves: A writes, B hears of it.
    device = await with_timeout(a.add_device(DeviceSpec(model="8841", mac="001122334455")))
    await eventually(lambda: b.find(device.name) is not None, within=5.0)
    await with_timeout(b.delete(device.name))
    await eventually(lambda: a.find(device.name) is None, within=5.0)


@pytest_twisted.ensureDeferred
async def test_changes_made_while_the_listener_was_away_are_caught_up(nodes: Nodes) -> None:
    a, b = nodes.registry(), nodes.registry()
    await task.deferLater(reactor, 0.2, lambda: None)
    b_store = nodes.stores[1]
    with psycopg.connect(nodes.dsn, autocommit=True) as admin:
        # Kill only B's listener, then write before it is back: no NOTIFY reaches B.
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'callboard' AND query LIKE 'LISTEN%%'"
        )
    added = await with_timeout(a.add_devices([DeviceSpec(model="8841") for _ in range(3)]))
    await eventually(lambda: all(b.find(d.name) for d in added), within=5.0)  # type: ignore[union-attr]
    assert b_store.on_change is not None


# -- outage --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_writes_fail_cleanly_while_the_database_is_down_and_work_when_it_returns(
    nodes: Nodes, pg_server: PGServer
) -> None:
    a = nodes.registry()
    device = await a.add_device(DeviceSpec(model="8841"))
    code = a.outstanding_code(device)
    assert code is not None
    pg_server.stop()
    try:
        with pytest.raises(StoreUnavailable, match=r"unreachable|connection failed"):
            await with_timeout(
                a.redeem(mac="001122334455", model="8841", code=code.code, mic_sha256="")
            )
        with pytest.raises(StoreUnavailable):
            await with_timeout(a.add_device(DeviceSpec(model="8851")))
        # Reads still come from memory: nothing half-applied.
        assert a.get(device.name).state is DeviceState.AWAITING_ACTIVATION
        assert a.outstanding_code(device) == code
        assert len(a) == 1
    finally:
        pg_server.start()
    result = await with_timeout(
        a.redeem(mac="001122334455", model="8841", code=code.code, mic_sha256="")
    )
    assert result.ok
    assert rows(nodes.dsn, "SELECT name, state FROM devices") == [("SEP001122334455", "active")]


# -- schema --------------------------------------------------------------------------------


def test_a_schema_from_a_newer_version_is_refused(pg_dsn: str) -> None:
    PostgreSQLStore(pg_dsn, listen=False).close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE callboard_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer than this Callboard"):
        PostgreSQLStore(pg_dsn, listen=False)


def test_an_unreachable_database_is_one_line_error(pg_server: PGServer) -> None:
    dead = f"postgresql://callboard@127.0.0.1:{pg_server.port + 1}/nowhere"
    with pytest.raises(StoreUnavailable) as raised:
        PostgreSQLStore(dead, connect_timeout=1, listen=False)
    assert "\n" not in str(raised.value)


def test_both_engines_have_the_same_tables_and_columns(pg_dsn: str, tmp_path: Path) -> None:
    """The parallel migration lists are in lockstep: same version, tables, columns."""
    PostgreSQLStore(pg_dsn, listen=False).close()
    SQLiteStore(tmp_path / "c.sqlite3").close()
    with psycopg.connect(pg_dsn) as conn:
        pg = {
            (t, c)
            for t, c in conn.execute(
                "SELECT table_name, column_name FROM information_schema.columns"
                " WHERE table_schema = 'public' AND table_name <> 'callboard_schema'"
            )
        }
    db = sqlite3.connect(tmp_path / "c.sqlite3")
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    lite = {
        (t, r[1])
        for t in tables
        if t != "sqlite_sequence"
        for r in db.execute(f"PRAGMA table_info({t})")
    }
    db.close()
    assert pg == lite
