"""Web users and API tokens: records, their durable table, and the secrets' one-way forms.

Passwords are stored only as Argon2id hashes (``argon2-cffi``, RFC 9106 parameters), tokens
only as SHA-256 digests (a token is 256 random bits, so a fast hash is enough and lets a
request be authenticated with one dictionary look-up). Hashing a password costs tens of
milliseconds and 64 MiB, so it always runs on a worker thread, never on the reactor.

The tables live in the registry's database (created by the store's migrations, SQLite or
PostgreSQL) and are written through the store's own writer (``store.transaction``): one
connection, one writer thread (SQLite: ``synchronous=FULL``), in order with the registry's
writes. Memory is updated only after the commit, so reads stay in memory and never wait. The
SQL is what both engines speak (``ON CONFLICT … DO UPDATE``), parameters in the store's
``paramstyle``.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar, runtime_checkable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from ..logs import get_logger
from .model import RegistryError

log = get_logger("callboard.accounts")

T = TypeVar("T")
Clock = Callable[[], float]

_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_EMAIL_RE = re.compile(r"^[^@\s<>\"',;]+@[^@\s<>\"',;]+\.[^@\s<>\"',;]+$")
TOKEN_PREFIX = "cbt_"
MIN_PASSWORD = 8
MAX_PASSWORD = 1024

_hasher = PasswordHasher()  # Argon2id, t=3, m=64 MiB, p=4 (RFC 9106 second choice)


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the user is unknown, so both answers take the same time.

    Made at the first verification (on a worker thread), not at import: one Argon2id hash
    costs 0.1-0.8 s of CPU and 64 MiB, which every daemon start paid, web on or off.
    """
    return _hasher.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True)
class User:
    name: str
    display_name: str = ""
    email: str = ""
    is_admin: bool = False
    password_hash: str = field(default="", repr=False)
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def has_password(self) -> bool:
        return bool(self.password_hash)


@dataclass(frozen=True)
class ApiToken:
    name: str
    token_sha256: str = field(repr=False)
    read_only: bool = False
    user_name: str = ""  # acts as this user when set; else a service token
    created_by: str = ""
    created_at: float = 0.0


def check_user_name(name: str) -> str:
    name = name.strip()
    if not _USER_RE.match(name):
        raise RegistryError(
            f"invalid user name {name!r}: 1-64 letters, digits, '.', '_', '@' or '-'"
        )
    return name


def check_token_name(name: str) -> str:
    name = name.strip()
    if not _TOKEN_NAME_RE.match(name):
        raise RegistryError(f"invalid token name {name!r}: 1-64 letters, digits, '.', '_', '-'")
    return name


def check_email(email: str) -> str:
    email = email.strip()
    if email and (len(email) > 254 or not _EMAIL_RE.match(email)):
        raise RegistryError(f"invalid email address {email!r}")
    return email


