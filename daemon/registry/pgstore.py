"""The registry on PostgreSQL: several processes and nodes share one database.

The same :class:`~callboard.daemon.registry.store.Store` interface as :class:`SQLiteStore`,
and the same semantics:

- Every transaction runs on one store thread per process (never the reactor) over one
  connection, checked before each use and replaced when it broke (a killed
  backend or a restarted server is met by a fresh connection, without a restart). Commits
  and feed reads reach the reactor in database order, as with SQLite. (One ordered
  connection, not a pool: a pool's background reconnection makes every call during an outage
  wait for its timeout, where this one is refused at once and the phone told so.)
- Conditions are part of the statements: a redemption is ``UPDATE codes … WHERE id AND
  state AND code AND expires_at > … RETURNING id`` in the transaction that also updates the
  device at the version read; under READ COMMITTED a second redeemer waits for the first
  one's row lock, re-evaluates the WHERE on the committed row and updates nothing. New
  devices use ``ON CONFLICT DO NOTHING`` so a taken name or id is a refusal, not an error.
- The change feed is the same ``changes`` table. Its rows are numbered under a transaction
  advisory lock taken just before they are inserted and held to the commit, so feed numbers
  are handed out in commit order and a reader of ``seq > n`` never skips a row that commits
  later with a smaller number. The same transaction sends ``NOTIFY callboard_changes``; a
  listener thread with a connection of its own wakes the registry, and after losing that
  connection it reconnects and wakes it once more, which reads everything it missed.
- The feed is bounded as on SQLite (:func:`~callboard.daemon.registry.store.prune_feed_rows`,
  the same statements): pruning deletes only rows numbered below every row still to commit
  (those hold the feed lock and get higher numbers), and moves ``feed_horizon`` in the same
  transaction, so a reader sees either the rows or the horizon that replaced them.
- The database unreachable (or lost mid-transaction) fails the Deferred with
  :class:`StoreUnavailable`; nothing of the transaction is applied to memory. A connection
  lost during ``COMMIT`` leaves the outcome unknown: memory is not updated and the feed
  brings the row if it did commit.

Schema: :data:`PG_MIGRATIONS` is a list parallel to SQLite's ``MIGRATIONS`` (index i takes
version i to i + 1), kept in lockstep: same tables, columns and meaning, PostgreSQL types
(``DOUBLE PRECISION`` for times, ``BIGSERIAL`` for the feed). The version is the one row of
``callboard_schema``; migrations run under an advisory lock so that nodes starting together
migrate once.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads

from ..logs import get_logger
from .model import CodeState, Device, Onboarding
from .store import (
    _CODE_COLUMNS,
    _DEVICE_COLUMNS,
    ABSENT,
    PRUNE_CHUNK,
    SCHEMA_VERSION,
    Change,
    CodeExpectation,
    Committed,
    ConditionFailed,
    DeleteDevice,
    FeedBatch,
    PutCode,
    PutDefault,
    PutDevice,
    Snapshot,
    StoreError,
    _code_row,
    _device,
    _device_row,
    _feed_batch,
    _feed_keys,
    _loaded_codes,
    _StoreThread,
    _wanted_keys,
    prune_feed_rows,
)

log = get_logger("callboard.registry.pg")
T = TypeVar("T")

CHANNEL = "callboard_changes"
_FEED_LOCK = 0x63616C6C  # pg_advisory_xact_lock key: feed numbers in commit order
_MIGRATE_LOCK = 0x63616C6D  # pg_advisory_xact_lock key: one node migrates at a time
_OWN_RANGES = 4096


class StoreUnavailable(StoreError):
    """The database could not be reached (or was lost mid-transaction); nothing applied."""


# -- schema ----------------------------------------------------------------------------------

_PG_V1 = """
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    owner_user TEXT NOT NULL DEFAULT '',
    lines TEXT NOT NULL DEFAULT '[]',
    requires_activation INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    version INTEGER NOT NULL
);
CREATE TABLE codes (
    id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    code TEXT NOT NULL,
    issued_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    state TEXT NOT NULL,
    used_at DOUBLE PRECISION
);
CREATE INDEX codes_by_device ON codes(device_id);
CREATE TABLE model_defaults (model TEXT PRIMARY KEY, onboarding TEXT NOT NULL)
"""
_PG_V2 = """
ALTER TABLE devices ADD COLUMN activated_at DOUBLE PRECISION;
ALTER TABLE devices ADD COLUMN mic_sha256 TEXT
"""
_PG_V3 = """
CREATE TABLE changes (
    seq BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL,
    key TEXT NOT NULL
)
"""

_PG_V4 = """
CREATE TABLE attempts (
    id BIGSERIAL PRIMARY KEY,
    key TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    origin TEXT NOT NULL
);
CREATE INDEX attempts_by_time ON attempts(at)
"""

_PG_V5 = """
ALTER TABLE devices ADD COLUMN allow_remote INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN token_generation INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN refresh_serial INTEGER NOT NULL DEFAULT 0
"""

_PG_V6 = """
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    display_name TEXT NOT NULL DEFAULT '',
    email TEXT NOT NULL DEFAULT '',
    is_admin INTEGER NOT NULL DEFAULT 0,
    password_hash TEXT NOT NULL DEFAULT '',
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE api_tokens (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    read_only INTEGER NOT NULL DEFAULT 0,
    user_name TEXT NOT NULL DEFAULT '',
    created_by TEXT NOT NULL DEFAULT '',
    created_at DOUBLE PRECISION NOT NULL
)
"""

_PG_V7 = """
ALTER TABLE devices ADD COLUMN onboarding TEXT
"""

_PG_V8 = """
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
    registered_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    client_cert_sha256 TEXT,
    PRIMARY KEY (holder, aor, key)
);
CREATE INDEX bindings_by_device ON bindings(device_name);
CREATE INDEX bindings_by_expiry ON bindings(expires_at)
"""

_PG_V9 = """
ALTER TABLE changes ADD COLUMN at DOUBLE PRECISION;
CREATE TABLE feed_horizon (pruned_through BIGINT NOT NULL);
INSERT INTO feed_horizon (pruned_through) VALUES (0)
"""

# In lockstep with store.MIGRATIONS: the same versions, the same tables and columns.
PG_MIGRATIONS: list[str] = [
    _PG_V1,
    _PG_V2,
    _PG_V3,
    _PG_V4,
    _PG_V5,
    _PG_V6,
    _PG_V7,
    _PG_V8,
    _PG_V9,
]
assert len(PG_MIGRATIONS) == SCHEMA_VERSION


def _run_script(cur: psycopg.Cursor[Any], script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            cur.execute(statement.encode())


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The schema version of the database (0: empty). Runs inside the caller's transaction."""
    cur = conn.execute("SELECT to_regclass('callboard_schema') IS NOT NULL")
    exists = cur.fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute("SELECT version FROM callboard_schema").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: psycopg.Connection[Any], where: str) -> int:
    """Bring the schema up to :data:`SCHEMA_VERSION` (each step its own transaction).

    A database newer than this program is refused with :class:`StoreError`. Returns the
    version found before migrating.
    """
    found = -1
    while True:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
            current = schema_version(conn)
            if found < 0:
                found = current
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"{where}: schema version {current} is newer than this Callboard "
                    f"understands ({SCHEMA_VERSION})"
                )
            if current == SCHEMA_VERSION:
                return found
            with conn.cursor() as cur:
                if current == 0:
                    cur.execute("CREATE TABLE callboard_schema (version INTEGER NOT NULL)")
                    cur.execute("INSERT INTO callboard_schema VALUES (0)")
                _run_script(cur, PG_MIGRATIONS[current])
                cur.execute("UPDATE callboard_schema SET version = %s", (current + 1,))


