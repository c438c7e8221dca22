"""Fixtures for the cluster tests: one throwaway PostgreSQL server per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.postgres import PGServer


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PGServer]:
    server = PGServer()
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def pg_dsn(pg_server: PGServer) -> str:
    """A database of the test's own on the session's server (restarted if a test stopped it)."""
    if not pg_server.running():
        pg_server.start()
    return pg_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: Any, tmp_path: Path) -> str:
    """A fresh registry on each engine: an SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/callboard.sqlite3"
    server: PGServer = request.getfixturevalue("pg_server")
    if not server.running():
        server.start()
    return server.new_database()
