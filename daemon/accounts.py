"""Users, API tokens, a user's own phones and codes by email: the application layer.

Like :class:`~callboard.daemon.admin.app.AdminApp` (whose :class:`Actor` and
:class:`Problem` it shares), every front door (the UNIX socket, the REST API, the web
console, Self-Care) calls these methods with who is asking; changes need an admin and are
logged as ``admin change`` with the actor, never with a password, token or code. Every
method returns a Deferred; password hashing and SQLite writes happen on worker threads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.python.failure import Failure

from .admin.app import Actor, Problem, problem_from
from .logs import get_logger
from .registry.accounts import (
    AccountStore,
    ApiToken,
    User,
    check_email,
    check_password,
    check_token_name,
    check_user_name,
    hash_password,
    new_token,
    token_digest,
    updated_user,
    verify_password,
)
from .registry.model import ActivationCode, Device, RegistryError
from .registry.registry import Registry

log = get_logger("callboard.admin")


class CodeMailer(Protocol):
    """Sends one device's code to its user (see :mod:`callboard.daemon.mail`)."""

    def send_code(
        self, to: str, user: User, device: Device, code: ActivationCode
    ) -> Deferred[None]: ...


@dataclass(frozen=True)
class OwnDevice:
    """A phone as its user sees it; ``code`` is the outstanding code, if any."""

    device: Device
    code: ActivationCode | None


@dataclass(frozen=True)
class CreatedToken:
    token: ApiToken
    secret: str  # shown once, never stored


@dataclass(frozen=True)
class SentCode:
    device: str
    to: str
    expires_at: float