def describe_dsn(dsn: str) -> str:
    """The DSN for messages: host, port and database, never a password."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "postgresql://?"
    host = parts.get("host") or "localhost"
    port = parts.get("port") or "5432"
    return f"postgresql://{host}:{port}/{parts.get('dbname') or ''}"


def one_line(error: BaseException) -> str:
    """psycopg's messages span lines (server hints); an admin's error is one line."""
    return re.sub(r"\s+", " ", str(error)).strip()


# -- the store -------------------------------------------------------------------------------


class PostgreSQLStore:
    """The registry's rows in PostgreSQL, shared by every process and node that opens it.

    ``on_change`` (set by the service) is called on the reactor when another writer
    committed (a NOTIFY arrived, or the listener reconnected and may have missed some).
    """

    def __init__(
        self,
        dsn: str,
        reactor: IReactorFromThreads | None = None,
        *,
        connect_timeout: float = 5.0,
        listen: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor  # type: ignore[assignment]
        assert reactor is not None
        self._reactor = reactor
        self.dsn = dsn
        self._clock = clock  # stamps feed rows (``at``), which retention keeps by age
        self.where = describe_dsn(dsn)
        self._connect_timeout = connect_timeout
        self.origin = uuid.uuid4().hex[:12]  # this store's NOTIFY payloads say it wrote them
        self.on_change: Callable[[], object] | None = None
        self._own: list[tuple[int, int]] = []
        self._closed = False
        self._stopping = threading.Event()
        self._listener: threading.Thread | None = None
        self._thread = _StoreThread(reactor, "callboard-store:pg")
        try:
            self._db: psycopg.Connection[Any] | None = self._thread.call_blocking(self._open)
        except BaseException:
            self._thread.stop()
            raise
        if listen:
            self._listener = threading.Thread(
                target=self._listen, name="callboard-store:pg-listen", daemon=True
            )
            self._listener.start()

    def _connect_kwargs(self) -> dict[str, Any]:
        return {
            "connect_timeout": max(1, int(self._connect_timeout)),
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "application_name": "callboard",
        }

    def _open(self) -> psycopg.Connection[Any]:
        conn = self._connect()
        try:
            migrate(conn, self.where)
        except psycopg.Error as exc:
            conn.close()
            raise StoreUnavailable(f"{self.where}: {one_line(exc)}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect(self) -> psycopg.Connection[Any]:
        """A new connection, or StoreUnavailable at once (refused) or after the timeout."""
        try:
            return psycopg.connect(self.dsn, autocommit=True, **self._connect_kwargs())
        except psycopg.Error as exc:
            raise StoreUnavailable(f"{self.where}: {one_line(exc)}") from None

    @property
    def schema_version(self) -> int:
        return self._thread.call_blocking(lambda: self._with_conn(schema_version))

    # -- the Store interface -------------------------------------------------------------

    def load(self) -> Snapshot:
        return self._thread.call_blocking(lambda: self._with_conn(self._load))

    def snapshot(self) -> Deferred[Snapshot]:
        return self._thread.submit(lambda: self._with_conn(self._load))

    def apply(self, changes: Sequence[Change]) -> Deferred[Committed]:
        if not changes:
            return succeed(Committed((), 0, 0))
        frozen = tuple(changes)
        return self._thread.submit(lambda: self._with_conn(lambda c: self._apply(c, frozen)))

    def changes_since(self, seq: int) -> Deferred[FeedBatch]:
        return self._thread.submit(lambda: self._with_conn(lambda c: self._changes_since(c, seq)))

    def prune_feed(
        self, keep_rows: int, keep_seconds: float, limit: int = PRUNE_CHUNK
    ) -> Deferred[int]:
        def prune(conn: psycopg.Connection[Any]) -> int:
            cutoff = self._clock() - keep_seconds
            with conn.transaction():
                return prune_feed_rows(conn, "%s", keep_rows, cutoff, limit)

        return self._thread.submit(lambda: self._with_conn(prune))

    # Tables the Store interface does not model (the web's users and tokens), in SQL both
    # engines speak; parameters are written as ``paramstyle``.
    paramstyle = "%s"

    def transaction(self, work: Callable[[Any], T]) -> Deferred[T]:
        """Run ``work(connection)`` as one transaction on the store thread."""

        def run(conn: psycopg.Connection[Any]) -> T:
            with conn.transaction():
                return work(conn)

        return self._thread.submit(lambda: self._with_conn(run))

    def read(self, work: Callable[[Any], T]) -> T:
        """Run a read on the store thread and wait for it (start-up only, like :meth:`load`)."""
        return self._thread.call_blocking(lambda: self._with_conn(work))

    def note_changes(self, conn: psycopg.Connection[Any], keys: Sequence[tuple[str, str]]) -> None:
        """Inside :meth:`transaction`: name changed rows of other kinds (``user``, ``token``)
        in the change feed (numbered in commit order, as :meth:`_apply` does) and wake the
        other nodes."""
        if not keys:
            return
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_FEED_LOCK,))
        rows = _insert_feed_rows(conn, keys, self._clock())
        last = max(r[0] for r in rows)
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{self.origin}:{last}"))

    def close(self) -> Deferred[None]:
        if self._closed:
            return succeed(None)
        self._closed = True
        self._stopping.set()
        d = self._thread.submit(self._close_connection)

        def stopped(result: object) -> object:
            self._thread.stop()
            if self._listener is not None:
                self._listener.join(timeout=10)
            return result

        return d.addBoth(stopped)

    # -- on the store thread -------------------------------------------------------------

    def _with_conn(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run ``work`` on a live connection; connection trouble is StoreUnavailable.

        The connection is checked first (one empty query, as a pool's check does) and
        replaced if its backend is gone, so a killed backend or a restarted server costs no
        failed call. A connection lost mid-transaction fails that call (nothing of
        it applied to memory) and is replaced on the next.
        """
        conn = self._live_connection()
        try:
            result = work(conn)
        except psycopg.OperationalError as exc:
            if conn.broken or conn.closed:
                self._close_connection()
            raise StoreUnavailable(
                f"{self.where}: the registry database connection failed: {one_line(exc)}"
            ) from None
        return result

    def _live_connection(self) -> psycopg.Connection[Any]:
        conn = self._db
        if conn is not None and not conn.closed and not conn.broken:
            try:
                conn.execute("")
                return conn
            except psycopg.Error:
                pass
        self._close_connection()
        self._db = conn = self._connect()
        return conn

    def _close_connection(self) -> None:
        conn, self._db = self._db, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def _load(self, conn: psycopg.Connection[Any]) -> Snapshot:
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            devices = [_device(r) for r in conn.execute(_SELECT_DEVICES)]
            codes = _loaded_codes(conn.execute(_SELECT_CODES), devices)
            defaults = {
                r[0]: Onboarding(r[1])
                for r in conn.execute("SELECT model, onboarding FROM model_defaults")
            }
            seq = _feed_position(conn)
        return Snapshot(devices, codes, defaults, seq)

    def _apply(self, conn: psycopg.Connection[Any], changes: tuple[Change, ...]) -> Committed:
        with conn.transaction():
            for change in changes:
                _write(conn, change)
            keys = _feed_keys(changes)
            # Numbered under the lock, held to the commit: feed order is commit order.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_FEED_LOCK,))
            rows = _insert_feed_rows(conn, keys, self._clock())
            first, last = min(r[0] for r in rows), max(r[0] for r in rows)
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{self.origin}:{last}"))
        self._own.append((first, last))
        if len(self._own) > _OWN_RANGES:
            del self._own[: len(self._own) - _OWN_RANGES]
        return Committed(changes, first, last)

    def _changes_since(self, conn: psycopg.Connection[Any], after: int) -> FeedBatch:
        self._own = [(first, last) for first, last in self._own if last > after]
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            if after < _pruned_through(conn):
                return FeedBatch(after, behind_horizon=True)
            rows = conn.execute(
                "SELECT seq, kind, key FROM changes WHERE seq > %s ORDER BY seq", (after,)
            ).fetchall()
            if not rows:
                return FeedBatch(after)
            seq = rows[-1][0]
            wanted = _wanted_keys(rows, self._is_own)
            devices = _select_any(conn, _SELECT_DEVICES, "id", wanted["device"])
            codes = _select_any(conn, _SELECT_CODES, "id", wanted["code"])
            defaults = _select_any(
                conn, "SELECT model, onboarding FROM model_defaults", "model", wanted["default"]
            )
        self._own = [(first, last) for first, last in self._own if last > seq]
        return _feed_batch(seq, wanted, devices, codes, defaults)

    def _is_own(self, seq: int) -> bool:
        return any(first <= seq <= last for first, last in self._own)

    # -- the listener thread -------------------------------------------------------------

    def _listen(self) -> None:
        """LISTEN for other writers' commits; after a lost connection, reconnect and wake
        the follower once so that it reads what was missed meanwhile."""
        delay = 0.2
        connected_before = False
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, **self._connect_kwargs()) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                    if connected_before:
                        log.info("registry database listener reconnected", database=self.where)
                        self._wake()
                    connected_before = True
                    delay = 0.2
                    while not self._stopping.is_set():
                        woken = False
                        for notify in conn.notifies(timeout=0.5, stop_after=64):
                            if not notify.payload.startswith(self.origin + ":"):
                                woken = True
                        if woken:
                            self._wake()
            except psycopg.Error as exc:
                if self._stopping.is_set():
                    return
                if delay == 0.2:  # once per outage, not once per attempt
                    log.warning(
                        "registry database listener lost; reconnecting",
                        database=self.where,
                        error=one_line(exc),
                    )
                self._stopping.wait(delay)
                delay = min(delay * 2, 5.0)
                connected_before = True

    def _wake(self) -> None:
        if self.on_change is not None and not self._stopping.is_set():
            self._reactor.callFromThread(self.on_change)


