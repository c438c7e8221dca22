"""Durable storage behind the registry: asynchronous, conditional, with a change feed.

The registry keeps everything in memory for reads and hands each change to a :class:`Store`
as one transaction of puts and deletes. The interface is small so that a PostgreSQL store can
be added without touching callers:

- :meth:`Store.apply` returns a Deferred that fires once the transaction is durable. A change
  may carry a condition on the row as it was read (a device's version, a code's state, digits
  and expiry); when one fails nothing is written and the Deferred fails with
  :class:`ConditionFailed`. PostgreSQL would run the same as ``UPDATE … WHERE … RETURNING``.
- :meth:`Store.changes_since` is the change feed: what *other* writers (processes, nodes)
  committed after a position, re-read as the rows stand now. SQLite keeps a ``changes`` table
  written in the same transaction; PostgreSQL would use ``LISTEN/NOTIFY`` to wake the reader.
- The feed is bounded (:meth:`Store.prune_feed`): rows are kept while they are among the
  newest ``keep_rows`` *or* younger than ``keep_seconds``, and only the oldest run of rows is
  ever deleted, so what is kept is always every row after one position, ``feed_horizon``.
  A follower whose position is older than that horizon gets a :class:`FeedBatch` with
  ``behind_horizon`` set (never a batch with rows silently missing) and re-reads everything
  (:meth:`Store.snapshot`).

:class:`SQLiteStore` runs every statement on one store thread (never the reactor) in WAL mode
with ``synchronous=FULL``, so a commit has reached the disk when its Deferred fires. Feed reads
share that thread: the reactor receives commits and feed batches in database order, which keeps
the registry's view monotonic without per-row bookkeeping.
"""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

from .model import ActivationCode, CodeState, Device, DeviceState, Line, Onboarding

SCHEMA_VERSION = 9

T = TypeVar("T")

PRUNE_CHUNK = 20_000  # feed rows deleted per prune transaction (writes wait no longer)

# -- what is stored, and what changes --------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    devices: list[Device] = field(default_factory=list)
    codes: list[ActivationCode] = field(default_factory=list)
    defaults: dict[str, Onboarding] = field(default_factory=dict)
    seq: int = 0  # the change-feed position this snapshot reflects


ABSENT = 0
"""``expect_version`` for a device that must not exist yet (versions start at 1)."""


@dataclass(frozen=True)
class PutDevice:
    """Insert or update a device row.

    ``expect_version``: None writes whatever is stored; :data:`ABSENT` inserts a new row
    (refused if its id or name exists); a number updates only the row still at that version
    (every change bumps it, so the version stands for name, state and everything else).
    """

    device: Device
    expect_version: int | None = None


@dataclass(frozen=True)
class DeleteDevice:
    """Delete a device and its codes (only the row still at ``expect_version``, if given)."""

    device_id: str
    expect_version: int | None = None


@dataclass(frozen=True)
class CodeExpectation:
    """What a code row must hold for a :class:`PutCode` to apply (a compare-and-set).

    A redemption expects ``state`` issued, the digits the phone sent, and ``expires_at``
    later than ``live_at`` (the time of the attempt); voiding a code expects it issued.
    """

    state: CodeState = CodeState.ISSUED
    digits: str | None = field(default=None, repr=False)
    live_at: float | None = None


@dataclass(frozen=True)
class PutCode:
    """Insert a code (``expect`` None) or update the row only if it meets ``expect``."""

    code: ActivationCode
    expect: CodeExpectation | None = None


@dataclass(frozen=True)
class PutDefault:
    model: str
    onboarding: Onboarding


Change = PutDevice | DeleteDevice | PutCode | PutDefault


@dataclass(frozen=True)
class Committed:
    """A durable transaction: its changes, exactly as written, and its feed positions."""

    changes: tuple[Change, ...]
    first_seq: int
    seq: int


@dataclass(frozen=True)
class FeedBatch:
    """Other writers' changes after a feed position, as the rows stand at ``seq``."""

    seq: int  # ask from here next time
    devices: list[Device] = field(default_factory=list)
    deleted_devices: list[str] = field(default_factory=list)
    codes: list[ActivationCode] = field(default_factory=list)
    defaults: dict[str, Onboarding] = field(default_factory=dict)
    # Keys of kinds the registry does not model (``user``, ``token``: the web's accounts),
    # by kind, for whoever keeps those rows to re-read.
    others: dict[str, list[str]] = field(default_factory=dict)
    # The position asked from is older than the feed's kept rows (they were pruned): nothing
    # else is in this batch, and the follower must resynchronise from :meth:`Store.snapshot`.
    behind_horizon: bool = False

    def __bool__(self) -> bool:
        return bool(
            self.devices
            or self.deleted_devices
            or self.codes
            or self.defaults
            or self.others
            or self.behind_horizon
        )