class AccountsApp:
    def __init__(
        self, registry: Registry, store: AccountStore, mailer: CodeMailer | None = None
    ) -> None:
        self.registry = registry
        self.store = store
        self.mailer = mailer

    # -- users ----------------------------------------------------------------------------

    def list_users(self, actor: Actor) -> Deferred[list[User]]:
        return succeed(sorted(self.store.users.values(), key=lambda u: u.name))

    def get_user(self, actor: Actor, name: str) -> Deferred[User]:
        user = self.store.user(name)
        if user is None:
            return fail(Problem.not_found(f"no user named {name!r}"))
        if not actor.is_admin and actor.name != name:
            return fail(Problem.forbidden(f"{actor.name} may not see other users"))
        return succeed(user)

    def knows_user(self, name: str) -> bool:
        return self.store.user(name) is not None

    def owned_devices(self, name: str) -> list[Device]:
        return [d for d in self.registry.devices() if d.owner_user == name]

    def add_user(
        self,
        actor: Actor,
        name: str,
        *,
        is_admin: bool = False,
        email: str = "",
        display_name: str = "",
        password: str | None = None,
    ) -> Deferred[User]:
        try:
            _require_admin(actor, "add users")
            name = check_user_name(name)
            email = check_email(email)
            if password is not None:
                check_password(password)
            if len(display_name) > 200:
                raise RegistryError("the display name is longer than 200 characters")
            if self.store.user(name) is not None:
                raise Problem.conflict(f"a user named {name!r} already exists")
        except (Problem, RegistryError) as exc:
            return fail(_problem(exc))
        now = self.store.now()
        user = User(name, display_name.strip(), email, is_admin, "", now, now)

        def hashed(password_hash: str) -> Deferred[User]:
            if self.store.user(name) is not None:  # added meanwhile
                raise Problem.conflict(f"a user named {name!r} already exists")
            return self.store.put_user(updated_user(user, now, password_hash=password_hash))

        d: Deferred[str] = (
            self.store.in_thread(hash_password, password) if password else succeed("")
        )
        d2 = d.addCallback(hashed)
        return d2.addCallback(self._audited(actor, "user.add", user=name, admin=is_admin))

    def set_password(self, actor: Actor, name: str, password: str) -> Deferred[User]:
        """An admin sets anyone's password; a user may set their own."""
        try:
            if not actor.is_admin and actor.name != name:
                raise Problem.forbidden(f"{actor.name} may not set another user's password")
            check_password(password)
            if self.store.user(name) is None:
                raise Problem.not_found(f"no user named {name!r}")
        except (Problem, RegistryError) as exc:
            return fail(_problem(exc))

        def store(password_hash: str) -> Deferred[User]:
            user = self.store.user(name)
            if user is None:
                raise Problem.not_found(f"no user named {name!r}")
            changed = updated_user(user, self.store.now(), password_hash=password_hash)
            return self.store.put_user(changed)

        d = self.store.in_thread(hash_password, password).addCallback(store)
        return d.addCallback(self._audited(actor, "user.set-password", user=name))

    def update_user(
        self,
        actor: Actor,
        name: str,
        *,
        is_admin: bool | None = None,
        email: str | None = None,
        display_name: str | None = None,
    ) -> Deferred[User]:
        try:
            _require_admin(actor, "change users")
            user = self.store.user(name)
            if user is None:
                raise Problem.not_found(f"no user named {name!r}")
            changes: dict[str, Any] = {}
            if is_admin is not None:
                changes["is_admin"] = is_admin
            if email is not None:
                changes["email"] = check_email(email)
            if display_name is not None:
                changes["display_name"] = display_name.strip()[:200]
        except (Problem, RegistryError) as exc:
            return fail(_problem(exc))
        d = self.store.put_user(updated_user(user, self.store.now(), **changes))
        return d.addCallback(self._audited(actor, "user.update", user=name, **changes))

    def delete_user(self, actor: Actor, name: str, *, force: bool = False) -> Deferred[User]:
        """Refused while the user owns phones, unless ``force``: then the phones lose their
        user first (each a conditional registry write), and only then is the user deleted."""
        try:
            _require_admin(actor, "delete users")
            user = self.store.user(name)
            if user is None:
                raise Problem.not_found(f"no user named {name!r}")
            owned = self.owned_devices(name)
            if owned and not force:
                raise Problem.conflict(
                    f"{name} owns {len(owned)} device(s) ({owned[0].name}…); "
                    "delete or reassign them first, or force"
                )
        except Problem as exc:
            return fail(exc)
        d = ensureDeferred(self._disown(actor, owned))
        d.addErrback(_as_problem)
        d.addCallback(lambda _: self.store.delete_user(name))
        d.addCallback(lambda _: user)
        return d.addCallback(
            self._audited(actor, "user.delete", user=name, force=force, devices=len(owned))
        )

    async def _disown(self, actor: Actor, devices: list[Device]) -> None:
        for device in devices:
            changed = await self.registry.update_device(device.name, owner_user="")
            log.info(
                "admin change",
                action="device.update",
                **actor.audit_fields(),
                device=changed.name,
                changed=["user"],
                owner="",
            )

    def authenticate(self, name: str, password: str) -> Deferred[User | None]:
        """The user if the password matches; None otherwise (same time either way)."""
        user = self.store.user(name)
        stored = user.password_hash if user is not None else None
        d = self.store.in_thread(verify_password, stored, password[:1024])
        return d.addCallback(lambda ok: self.store.user(name) if ok else None)

    # -- API tokens -------------------------------------------------------------------------

    def list_tokens(self, actor: Actor) -> Deferred[list[ApiToken]]:
        try:
            _require_admin(actor, "list API tokens")
        except Problem as exc:
            return fail(exc)
        return succeed(sorted(self.store.tokens.values(), key=lambda t: t.name))

    def create_token(
        self, actor: Actor, name: str, *, read_only: bool = False, user: str = ""
    ) -> Deferred[CreatedToken]:
        try:
            _require_admin(actor, "create API tokens")
            name = check_token_name(name)
            if name in self.store.tokens:
                raise Problem.conflict(f"a token named {name!r} already exists")
            if user and self.store.user(user) is None:
                raise Problem.not_found(f"no user named {user!r}")
        except (Problem, RegistryError) as exc:
            return fail(_problem(exc))
        secret = new_token()
        token = ApiToken(name, token_digest(secret), read_only, user, actor.name, self.store.now())
        d = self.store.put_token(token).addCallback(lambda t: CreatedToken(t, secret))
        return d.addCallback(
            self._audited(actor, "token.create", token=name, read_only=read_only, user=user)
        )

    def revoke_token(self, actor: Actor, name: str) -> Deferred[ApiToken]:
        try:
            _require_admin(actor, "revoke API tokens")
            token = self.store.tokens.get(name)
            if token is None:
                raise Problem.not_found(f"no token named {name!r}")
        except Problem as exc:
            return fail(exc)
        d = self.store.delete_token(name).addCallback(lambda _: token)
        return d.addCallback(self._audited(actor, "token.revoke", token=name))

    def actor_for_token(self, secret: str) -> Actor | None:
        """Who a bearer token acts as: its user, or a service actor named after it."""
        token = self.store.token_for(secret)
        if token is None:
            return None
        if token.user_name:
            user = self.store.user(token.user_name)
            if user is None:
                return None
            return Actor(user.name, user.is_admin and not token.read_only, "https-token")
        return Actor(f"token:{token.name}", not token.read_only, "https-token")

    def token_is_read_only(self, secret: str) -> bool:
        token = self.store.token_for(secret)
        return token is None or token.read_only

    # -- a user's own phones ------------------------------------------------------------------

    def own_devices(self, actor: Actor) -> Deferred[list[OwnDevice]]:
        """The actor's phones with their outstanding codes; nobody else's, ever."""
        reg = self.registry
        return succeed(
            [OwnDevice(d, reg.outstanding_code(d)) for d in self.owned_devices(actor.name)]
        )

    # -- codes by email ---------------------------------------------------------------------

    def send_code(self, actor: Actor, device_name: str) -> Deferred[SentCode]:
        """Email a device's outstanding code to its user; a failure leaves the code valid."""
        try:
            _require_admin(actor, "send activation codes")
            device = self.registry.get(device_name)
            code = self.registry.outstanding_code(device)
            if code is None:
                raise Problem.conflict(f"{device.name} has no outstanding activation code")
            if not device.owner_user:
                raise Problem.conflict(f"{device.name} has no user to send the code to")
            user = self.store.user(device.owner_user)
            if user is None:
                raise Problem.conflict(f"{device.name}'s user {device.owner_user!r} is unknown")
            if not user.email:
                raise Problem.conflict(f"user {user.name} has no email address")
            if self.mailer is None:
                raise Problem.conflict("no SMTP server is configured (smtp.host)")
        except (Problem, RegistryError) as exc:
            return fail(_problem(exc))
        d = self.mailer.send_code(user.email, user, device, code)

        def failed(failure: Failure) -> Failure:
            log.warning(
                "code email failed",
                device=device.name,
                user=user.name,
                error=failure.getErrorMessage()[:200],
            )
            return Failure(
                Problem(
                    502,
                    "Mail not sent",
                    f"the SMTP server did not take the message: "
                    f"{failure.getErrorMessage()[:200]}; the code stays valid",
                )
            )

        d.addErrback(failed)
        d2 = d.addCallback(lambda _: SentCode(device.name, user.email, code.expires_at))
        return d2.addCallback(self._audited(actor, "code.send", device=device.name, user=user.name))

    # -- internals ---------------------------------------------------------------------------

    def _audited(self, actor: Actor, action: str, **fields: Any) -> Callable[[Any], Any]:
        def audit(result: Any) -> Any:
            log.info("admin change", action=action, **actor.audit_fields(), **fields)
            return result

        return audit


def _require_admin(actor: Actor, what: str) -> None:
    if not actor.is_admin:
        raise Problem.forbidden(f"{actor.name or 'this actor'} may not {what}")


def _as_problem(failure: Failure) -> Failure:
    """Registry refusals become problems; anything else stays an internal failure."""
    problem = problem_from(failure.value) if failure.value is not None else None
    return Failure(problem) if problem is not None else failure


def _problem(exc: Problem | RegistryError) -> Problem:
    return problem_from(exc) or Problem.bad_request(str(exc))