# -- statements ------------------------------------------------------------------------------

_SELECT_DEVICES = f"SELECT {_DEVICE_COLUMNS} FROM devices"
_SELECT_CODES = f"SELECT {_CODE_COLUMNS} FROM codes"
_DEVICE_VALUES = ", ".join(["%s"] * len(_DEVICE_COLUMNS.split(",")))
_CODE_VALUES = ", ".join(["%s"] * 7)
# Every column but the id, in _DEVICE_COLUMNS order (the row's tail).
_DEVICE_SET = ", ".join(f"{column}=%s" for column in _DEVICE_COLUMNS.replace(",", " ").split()[1:])
_UPSERT_SET = ", ".join(
    f"{column}=excluded.{column}"
    for column in _DEVICE_COLUMNS.replace(",", " ").split()
    if column not in ("id", "created_at")
)
_CODE_UPSERT_SET = ", ".join(
    f"{column}=excluded.{column}" for column in _CODE_COLUMNS.replace(",", " ").split()[1:]
)


def _feed_position(conn: psycopg.Connection[Any]) -> int:
    """The newest feed position (never behind the horizon, even with every row pruned)."""
    row = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()
    return max(int(row[0]) if row else 0, _pruned_through(conn))


def _pruned_through(conn: psycopg.Connection[Any]) -> int:
    """The feed position up to which rows may have been pruned (0: none ever were)."""
    row = conn.execute("SELECT pruned_through FROM feed_horizon").fetchone()
    return int(row[0]) if row else 0