class ConditionFailed(Exception):
    """A conditional write found the stored rows other than expected; nothing was written.

    The message says why in words safe for an admin or a log (never a code).
    """


class StoreError(Exception):
    """The database cannot be opened or is newer than this program."""


class Store(Protocol):
    def load(self) -> Snapshot:
        """Everything, at start-up (it blocks: call it before serving)."""
        ...

    def snapshot(self) -> Deferred[Snapshot]:
        """Everything, as :meth:`load`, but read on the store thread (a follower that fell
        behind the feed's kept rows resynchronises from it while serving)."""
        ...

    def apply(self, changes: Sequence[Change]) -> Deferred[Committed]:
        """Write all changes in one durable transaction, or none of them (the Deferred fails;
        with :class:`ConditionFailed` when a change's condition does not hold)."""
        ...

    def changes_since(self, seq: int) -> Deferred[FeedBatch]:
        """Rows other writers changed after ``seq`` (this store's own commits left out);
        a batch with ``behind_horizon`` set if rows after ``seq`` were pruned already."""
        ...

    def prune_feed(
        self, keep_rows: int, keep_seconds: float, limit: int = PRUNE_CHUNK
    ) -> Deferred[int]:
        """Delete at most ``limit`` of the oldest feed rows that are neither among the newest
        ``keep_rows`` nor younger than ``keep_seconds``; fires with how many went."""
        ...

    def close(self) -> Deferred[None]: ...


# -- schema and migrations -------------------------------------------------------------------


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


def _v2_to_v3(db: sqlite3.Connection) -> None:
    """Version 3 adds the change feed: one row per changed key, in the writing transaction.

    ``kind`` is ``device``, ``code`` or ``default``; ``key`` the row's id (or model). Other
    processes follow ``seq`` and re-read the rows it names.
    """
    _run_script(
        db,
        """
        CREATE TABLE changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            key TEXT NOT NULL
        )
        """,
    )


def _v3_to_v4(db: sqlite3.Connection) -> None:
    """Version 4 keeps failed activation attempts where every process and node sees them:
    one row per failure counted against a throttle key (``dev:NAME`` or ``src:ADDRESS``),
    by the node (``origin``) that saw it. The TVS failure budget is shared through it."""
    _run_script(
        db,
        """
        CREATE TABLE attempts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            key TEXT NOT NULL,
            at REAL NOT NULL,
            origin TEXT NOT NULL
        );
        CREATE INDEX attempts_by_time ON attempts(at)
        """,
    )


def _v4_to_v5(db: sqlite3.Connection) -> None:
    """Version 5: remote activation through the edge (permission, token generation, the
    serial of the live refresh token)."""
    _run_script(
        db,
        """
        ALTER TABLE devices ADD COLUMN allow_remote INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE devices ADD COLUMN token_generation INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE devices ADD COLUMN refresh_serial INTEGER NOT NULL DEFAULT 0
        """,
    )


def _v5_to_v6_accounts(db: sqlite3.Connection) -> None:
    """Version 6 adds web users (Argon2id hashes only) and API tokens (SHA-256 only).

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


def _v6_to_v7(db: sqlite3.Connection) -> None:
    """Version 7: a device's own onboarding method (NULL: its model's default)."""
    _run_script(db, "ALTER TABLE devices ADD COLUMN onboarding TEXT")


def _v8_to_v9_feed_retention(db: sqlite3.Connection) -> None:
    """Version 9 bounds the change feed: each row records when it was written (``at``;
    NULL for rows from before, which count as old) and ``feed_horizon`` the position up to
    which rows were pruned (a follower behind it resynchronises from a snapshot)."""
    _run_script(db, _FEED_RETENTION)


_FEED_RETENTION = """
ALTER TABLE changes ADD COLUMN at REAL;
CREATE TABLE feed_horizon (pruned_through INTEGER NOT NULL);
INSERT INTO feed_horizon (pruned_through) VALUES (0)
"""


def _v7_to_v8_bindings(db: sqlite3.Connection) -> None:
    """Version 8: SIP bindings visible cluster-wide (soft state, see
    :mod:`callboard.daemon.registry.bindings`): one row per binding a process holds in
    memory, keyed by that process (``holder``), shown with its node's name."""
    _run_script(db, _BINDINGS_TABLE)


