"""One TVS failure budget for every node on a registry, on both engines."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from callboard.daemon.registry.engines import open_store
from callboard.daemon.shared_throttle import ThrottleSync, open_journal
from callboard.protocols.tvs.activation import Throttle
from twisted.internet import reactor

NOW = 1_800_000_000.0


class Node:
    def __init__(self, url: str, state_dir: Path) -> None:
        self.journal = open_journal(url, state_dir, reactor)
        self.sync = ThrottleSync(self.journal, lambda: NOW, window=900.0)
        self.devices = self.sync.wrap("dev:", Throttle(budget=3, window=900.0))
        self.sources = self.sync.wrap("src:", Throttle(budget=10, window=900.0))


@pytest_twisted.async_yield_fixture
async def nodes(registry_url: str, tmp_path: Path) -> AsyncIterator[tuple[Node, Node]]:
    store = open_store(registry_url, tmp_path, reactor)  # creates the schema
    a, b = Node(registry_url, tmp_path), Node(registry_url, tmp_path)
    yield a, b
    for node in (a, b):
        await node.journal.close()
    await store.close()


@pytest_twisted.ensureDeferred
async def test_two_nodes_share_one_failure_budget(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    key = "dev:SEP001122334455"
    a.devices.failure(key, NOW)
    a.devices.failure(key, NOW + 1)
    assert a.devices.locked_for(key, NOW + 2) == 0  # two of three
    await a.sync.sync()
    await b.sync.sync()  # B learns of A's two failures
    assert b.devices.locked_for(key, NOW + 2) == 0
    b.devices.failure(key, NOW + 2)  # the third, on the other node
    assert b.devices.locked_for(key, NOW + 3) > 0
    await b.sync.sync()
    await a.sync.sync()
    assert a.devices.locked_for(key, NOW + 3) > 0  # locked everywhere: one budget, not two
    # Source keys go to the source throttles only.
    a.sources.failure("src:192.0.2.1", NOW)
    await a.sync.sync()
    await b.sync.sync()
    assert "src:192.0.2.1" in b.sources.local._entries
    assert "src:192.0.2.1" not in b.devices.local._entries


@pytest_twisted.ensureDeferred
async def test_failures_wait_in_memory_while_the_journal_fails(
    nodes: tuple[Node, Node], tmp_path: Path
) -> None:
    a, b = nodes
    a.journal._side._connect = _refuse
    a.devices.failure("dev:X", NOW)
    await a.sync.sync()  # logged, not raised
    assert [x.key for x in a.sync.pending] == ["dev:X"]
    a.journal._side._connect = b.journal._side._connect
    await a.sync.sync()
    assert a.sync.pending == []
    await b.sync.sync()
    assert "dev:X" in b.devices.local._entries


def _refuse() -> Any:
    raise OSError("database away")