def _insert_feed_rows(
    conn: psycopg.Connection[Any], keys: Sequence[tuple[str, str]], now: float
) -> list[tuple[Any, ...]]:
    """One feed row per key, stamped ``now``, under the feed lock the caller holds."""
    return conn.execute(
        "INSERT INTO changes (kind, key, at)"
        " SELECT k, v, %s FROM unnest(%s::text[], %s::text[]) AS t(k, v) RETURNING seq",
        (now, [k for k, _ in keys], [v for _, v in keys]),
    ).fetchall()


def _select_any(
    conn: psycopg.Connection[Any], select: str, column: str, keys: dict[str, None]
) -> list[tuple[Any, ...]]:
    if not keys:
        return []
    query = f"{select} WHERE {column} = ANY(%s)"
    return conn.execute(query.encode(), (list(keys),)).fetchall()


def _write(conn: psycopg.Connection[Any], change: Change) -> None:
    if isinstance(change, PutDevice):
        if change.expect_version == ABSENT:
            _insert_device(conn, change.device)
        elif change.expect_version is None:
            _upsert_device(conn, change.device)
        else:
            _update_device(conn, change.device, change.expect_version)
    elif isinstance(change, DeleteDevice):
        _delete_device(conn, change)
    elif isinstance(change, PutCode):
        if change.expect is None:
            conn.execute(
                f"INSERT INTO codes ({_CODE_COLUMNS}) VALUES ({_CODE_VALUES})"
                f" ON CONFLICT (id) DO UPDATE SET {_CODE_UPSERT_SET}".encode(),
                _code_row(change.code),
            )
        else:
            _update_code(conn, change.code, change.expect)
    else:
        assert isinstance(change, PutDefault)
        conn.execute(
            "INSERT INTO model_defaults (model, onboarding) VALUES (%s, %s)"
            " ON CONFLICT (model) DO UPDATE SET onboarding = excluded.onboarding",
            (change.model, change.onboarding.value),
        )


