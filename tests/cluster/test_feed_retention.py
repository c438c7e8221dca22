"""The change feed is bounded: old rows are pruned; a follower behind them resynchronises.

Every test runs on a real SQLite file and on a real PostgreSQL database (``support.postgres``),
each store (a process, a node) with its own connection and thread. Time is a task.Clock:
the stores stamp feed rows with it, the registries and the pruning read it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import structlog
from callboard.daemon.provisioning import ProvisioningSettings, ProvisioningTree
from callboard.daemon.registry.accounts import AccountStore, User
from callboard.daemon.registry.model import CodeState, Device, DeviceState, Onboarding
from callboard.daemon.registry.pgstore import PostgreSQLStore
from callboard.daemon.registry.registry import DeviceSpec, Registry, RegistrySettings
from callboard.daemon.registry.store import SQLiteStore
from callboard.protocols.filesource import DirectorySource, FileNotFound, Requester
from support.postgres import PGServer
from twisted.internet import defer, reactor, task

NOW = 1_800_000_000.0
HOUR = 3600.0
TIMEOUT = 20.0

AnyStore = SQLiteStore | PostgreSQLStore


class Engine:
    """Opens stores on one database (SQLite file or PostgreSQL), all closed at the end."""

    def __init__(self, kind: str, where: str, clock: task.Clock) -> None:
        self.kind = kind
        self.where = where
        self.clock = clock
        self.stores: list[AnyStore] = []

    def store(self) -> AnyStore:
        store: AnyStore
        if self.kind == "sqlite":
            store = SQLiteStore(Path(self.where), clock=self.clock.seconds)
        else:
            store = PostgreSQLStore(
                self.where, connect_timeout=2, listen=False, clock=self.clock.seconds
            )
        self.stores.append(store)
        return store

    def registry(self, settings: RegistrySettings | None = None) -> Registry:
        return Registry(self.store(), self.clock.seconds, settings)

    def feed(self, store: AnyStore) -> list[tuple[int, str, str]]:
        """The kept feed rows as (seq, kind, key), oldest first."""
        return [
            (int(r[0]), r[1], r[2])
            for r in store.read(
                lambda db: db.execute("SELECT seq, kind, key FROM changes ORDER BY seq").fetchall()
            )
        ]

    def horizon(self, store: AnyStore) -> int:
        return int(
            store.read(lambda db: db.execute("SELECT pruned_through FROM feed_horizon").fetchone())[
                0
            ]
        )


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request: Any, tmp_path: Path) -> tuple[str, str]:
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "callboard.sqlite3")
    server: PGServer = request.getfixturevalue("pg_server")
    if not server.running():
        server.start()
    return "postgresql", server.new_database()


@pytest_twisted.async_yield_fixture
async def engine(where: tuple[str, str]) -> AsyncIterator[Engine]:
    clock = task.Clock()
    clock.advance(NOW)
    e = Engine(*where, clock)
    yield e
    for store in e.stores:
        await store.close()


def settle(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
    return d.addTimeout(TIMEOUT, reactor)


def plain(n: int) -> DeviceSpec:
    """A device that needs no code: one feed row per add."""
    return DeviceSpec(model="8841", mac=f"00112233{n:04X}", requires_activation=False)


def served(tree: ProvisioningTree, device: Device) -> bytes | None:
    """The device's config file as a phone would get it (None: not served)."""
    try:
        body = tree.open(f"{device.name}.cnf.xml", Requester("127.0.0.1", 50000, "tftp"))
    except FileNotFound:
        return None
    return body.read_at(0, body.size)


class Heard:
    """A registry's listeners: device events and resyncs."""

    def __init__(self, registry: Registry) -> None:
        self.events: list[tuple[Device | None, Device | None]] = []
        self.resyncs = 0
        registry.subscribe(lambda old, new: self.events.append((old, new)))
        registry.on_resync(self._resynced)

    def _resynced(self) -> None:
        self.resyncs += 1


# -- pruning --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pruning_deletes_only_rows_past_both_the_newest_n_and_the_age(
    engine: Engine,
) -> None:
    registry = engine.registry()
    store = registry._store
    for n in range(10):  # ten rows written two hours ago...
        await registry.add_device(plain(n))
    engine.clock.advance(2 * HOUR)
    for n in range(10, 15):  # ...and five now
        await registry.add_device(plain(n))
    rows = engine.feed(store)
    assert len(rows) == 15 and engine.horizon(store) == 0

    # Newest 3 or younger than an hour: the five young rows stay although 3 would do.
    assert await settle(store.prune_feed(3, HOUR)) == 10
    assert engine.feed(store) == rows[10:]
    assert engine.horizon(store) == rows[9][0]
    assert await settle(store.prune_feed(3, HOUR)) == 0  # nothing more is due

    # Everything old now: the newest three stay. In chunks of one, oldest first.
    engine.clock.advance(2 * HOUR)
    assert await settle(store.prune_feed(100, HOUR)) == 0  # fewer rows than keep_rows
    assert await settle(store.prune_feed(3, HOUR, limit=1)) == 1
    assert engine.feed(store) == rows[11:]
    assert engine.horizon(store) == rows[10][0]
    assert await settle(store.prune_feed(3, HOUR)) == 1
    assert engine.feed(store) == rows[12:]
    assert engine.horizon(store) == rows[11][0]
    assert registry.seq == rows[-1][0]  # the writer's own position is untouched