def check_password(password: str) -> str:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise RegistryError(f"a password needs {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return password


def hash_password(password: str) -> str:
    """Argon2id (slow on purpose): call on a worker thread."""
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True when ``password`` matches; an unknown user (None) costs the same time."""
    dummy = _dummy_hash()  # first, known user or not: the first answer is no tell either
    try:
        return _hasher.verify(stored_hash or dummy, password) and bool(stored_hash)
    except (VerificationError, InvalidHashError):
        return False


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@runtime_checkable
class Transactions(Protocol):
    """What the accounts need of the registry's store (both engines' stores have it).

    ``work`` gets the store's DB-API connection (``execute(sql, params)``); ``paramstyle``
    is how a parameter is written in that SQL (``?`` or ``%s``).
    """

    paramstyle: str

    def transaction(self, work: Callable[[Any], T]) -> Deferred[T]: ...

    def read(self, work: Callable[[Any], T]) -> T: ...

    def note_changes(self, db: Any, keys: Sequence[tuple[str, str]]) -> None: ...


class AccountStore:
    """Users and tokens in memory, written through to their SQLite tables off the reactor."""

    def __init__(self, store: Transactions, clock: Clock, reactor: Any) -> None:
        self._store = store
        self._clock = clock
        self._reactor = reactor
        self.users: dict[str, User] = {}
        self.tokens: dict[str, ApiToken] = {}
        self._by_digest: dict[str, str] = {}
        self._p = store.paramstyle
        store.read(self._load)

    def _sql(self, text: str) -> str:
        """``text`` with each ``?`` written in the store's parameter style."""
        return text.replace("?", self._p)

    def _load(self, db: Any) -> None:
        for r in db.execute(_SELECT_USERS):
            self.users[r[0]] = _user(r)
        for r in db.execute(_SELECT_TOKENS):
            self._remember_token(_token(r))

    # -- other writers (processes, nodes): the change feed names what they changed -----

    def follow(self, feed: FeedSource) -> None:
        """Re-read the users and tokens the registry's change feed says others changed."""
        feed.on_feed("user", lambda names: self.reread(users=names))
        feed.on_feed("token", lambda names: self.reread(tokens=names))
        feed.on_resync(self.reread_all)  # the feed's rows were pruned: names may be missed

    def reread_all(self) -> Deferred[None]:
        """Re-read every user and token, the ones held and the ones stored (after a change
        feed resync, when the names of what others changed may have been pruned)."""

        def names(db: Any) -> tuple[list[str], list[str]]:
            users = [r[0] for r in db.execute("SELECT name FROM users")]
            tokens = [r[0] for r in db.execute("SELECT name FROM api_tokens")]
            return users, tokens

        def reread(found: tuple[list[str], list[str]]) -> Deferred[None]:
            users, tokens = found
            return self.reread(
                users=set(users) | set(self.users), tokens=set(tokens) | set(self.tokens)
            )

        def failed(failure: Any) -> None:
            log.warning("users and tokens could not be re-read", error=str(failure.value)[:200])

        return self._store.transaction(names).addCallback(reread).addErrback(failed)

    def reread(self, users: Iterable[str] = (), tokens: Iterable[str] = ()) -> Deferred[None]:
        """Read the named rows as they stand now (a missing one was deleted), off the
        reactor, in order with this store's own writes; memory follows."""
        user_names, token_names = list(users), list(tokens)

        def read(db: Any) -> tuple[list[Any], list[Any]]:
            return (
                _rows_named(db, _SELECT_USERS, user_names, self._p),
                _rows_named(db, _SELECT_TOKENS, token_names, self._p),
            )

        def apply(found: tuple[list[Any], list[Any]]) -> None:
            user_rows, token_rows = found
            present = {r[0]: _user(r) for r in user_rows}
            for name in user_names:
                if name in present:
                    self.users[name] = present[name]
                else:
                    self.users.pop(name, None)
            tokens_now = {r[0]: _token(r) for r in token_rows}
            for name in token_names:
                self._forget_token(name)
                if name in tokens_now:
                    self._remember_token(tokens_now[name])

        def failed(failure: Any) -> None:
            # The next change, or a restart, reads them again; the feed goes on.
            log.warning("users and tokens could not be re-read", error=str(failure.value)[:200])

        return self._store.transaction(read).addCallbacks(apply, failed)

    def now(self) -> float:
        return self._clock()

    # -- reads (memory) ------------------------------------------------------------------

    def user(self, name: str) -> User | None:
        return self.users.get(name)

    def token_for(self, token: str) -> ApiToken | None:
        name = self._by_digest.get(token_digest(token))
        return self.tokens.get(name) if name else None

    # -- writes (worker thread, one at a time, memory after the commit) ------------------

    def put_user(self, user: User) -> Deferred[User]:
        def write(db: Any) -> None:
            db.execute(
                self._sql(
                    "INSERT INTO users (name, display_name, email, is_admin, password_hash,"
                    " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET display_name = excluded.display_name,"
                    " email = excluded.email, is_admin = excluded.is_admin,"
                    " password_hash = excluded.password_hash, updated_at = excluded.updated_at"
                ),
                (
                    user.name,
                    user.display_name,
                    user.email,
                    int(user.is_admin),
                    user.password_hash,
                    user.created_at,
                    user.updated_at,
                ),
            )
            self._store.note_changes(db, [("user", user.name)])

        def remember(_: object) -> User:
            self.users[user.name] = user
            return user

        return self._write(write).addCallback(remember)

    def delete_user(self, name: str) -> Deferred[None]:
        """Delete a user and every token acting as them."""

        def write(db: Any) -> None:
            tokens = db.execute(
                self._sql("SELECT name FROM api_tokens WHERE user_name = ?"), (name,)
            ).fetchall()
            db.execute(self._sql("DELETE FROM api_tokens WHERE user_name = ?"), (name,))
            db.execute(self._sql("DELETE FROM users WHERE name = ?"), (name,))
            self._store.note_changes(db, [("user", name)] + [("token", t[0]) for t in tokens])

        def forget(_: object) -> None:
            self.users.pop(name, None)
            for token in [t for t in self.tokens.values() if t.user_name == name]:
                self._forget_token(token.name)

        return self._write(write).addCallback(forget)

    def put_token(self, token: ApiToken) -> Deferred[ApiToken]:
        def write(db: Any) -> None:
            db.execute(
                self._sql(
                    "INSERT INTO api_tokens (name, token_sha256, read_only, user_name,"
                    " created_by, created_at) VALUES (?, ?, ?, ?, ?, ?)"
                ),
                (
                    token.name,
                    token.token_sha256,
                    int(token.read_only),
                    token.user_name,
                    token.created_by,
                    token.created_at,
                ),
            )
            self._store.note_changes(db, [("token", token.name)])

        def remember(_: object) -> ApiToken:
            self._remember_token(token)
            return token

        return self._write(write).addCallback(remember)

    def delete_token(self, name: str) -> Deferred[None]:
        def write(db: Any) -> None:
            db.execute(self._sql("DELETE FROM api_tokens WHERE name = ?"), (name,))
            self._store.note_changes(db, [("token", name)])

        return self._write(write).addCallback(lambda _: self._forget_token(name))

    def _remember_token(self, token: ApiToken) -> None:
        self.tokens[token.name] = token
        self._by_digest[token.token_sha256] = token.name

    def _forget_token(self, name: str) -> None:
        token = self.tokens.pop(name, None)
        if token is not None:
            self._by_digest.pop(token.token_sha256, None)

    def _write(self, statements: Callable[[Any], None]) -> Deferred[None]:
        """One transaction on the store's writer thread; durable when the Deferred fires."""
        return self._store.transaction(statements)

    def in_thread(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run blocking work (SQLite, Argon2) on the reactor's thread pool."""
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), fn, *args)


_SELECT_USERS = (
    "SELECT name, display_name, email, is_admin, password_hash, created_at, updated_at FROM users"
)
_SELECT_TOKENS = (
    "SELECT name, token_sha256, read_only, user_name, created_by, created_at FROM api_tokens"
)


class FeedSource(Protocol):
    """The registry's change feed, as the accounts follow it."""

    def on_feed(self, kind: str, listener: Callable[[list[str]], object]) -> None: ...

    def on_resync(self, listener: Callable[[], object]) -> None: ...


def _user(r: Sequence[Any]) -> User:
    return User(r[0], r[1], r[2], bool(r[3]), r[4], r[5], r[6])


def _token(r: Sequence[Any]) -> ApiToken:
    return ApiToken(r[0], r[1], bool(r[2]), r[3], r[4], r[5])


def _rows_named(db: Any, select: str, names: list[str], mark: str) -> list[Any]:
    found: list[Any] = []
    for start in range(0, len(names), 500):
        chunk = names[start : start + 500]
        marks = ", ".join([mark] * len(chunk))
        found += db.execute(f"{select} WHERE name IN ({marks})", chunk).fetchall()
    return found


def updated_user(user: User, now: float, **changes: Any) -> User:
    return replace(user, updated_at=now, **changes)
