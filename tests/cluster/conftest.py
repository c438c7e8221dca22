"""Fixtures for the cluster tests: one throwaway PostgreSQL server per session."""

from __future__ import annotations

from collections.abc import Iterator

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