@pytest_twisted.ensureDeferred
async def test_the_registry_prunes_by_its_settings_and_logs_counts_only(engine: Engine) -> None:
    registry = engine.registry(RegistrySettings(feed_keep_rows=2, feed_keep_seconds=HOUR))
    for n in range(6):
        await registry.add_device(plain(n))
    with structlog.testing.capture_logs() as logs:
        assert await settle(registry.prune_feed()) == 0  # all younger than an hour
        engine.clock.advance(2 * HOUR)
        assert await settle(registry.prune_feed()) == 4
        assert await settle(registry.prune_feed()) == 0
    (line,) = [e for e in logs if e["event"].startswith("change feed")]
    assert line == {
        "event": "change feed: pruned old rows",
        "log_level": "info",
        "logger_name": "callboard.registry",
        "rows": 4,
        "keep_rows": 2,
        "keep_seconds": HOUR,
    }
    assert len(engine.feed(registry._store)) == 2


@pytest_twisted.ensureDeferred
async def test_a_follower_within_the_horizon_sees_every_change_as_before(
    engine: Engine,
) -> None:
    a = engine.registry()
    first = await a.add_device(plain(0))
    doomed = await a.add_device(plain(1))
    b = engine.registry()  # at A's position now
    heard = Heard(b)
    changed = await a.update_device(first.name, description="lobby")
    added = await a.add_device(plain(2))
    await a.delete(doomed.name)
    # Prune everything B has already read, nothing after it.
    engine.clock.advance(2 * HOUR)
    assert await settle(a._store.prune_feed(3, HOUR)) == 2
    assert engine.horizon(a._store) == b.seq

    assert await settle(b.refresh()) == 3
    assert heard.resyncs == 0
    assert sorted(heard.events, key=repr) == sorted(
        [(first, changed), (None, added), (doomed, None)], key=repr
    )
    assert b.devices() == a.devices()
    assert await settle(b.refresh()) == 0  # nothing twice


# -- resynchronising ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_follower_behind_the_horizon_resynchronises_from_a_snapshot(
    engine: Engine, tmp_path: Path
) -> None:
    a = engine.registry()
    to_change = await a.add_device(plain(1))
    to_delete = await a.add_device(plain(2))
    to_redeem = await a.add_device(DeviceSpec(model="8841"))  # BAT, awaiting activation
    code = a.outstanding_code(to_redeem)
    assert code is not None
    a_accounts = AccountStore(a._store, engine.clock.seconds, reactor)
    await a_accounts.put_user(User("gone", created_at=NOW, updated_at=NOW))

    b = engine.registry()
    b_accounts = AccountStore(b._store, engine.clock.seconds, reactor)
    b_accounts.follow(b)
    heard = Heard(b)
    assert b.devices() == a.devices() and set(b_accounts.users) == {"gone"}
    files = ProvisioningTree(
        b, ProvisioningSettings(address="192.0.2.10"), DirectorySource(str(tmp_path))
    )
    assert served(files, to_delete) is not None

    # While B is not looking: one added, one changed, one deleted, a code redeemed, a
    # model default changed, a user added and one deleted; then the feed is pruned.
    added = await a.add_device(plain(3))
    changed = await a.update_device(to_change.name, description="changed")
    await a.delete(to_delete.name)
    redeemed = await a.redeem(
        mac="0011223344AA", model="8841", code=code.code, mic_sha256="ab" * 32
    )
    assert redeemed.ok and redeemed.device is not None
    await a.set_default("8841", Onboarding.AUTOREGISTRATION)
    await a_accounts.put_user(User("new", created_at=NOW, updated_at=NOW))
    await a_accounts.delete_user("gone")
    engine.clock.advance(2 * HOUR)
    assert await settle(a._store.prune_feed(1, HOUR)) > 0
    assert engine.horizon(a._store) > b.seq

    assert served(files, added) is None  # B does not know it yet
    with structlog.testing.capture_logs() as logs:
        await settle(b.refresh())
    (line,) = [e for e in logs if e["event"].startswith("change feed")]
    assert line["event"] == (
        "change feed: fell behind the kept rows; resynchronised from a snapshot"
    )
    assert (
        line["devices_changed"],
        line["devices_deleted"],
        line["codes_changed"],
        line["defaults_changed"],
    ) == (3, 1, 1, 1)
    assert code.code not in repr(logs)

    # B's view is A's: every kind of change is right.
    assert b.devices() == a.devices()
    assert b.get(added.name) == added
    assert b.get(to_change.name) == changed
    assert b.find(to_delete.name) is None
    active = b.get("SEP0011223344AA")
    assert active == redeemed.device and active.state is DeviceState.ACTIVE
    held = b.current_code(active)
    assert held is not None and held.state is CodeState.USED
    assert b.outstanding_codes() == []
    assert b.onboarding("8841") is Onboarding.AUTOREGISTRATION
    # The files follow: the deleted device's is no longer served, the new one's is.
    assert served(files, to_delete) is None
    assert served(files, added) is not None
    assert b.seq == engine.feed(a._store)[-1][0]  # the snapshot's position
    # Its listeners heard each difference (the file service drops the deleted SEP file and
    # renders the new one), and the accounts re-read everything.
    assert sorted(heard.events, key=repr) == sorted(
        [
            (None, added),
            (to_change, changed),
            (to_redeem, redeemed.device),
            (to_delete, None),
        ],
        key=repr,
    )
    assert heard.resyncs == 1
    for _ in range(200):  # the accounts' re-read is on the store thread
        if set(b_accounts.users) == {"new"}:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert set(b_accounts.users) == {"new"}

    # And the feed goes on from the snapshot's position: the next change once, normally.
    heard.events.clear()
    later = await a.update_device(added.name, description="later")
    assert await settle(b.refresh()) == 1
    assert heard.events == [(added, later)] and heard.resyncs == 1


