"""Who is asking over HTTPS: a browser session or a bearer token, turned into an Actor."""

from __future__ import annotations

from dataclasses import dataclass

from ..accounts import AccountsApp
from ..admin.app import Actor, Problem
from ..logs import get_logger
from ..registry.accounts import User
from .core import Ctx
from .sessions import COOKIE, Session, SessionStore, SignInThrottle

log = get_logger("callboard.web")

SIGN_IN_FAILED = "Sign-in failed: wrong user name or password."


@dataclass
class WebAuth:
    accounts: AccountsApp
    sessions: SessionStore
    throttle: SignInThrottle

    def session(self, ctx: Ctx) -> Session:
        """The request's session; a new anonymous one (with a cookie) if it has none."""
        raw = ctx.request.getCookie(COOKIE.encode())
        session = self.sessions.get(raw.decode("latin-1") if raw else None, ctx.now)
        if session is not None and session.user and self.accounts.store.user(session.user) is None:
            self.sessions.end(session)  # the user was deleted
            session = None
        if session is None:
            session = self.sessions.new("", ctx.now)
            ctx.new_cookie = session.id
        ctx.session = session
        return session

    def existing_session(self, ctx: Ctx) -> Session | None:
        raw = ctx.request.getCookie(COOKIE.encode())
        session = self.sessions.get(raw.decode("latin-1") if raw else None, ctx.now)
        if session is not None and session.user and self.accounts.store.user(session.user):
            ctx.session = session
            return session
        return None

    def user_of(self, session: Session | None) -> User | None:
        if session is None or not session.user:
            return None
        return self.accounts.store.user(session.user)

    @staticmethod
    def actor_of(user: User) -> Actor:
        return Actor(user.name, user.is_admin, "web-session")

    async def sign_in(self, ctx: Ctx, name: str, password: str) -> User:
        """Check the password (off the reactor) under the throttle; rotate the session."""
        name = name.strip()[:64]
        wait = self.throttle.wait(name, ctx.source, ctx.now)
        if wait > 0:
            log.info("web sign-in throttled", user=name, source=ctx.source)
            retry = f"Too many failed sign-ins; try again in {int(wait) + 1} s."
            raise Problem(429, "Too many attempts", retry)
        user = await self.accounts.authenticate(name, password)
        if user is None:
            self.throttle.failure(name, ctx.source, ctx.now)
            log.info("web sign-in failed", user=name, source=ctx.source)
            raise Problem(401, "Sign-in failed", SIGN_IN_FAILED)
        session = self.sessions.sign_in(ctx.session, user.name, ctx.now)
        ctx.session = session
        ctx.new_cookie = session.id
        log.info("web sign-in", user=user.name, source=ctx.source)
        return user

    def sign_out(self, ctx: Ctx) -> None:
        if ctx.session is not None:
            self.sessions.end(ctx.session)
        session = self.sessions.new("", ctx.now)
        ctx.session = session
        ctx.new_cookie = session.id
