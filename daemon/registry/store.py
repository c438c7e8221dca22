"""Durable storage behind the registry.

The registry keeps everything in memory for reads and hands each change to a :class:`Store`
as one transaction of puts and deletes. The store interface is small so that a PostgreSQL
store can be added without touching callers. The SQLite store runs in WAL mode with
``synchronous=FULL``: a transaction has reached the disk when :meth:`Store.apply` returns,
so a security change (code issued or used, a rename) is durable before it is acknowledged.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .model import ActivationCode, CodeState, Device, DeviceState, Line, Onboarding

SCHEMA_VERSION = 3


@dataclass(frozen=True)
class Snapshot:
    devices: list[Device] = field(default_factory=list)
    codes: list[ActivationCode] = field(default_factory=list)
    defaults: dict[str, Onboarding] = field(default_factory=dict)


@dataclass(frozen=True)
class PutDevice:
    device: Device


@dataclass(frozen=True)
class DeleteDevice:
    device_id: str


@dataclass(frozen=True)
class PutCode:
    code: ActivationCode


@dataclass(frozen=True)
class PutDefault:
    model: str
    onboarding: Onboarding


Change = PutDevice | DeleteDevice | PutCode | PutDefault


class Store(Protocol):
    def load(self) -> Snapshot: ...

    def apply(self, changes: Sequence[Change]) -> None:
        """Write all changes in one durable transaction, or none of them (raising)."""
        ...

    def close(self) -> None: ...


def _run_script(db: sqlite3.Connection, script: str) -> None:
    """Run statements one by one: ``executescript`` would commit the open transaction."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


# Forward migrations: index i takes a database from version i to i + 1.
def _v0_to_v1(db: sqlite3.Connection) -> None:
    _run_script(
        db,
        """
        CREATE TABLE devices (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            model TEXT NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            owner_user TEXT NOT NULL DEFAULT '',
            lines TEXT NOT NULL DEFAULT '[]',
            requires_activation INTEGER NOT NULL,
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            version INTEGER NOT NULL
        );
        CREATE TABLE codes (
            id TEXT PRIMARY KEY,
            device_id TEXT NOT NULL,
            code TEXT NOT NULL,
            issued_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            state TEXT NOT NULL,
            used_at REAL
        );
        CREATE INDEX codes_by_device ON codes(device_id);
        CREATE TABLE model_defaults (model TEXT PRIMARY KEY, onboarding TEXT NOT NULL);
        """,
    )


def _v1_to_v2(db: sqlite3.Connection) -> None:
    """Version 2 records when and with which MIC a device was activated."""
    _run_script(
        db,
        """
        ALTER TABLE devices ADD COLUMN activated_at REAL;
        ALTER TABLE devices ADD COLUMN mic_sha256 TEXT;
        """,
    )


def _v2_to_v3_accounts(db: sqlite3.Connection) -> None:
    """Version 3 adds web users (Argon2id hashes only) and API tokens (SHA-256 only).

    Read and written by :mod:`callboard.daemon.registry.accounts`, not by this store.
    """
    _run_script(
        db,
        """
        CREATE TABLE users (
            name TEXT PRIMARY KEY,
            display_name TEXT NOT NULL DEFAULT '',
            email TEXT NOT NULL DEFAULT '',
            is_admin INTEGER NOT NULL DEFAULT 0,
            password_hash TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE TABLE api_tokens (
            name TEXT PRIMARY KEY,
            token_sha256 TEXT NOT NULL UNIQUE,
            read_only INTEGER NOT NULL DEFAULT 0,
            user_name TEXT NOT NULL DEFAULT '',
            created_by TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL
        );
        """,
    )


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _v0_to_v1,
    _v1_to_v2,
    _v2_to_v3_accounts,
]
assert len(MIGRATIONS) == SCHEMA_VERSION


class StoreError(Exception):
    """The database cannot be opened or is newer than this program."""


class ConditionFailed(Exception):
    """A conditional write found the stored rows other than expected; nothing was written.

    The message says why in words safe for an admin or a log (never a code).
    """


