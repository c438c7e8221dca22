"""The TVS failure budget shared by every process and node on one registry.

TVS decides on every ACTIVATE at once, from memory (:class:`ThrottleStore` is synchronous
and the reactor never waits for a database), so each process keeps its own
:class:`~callboard.protocols.tvs.activation.Throttle`. What is shared is the evidence:
every failure counted against a key (``dev:NAME``, ``src:ADDRESS``) is written through to the
registry's ``attempts`` table, and each process replays the failures other processes
recorded into its own throttle. The table is also the audit of failed attempts (which key,
when, which node); successful activations are on the device rows themselves.

Consistency: eventual, bounded by the sync interval. A failure is decided and counted
locally at once; it reaches the other nodes within one interval (write-through and read run
every ``interval`` seconds). So N nodes give a guesser one budget plus at most what the
other nodes let through during one interval, not N budgets; once a key is locked on one
node, every node has it locked one interval later. A database outage only delays the
sharing: failures wait in memory (bounded) and are written when it returns.

Retention: rows older than ``[tvs] attempts_retention_days`` (default 30) are deleted
periodically (:meth:`ThrottleSync.prune`, through the journal's own connection), never
sooner than the throttle's window, which the shared budget reads back.
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from callboard.protocols.settings import check_range, config_key
from callboard.protocols.tvs.activation import Throttle
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

from .logs import get_logger
from .registry.engines import parse_registry_url
from .registry.side import SideConnection

log = get_logger("callboard.throttle")

MAX_PENDING = 10_000  # failures kept for a write-through while the database is away
PRUNE_CHUNK = 10_000  # attempts deleted per statement (other writers wait no longer)
PRUNE_ROUNDS = 100  # statements per prune pass at most
DAY = 86400.0


@dataclass(frozen=True)
class AttemptRetention:
    """The shared throttle's part of [tvs]: how long failed attempts are kept (the audit),
    in days; never less than the throttle's window in effect (the budget reads that far)."""

    days: float = field(default=30.0, metadata=config_key("attempts_retention_days"))

    def validate(self) -> None:
        check_range("days", self.days, 1, 3650)


@dataclass(frozen=True)
class Attempt:
    key: str
    at: float
    origin: str


# -- the journal: the attempts table, off the reactor -------------------------------------


class AttemptJournal:
    """Appends and reads ``attempts`` rows on a thread of its own (SQLite or PostgreSQL).

    ``connect`` opens a connection (autocommit); ``mark`` is the engine's placeholder.
    """

    def __init__(self, connect: Callable[[], Any], mark: str, reactor: IReactorFromThreads) -> None:
        self._mark = mark
        self._side = SideConnection(connect, reactor, "callboard-attempts")

    def record(self, attempts: Sequence[Attempt]) -> Deferred[None]:
        rows = [(a.key, a.at, a.origin) for a in attempts]
        if not rows:
            return succeed(None)
        m = self._mark
        insert = f"INSERT INTO attempts (key, at, origin) VALUES ({m}, {m}, {m})"

        def write(db: Any) -> None:
            db.execute("BEGIN")
            try:
                cursor = db.cursor()
                cursor.executemany(insert, rows)
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    db.execute("ROLLBACK")
                raise

        return self._side.submit(write)

    def since(
        self, after: int, not_before: float, origin: str
    ) -> Deferred[tuple[int, list[Attempt]]]:
        """Other origins' attempts after row ``after`` and not older than ``not_before``."""
        m = self._mark
        select = (
            "SELECT id, key, at, origin FROM attempts"
            f" WHERE id > {m} AND at >= {m} AND origin <> {m} ORDER BY id LIMIT 50000"
        )
        last = f"SELECT COALESCE(MAX(id), 0) FROM attempts WHERE id > {m}"

        def read(db: Any) -> tuple[int, list[Attempt]]:
            rows = db.execute(select, (after, not_before, origin)).fetchall()
            position = int(db.execute(last, (after,)).fetchone()[0])
            if rows and len(rows) == 50000:
                position = int(rows[-1][0])
            return position, [Attempt(r[1], float(r[2]), r[3]) for r in rows]

        return self._side.submit(read)

    def prune(self, older_than: float) -> Deferred[int]:
        """Delete attempts from before ``older_than``, a bounded chunk per statement (each
        its own autocommit transaction); fires with how many went."""
        m = self._mark
        delete = (
            "DELETE FROM attempts WHERE id IN"
            f" (SELECT id FROM attempts WHERE at < {m} ORDER BY id LIMIT {m})"
        )

        def prune(db: Any) -> int:
            total = 0
            for _ in range(PRUNE_ROUNDS):
                deleted = int(db.execute(delete, (older_than, PRUNE_CHUNK)).rowcount)
                total += deleted
                if deleted < PRUNE_CHUNK:
                    break
            return total

        return self._side.submit(prune)

    def close(self) -> Deferred[None]:
        return self._side.close()


