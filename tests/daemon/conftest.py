"""Fixtures shared by the daemon's in-process tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted
from callboard.daemon.registry.registry import Registry
from callboard.daemon.registry.store import SQLiteStore


@pytest_twisted.async_yield_fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    """A registry over a fresh SQLite store, its clock stopped at one instant."""
    store = SQLiteStore(tmp_path / "db.sqlite3")
    yield Registry(store, lambda: 1_800_000_000.0)
    await store.close()
