"""Which store a registry URL names, and ``callboard db migrate``.

``sqlite:///path/to/file`` (the default: ``<state-dir>/callboard.sqlite3``) or
``postgresql://user@host/db`` (``postgres://`` too, and any libpq URI parameters). A URL that
cannot name a store is refused when the configuration is read; an unreachable database when
the store opens. Both are one line.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from callboard.protocols.settings import SettingError

from .store import SCHEMA_VERSION, Store, StoreError

SQLITE_PREFIX = "sqlite://"
PG_SCHEMES = ("postgresql://", "postgres://")
DATABASE_NAME = "callboard.sqlite3"


@dataclass(frozen=True)
class StoreSettings:
    """The ``url`` key of [registry]: where the registry's rows live ("" the default);
    ``node_name``: this node's name beside the SIP bindings it holds ("" the host name)."""

    url: str = ""
    node_name: str = ""

    def validate(self) -> None:
        if self.url:
            try:
                parse_registry_url(self.url, Path("."))
            except StoreError as exc:
                raise SettingError("url", str(exc)) from None
        if len(self.node_name) > 64 or not self.node_name.isprintable():
            raise SettingError("node_name", "at most 64 printable characters")


@dataclass(frozen=True)
class Location:
    engine: str  # "sqlite" or "postgresql"
    path: Path | None = None
    dsn: str = ""


def parse_registry_url(url: str, state_dir: Path) -> Location:
    """The store a URL names; ``""`` is the SQLite file in the state directory."""
    if not url:
        return Location("sqlite", path=state_dir / DATABASE_NAME)
    if url.startswith(SQLITE_PREFIX):
        rest = url[len(SQLITE_PREFIX) :]
        if not rest.startswith("/") or rest == "/" or "?" in rest or "#" in rest:
            raise StoreError(f"{url!r}: expected sqlite:///absolute/path/to/file")
        return Location("sqlite", path=Path(rest))
    if url.startswith(PG_SCHEMES):
        try:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict
        except ImportError:
            raise StoreError(
                "postgresql:// needs psycopg: pip install 'callboard[postgresql]'"
            ) from None

        try:
            conninfo_to_dict(url)
        except psycopg.ProgrammingError:
            raise StoreError("malformed postgresql:// URL") from None  # it may hold a password
        return Location("postgresql", dsn=url)
    scheme = url.split(":", 1)[0] if ":" in url else url
    raise StoreError(f"registry URL scheme {scheme[:20]!r} is not sqlite:/// or postgresql://")


def open_store(url: str, state_dir: Path, reactor: Any) -> Store:
    """Open (and migrate) the store a URL names; :class:`StoreError` in one line if not."""
    where = parse_registry_url(url, state_dir)
    if where.engine == "postgresql":
        from .pgstore import PostgreSQLStore

        return PostgreSQLStore(where.dsn, reactor)
    from .store import SQLiteStore

    assert where.path is not None
    try:
        return SQLiteStore(where.path, reactor)
    except OSError as exc:
        raise StoreError(f"{where.path}: {exc.strerror or exc}") from None
    except sqlite3.Error as exc:  # not a database, a directory, unreadable
        raise StoreError(f"{where.path}: {exc}") from None


def wake_on_notify(store: Store | None, follow: Callable[[], object]) -> None:
    """Have a store that hears other writers (PostgreSQL's NOTIFY) call ``follow`` then."""
    if store is not None and hasattr(store, "on_change"):
        store.on_change = follow


# -- callboard db migrate ----------------------------------------------------------------------


def migrate_url(url: str, state_dir: Path) -> tuple[int, int]:
    """Run the migrations on the store a URL names: (version found, version now)."""
    where = parse_registry_url(url, state_dir)
    if where.engine == "postgresql":
        import psycopg

        from .pgstore import describe_dsn, migrate, one_line

        try:
            with psycopg.connect(where.dsn, autocommit=True, connect_timeout=5) as conn:
                found = migrate(conn, describe_dsn(where.dsn))
        except psycopg.Error as exc:
            raise StoreError(f"{describe_dsn(where.dsn)}: {one_line(exc)}") from None
        return found, SCHEMA_VERSION

    from .store import _migrate, _user_version

    assert where.path is not None
    if not where.path.parent.is_dir():
        raise StoreError(f"{where.path.parent}: no such directory")
    try:
        db = sqlite3.connect(where.path, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"{where.path}: {exc}") from None
    try:
        found = _user_version(db)
        _migrate(db, where.path)
        return found, _user_version(db)
    except sqlite3.Error as exc:
        raise StoreError(f"{where.path}: {exc}") from None
    finally:
        db.close()


def _cmd_migrate(args: argparse.Namespace) -> int:
    state_dir = Path(args.db_state_dir or args.state_dir or "/var/lib/callboard")
    try:
        found, now = migrate_url(args.registry or "", state_dir)
    except StoreError as exc:
        print(f"callboard db migrate: {exc}", file=sys.stderr)
        return 1
    if found == now:
        print(f"schema version {now}: up to date")
    else:
        print(f"schema migrated from version {found} to {now}")
    return 0


def register_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = sub.add_parser("db", help="the registry database", description="Registry database.")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    migrate = db_sub.add_parser(
        "migrate",
        help="create or upgrade the registry schema",
        description="Create or upgrade the registry schema (the daemon also does it at start).",
    )
    migrate.add_argument(
        "--registry",
        metavar="URL",
        help="sqlite:///path or postgresql://user@host/db (default: <state-dir>/callboard.sqlite3)",
    )
    migrate.add_argument(
        "--state-dir", dest="db_state_dir", metavar="DIR", help="where the default SQLite file is"
    )
    migrate.set_defaults(func=_cmd_migrate)