@pytest_twisted.ensureDeferred
async def test_two_writers_pruning_while_the_other_is_behind_lose_and_repeat_nothing(
    engine: Engine,
) -> None:
    """A and B both write and both prune hard; each follows the other now and then. Every
    version a listener hears is newer than the last it heard (nothing twice) and in the end
    both views are what the database holds (nothing lost)."""
    hard = RegistrySettings(feed_keep_rows=2, feed_keep_seconds=60.0)
    a, b = engine.registry(hard), engine.registry(hard)
    seen: dict[str, dict[str, int]] = {"a": {}, "b": {}}
    repeated: list[str] = []  # (a listener's exception would only be logged)

    def watch(name: str, registry: Registry) -> None:
        def heard(old: Device | None, new: Device | None) -> None:
            if new is not None:
                if new.version <= seen[name].get(new.id, 0):
                    repeated.append(f"{name} heard {new.name} version {new.version} again")
                seen[name][new.id] = new.version

        registry.subscribe(heard)

    watch("a", a)
    watch("b", b)
    resyncs = {"a": 0, "b": 0}
    a.on_resync(lambda: resyncs.__setitem__("a", resyncs["a"] + 1))
    b.on_resync(lambda: resyncs.__setitem__("b", resyncs["b"] + 1))

    own: dict[str, list[str]] = {"a": [], "b": []}  # each writes its own devices
    for step in range(30):
        key = "b" if step % 3 == 0 else "a"
        writer, other = (a, b) if key == "a" else (b, a)
        mine = own[key]
        if step % 4 == 0 or not mine:
            mine.append((await writer.add_device(plain(100 + step))).name)
        else:
            await writer.update_device(mine[step % len(mine)], description=f"step {step}")
        engine.clock.advance(120.0)
        await settle(writer.prune_feed())
        if step % 7 == 6:
            await settle(other.refresh())
    await settle(a.refresh())
    await settle(b.refresh())
    # One writer changes the other's device, the feed is pruned again, and it follows.
    changed = await b.update_device(own["a"][0], description="by b")
    engine.clock.advance(120.0)
    await settle(a.add_device(plain(999)))
    await settle(b.prune_feed())
    await settle(a.refresh())
    assert a.get(own["a"][0]) == changed
    await settle(b.refresh())

    fresh = engine.registry()
    assert repeated == []
    assert a.devices() == b.devices() == fresh.devices()
    for name in ("a", "b"):  # every device's latest version was heard by both
        assert seen[name] == {d.id: d.version for d in fresh.devices()}
    assert len(fresh) == len(own["a"]) + len(own["b"]) + 1
    assert resyncs["a"] > 0 and resyncs["b"] > 0  # the hard pruning did leave them behind
    assert a.seq == b.seq == fresh.seq