def open_journal(url: str, state_dir: Path, reactor: IReactorFromThreads) -> AttemptJournal:
    """The journal on the registry a URL names (the store has created the table already)."""
    where = parse_registry_url(url, state_dir)
    if where.engine == "postgresql":
        import psycopg

        dsn = where.dsn

        def connect_pg() -> Any:
            return psycopg.connect(
                dsn, autocommit=True, connect_timeout=5, application_name="callboard"
            )

        return AttemptJournal(connect_pg, "%s", reactor)
    path = where.path
    assert path is not None

    def connect_sqlite() -> Any:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    return AttemptJournal(connect_sqlite, "?", reactor)


# -- the throttle TVS uses -----------------------------------------------------------------


class SharedThrottle:
    """A :class:`ThrottleStore`: decides from the local throttle, shares its failures."""

    def __init__(self, local: Throttle, sync: ThrottleSync) -> None:
        self.local = local
        self._sync = sync

    def locked_for(self, key: str, now: float) -> float:
        return self.local.locked_for(key, now)

    def failure(self, key: str, now: float) -> None:
        self.local.failure(key, now)
        self._sync.pending.append(Attempt(key, now, self._sync.origin))


class ThrottleSync:
    """Writes this process's failures through and replays other processes' failures.

    Throttles are told apart by key prefix: ``src:`` keys go to the source throttle, the
    rest to the device throttle (the keys TVS uses).
    """

    def __init__(
        self,
        journal: AttemptJournal,
        now: Callable[[], float],
        window: float,
        origin: str | None = None,
        *,
        retention: float = AttemptRetention().days * DAY,
    ) -> None:
        self.journal = journal
        self.origin = origin or uuid.uuid4().hex[:12]
        self.now = now
        self.window = window
        self.retention = max(retention, window)  # the budget reads a window back
        self.pending: list[Attempt] = []
        self.throttles: dict[str, SharedThrottle] = {}
        self._position: int | None = None
        self._busy = False

    def wrap(self, prefix: str, local: Throttle) -> SharedThrottle:
        shared = SharedThrottle(local, self)
        self.throttles[prefix] = shared
        return shared

    def sync(self) -> Deferred[None]:
        """One write-through and one read; a failure is logged and retried next time."""
        if self._busy:
            return succeed(None)
        self._busy = True
        batch, self.pending = self.pending, []

        def written(_: object) -> Deferred[tuple[int, list[Attempt]]]:
            return self.journal.since(self._position or 0, self.now() - self.window, self.origin)

        def unwritten(failure: Failure) -> Failure:
            self.pending[:0] = batch  # keep them (bounded) for the next try
            del self.pending[: max(0, len(self.pending) - MAX_PENDING)]
            return failure

        d = self.journal.record(batch).addErrback(unwritten).addCallback(written)
        d.addCallback(self._replay)

        def done(result: object) -> None:
            self._busy = False
            if isinstance(result, Failure):
                log.warning("shared throttle sync failed", error=str(result.value))

        return d.addBoth(done)

    def _replay(self, found: tuple[int, list[Attempt]]) -> None:
        position, attempts = found
        self._position = position
        for attempt in attempts:
            prefix = "src:" if attempt.key.startswith("src:") else "dev:"
            throttle = self.throttles.get(prefix)
            if throttle is not None:
                throttle.local.failure(attempt.key, attempt.at)

    def service(self, interval: float, reactor: Any) -> TimerService:
        timer = TimerService(interval, self.sync)
        timer.clock = reactor
        return timer

    def prune(self) -> Deferred[int]:
        """Delete the attempts older than the retention; a failure is logged and the next
        pass tries again. Fires with how many rows went."""
        # Never within a window a throttle reads back (the window in effect, after a reload).
        windows = [t.local.window for t in self.throttles.values()]
        older_than = self.now() - max([self.retention, self.window, *windows])

        def pruned(deleted: int) -> int:
            if deleted:
                log.info(
                    "failed attempts: pruned old rows",
                    rows=deleted,
                    retention_days=round(self.retention / DAY, 3),
                )
            return deleted

        def failed(failure: Failure) -> int:
            log.warning("failed attempts prune failed", error=str(failure.value))
            return 0

        return self.journal.prune(older_than).addCallbacks(pruned, failed)

    def prune_service(self, interval: float, reactor: Any) -> TimerService:
        timer = TimerService(interval, self.prune)
        timer.clock = reactor
        return timer


def share_tvs_throttles(
    handler: Any,
    journal: AttemptJournal,
    now: Callable[[], float],
    window: float,
    *,
    retention: float = AttemptRetention().days * DAY,
) -> ThrottleSync:
    """Replace a TVS handler's in-memory throttles by shared ones (same budgets)."""
    sync = ThrottleSync(journal, now, window, retention=retention)
    if isinstance(handler.throttle, Throttle):
        handler.throttle = sync.wrap("dev:", handler.throttle)
    if isinstance(handler.source_throttle, Throttle):
        handler.source_throttle = sync.wrap("src:", handler.source_throttle)
    return sync
