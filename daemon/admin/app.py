"""The admin application layer: what an admin may do, checked and audited in one place.

Every front door (the UNIX-socket API today; an HTTPS REST API and a web console later)
turns its request into a call on :class:`AdminApp` with an :class:`Actor` saying who is
asking. The app checks permissions, asks the registry, writes the audit line and returns
plain results (the front door shapes them as JSON or HTML). Refusals are :class:`Problem`
errors carrying an HTTP status, a title and a detail, ready for RFC 9457 problem JSON.

Every method returns a Deferred: writes complete only once the store has committed them,
and a front door never needs to know which calls could have answered at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from callboard.protocols.models import MODELS
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.python.failure import Failure

from ..logs import get_logger
from ..registry.model import (
    ActivationCode,
    Conflict,
    Device,
    Line,
    NotFound,
    Onboarding,
    RegistryError,
    model_info,
)
from ..registry.registry import BulkError, DeviceSpec, Registry
from ..registry.store import StoreError
from .csvio import ImportRow, row_to_spec

__all__ = [
    "Actor",
    "AdminApp",
    "CodeView",
    "DefaultView",
    "DeviceView",
    "ImportResult",
    "Problem",
    "Registrations",
    "StatusView",
]

log = get_logger("callboard.admin")

Registrations = Callable[[str], list[dict[str, Any]]]
T = TypeVar("T")
R = TypeVar("R")


# -- who is asking, and how a refusal looks -------------------------------------------------


@dataclass(frozen=True)
class Actor:
    """Who is asking: the name the audit log records, whether they may change things, and
    through which front door (``unix-socket``, later ``https-token`` or ``web-session``)."""

    name: str
    is_admin: bool
    via: str
    uid: int | None = None  # the peer's uid when the transport proves it (SO_PEERCRED)

    def audit_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"actor": self.name, "via": self.via}
        if self.uid is not None:
            fields["actor_uid"] = self.uid
        return fields


class Problem(Exception):
    """A refusal with what RFC 9457 problem JSON needs; ``detail`` is safe to show.

    ``extensions`` carries extra members (for an import: the bad rows).
    """

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        type: str = "about:blank",
        extensions: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type
        self.extensions: dict[str, Any] = dict(extensions or {})

    @classmethod
    def bad_request(cls, detail: str, **extensions: Any) -> Problem:
        return cls(400, "Bad request", detail, extensions=extensions)

    @classmethod
    def not_found(cls, detail: str) -> Problem:
        return cls(404, "Not found", detail)

    @classmethod
    def forbidden(cls, detail: str) -> Problem:
        return cls(403, "Forbidden", detail)

    @classmethod
    def conflict(cls, detail: str) -> Problem:
        return cls(409, "Conflict", detail)

    @classmethod
    def invalid_rows(cls, detail: str, problems: list[dict[str, Any]]) -> Problem:
        return cls(422, "Invalid rows", detail, extensions={"problems": problems})


def problem_from(error: BaseException) -> Problem | None:
    """The problem a registry refusal maps to (None: not a refusal, an internal failure)."""
    if isinstance(error, Problem):
        return error
    if isinstance(error, BulkError):
        rows = [{"index": i, "message": m} for i, m in error.problems]
        return Problem(422, "Invalid rows", str(error), extensions={"problems": rows})
    if isinstance(error, NotFound):
        return Problem.not_found(str(error))
    if isinstance(error, Conflict):  # Stale too: another writer got there first
        return Problem.conflict(str(error))
    if isinstance(error, RegistryError):
        return Problem.bad_request(str(error))
    if isinstance(error, StoreError):  # the database is down: nothing was written
        return Problem(503, "Registry unavailable", str(error))
    return None


# -- results (front doors shape them) -------------------------------------------------------


@dataclass(frozen=True)
class DeviceView:
    """A device as an admin sees it; ``code`` digits are shown only when ``reveal_code``."""

    device: Device
    code: ActivationCode | None
    reveal_code: bool
    as_of: float  # the time the code's effective state is judged at
    registrations: list[dict[str, Any]] | None = None  # set for the detailed view only
    onboarding: str = ""  # the method in force (its own, else its model's); detail only
    onboarding_own: bool = False  # the device's own method, not its model's default
    bootstrap: str | None = None  # activation by voice: where it stands (detail, ivr only)

    @property
    def detail(self) -> bool:
        return self.registrations is not None


@dataclass(frozen=True)
class CodeView:
    device: Device
    code: ActivationCode
    reveal: bool
    as_of: float


@dataclass(frozen=True)
class DefaultView:
    model: str
    model_id: str
    onboarding: Onboarding


@dataclass(frozen=True)
class StatusView:
    devices: int
    service: dict[str, Any] = field(default_factory=dict)  # listeners and counters


@dataclass(frozen=True)
class ImportResult:
    devices: list[Device]


# -- the application ------------------------------------------------------------------------


class AdminApp:
    """The admin operations over the registry, for any front door.

    Reads need an actor (the audit of reads is left to the front door's access log, but a
    future read-only actor must not see codes); changes need an admin and are logged as
    ``admin change`` with the actor, never with a code or a password.

    ``known_user`` says whether a user name exists (the web's accounts); with it, a device's
    user must be one (None: any name is taken as it is).
    """

    def __init__(
        self,
        registry: Registry,
        registrations: Registrations = lambda _name: [],
        status: Callable[[], dict[str, Any] | Deferred[dict[str, Any]]] = dict,
        known_user: Callable[[str], bool] | None = None,
    ) -> None:
        self._registry = registry
        self._registrations = registrations
        self._status = status
        # Told the action of every change made (metrics); the audit line is logged anyway.
        self.on_change: Callable[[str], None] | None = None
        # Writes a consistent copy of the registry to a path (the store's backup).
        self.backup_to: Callable[[str], Deferred[None]] | None = None
        # Whether a user name exists (the web's accounts): a device's user must be one.
        self.known_user = known_user
        # Adds other nodes' registrations to a device's own (None: this process's only).
        self.cluster_registrations: (
            Callable[[str, list[dict[str, Any]]], Deferred[list[dict[str, Any]]]] | None
        ) = None

    # -- reads ---------------------------------------------------------------------------

    def status(self, actor: Actor) -> Deferred[StatusView]:
        # The service's status may be a Deferred (worker 0 asks the other workers for theirs).
        service = self._status()
        d = service if isinstance(service, Deferred) else succeed(service)
        return d.addCallback(lambda service: StatusView(len(self._registry), service))

    def list_devices(self, actor: Actor) -> Deferred[list[DeviceView]]:
        reg = self._registry
        return succeed([self._view(d, reveal_code=False) for d in reg.devices()])

    def show_device(self, actor: Actor, name: str) -> Deferred[DeviceView]:
        d = _attempt(lambda: self._view(self._registry.get(name), detail=True))
        more = self.cluster_registrations
        if more is None:
            return d

        def with_cluster(view: DeviceView) -> Deferred[DeviceView]:
            regs = more(view.device.name, view.registrations or [])
            return regs.addCallback(lambda all_regs: replace(view, registrations=all_regs))

        return d.addCallback(with_cluster)

    def view_code(self, actor: Actor, name: str) -> Deferred[CodeView]:
        """A device's latest code with its digits (admins only)."""

        def look() -> CodeView:
            _require_admin(actor, "see activation codes")
            reg = self._registry
            device = reg.get(name)
            code = reg.current_code(device)
            if code is None:
                raise Problem.not_found(f"{device.name} has no activation code")
            return CodeView(device, code, True, reg.now())

        return _attempt(look)

    def export_codes(self, actor: Actor) -> Deferred[list[tuple[Device, ActivationCode]]]:
        """Every outstanding code with its device (admins only), for the export CSV."""

        def look() -> list[tuple[Device, ActivationCode]]:
            _require_admin(actor, "export activation codes")
            return self._registry.outstanding_codes()

        return _attempt(look)

    def list_defaults(self, actor: Actor) -> Deferred[list[DefaultView]]:
        return succeed(
            [
                DefaultView(model, MODELS[model].model_id, onboarding)
                for model, onboarding in self._registry.defaults().items()
            ]
        )

    # -- changes -------------------------------------------------------------------------

    def add_device(self, actor: Actor, spec: DeviceSpec) -> Deferred[DeviceView]:
        def audit(device: Device) -> DeviceView:
            self._audit(actor, "device.add", device=device.name, model=device.model)
            return self._view(device, reveal_code=True)

        def start() -> Deferred[Device]:
            self._check_user(spec.owner_user)
            _check_lengths(spec.description, spec.lines)
            return self._registry.add_device(spec)

        return self._change(actor, start, audit)

    def update_device(
        self,
        actor: Actor,
        name: str,
        *,
        description: str | None = None,
        owner_user: str | None = None,
        lines: Sequence[Line] | None = None,
    ) -> Deferred[DeviceView]:
        """Edit a device's description, user or lines (None leaves a field as it is).

        A line given without a password keeps the one its directory number had (a new
        password replaces it), so a form that never shows passwords can be sent back as is.
        """

        def start() -> Deferred[Device]:
            if owner_user is not None:
                self._check_user(owner_user)
            _check_lengths(description, lines or ())
            kept: list[Line] | None = None
            if lines is not None:
                old = {ln.directory_number: ln for ln in self._registry.get(name).lines}
                kept = [_keep_password(ln, old) for ln in lines]
            return self._registry.update_device(
                name, description=description, owner_user=owner_user, lines=kept
            )

        def audit(device: Device) -> DeviceView:
            changed = [
                key
                for key, value in (
                    ("description", description),
                    ("user", owner_user),
                    ("lines", lines),
                )
                if value is not None
            ]
            extra = {"owner": owner_user} if owner_user is not None else {}
            self._audit(actor, "device.update", device=device.name, changed=changed, **extra)
            return self._view(device, reveal_code=False)

        return self._change(actor, start, audit)

    def import_devices(
        self, actor: Actor, rows: Sequence[ImportRow], *, dummy_mac: bool
    ) -> Deferred[ImportResult]:
        """All rows or none; a refusal lists every bad row by its line number."""
        return self._change(
            actor, lambda: self._import(rows, dummy_mac), lambda r: self._imported(actor, r)
        )

    def delete_device(self, actor: Actor, name: str) -> Deferred[DeviceView]:
        def audit(device: Device) -> DeviceView:
            self._audit(actor, "device.delete", device=device.name)
            return self._view(device, reveal_code=False, gone=True)

        return self._change(actor, lambda: self._registry.delete(name), audit)

    def set_mac(self, actor: Actor, name: str, mac: str | None) -> Deferred[DeviceView]:
        """Give a placeholder its MAC, or blank a device's MAC (None) to re-onboard it."""
        old: list[str] = []

        def start() -> Deferred[Device]:
            old.append(self._registry.get(name).name)
            return self._registry.set_mac(name, mac)

        def audit(device: Device) -> DeviceView:
            self._audit(actor, "device.set-mac", device=old[0], renamed_to=device.name)
            return self._view(device, reveal_code=True)

        return self._change(actor, start, audit)

    def set_requires_activation(
        self, actor: Actor, name: str, required: bool
    ) -> Deferred[DeviceView]:
        def audit(device: Device) -> DeviceView:
            self._audit(actor, "device.require-activation", device=device.name, required=required)
            return self._view(device, reveal_code=True)

        return self._change(
            actor, lambda: self._registry.set_requires_activation(name, required), audit
        )

    def set_allow_remote(self, actor: Actor, name: str, allowed: bool) -> Deferred[DeviceView]:
        """Allow or forbid activation through the edge (forbidding ends the device's tokens)."""

        def audit(device: Device) -> DeviceView:
            self._audit(actor, "device.allow-remote", device=device.name, allowed=allowed)
            return self._view(device, reveal_code=False)

        return self._change(actor, lambda: self._registry.set_allow_remote(name, allowed), audit)

    def revoke_tokens(self, actor: Actor, name: str) -> Deferred[DeviceView]:
        """Every OAuth token of the device fails from now on."""

        def audit(device: Device) -> DeviceView:
            generation = device.token_generation
            self._audit(actor, "device.revoke-tokens", device=device.name, generation=generation)
            return self._view(device, reveal_code=False, detail=True)

        return self._change(actor, lambda: self._registry.revoke_tokens(name), audit)

    def release_code(self, actor: Actor, name: str) -> Deferred[CodeView]:
        """Void a device's outstanding code; the view does not show the digits."""
        device: list[Device] = []

        def start() -> Deferred[ActivationCode]:
            device.append(self._registry.get(name))
            return self._registry.release_code(name)

        def audit(code: ActivationCode) -> CodeView:
            self._audit(actor, "code.release", device=device[0].name)
            return CodeView(device[0], code, False, self._registry.now())

        return self._change(actor, start, audit)

    def generate_code(self, actor: Actor, name: str) -> Deferred[CodeView]:
        """Issue a new code (voiding the old one); the view shows the new digits."""

        def audit(result: tuple[Device, ActivationCode]) -> CodeView:
            device, code = result
            self._audit(actor, "code.generate", device=device.name)
            return CodeView(device, code, True, self._registry.now())

        return self._change(actor, lambda: self._registry.generate_code(name), audit)

    def set_default(
        self, actor: Actor, model: str, onboarding: Onboarding
    ) -> Deferred[DefaultView]:
        resolved: list[str] = []  # the model's canonical name, once known

        def start() -> Deferred[None]:
            info = model_info(model)
            resolved.append(info.name)
            return self._registry.set_default(info.name, onboarding)

        def audit(_: object) -> DefaultView:
            self._audit(actor, "defaults.set", model=model, onboarding=onboarding.value)
            return DefaultView(model, MODELS[resolved[0]].model_id, onboarding)

        return self._change(actor, start, audit)

    # -- internals -----------------------------------------------------------------------

    def _change(
        self,
        actor: Actor,
        start: Callable[[], Deferred[R]],
        done: Callable[[R], T],
    ) -> Deferred[T]:
        """Check the actor may change things, run the registry call, audit on success."""
        try:
            _require_admin(actor, "change the registry")
        except Problem as exc:
            return fail(exc)
        try:
            d = start()
        except RegistryError as exc:
            d = fail(exc)
        return d.addCallbacks(done, _as_problem)

    def _import(self, rows: Sequence[ImportRow], dummy_mac: bool) -> Deferred[list[Device]]:
        specs: list[DeviceSpec] = []
        lines: list[int] = []
        problems: list[dict[str, Any]] = []
        for row in rows:
            try:
                spec = row_to_spec(row.cells, dummy_mac=dummy_mac)
                self._check_user(spec.owner_user)
                _check_lengths(spec.description, spec.lines)
                specs.append(spec)
                lines.append(row.line)
            except RegistryError as exc:
                problems.append({"line": row.line, "message": str(exc)})
        # With bad rows already found, still check the good ones (without writing) so that
        # one run reports every bad row.
        d: Deferred[list[Device]] = maybeDeferred(
            self._registry.add_devices, specs, dry_run=bool(problems)
        )

        def judged(result: list[Device] | Failure) -> list[Device]:
            found = list(problems)
            if isinstance(result, Failure):
                if not result.check(BulkError):
                    result.raiseException()
                error = result.value
                assert isinstance(error, BulkError)
                found += [{"line": lines[i], "message": m} for i, m in error.problems]
            if found:
                found.sort(key=lambda p: p["line"])
                raise Problem.invalid_rows(f"{len(found)} bad row(s); nothing was imported", found)
            assert not isinstance(result, Failure)
            return result

        return d.addBoth(judged)

    def _check_user(self, name: str) -> None:
        """A device's user must exist (when this app knows the users)."""
        name = name.strip()
        if name and self.known_user is not None and not self.known_user(name):
            raise RegistryError(f"no user named {name!r}; add the user first")

    def _imported(self, actor: Actor, devices: list[Device]) -> ImportResult:
        self._audit(actor, "import", devices=len(devices))
        return ImportResult(devices)

    def _view(
        self,
        device: Device,
        *,
        reveal_code: bool = False,
        detail: bool = False,
        gone: bool = False,
    ) -> DeviceView:
        reg = self._registry
        if gone:
            code = None
        elif reveal_code:
            code = reg.outstanding_code(device)
        else:
            code = reg.current_code(device)
        registrations = self._registrations(device.name) if detail else None
        view = DeviceView(device, code, reveal_code, reg.now(), registrations)
        if detail and not gone:
            view = self._onboarding_view(view)
        return view

    def _onboarding_view(self, view: DeviceView) -> DeviceView:
        """The onboarding method in force and, for activation by voice, the bootstrap
        account's state: waiting (registered or not), used (activated by voice) or none."""
        device, reg = view.device, self._registry
        method = reg.onboarding_of(device)
        bootstrap: str | None = None
        if method is Onboarding.IVR and device.is_placeholder:
            bootstrap = "any unknown phone may claim it by voice (when ivr.unknown_phones)"
        elif method is Onboarding.IVR and reg.outstanding_code(device) is not None:
            account = "bootstrap-" + device.name[3:].lower()
            bound = self._registrations(account)
            where = f"registered from {bound[0]['source']}" if bound else "not registered"
            bootstrap = f"waiting for the activation call ({account}, {where})"
        elif device.mic_sha256 == "ivr":
            bootstrap = "used: activated by voice"
        elif method is Onboarding.IVR:
            bootstrap = "none (no code waiting)"
        return replace(view, onboarding=method.value, onboarding_own=device.onboarding is not None,
                       bootstrap=bootstrap)  # fmt: skip

    def _audit(self, actor: Actor, action: str, **fields: Any) -> None:
        log.info("admin change", action=action, **actor.audit_fields(), **fields)
        if self.on_change is not None:
            self.on_change(action)

    def backup(self, actor: Actor, path: str) -> Deferred[dict[str, Any]]:
        """A consistent online copy of the registry at ``path`` (admins only)."""
        _require_admin(actor, "back up the registry")
        if self.backup_to is None:
            return fail(Problem(501, "Not implemented", "this daemon cannot make backups"))

        def written(_: object) -> dict[str, Any]:
            log.info("registry backed up", file=path, **actor.audit_fields())
            return {"file": path, "devices": len(self._registry)}

        def refused(failure: Failure) -> Failure:
            error = failure.value
            if isinstance(error, OSError | ValueError):
                why = getattr(error, "strerror", None) or str(error)
                return Failure(Problem.bad_request(f"cannot write {path}: {why}"))
            return failure

        return self.backup_to(path).addCallbacks(written, refused)


def _keep_password(line: Line, old: Mapping[str, Line]) -> Line:
    """A line without a password keeps the password its directory number had."""
    if line.auth_password:
        return line
    before = old.get(line.directory_number.strip())
    return replace(line, auth_password=before.auth_password) if before else line


def _require_admin(actor: Actor, what: str) -> None:
    if not actor.is_admin:
        raise Problem.forbidden(f"{actor.name or 'this actor'} may not {what}")


def _as_problem(failure: Failure) -> Failure:
    """Registry refusals become problems; anything else stays an internal failure."""
    problem = problem_from(failure.value) if failure.value is not None else None
    return Failure(problem) if problem is not None else failure


def _attempt(look: Callable[[], T]) -> Deferred[T]:
    try:
        return succeed(look())
    except (Problem, RegistryError) as exc:
        problem = problem_from(exc)
        assert problem is not None
        return fail(problem)


#: The longest description and line display name wherever a device is added or edited (CLI,
#: console, REST API, CSV import), as the REST API's schema has them; the others took any
#: length, and a description becomes the phone's label in its configuration file.
MAX_DESCRIPTION = 200
MAX_DISPLAY_NAME = 100


def _check_lengths(description: str | None, lines: Sequence[Line]) -> None:
    if description is not None and len(description) > MAX_DESCRIPTION:
        raise RegistryError(f"the description is longer than {MAX_DESCRIPTION} characters")
    for line in lines:
        if len(line.display_name) > MAX_DISPLAY_NAME:
            raise RegistryError(
                f"line {line.directory_number}: the display name is longer than "
                f"{MAX_DISPLAY_NAME} characters"
            )