def _insert_device(conn: psycopg.Connection[Any], device: Device) -> None:
    """A new row, or a refusal: a taken id or name inserts nothing (no aborted transaction)."""
    cur = conn.execute(
        f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES ({_DEVICE_VALUES})"
        " ON CONFLICT DO NOTHING".encode(),
        _device_row(device),
    )
    if cur.rowcount != 1:
        taken = conn.execute("SELECT name FROM devices WHERE name = %s", (device.name,))
        name = taken.fetchone()
        raise ConditionFailed(f"{name[0] if name else 'a device id'} already exists")


def _upsert_device(conn: psycopg.Connection[Any], device: Device) -> None:
    try:
        conn.execute(
            f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES ({_DEVICE_VALUES})"
            f" ON CONFLICT (id) DO UPDATE SET {_UPSERT_SET}".encode(),
            _device_row(device),
        )
    except psycopg.errors.UniqueViolation:
        raise ConditionFailed(f"{device.name} belongs to another device") from None


def _update_device(conn: psycopg.Connection[Any], device: Device, expect_version: int) -> None:
    row = _device_row(device)
    try:
        cur = conn.execute(
            f"UPDATE devices SET {_DEVICE_SET} WHERE id=%s AND version=%s RETURNING id".encode(),
            (*row[1:], device.id, expect_version),
        )
    except psycopg.errors.UniqueViolation:
        # The transaction is aborted; the caller rolls it back: nothing is written.
        raise ConditionFailed(f"{device.name} belongs to another device") from None
    if cur.fetchone() is None:
        raise ConditionFailed(_why_device_differs(conn, device.id))


