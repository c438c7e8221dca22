"""The ``bindings`` table: SIP bindings every process and node on one registry can see.

Bindings are soft state. Each process keeps its own in memory (the registrar answers every
REGISTER from there, never waiting on a database); this table is a copy written behind, so
that ``status`` and ``device show`` on any node list the bindings held anywhere, with the
node that holds them and when they expire. One row per binding a process holds, keyed by
that process (``holder``, a random id per process start): a process only ever writes its own
rows, so nodes never contend for a row and no write needs a condition.

Durability is deliberately relaxed, as for any soft state a phone re-creates on its next
REGISTER: SQLite writes on a connection of its own with ``synchronous=NORMAL`` (WAL: no fsync
per commit, the database never corrupt), PostgreSQL with ``synchronous_commit = off`` (the
commit returns before the WAL is flushed). A crash may lose the last moment of binding
writes; a lost process's rows lapse at their stored expiry (readers skip them, and any
process purges them).

:class:`BindingJournal` runs every statement on a thread of its own, never the reactor.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads

from .engines import parse_registry_url
from .side import SideConnection

_COLUMNS = (
    "holder, node, aor, key, device_name, contact, transport, source, user_agent,"
    " registered_at, expires_at, client_cert_sha256"
)
_SHOWN = (
    "node, aor, key, device_name, contact, transport, source, user_agent,"
    " registered_at, expires_at, client_cert_sha256"
)


#: One binding as :meth:`BindingJournal.replace` writes it: its columns after ``holder``
#: (``node`` to ``client_cert_sha256``, in :data:`_COLUMNS` order). A tuple, not a
#: :class:`StoredBinding`: a flush makes thousands, on the reactor.
Row = tuple[Any, ...]


@dataclass(frozen=True)
class StoredBinding:
    """One binding as the table holds it (and as another node shows it)."""

    node: str
    aor: str
    key: str
    device_name: str
    contact: str
    transport: str
    source: str
    user_agent: str | None
    registered_at: float
    expires_at: float  # rounded up to the writer's expiry bucket: never before the real one
    client_cert_sha256: str | None


class BindingJournal:
    """Reads and writes ``bindings`` rows on a thread of its own (SQLite or PostgreSQL).

    ``connect`` opens a connection (autocommit, relaxed durability); ``mark`` is the engine's
    parameter placeholder and ``begin`` its write-transaction statement.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        mark: str,
        reactor: IReactorFromThreads,
        begin: str = "BEGIN",
    ) -> None:
        self._mark = mark
        self._begin = begin
        self._side = SideConnection(connect, reactor, "callboard-bindings")
        self.transactions = 0  # write transactions committed (tests count the batching)

    def _sql(self, text: str) -> str:
        return text.replace("?", self._mark)

    # -- writes --------------------------------------------------------------------------

    def replace(
        self,
        holder: str,
        aors: Mapping[str, Sequence[Row]],
        purge_before: float,
        unstored: Collection[str] = (),
    ) -> Deferred[None]:
        """Make each AoR's rows of ``holder`` exactly the bindings given (none: removed),
        all in one transaction; and drop anyone's rows that expired before
        ``purge_before`` (a process that died without removing its own). ``unstored``
        names AoRs the holder is known to have no rows of: their rows are only inserted
        (a phone's first registration costs one statement, not two)."""
        if not aors and not purge_before:
            return succeed(None)
        delete = self._sql("DELETE FROM bindings WHERE holder = ? AND aor = ?")
        insert = self._sql(f"INSERT INTO bindings ({_COLUMNS}) VALUES ({', '.join(['?'] * 12)})")
        purge = self._sql("DELETE FROM bindings WHERE expires_at < ?")
        skip = frozenset(unstored)

        def write(db: Any) -> None:
            # The statements' parameters are made here, on the journal's thread.
            gone = [(holder, aor) for aor in aors if aor not in skip]
            rows = [(holder, *row) for bindings in aors.values() for row in bindings]
            cursor = db.cursor()
            if gone:
                cursor.executemany(delete, gone)
            if rows:
                cursor.executemany(insert, rows)
            if purge_before:
                cursor.execute(purge, (purge_before,))

        return self._submit_write(write)

    def forget_holder(self, holder: str) -> Deferred[None]:
        """Remove every row of ``holder`` (its process stops: its bindings go with it)."""
        statement = self._sql("DELETE FROM bindings WHERE holder = ?")
        return self._submit_write(lambda db: db.execute(statement, (holder,)))

    def _submit_write(self, work: Callable[[Any], object]) -> Deferred[None]:
        def write(db: Any) -> None:
            db.execute(self._begin)
            try:
                work(db)
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    db.execute("ROLLBACK")
                raise
            self.transactions += 1

        return self._side.submit(write)

    # -- reads ---------------------------------------------------------------------------

    def of_device(
        self, device_name: str, live_at: float, not_holder: str
    ) -> Deferred[list[StoredBinding]]:
        """A device's live bindings held by other processes (and nodes)."""
        select = self._sql(
            f"SELECT {_SHOWN} FROM bindings WHERE device_name = ? AND expires_at > ?"
            " AND holder <> ? ORDER BY node, aor, key"
        )

        def read(db: Any) -> list[StoredBinding]:
            return [_stored(r) for r in db.execute(select, (device_name, live_at, not_holder))]

        return self._side.submit(read)

    def count_by_node(self, live_at: float) -> Deferred[dict[str, int]]:
        """How many live bindings each node holds (every process of a node summed)."""
        select = self._sql("SELECT node, COUNT(*) FROM bindings WHERE expires_at > ? GROUP BY node")

        def read(db: Any) -> dict[str, int]:
            return {str(r[0]): int(r[1]) for r in db.execute(select, (live_at,))}

        return self._side.submit(read)

    # -- the connection ------------------------------------------------------------------

    def close(self) -> Deferred[None]:
        return self._side.close()


def _stored(r: Sequence[Any]) -> StoredBinding:
    return StoredBinding(
        node=r[0],
        aor=r[1],
        key=r[2],
        device_name=r[3],
        contact=r[4],
        transport=r[5],
        source=r[6],
        user_agent=r[7],
        registered_at=float(r[8]),
        expires_at=float(r[9]),
        client_cert_sha256=r[10],
    )


def open_binding_journal(
    url: str, state_dir: Path, reactor: IReactorFromThreads, *, connect_timeout: int = 2
) -> BindingJournal:
    """The journal on the registry a URL names (the store has created the table already)."""
    where = parse_registry_url(url, state_dir)
    if where.engine == "postgresql":
        import psycopg

        dsn = where.dsn

        def connect_pg() -> Any:
            conn = psycopg.connect(
                dsn,
                autocommit=True,
                connect_timeout=connect_timeout,
                application_name="callboard-bindings",
            )
            conn.execute("SET synchronous_commit TO off")  # soft state: see the module doc
            return conn

        return BindingJournal(connect_pg, "%s", reactor)
    path = where.path
    assert path is not None

    def connect_sqlite() -> Any:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # soft state: see the module doc
        return db

    return BindingJournal(connect_sqlite, "?", reactor, begin="BEGIN IMMEDIATE")