_BINDINGS_TABLE = """
CREATE TABLE bindings (
    holder TEXT NOT NULL,
    node TEXT NOT NULL,
    aor TEXT NOT NULL,
    key TEXT NOT NULL,
    device_name TEXT NOT NULL DEFAULT '',
    contact TEXT NOT NULL,
    transport TEXT NOT NULL,
    source TEXT NOT NULL,
    user_agent TEXT,
    registered_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    client_cert_sha256 TEXT,
    PRIMARY KEY (holder, aor, key)
);
CREATE INDEX bindings_by_device ON bindings(device_name);
CREATE INDEX bindings_by_expiry ON bindings(expires_at)
"""


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _v0_to_v1,
    _v1_to_v2,
    _v2_to_v3,
    _v3_to_v4,
    _v4_to_v5,
    _v5_to_v6_accounts,
    _v6_to_v7,
    _v7_to_v8_bindings,
    _v8_to_v9_feed_retention,
]
assert len(MIGRATIONS) == SCHEMA_VERSION


# -- the store thread ------------------------------------------------------------------------


_STOP = object()
MAX_GROUP = 256  # writes in one group commit at most


class _Grouped:
    """A write waiting on the store thread to join a group commit."""

    __slots__ = ("d", "item")

    def __init__(self, item: Any, d: Deferred[Any]) -> None:
        self.item = item
        self.d = d


GroupRunner = Callable[[list[Any]], list[Any]]
"""Runs waiting writes as one group: one outcome (a result or the exception) per write."""


class _StoreThread:
    """One thread draining a queue of jobs in order; results come back on the reactor.

    A queue rather than a thread pool so that writes waiting together become one group
    commit (:meth:`submit_grouped`): every write queued behind the first is taken into the
    same transaction, up to a job of another kind, which runs after the group, in order.
    """

    def __init__(
        self, reactor: IReactorFromThreads, name: str, run_group: GroupRunner | None = None
    ) -> None:
        self._reactor = reactor
        self._run_group = run_group
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # A daemon thread: a write still queued at a hard exit was never acknowledged.
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        held: Any = None
        while True:
            job = held if held is not None else self._jobs.get()
            held = None
            if job is _STOP:
                return
            if isinstance(job, _Grouped):
                group = [job]
                while len(group) < MAX_GROUP:
                    try:
                        more = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if not isinstance(more, _Grouped):
                        held = more
                        break
                    group.append(more)
                self._commit_group(group)
                del group
            else:
                job()
            del job  # its data (a flush's rows) is not kept while the thread waits for more

    def _commit_group(self, group: list[_Grouped]) -> None:
        assert self._run_group is not None
        try:
            outcomes: list[Any] = self._run_group([g.item for g in group])
        except BaseException:
            failure = Failure()
            outcomes = [failure] * len(group)
        self._reactor.callFromThread(_deliver, [g.d for g in group], outcomes)

    def submit(self, work: Callable[[], T]) -> Deferred[T]:
        """Run ``work`` on the store thread; the Deferred fires on the reactor thread."""
        d: Deferred[T] = Deferred()
        call = self._reactor.callFromThread

        def job() -> None:
            try:
                result = work()
            except BaseException:
                failure = Failure()
                call(d.errback, failure)
            else:
                call(d.callback, result)

        self._jobs.put(job)
        return d

    def submit_grouped(self, item: Any) -> Deferred[Any]:
        """Queue a write for the next group commit; fires with its own outcome."""
        d: Deferred[Any] = Deferred()
        self._jobs.put(_Grouped(item, d))
        return d

    def call_blocking(self, work: Callable[[], T]) -> T:
        """Run ``work`` on the store thread and wait for it (start-up and tests only)."""
        future: Future[T] = Future()

        def job() -> None:
            try:
                future.set_result(work())
            except BaseException as exc:
                future.set_exception(exc)

        self._jobs.put(job)
        return future.result()

    def stop(self) -> None:
        self._jobs.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join()


def _deliver(waiting: list[Deferred[Any]], outcomes: list[Any]) -> None:
    """On the reactor: fire each write's Deferred with its outcome, in commit order."""
    for d, outcome in zip(waiting, outcomes, strict=True):
        if isinstance(outcome, Failure):
            d.errback(outcome)
        elif isinstance(outcome, BaseException):
            d.errback(Failure(outcome))
        else:
            d.callback(outcome)


# -- SQLite ----------------------------------------------------------------------------------


_DEVICE_COLUMNS = (
    "id, name, model, description, owner_user, lines, requires_activation,"
    " state, created_at, updated_at, version, activated_at, mic_sha256,"
    " allow_remote, token_generation, refresh_serial, onboarding"
)
_CODE_COLUMNS = "id, device_id, code, issued_at, expires_at, state, used_at"
_SELECT_DEVICES = f"SELECT {_DEVICE_COLUMNS} FROM devices"
_SELECT_CODES = f"SELECT {_CODE_COLUMNS} FROM codes"
_OWN_RANGES = 4096  # own commits remembered for the feed to leave out
_IN_CHUNK = 500  # keys per ``IN (…)`` query, under SQLite's variable limit