def _delete_device(conn: psycopg.Connection[Any], change: DeleteDevice) -> None:
    if change.expect_version is None:
        conn.execute("DELETE FROM devices WHERE id = %s", (change.device_id,))
    else:
        cur = conn.execute(
            "DELETE FROM devices WHERE id = %s AND version = %s RETURNING id",
            (change.device_id, change.expect_version),
        )
        if cur.fetchone() is None:
            raise ConditionFailed(_why_device_differs(conn, change.device_id))
    conn.execute("DELETE FROM codes WHERE device_id = %s", (change.device_id,))


def _why_device_differs(conn: psycopg.Connection[Any], device_id: str) -> str:
    row = conn.execute("SELECT name FROM devices WHERE id = %s", (device_id,)).fetchone()
    if row is None:
        return "the device was deleted meanwhile"
    return f"{row[0]} was changed meanwhile; try again"


def _update_code(conn: psycopg.Connection[Any], code: Any, expect: CodeExpectation) -> None:
    """The compare-and-set, ``UPDATE … WHERE state AND code AND expires_at > … RETURNING``."""
    where = ["id = %s", "state = %s"]
    params: list[Any] = [code.id, expect.state.value]
    if expect.digits is not None:
        where.append("code = %s")
        params.append(expect.digits)
    if expect.live_at is not None:
        where.append("expires_at > %s")
        params.append(expect.live_at)
    cur = conn.execute(
        (
            "UPDATE codes SET device_id=%s, code=%s, issued_at=%s, expires_at=%s, state=%s,"
            f" used_at=%s WHERE {' AND '.join(where)} RETURNING id"
        ).encode(),
        (*_code_row(code)[1:], *params),
    )
    if cur.fetchone() is None:
        raise ConditionFailed(_why_code_differs(conn, code.id, expect))


def _why_code_differs(conn: psycopg.Connection[Any], code_id: str, expect: CodeExpectation) -> str:
    row = conn.execute(
        "SELECT code, expires_at, state FROM codes WHERE id = %s", (code_id,)
    ).fetchone()
    if row is None or (expect.digits is not None and row[0] != expect.digits):
        return "unknown activation code"
    _digits, expires_at, state = row
    if state != expect.state.value:
        return f"activation code is {state}"
    if expect.live_at is not None and expires_at <= expect.live_at:
        return f"activation code is {CodeState.EXPIRED.value}"
    return "activation code changed meanwhile"
