"""Bad ``--registry`` input to ``callboard serve`` and ``callboard db migrate``: each a one-line
error on stderr and a non-zero exit, never a traceback, a hang or a password echoed.

Complements ``test_two_nodes.py`` (malformed URLs and a refused port for both commands, a newer
PostgreSQL schema for ``db migrate``) with: a newer schema for ``serve`` on both engines and
for ``db migrate`` on SQLite, an unresolvable host, bad connection parameters, and a path that
is not a database.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import psycopg
from callboard.daemon.registry.store import SCHEMA_VERSION
from support.harness import run_cli

SECRET = "s3cret-pw"


def serve(state: Path, url: str) -> Any:
    return run_cli(
        "serve", "--state-dir", str(state), "--listen-address", "127.0.0.1",
        "--tftp-port", "0", "--http-port", "0", "--tvs-port", "0", "--sip-port", "0",
        "--sip-tls-port", "0", "--registry", url, timeout=60,
    )  # fmt: skip


def assert_one_line(result: Any, *expected: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and SECRET not in result.stderr + result.stdout
    for text in expected:
        assert text in lines[0], lines[0]


def test_a_newer_schema_is_refused_by_serve_and_migrate_on_both_engines(
    pg_dsn: str, tmp_path: Path
) -> None:
    lite = tmp_path / "newer.sqlite3"
    run_cli("db", "migrate", "--registry", f"sqlite://{lite}", check=True)
    db = sqlite3.connect(lite)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    run_cli("db", "migrate", "--registry", pg_dsn, check=True)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE callboard_schema SET version = %s", (SCHEMA_VERSION + 1,))
    for url in (f"sqlite://{lite}", pg_dsn):
        newer = f"schema version {SCHEMA_VERSION + 1} is newer than this Callboard"
        assert_one_line(serve(tmp_path / "state", url), "callboard serve: cannot start:", newer)
        assert_one_line(run_cli("db", "migrate", "--registry", url), "callboard db migrate:", newer)
    # Nothing was changed by the refusals.
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT version FROM callboard_schema").fetchone() == (
            SCHEMA_VERSION + 1,
        )
    db = sqlite3.connect(lite)
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION + 1,)
    db.close()


def test_unreachable_and_unusable_registries_are_one_line_errors(
    tmp_path: Path, pg_server: Any
) -> None:
    not_a_database = tmp_path / "a-directory"
    not_a_database.mkdir()
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not an SQLite file" * 100)
    cases = [
        (f"postgresql://cb:{SECRET}@no-such-host.invalid/x", "no-such-host.invalid"),
        (f"postgresql://cb:{SECRET}@127.0.0.1:{pg_server.port + 1}/x", "refused"),
        (f"postgresql://cb:{SECRET}@127.0.0.1:{pg_server.port}/x?sslmode=bogus", "sslmode"),
        (f"sqlite://{not_a_database}", str(not_a_database)),
        (f"sqlite://{garbage}", str(garbage)),
    ]
    for url, expected in cases:
        assert_one_line(serve(tmp_path / "state", url), "callboard serve: cannot start:", expected)
        assert_one_line(run_cli("db", "migrate", "--registry", url), "callboard db migrate:")