class SQLiteStore:
    """The embedded default store: one SQLite file in the state directory.

    Several stores (processes) may open the same file: SQLite serialises their writers
    (``BEGIN IMMEDIATE`` waits up to ``busy_timeout``) and each follows the others through
    the feed.
    """

    def __init__(
        self,
        path: Path,
        reactor: IReactorFromThreads | None = None,
        *,
        busy_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor  # type: ignore[assignment]
        assert reactor is not None
        self.path = path
        self._clock = clock  # stamps feed rows (``at``), which retention keeps by age
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            # Create it owner-only before SQLite does, so it is never world-readable.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(path, 0o600)
        self._own: list[tuple[int, int]] = []  # feed ranges this store wrote (store thread)
        self._closed = False
        self.transactions = 0  # write transactions committed (tests count group commits)
        self._thread = _StoreThread(
            reactor, f"callboard-store:{path.name}", run_group=self._apply_group
        )
        try:
            self._db = self._thread.call_blocking(lambda: self._open(busy_timeout))
        except BaseException:
            self._thread.stop()
            raise

    def _open(self, busy_timeout: float) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
        )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            _migrate(db, self.path)
        except BaseException:
            db.close()
            raise
        return db

    @property
    def schema_version(self) -> int:
        return self._thread.call_blocking(lambda: _user_version(self._db))

    # -- the Store interface -------------------------------------------------------------

    def load(self) -> Snapshot:
        return self._thread.call_blocking(self._load)

    def snapshot(self) -> Deferred[Snapshot]:
        return self._thread.submit(self._load)

    def apply(self, changes: Sequence[Change]) -> Deferred[Committed]:
        if not changes:
            return succeed(Committed((), 0, 0))
        return self._thread.submit_grouped(tuple(changes))

    def changes_since(self, seq: int) -> Deferred[FeedBatch]:
        return self._thread.submit(lambda: self._changes_since(seq))

    def prune_feed(
        self, keep_rows: int, keep_seconds: float, limit: int = PRUNE_CHUNK
    ) -> Deferred[int]:
        return self._thread.submit(lambda: self._prune_feed(keep_rows, keep_seconds, limit))

    def backup(self, path: Path) -> Deferred[None]:
        """A consistent copy of the database at ``path``, while the daemon runs.

        SQLite's online backup, on the store thread (so between two writes, never across
        one); written beside ``path`` and renamed into place, so ``path`` is never a torn
        copy. A path that cannot be written fails with :class:`OSError`.
        """
        return self._thread.submit(lambda: _backup(self._db, path))

    # Tables the Store interface does not model (the web's users and tokens), in SQL both
    # engines speak; parameters are written as ``paramstyle``.
    paramstyle = "?"

    def transaction(self, work: Callable[[sqlite3.Connection], T]) -> Deferred[T]:
        """Run ``work`` as one write transaction on the store thread, in order with this
        store's own writes (after any group commit queued before it)."""

        def run() -> T:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
                db.execute("COMMIT")
            except BaseException:
                _roll_back(db)
                raise
            return result

        return self._thread.submit(run)

    def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read on the store thread and wait for it (start-up only, like :meth:`load`)."""
        return self._thread.call_blocking(lambda: work(self._db))

    def note_changes(self, db: sqlite3.Connection, keys: Sequence[tuple[str, str]]) -> None:
        """Inside :meth:`transaction`: name changed rows of other kinds (``user``, ``token``)
        in the change feed, so other processes re-read them (:attr:`FeedBatch.others`)."""
        now = self._clock()
        db.executemany(_INSERT_CHANGE, [(kind, key, now) for kind, key in keys])

    def close(self) -> Deferred[None]:
        """Finish the queued work, close the file and end the store thread."""
        if self._closed:
            return succeed(None)
        self._closed = True
        d = self._thread.submit(self._db.close)

        def stopped(result: object) -> object:
            self._thread.stop()
            return result

        return d.addBoth(stopped)

    # -- on the store thread -------------------------------------------------------------

    def _load(self) -> Snapshot:
        db = self._db
        db.execute("BEGIN")
        try:
            devices: list[Device] = []
            cursor = db.execute(_SELECT_DEVICES)
            while rows := cursor.fetchmany(_LOAD_CHUNK):
                devices += _devices(rows)
            codes = _loaded_codes(db.execute(_SELECT_CODES), devices)
            defaults = {
                r[0]: Onboarding(r[1])
                for r in db.execute("SELECT model, onboarding FROM model_defaults")
            }
            seq = _feed_position(db)
        finally:
            db.execute("COMMIT")
        return Snapshot(devices, codes, defaults, seq)

    def _apply_group(self, group: list[tuple[Change, ...]]) -> list[Committed | Exception]:
        """Group commit: every waiting write in one transaction, one fsync for them all.

        Each write runs inside its own SAVEPOINT with its own conditions: a failed one is
        rolled back alone and fails alone. Nothing is acknowledged before the COMMIT (the
        outcomes go back to the reactor only after this returns); if the COMMIT fails, every
        write of the group fails.
        """
        db = self._db
        now = self._clock()
        db.execute("BEGIN IMMEDIATE")
        try:
            outcomes = [self._apply_one(db, changes, now) for changes in group]
            db.execute("COMMIT")
        except BaseException:
            _roll_back(db)
            raise
        self.transactions += 1
        for outcome in outcomes:
            if isinstance(outcome, Committed):
                self._own.append((outcome.first_seq, outcome.seq))
        if len(self._own) > _OWN_RANGES:
            # Nobody follows this store: forget the oldest (re-reading our own rows later
            # would only find them already held).
            del self._own[: len(self._own) - _OWN_RANGES]
        return outcomes

    @staticmethod
    def _apply_one(
        db: sqlite3.Connection, changes: tuple[Change, ...], now: float
    ) -> Committed | Exception:
        db.execute("SAVEPOINT write")
        try:
            for batch in _batches(changes):
                _write(db, batch)
            keys = _feed_keys(changes)
            db.executemany(_INSERT_CHANGE, [(kind, key, now) for kind, key in keys])
            last = int(db.execute("SELECT MAX(seq) FROM changes").fetchone()[0])
        except (ConditionFailed, sqlite3.IntegrityError) as exc:
            db.execute("ROLLBACK TO write")
            db.execute("RELEASE write")
            return exc
        db.execute("RELEASE write")
        # The group holds the write lock: this write's feed rows have no gaps.
        return Committed(changes, last - len(keys) + 1, last)

    def _changes_since(self, after: int) -> FeedBatch:
        # The follower is past ``after``: our own rows up to there need no filtering any more.
        self._own = [(first, last) for first, last in self._own if last > after]
        db = self._db
        db.execute("BEGIN")  # one read transaction: a consistent view of the rows
        try:
            if after < _pruned_through(db):
                return FeedBatch(after, behind_horizon=True)
            rows = db.execute(
                "SELECT seq, kind, key FROM changes WHERE seq > ? ORDER BY seq", (after,)
            ).fetchall()
            if not rows:
                return FeedBatch(after)
            seq = rows[-1][0]
            wanted = _wanted_keys(rows, self._is_own)
            devices = _select_in(db, _SELECT_DEVICES, "id", wanted["device"])
            codes = _select_in(db, _SELECT_CODES, "id", wanted["code"])
            defaults = _select_in(
                db, "SELECT model, onboarding FROM model_defaults", "model", wanted["default"]
            )
        finally:
            db.execute("COMMIT")
        self._own = [(first, last) for first, last in self._own if last > seq]
        return _feed_batch(seq, wanted, devices, codes, defaults)

    def _is_own(self, seq: int) -> bool:
        return any(first <= seq <= last for first, last in self._own)

    def _prune_feed(self, keep_rows: int, keep_seconds: float, limit: int) -> int:
        db = self._db
        cutoff = self._clock() - keep_seconds
        db.execute("BEGIN IMMEDIATE")
        try:
            deleted = prune_feed_rows(db, "?", keep_rows, cutoff, limit)
            db.execute("COMMIT")
        except BaseException:
            _roll_back(db)
            raise
        return deleted


_INSERT_CHANGE = "INSERT INTO changes (kind, key, at) VALUES (?, ?, ?)"


def prune_feed_rows(db: Any, mark: str, keep_rows: int, cutoff: float, limit: int) -> int:
    """Inside a write transaction (either engine; ``mark`` its placeholder): delete the
    oldest feed rows, at most ``limit``, that are neither among the newest ``keep_rows`` nor
    written at or after ``cutoff``, and move ``feed_horizon`` past them.

    Only a run of the oldest rows goes (everything below one position), so the kept feed
    has no holes: a follower is either past the horizon and sees every row after it, or
    behind it and told so. A row with no time (written before version 9) counts as old.
    """
    m = mark
    newest = db.execute(
        f"SELECT seq FROM changes ORDER BY seq DESC LIMIT 1 OFFSET {m}", (max(keep_rows, 1) - 1,)
    ).fetchone()
    if newest is None:
        return 0  # fewer rows than keep_rows
    # At most ``limit`` rows below the newest kept ones; then the first young row among
    # them, if any (each query walks the primary key from the oldest row and stops early).
    chunk_end = db.execute(
        f"SELECT seq FROM changes WHERE seq < {m} ORDER BY seq LIMIT 1 OFFSET {m}",
        (newest[0], limit),
    ).fetchone()
    below = chunk_end[0] if chunk_end is not None else newest[0]
    young = db.execute(
        f"SELECT seq FROM changes WHERE seq < {m} AND at >= {m} ORDER BY seq LIMIT 1",
        (below, cutoff),
    ).fetchone()
    if young is not None:
        below = young[0]
    deleted = int(db.execute(f"DELETE FROM changes WHERE seq < {m}", (below,)).rowcount)
    if deleted:
        db.execute(
            f"UPDATE feed_horizon SET pruned_through = {m} WHERE pruned_through < {m}",
            (below - 1, below - 1),
        )
    return deleted


def _pruned_through(db: sqlite3.Connection) -> int:
    """The feed position up to which rows may have been pruned (0: none ever were)."""
    row = db.execute("SELECT pruned_through FROM feed_horizon").fetchone()
    return int(row[0]) if row else 0


def _wanted_keys(rows: Sequence[Any], is_own: Callable[[int], bool]) -> dict[str, dict[str, None]]:
    """The keys other writers changed, by kind, in feed order (one engine-neutral step)."""
    wanted: dict[str, dict[str, None]] = {"device": {}, "code": {}, "default": {}}
    for row_seq, kind, key in rows:
        if not is_own(row_seq):
            wanted.setdefault(kind, {})[key] = None
    return wanted


def _feed_batch(
    seq: int,
    wanted: dict[str, dict[str, None]],
    devices: Sequence[Any],
    codes: Sequence[Any],
    defaults: Sequence[Any],
) -> FeedBatch:
    """The rows as they stand now; a wanted device with no row was deleted."""
    found = [_device(r) for r in devices]
    present = {d.id for d in found}
    return FeedBatch(
        seq,
        devices=found,
        deleted_devices=[key for key in wanted["device"] if key not in present],
        codes=[_code(r) for r in codes],
        defaults={r[0]: Onboarding(r[1]) for r in defaults},
        others={
            kind: list(keys)
            for kind, keys in wanted.items()
            if kind not in ("device", "code", "default") and keys
        },
    )


def _backup(db: sqlite3.Connection, path: Path) -> None:
    partial = path.with_name(f".{path.name}.partial")
    os.close(os.open(partial, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600))
    try:
        copy = sqlite3.connect(partial)
        try:
            db.backup(copy)
        finally:
            copy.close()
        os.replace(partial, path)
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise OSError(str(exc)) from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _user_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    current = _user_version(db)
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: schema version {current} is newer than this Callboard "
            f"understands ({SCHEMA_VERSION})"
        )
    for version in range(current, SCHEMA_VERSION):
        db.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[version](db)
            db.execute(f"PRAGMA user_version = {version + 1}")
            db.execute("COMMIT")
        except BaseException:
            _roll_back(db)
            raise


def _roll_back(db: sqlite3.Connection) -> None:
    """Undo the open transaction, if any (``BEGIN IMMEDIATE`` itself may have timed out)."""
    if db.in_transaction:
        db.execute("ROLLBACK")


def _feed_position(db: sqlite3.Connection) -> int:
    """The newest feed position (never behind the horizon, even with every row pruned)."""
    latest = int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])
    return max(latest, _pruned_through(db))


def _feed_keys(changes: Iterable[Change]) -> list[tuple[str, str]]:
    """One feed row per changed key (a transaction touching a key twice names it once)."""
    keys: dict[tuple[str, str], None] = {}
    for change in changes:
        if isinstance(change, PutDevice):
            keys[("device", change.device.id)] = None
        elif isinstance(change, DeleteDevice):
            keys[("device", change.device_id)] = None
        elif isinstance(change, PutCode):
            keys[("code", change.code.id)] = None
        else:
            keys[("default", change.model)] = None
    return list(keys)


def _select_in(
    db: sqlite3.Connection, select: str, column: str, keys: Iterable[str]
) -> list[tuple[Any, ...]]:
    wanted = list(keys)
    found: list[tuple[Any, ...]] = []
    for start in range(0, len(wanted), _IN_CHUNK):
        chunk = wanted[start : start + _IN_CHUNK]
        marks = ", ".join("?" * len(chunk))
        found += db.execute(f"{select} WHERE {column} IN ({marks})", chunk).fetchall()
    return found


# -- writing one transaction -----------------------------------------------------------------


def _batches(changes: Sequence[Change]) -> list[list[Change]]:
    """Runs of unconditional inserts (one ``executemany`` each); every other change alone."""
    batches: list[list[Change]] = []
    for change in changes:
        kind = _batch_kind(change)
        if kind is not None and batches and _batch_kind(batches[-1][0]) == kind:
            batches[-1].append(change)
        else:
            batches.append([change])
    return batches


def _batch_kind(change: Change) -> str | None:
    if isinstance(change, PutDevice) and change.expect_version == ABSENT:
        return "new-device"
    if isinstance(change, PutCode) and change.expect is None:
        return "code"
    return None


def _write(db: sqlite3.Connection, batch: list[Change]) -> None:
    first = batch[0]
    if isinstance(first, PutDevice):
        if first.expect_version == ABSENT:
            _insert_devices(db, [c.device for c in batch if isinstance(c, PutDevice)])
        elif first.expect_version is None:
            _upsert_device(db, first.device)
        else:
            _update_device(db, first.device, first.expect_version)
    elif isinstance(first, DeleteDevice):
        _delete_device(db, first)
    elif isinstance(first, PutCode):
        if first.expect is None:
            db.executemany(
                f"INSERT OR REPLACE INTO codes ({_CODE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [_code_row(c.code) for c in batch if isinstance(c, PutCode)],
            )
        else:
            _update_code(db, first.code, first.expect)
    else:
        db.execute(
            "INSERT OR REPLACE INTO model_defaults (model, onboarding) VALUES (?, ?)",
            (first.model, first.onboarding.value),
        )


_DEVICE_VALUES = ", ".join("?" * 17)
_DEVICE_SET = (
    "name=?, model=?, description=?, owner_user=?, lines=?, requires_activation=?,"
    " state=?, created_at=?, updated_at=?, version=?, activated_at=?, mic_sha256=?,"
    " allow_remote=?, token_generation=?, refresh_serial=?, onboarding=?"
)


def _insert_devices(db: sqlite3.Connection, devices: list[Device]) -> None:
    try:
        db.executemany(
            f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES ({_DEVICE_VALUES})",
            [_device_row(d) for d in devices],
        )
    except sqlite3.IntegrityError:
        taken = _select_in(db, "SELECT name FROM devices", "name", [d.name for d in devices])
        names = ", ".join(sorted(r[0] for r in taken)) or "a device id"
        raise ConditionFailed(f"{names} already exists") from None


def _upsert_device(db: sqlite3.Connection, device: Device) -> None:
    try:
        db.execute(
            f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES ({_DEVICE_VALUES})"
            f" ON CONFLICT(id) DO UPDATE SET {_UPSERT_SET}",
            _device_row(device),
        )
    except sqlite3.IntegrityError:
        raise ConditionFailed(f"{device.name} belongs to another device") from None


_UPSERT_SET = ", ".join(
    f"{column}=excluded.{column}"
    for column in _DEVICE_COLUMNS.replace(",", " ").split()
    if column not in ("id", "created_at")
)


def _update_device(db: sqlite3.Connection, device: Device, expect_version: int) -> None:
    row = _device_row(device)
    try:
        cursor = db.execute(
            f"UPDATE devices SET {_DEVICE_SET} WHERE id=? AND version=?",
            (*row[1:], device.id, expect_version),
        )
    except sqlite3.IntegrityError:
        raise ConditionFailed(f"{device.name} belongs to another device") from None
    if cursor.rowcount != 1:
        raise ConditionFailed(_why_device_differs(db, device.id))


def _delete_device(db: sqlite3.Connection, change: DeleteDevice) -> None:
    if change.expect_version is None:
        cursor = db.execute("DELETE FROM devices WHERE id = ?", (change.device_id,))
    else:
        cursor = db.execute(
            "DELETE FROM devices WHERE id = ? AND version = ?",
            (change.device_id, change.expect_version),
        )
        if cursor.rowcount != 1:
            raise ConditionFailed(_why_device_differs(db, change.device_id))
    db.execute("DELETE FROM codes WHERE device_id = ?", (change.device_id,))


def _why_device_differs(db: sqlite3.Connection, device_id: str) -> str:
    row = db.execute("SELECT name FROM devices WHERE id = ?", (device_id,)).fetchone()
    if row is None:
        return "the device was deleted meanwhile"
    return f"{row[0]} was changed meanwhile; try again"


def _update_code(db: sqlite3.Connection, code: ActivationCode, expect: CodeExpectation) -> None:
    """The compare-and-set: update the code only if the stored row is as expected."""
    where = ["id = ?", "state = ?"]
    params: list[Any] = [code.id, expect.state.value]
    if expect.digits is not None:
        where.append("code = ?")
        params.append(expect.digits)
    if expect.live_at is not None:
        where.append("expires_at > ?")
        params.append(expect.live_at)
    cursor = db.execute(
        "UPDATE codes SET device_id=?, code=?, issued_at=?, expires_at=?, state=?, used_at=?"
        f" WHERE {' AND '.join(where)}",
        (*_code_row(code)[1:], *params),
    )
    if cursor.rowcount != 1:
        raise ConditionFailed(_why_code_differs(db, code.id, expect))


def _why_code_differs(db: sqlite3.Connection, code_id: str, expect: CodeExpectation) -> str:
    row = db.execute(
        "SELECT code, expires_at, state FROM codes WHERE id = ?", (code_id,)
    ).fetchone()
    if row is None or (expect.digits is not None and row[0] != expect.digits):
        return "unknown activation code"
    _digits, expires_at, state = row
    if state != expect.state.value:
        return f"activation code is {state}"
    if expect.live_at is not None and expires_at <= expect.live_at:
        return f"activation code is {CodeState.EXPIRED.value}"
    return "activation code changed meanwhile"


# -- rows ------------------------------------------------------------------------------------


def _device(r: Sequence[Any]) -> Device:
    return _device_of(r, json.loads(r[5]), {})


def _devices(rows: list[Sequence[Any]]) -> list[Device]:
    """Many rows at once, for a start with many devices: one JSON parse for all their lines
    columns instead of one per row; same result as ``_device``.
    (The caller reads ``_LOAD_CHUNK`` rows at a time: all 100,000 rows and their parsed JSON
    at once would raise the peak, and the process's resident memory with it, for good.)
    """
    lines = json.loads("[" + ",".join(r[5] for r in rows) + "]")
    times: dict[float, float] = {}
    return [_device_of(r, entries, times) for r, entries in zip(rows, lines, strict=True)]


def _device_of(r: Sequence[Any], lines: list[dict[str, str]], times: dict[float, float]) -> Device:
    """A device row and its parsed lines column, the one decoding both engines use.

    Every device is held in memory for the life of the process, so values that repeat are
    held once rather than once per row as the database driver hands them out: the model
    and owner names (interned), a line's auth name that is its number, and equal times
    (``times`` maps each time met so far to its one float: a record never edited was
    updated when it was created, and devices imported together were created at one time).
    """
    return Device(
        id=r[0],
        name=r[1],
        model=sys.intern(r[2]),
        description=r[3],
        owner_user=sys.intern(r[4]),
        lines=tuple([_line(entry) for entry in lines]),
        requires_activation=bool(r[6]),
        state=_STATES[r[7]],
        created_at=times.setdefault(r[8], r[8]),
        updated_at=times.setdefault(r[9], r[9]),
        version=r[10],
        activated_at=None if r[11] is None else times.setdefault(r[11], r[11]),
        mic_sha256=r[12],
        allow_remote=bool(r[13]),
        token_generation=r[14],
        refresh_serial=r[15],
        onboarding=_ONBOARDINGS[r[16]] if r[16] else None,
    )


def _line(entry: dict[str, str]) -> Line:
    """A stored line; its auth name, when it is the number (the default), the same string."""
    number = entry["directory_number"]
    if entry.get("auth_name") == number:
        entry["auth_name"] = number
    return Line(**entry)


_LOAD_CHUNK = 2000
_STATES = {s.value: s for s in DeviceState}
_ONBOARDINGS = {o.value: o for o in Onboarding}


def _code(r: Sequence[Any], device_id: str | None = None) -> ActivationCode:
    return ActivationCode(
        id=r[0],
        device_id=device_id or r[1],
        code=r[2],
        issued_at=r[3],
        expires_at=r[4],
        state=CodeState(r[5]),
        used_at=r[6],
    )


def _loaded_codes(rows: Iterable[Sequence[Any]], devices: list[Device]) -> list[ActivationCode]:
    """The codes of a start-up load, each naming its device with the device's own id string
    (held once for both, instead of once per row as the driver hands them out)."""
    ids: dict[str, str] = {}
    codes = []
    for r in rows:
        if not ids:  # built at the first code: none for a registry without codes
            ids = {d.id: d.id for d in devices}
        codes.append(_code(r, ids.get(r[1])))
    return codes


def _code_row(c: ActivationCode) -> tuple[Any, ...]:
    return (c.id, c.device_id, c.code, c.issued_at, c.expires_at, c.state.value, c.used_at)


def _device_row(d: Device) -> tuple[Any, ...]:
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
        int(d.allow_remote),
        d.token_generation,
        d.refresh_serial,
        d.onboarding.value if d.onboarding else None,
    )
