"""Failed TVS attempts are kept for a retention, then deleted; the shared budget keeps its window.

On a real SQLite file and a real PostgreSQL database, through the journal's own connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted
import structlog
from callboard.daemon.registry.engines import open_store
from callboard.daemon.shared_throttle import DAY, Attempt, ThrottleSync, open_journal
from callboard.protocols.tvs.activation import Throttle
from twisted.internet import reactor, task

NOW = 1_800_000_000.0
WINDOW = 900.0
TIMEOUT = 20.0


class Node:
    def __init__(self, url: str, state_dir: Path, clock: task.Clock, retention: float) -> None:
        self.journal = open_journal(url, state_dir, reactor)
        self.sync = ThrottleSync(self.journal, clock.seconds, window=WINDOW, retention=retention)
        self.devices = self.sync.wrap("dev:", Throttle(budget=3, window=WINDOW))

    async def keys(self) -> list[str]:
        rows = await self.journal._side.submit(
            lambda db: db.execute("SELECT key FROM attempts ORDER BY id").fetchall()
        )
        return [r[0] for r in rows]


class Cluster:
    def __init__(self, url: str, state_dir: Path) -> None:
        self.url = url
        self.state_dir = state_dir
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.nodes: list[Node] = []

    def node(self, retention: float) -> Node:
        node = Node(self.url, self.state_dir, self.clock, retention)
        self.nodes.append(node)
        return node


@pytest_twisted.async_yield_fixture
async def cluster(registry_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    store = open_store(registry_url, tmp_path, reactor)  # creates the schema
    c = Cluster(registry_url, tmp_path)
    yield c
    for node in c.nodes:
        await node.journal.close()
    await store.close()


@pytest_twisted.ensureDeferred
async def test_attempts_older_than_the_retention_are_deleted_younger_kept(
    cluster: Cluster,
) -> None:
    a = cluster.node(retention=30 * DAY)
    origin = a.sync.origin
    await a.journal.record(
        [
            Attempt("dev:YEAR-OLD", NOW - 365 * DAY, origin),
            Attempt("dev:OLD", NOW - 31 * DAY, origin),
            Attempt("dev:MONTH", NOW - 29 * DAY, origin),
            Attempt("src:192.0.2.1", NOW - 60, origin),
        ]
    )
    with structlog.testing.capture_logs() as logs:
        assert await a.sync.prune().addTimeout(TIMEOUT, reactor) == 2
        assert await a.sync.prune().addTimeout(TIMEOUT, reactor) == 0  # nothing more is due
    assert await a.keys() == ["dev:MONTH", "src:192.0.2.1"]
    (line,) = [e for e in logs if e["event"].startswith("failed attempts")]
    assert line["event"] == "failed attempts: pruned old rows" and line["rows"] == 2
    assert line["log_level"] == "info" and line["retention_days"] == 30
    # A day later the month-old row is past the retention too.
    cluster.clock.advance(DAY + 1)
    assert await a.sync.prune() == 1
    assert await a.keys() == ["src:192.0.2.1"]


@pytest_twisted.ensureDeferred
async def test_the_shared_budget_still_counts_its_window_whatever_the_retention(
    cluster: Cluster,
) -> None:
    a = cluster.node(retention=60.0)  # shorter than the window: the window wins
    assert a.sync.retention == WINDOW
    key = "dev:SEP001122334455"
    for at in (NOW - 1000, NOW - 800, NOW - 30, NOW - 10):  # the first is outside
        a.devices.failure(key, at)
    await a.sync.sync()
    assert await a.sync.prune() == 1
    assert await a.keys() == [key] * 3

    # Another node learns the three inside the window (kept): the budget is spent there too.
    b = cluster.node(retention=60.0)
    assert b.devices.locked_for(key, NOW) == 0
    await b.sync.sync()
    assert b.devices.locked_for(key, NOW) > 0