class SQLiteStore:
    """The embedded default store: one SQLite file in the state directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            # Create it owner-only before SQLite does, so it is never world-readable.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(path, 0o600)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    @property
    def schema_version(self) -> int:
        row = self._db.execute("PRAGMA user_version").fetchone()
        return int(row[0])

    def _migrate(self) -> None:
        current = self.schema_version
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {current} is newer than this Callboard "
                f"understands ({SCHEMA_VERSION})"
            )
        for version in range(current, SCHEMA_VERSION):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                MIGRATIONS[version](self._db)
                self._db.execute(f"PRAGMA user_version = {version + 1}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def load(self) -> Snapshot:
        db = self._db
        devices = [
            Device(
                id=r[0],
                name=r[1],
                model=r[2],
                description=r[3],
                owner_user=r[4],
                lines=tuple(Line(**entry) for entry in json.loads(r[5])),
                requires_activation=bool(r[6]),
                state=DeviceState(r[7]),
                created_at=r[8],
                updated_at=r[9],
                version=r[10],
                activated_at=r[11],
                mic_sha256=r[12],
            )
            for r in db.execute(
                "SELECT id, name, model, description, owner_user, lines, requires_activation,"
                " state, created_at, updated_at, version, activated_at, mic_sha256 FROM devices"
            )
        ]
        codes = [
            ActivationCode(
                id=r[0],
                device_id=r[1],
                code=r[2],
                issued_at=r[3],
                expires_at=r[4],
                state=CodeState(r[5]),
                used_at=r[6],
            )
            for r in db.execute(
                "SELECT id, device_id, code, issued_at, expires_at, state, used_at FROM codes"
            )
        ]
        defaults = {
            r[0]: Onboarding(r[1])
            for r in db.execute("SELECT model, onboarding FROM model_defaults")
        }
        return Snapshot(devices, codes, defaults)

    def apply(self, changes: Sequence[Change]) -> None:
        if not changes:
            return
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            device_rows = []
            for change in changes:
                if isinstance(change, PutDevice):
                    device_rows.append(_device_row(change.device))
                    continue
                if device_rows:
                    _put_devices(db, device_rows)
                    device_rows = []
                if isinstance(change, DeleteDevice):
                    db.execute("DELETE FROM codes WHERE device_id = ?", (change.device_id,))
                    db.execute("DELETE FROM devices WHERE id = ?", (change.device_id,))
                elif isinstance(change, PutCode):
                    c = change.code
                    db.execute(
                        "INSERT OR REPLACE INTO codes"
                        " (id, device_id, code, issued_at, expires_at, state, used_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            c.id,
                            c.device_id,
                            c.code,
                            c.issued_at,
                            c.expires_at,
                            c.state.value,
                            c.used_at,
                        ),
                    )
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO model_defaults (model, onboarding) VALUES (?, ?)",
                        (change.model, change.onboarding.value),
                    )
            if device_rows:
                _put_devices(db, device_rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()


DeviceRow = tuple[object, ...]


def _device_row(d: Device) -> DeviceRow:
    lines = json.dumps(
        [
            {
                "directory_number": ln.directory_number,
                "display_name": ln.display_name,
                "auth_name": ln.auth_name,
                "auth_password": ln.auth_password,
            }
            for ln in d.lines
        ]
    )
    return (
        d.id,
        d.name,
        d.model,
        d.description,
        d.owner_user,
        lines,
        int(d.requires_activation),
        d.state.value,
        d.created_at,
        d.updated_at,
        d.version,
        d.activated_at,
        d.mic_sha256,
    )


def _put_devices(db: sqlite3.Connection, rows: list[DeviceRow]) -> None:
    # A rename keeps the id but changes the unique name: delete-then-insert keeps the
    # unique index consistent inside the transaction.
    db.executemany(
        "INSERT INTO devices (id, name, model, description, owner_user, lines,"
        " requires_activation, state, created_at, updated_at, version, activated_at, mic_sha256)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT(id) DO UPDATE SET name=excluded.name, model=excluded.model,"
        " description=excluded.description, owner_user=excluded.owner_user,"
        " lines=excluded.lines, requires_activation=excluded.requires_activation,"
        " state=excluded.state, updated_at=excluded.updated_at, version=excluded.version,"
        " activated_at=excluded.activated_at, mic_sha256=excluded.mic_sha256",
        rows,
    )
