"""Browser sessions, CSRF tokens and the sign-in throttle (pure: the caller passes the time).

A session id is 256 random bits in a ``__Host-`` cookie (``Secure; HttpOnly;
SameSite=Strict; Path=/``). Anonymous visitors get a session too, only to carry the CSRF
token of the sign-in form; signing in always makes a *new* session (the old id dies), so an
id planted before sign-in is worth nothing afterwards (no session fixation). Sessions end
after ``idle`` seconds without a request or ``absolute`` seconds after sign-in.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass

from callboard.protocols.tvs.activation import Throttle

COOKIE = "__Host-callboard"


@dataclass
class Session:
    id: str
    csrf: str
    user: str  # "" while anonymous
    created: float
    last_seen: float

    def csrf_ok(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf.encode(), str(token).encode())


class SessionStore:
    """In memory: a restart signs everyone out, which is the safe direction."""

    def __init__(self, idle: float, absolute: float, max_sessions: int = 100_000) -> None:
        self.idle = idle
        self.absolute = absolute
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def get(self, session_id: str | None, now: float) -> Session | None:
        """The live session for a cookie value (touching it), or None."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        limit = self.absolute if session.user else self.idle
        if now - session.last_seen > self.idle or now - session.created > limit:
            del self._sessions[session_id]
            return None
        session.last_seen = now
        self._sessions.move_to_end(session_id)
        return session

    def new(self, user: str, now: float) -> Session:
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), user, now, now)
        self._sessions[session.id] = session
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return session

    def sign_in(self, old: Session | None, user: str, now: float) -> Session:
        """Rotate: the pre-sign-in id is dropped and a fresh id is issued."""
        if old is not None:
            self._sessions.pop(old.id, None)
        return self.new(user, now)

    def end(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def end_user(self, user: str) -> None:
        """Sign a user out everywhere (deleted, or their password changed by an admin)."""
        for sid in [s.id for s in self._sessions.values() if s.user == user]:
            del self._sessions[sid]

    def __len__(self) -> int:
        return len(self._sessions)


class SignInThrottle:
    """The TVS throttle's rules for sign-in: per user name and per source address."""

    def __init__(self, budget: int, source_budget: int, window: float) -> None:
        self.by_user = Throttle(budget, window)
        self.by_source = Throttle(source_budget or budget, window)

    def wait(self, user: str, source: str, now: float) -> float:
        return max(
            self.by_user.locked_for("user:" + user.lower(), now),
            self.by_source.locked_for("src:" + source, now),
        )

    def failure(self, user: str, source: str, now: float) -> None:
        self.by_user.failure("user:" + user.lower(), now)
        self.by_source.failure("src:" + source, now)
