"""The device registry: the one place that changes device and code state.

Reads come from memory. Every change is planned from memory, then written through the
:class:`Store` as one conditional transaction (each row as it was read: a device's version, a
code still issued, unexpired and with the digits given), and only once that commit is durable
is memory updated from the very same change list. Memory never runs ahead of the disk; a write
whose condition fails leaves both untouched and the caller gets a refusal.

Other writers (processes sharing the file) reach this view through the store's change feed:
:meth:`Registry.refresh` re-reads what they changed. Listeners hear of each device change,
whoever made it (the registrar drops bindings, the file service re-renders).

The feed is bounded (:meth:`Registry.prune_feed`, run periodically): a row is kept while it
is among the newest ``feed_keep_rows`` or younger than ``feed_keep_seconds``. A view whose
position fell behind the kept rows (a process stopped for longer, a node cut off) cannot
trust the feed; it resynchronises from a full snapshot read off the reactor, diffs it
against memory (listeners hear of every difference as of any other change) and tells the
followers of other kinds (:meth:`Registry.on_resync`) to re-read everything.

Writes return Deferreds and never block the reactor.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import hmac
import secrets
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import ParamSpec, TypeVar

from callboard.protocols.models import MODELS
from callboard.protocols.settings import SettingError, check_range
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.python.failure import Failure

from ..logs import get_logger
from .model import (
    ActivationCode,
    CodeState,
    Conflict,
    Device,
    DeviceState,
    Line,
    NotFound,
    Onboarding,
    RegistryError,
    Stale,
    check_directory_number,
    model_info,
    new_bat_name,
    new_code,
    normalise_code,
    normalise_mac,
    sep_name,
)
from .store import (
    ABSENT,
    PRUNE_CHUNK,
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
    Store,
)

log = get_logger("callboard.registry")

Clock = Callable[[], float]
DeviceListener = Callable[[Device | None, Device | None], None]
Event = tuple[Device | None, Device | None]
P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class RegistrySettings:
    """The registry's rules; also the [registry] configuration section."""

    code_ttl_hours: float = 168.0
    unique_directory_numbers: bool = False
    feed_interval: float = 1.0  # seconds between change-feed polls (other writers' changes)
    # Change-feed retention: a row is kept while it is among the newest feed_keep_rows OR
    # younger than feed_keep_seconds; a follower behind that resynchronises from a snapshot.
    feed_keep_rows: int = 100_000
    feed_keep_seconds: float = 3600.0

    def validate(self) -> None:
        check_range("code_ttl_hours", self.code_ttl_hours, 0.01, 24 * 3650)
        check_range("feed_interval", self.feed_interval, 0.01, 3600)
        check_range("feed_keep_rows", self.feed_keep_rows, 1, 10**9)
        check_range("feed_keep_seconds", self.feed_keep_seconds, 60, 1e9)
        if self.feed_keep_seconds < 10 * self.feed_interval:
            # A live follower polls every feed_interval: its rows must outlive ten polls.
            raise SettingError(
                "feed_keep_seconds", "must be at least ten times feed_interval (ten polls)"
            )


@dataclass(frozen=True)
class DeviceSpec:
    """What an admin gives to create a device (one CLI call or one CSV row)."""

    model: str
    mac: str | None = None
    description: str = ""
    owner_user: str = ""
    lines: tuple[Line, ...] = ()
    requires_activation: bool | None = None  # None: follow the model's default
    allow_remote: bool = False  # may activate through the edge (remote activation)
    onboarding: Onboarding | None = None  # None: follow the model's default


@dataclass(frozen=True)
class Redeemed:
    """Outcome of a redemption; ``reason`` is for the audit log and never holds the code."""

    ok: bool
    reason: str
    device: Device | None = None


@dataclass(frozen=True)
class _Activation:
    """What redeeming a code writes: the code used, the device activated (and renamed)."""

    changes: list[Change]
    device: Device
    names: frozenset[str]  # a BAT record's new SEP name, claimed until the store answers


class BulkError(RegistryError):
    """Some rows of a bulk insert are bad; nothing was written."""

    def __init__(self, problems: list[tuple[int, RegistryError]]) -> None:
        self.errors = problems
        self.problems = [(index, str(error)) for index, error in problems]
        super().__init__(f"{len(problems)} bad row(s); nothing was imported")


def _fan_out(result: int | Failure, waiters: list[Deferred[int]]) -> None:
    for waiter in waiters:
        if isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)


def _refusals_as_failures(method: Callable[P, Deferred[R]]) -> Callable[P, Deferred[R]]:
    """A refusal found while planning fails the Deferred instead of raising at the caller."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Deferred[R]:
        try:
            return method(*args, **kwargs)
        except RegistryError as exc:
            return fail(exc)

    return wrapper


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Hold the cyclic garbage collector off while many long-lived objects are built.

    Every few hundred allocations of containers start a collection, and the full ones walk
    every object made so far: loading 100,000 devices spent more time there than in the load.
    Nothing made here is garbage, and reference counting still frees at once what dies.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Registry:
    def __init__(
        self, store: Store, clock: Clock, settings: RegistrySettings | None = None
    ) -> None:
        self._store = store
        self._clock = clock
        self.settings = settings or RegistrySettings()
        self._listeners: list[DeviceListener] = []
        self._feed_listeners: dict[str, list[Callable[[list[str]], object]]] = {}
        self._resync_listeners: list[Callable[[], object]] = []
        self._index_key = secrets.token_bytes(32)
        self._devices: dict[str, Device] = {}
        self._by_name: dict[str, str] = {}
        self._codes: dict[str, ActivationCode] = {}
        self._code_of_device: dict[str, str] = {}
        self._code_index: dict[bytes, str] = {}
        # Directory number -> how many devices have a line on it: all that is asked of it is
        # whether a number is taken, and a count (a shared small int) costs nothing per
        # device, where a set or tuple of ids cost 50-200 bytes each with 100,000 devices.
        self._dn_users: dict[str, int] = {}
        self._defaults: dict[str, Onboarding] = {}
        self.defaults_version = 0  # bumped on every change of a model's default
        # Names and directory numbers claimed by writes still on their way to the disk.
        self._pending_names: Counter[str] = Counter()
        self._pending_dns: Counter[str] = Counter()
        self._refreshing = False
        self._refresh_waiters: list[Deferred[int]] = []
        #: Other processes write this registry too (workers, nodes): a refusal decided from
        #: this view may only mean their change is not followed yet, so ``redeem`` and the
        #: readers that use :meth:`settled` read the feed once more before refusing.
        self.shared = False
        with _no_cyclic_gc():  # 100,000 new records: no point in scanning them as they come
            snapshot = store.load()
            self._load_devices(snapshot.devices)
            self._remember(
                [PutCode(c) for c in sorted(snapshot.codes, key=lambda c: c.issued_at)]
                + [PutDefault(m, o) for m, o in snapshot.defaults.items()]
            )
        self._seq = snapshot.seq

    # -- reads -------------------------------------------------------------------------

    def on_feed(self, kind: str, listener: Callable[[list[str]], object]) -> None:
        """Have ``listener`` told the keys of ``kind`` rows (``user``, ``token``) other writers
        changed, as the change feed brings them (the registry keeps no such rows)."""
        self._feed_listeners.setdefault(kind, []).append(listener)

    def on_resync(self, listener: Callable[[], object]) -> None:
        """Have ``listener`` told when this view resynchronised from a snapshot: the feed's
        rows it missed were pruned, so keys of other kinds (:meth:`on_feed`) may have been
        missed too and whoever keeps such rows must re-read them all."""
        self._resync_listeners.append(listener)

    def subscribe(self, listener: DeviceListener) -> None:
        self._listeners.append(listener)

    def devices(self) -> list[Device]:
        return sorted(self._devices.values(), key=lambda d: d.name)

    def __len__(self) -> int:
        return len(self._devices)

    def find(self, name: str) -> Device | None:
        device_id = self._by_name.get(name.strip().upper())
        return self._devices.get(device_id) if device_id else None

    def get(self, name: str) -> Device:
        device = self.find(name)
        if device is None:
            raise NotFound(f"no device named {name!r}")
        return device

    def current_code(self, device: Device) -> ActivationCode | None:
        """The device's latest code, whatever its state (None if it never had one)."""
        code_id = self._code_of_device.get(device.id)
        return self._codes.get(code_id) if code_id else None

    def outstanding_code(self, device: Device) -> ActivationCode | None:
        code = self.current_code(device)
        return code if code and code.is_outstanding(self._clock()) else None

    def outstanding_codes(self) -> list[tuple[Device, ActivationCode]]:
        now = self._clock()
        found = []
        for device_id, code_id in self._code_of_device.items():
            code = self._codes[code_id]
            if code.is_outstanding(now):
                found.append((self._devices[device_id], code))
        return sorted(found, key=lambda pair: pair[0].name)

    def onboarding(self, model: str) -> Onboarding:
        return self._defaults.get(model_info(model).name, Onboarding.ACTIVATION_CODE)

    def onboarding_of(self, device: Device) -> Onboarding:
        """The device's own onboarding method, else its model's default."""
        return device.onboarding or self.onboarding(device.model)

    def defaults(self) -> dict[str, Onboarding]:
        """Every supported model's onboarding method (activation code unless changed)."""
        return {name: self.onboarding(name) for name in MODELS}

    def directory_number_in_use(self, dn: str) -> bool:
        """Whether a device has the number, or a write still in flight claims it."""
        return dn in self._dn_users or self._pending_dns[dn] > 0

    def now(self) -> float:
        return self._clock()

    @property
    def seq(self) -> int:
        """The change-feed position this view has caught up with."""
        return self._seq

    # -- admin changes -----------------------------------------------------------------

    def add_device(self, spec: DeviceSpec) -> Deferred[Device]:
        def single(failure: Failure) -> Failure:
            error = failure.value
            if isinstance(error, BulkError):
                return Failure(error.errors[0][1])
            return failure

        d = self.add_devices([spec])
        d.addErrback(single)
        return d.addCallback(lambda created: created[0])

    @_refusals_as_failures
    def add_devices(
        self, specs: Sequence[DeviceSpec], *, dry_run: bool = False
    ) -> Deferred[list[Device]]:
        """Insert devices in one transaction: all of them, or none and a :class:`BulkError`.

        ``dry_run`` checks every spec against the registry and each other, writing nothing.
        """
        now = self._clock()
        problems: list[tuple[int, RegistryError]] = []
        created: list[Device] = []
        claimed_names: set[str] = set()
        claimed_dns: set[str] = set()
        for index, spec in enumerate(specs):
            try:
                device = self._new_device(spec, now)
                if device.name in claimed_names or self._name_taken(device.name):
                    raise Conflict(f"a device for MAC {device.mac} already exists")
                dns = {ln.directory_number for ln in device.lines}
                if self.settings.unique_directory_numbers:
                    taken = sorted(
                        dn for dn in dns if dn in claimed_dns or self.directory_number_in_use(dn)
                    )
                    if taken:
                        raise Conflict(f"directory number {taken[0]} is already in use")
            except RegistryError as exc:
                problems.append((index, exc))
                continue
            claimed_names.add(device.name)
            claimed_dns |= dns
            created.append(device)
        if problems:
            raise BulkError(problems)
        if dry_run:
            return succeed(created)
        # All devices, then all codes: each run is one batched statement in the store.
        changes: list[Change] = [PutDevice(d, expect_version=ABSENT) for d in created]
        changes += [PutCode(self._issue(d, now)) for d in created if d.requires_activation]
        d = self._commit(changes, names=claimed_names, dns=claimed_dns)
        return d.addCallback(lambda _: created)

    @_refusals_as_failures
    def set_mac(self, name: str, mac: str | None) -> Deferred[Device]:
        """Give a device its real MAC (BAT→SEP) or blank it (SEP→new BAT).

        Blanking the MAC of a device that requires activation puts it back to awaiting
        activation with a fresh code, as re-onboarding a replaced phone needs.
        """
        device = self.get(name)
        now = self._clock()
        changes: list[Change] = []
        if mac is None:
            if device.is_placeholder:
                return succeed(device)
            new = device.changed(
                now,
                name=self._unused_bat_name(),
                token_generation=device.token_generation + 1,
                mic_sha256=None,  # the pinned MIC goes with the phone (docs/REMOTE.md §9)
            )
            if new.requires_activation:
                new = replace(new, state=DeviceState.AWAITING_ACTIVATION, activated_at=None)
                changes.extend(self._void_code(new, now))
                changes.append(PutCode(self._issue(new, now)))
        else:
            target = sep_name(mac)
            if target == device.name:
                return succeed(device)
            if self._name_taken(target):
                raise Conflict(f"MAC {mac} already belongs to {target}")
            new = device.changed(now, name=target)
        d = self._commit(
            [PutDevice(new, expect_version=device.version), *changes], names={new.name}
        )
        return d.addCallback(lambda _: new)

    @_refusals_as_failures
    def set_requires_activation(self, name: str, required: bool) -> Deferred[Device]:
        device = self.get(name)
        if required:
            return self.generate_code(name).addCallback(lambda issued: issued[0])
        if not device.requires_activation:
            return succeed(device)
        now = self._clock()
        state = DeviceState.ACTIVE if device.activated_at else DeviceState.PROVISIONED
        new = device.changed(now, requires_activation=False, state=state)
        d = self._commit(
            [PutDevice(new, expect_version=device.version), *self._void_code(new, now)]
        )
        return d.addCallback(lambda _: new)

    @_refusals_as_failures
    def set_allow_remote(self, name: str, allowed: bool) -> Deferred[Device]:
        """Allow or forbid activation through the edge; forbidding also ends its tokens."""
        device = self.get(name)
        if device.allow_remote == allowed:
            return succeed(device)
        generation = device.token_generation + (0 if allowed else 1)
        new = device.changed(self._clock(), allow_remote=allowed, token_generation=generation)
        d = self._commit([PutDevice(new, expect_version=device.version)])
        return d.addCallback(lambda _: new)

    @_refusals_as_failures
    def revoke_tokens(self, name: str) -> Deferred[Device]:
        """Every OAuth token of the device fails from now on (its generation moves on), and
        its pinned MIC no longer opens the edge (cleared: re-activation pins one again)."""
        device = self.get(name)
        new = device.changed(
            self._clock(), token_generation=device.token_generation + 1, mic_sha256=None
        )
        d = self._commit([PutDevice(new, expect_version=device.version)])
        return d.addCallback(lambda _: new)

    @_refusals_as_failures
    def rotate_refresh(self, name: str, *, generation: int, serial: int) -> Deferred[Device]:
        """Spend the refresh token ``serial`` of ``generation``: durable before new tokens.

        A token already spent, or of an older generation, is refused (:class:`Stale`), and
        so is the loser of two concurrent refreshes (the store's version condition).
        """
        device = self.get(name)
        if device.token_generation != generation or device.refresh_serial != serial:
            raise Stale(f"refresh token of {device.name} is no longer current")
        new = device.changed(self._clock(), refresh_serial=serial + 1)
        d = self._commit([PutDevice(new, expect_version=device.version)])
        return d.addCallback(lambda _: new)

    @_refusals_as_failures
    def generate_code(self, name: str) -> Deferred[tuple[Device, ActivationCode]]:
        """Issue a new code, voiding the old one; the device must then (re-)activate.

        On an active device this is CUCM's re-onboarding: it goes back to awaiting
        activation at once, so its config is no longer served and its bindings drop.
        """
        device = self.get(name)
        now = self._clock()
        new = device.changed(
            now,
            requires_activation=True,
            state=DeviceState.AWAITING_ACTIVATION,
        )
        code = self._issue(new, now)
        d = self._commit(
            [
                PutDevice(new, expect_version=device.version),
                *self._void_code(new, now),
                PutCode(code),
            ]
        )
        return d.addCallback(lambda _: (new, code))

    @_refusals_as_failures
    def release_code(self, name: str) -> Deferred[ActivationCode]:
        """Void a device's outstanding code (CUCM's "Release Activation Code")."""
        device = self.get(name)
        now = self._clock()
        changes = self._void_code(device, now)
        if not changes:
            raise NotFound(f"{device.name} has no outstanding activation code")
        released = changes[0]
        assert isinstance(released, PutCode)
        return self._commit(changes).addCallback(lambda _: released.code)

    @_refusals_as_failures
    def update_device(
        self,
        name: str,
        *,
        description: str | None = None,
        owner_user: str | None = None,
        lines: Sequence[Line] | None = None,
    ) -> Deferred[Device]:
        """Change a device's description, owner or lines (None leaves a field as it is).

        Conditional on the version read, like every write: if another writer changed the
        device meanwhile nothing is written and the Deferred fails with :class:`Stale`.
        Lines are checked as for a new device; with unique directory numbers, a number the
        device did not have must be free.
        """
        device = self.get(name)
        changes: dict[str, object] = {}
        if description is not None:
            changes["description"] = description.strip()
        if owner_user is not None:
            changes["owner_user"] = owner_user.strip()
        added_dns: set[str] = set()
        if lines is not None:
            checked = self._checked_lines(lines)
            added_dns = {ln.directory_number for ln in checked} - {
                ln.directory_number for ln in device.lines
            }
            if self.settings.unique_directory_numbers:
                taken = sorted(dn for dn in added_dns if self.directory_number_in_use(dn))
                if taken:
                    raise Conflict(f"directory number {taken[0]} is already in use")
            changes["lines"] = checked
        if all(getattr(device, key) == value for key, value in changes.items()):
            return succeed(device)
        new = device.changed(self._clock(), **changes)
        d = self._commit([PutDevice(new, expect_version=device.version)], dns=added_dns)
        return d.addCallback(lambda _: new)

    @_refusals_as_failures
    def delete(self, name: str) -> Deferred[Device]:
        device = self.get(name)
        d = self._commit([DeleteDevice(device.id, expect_version=device.version)])
        return d.addCallback(lambda _: device)

    @_refusals_as_failures
    def set_default(self, model: str, onboarding: Onboarding) -> Deferred[None]:
        d = self._commit([PutDefault(model_info(model).name, onboarding)])
        return d.addCallback(lambda _: None)

    # -- phone-driven changes ------------------------------------------------------------

    def redeem(
        self, *, mac: str, model: str, code: str, mic_sha256: str, remote: bool = False
    ) -> Deferred[Redeemed]:
        """Redeem a code for a phone proven (by its MIC) to have ``mac`` and ``model``.

        The checks run on memory; the write is a compare-and-set in the store (the code still
        issued, unexpired and with these digits; the device at the version read). The code
        becomes used, a BAT record becomes SEP<mac>, the device becomes active with the MIC
        fingerprint recorded, and the Deferred fires once that is durable. A refusal decided
        from memory fires at once (no store round trip for a wrong guess) unless the registry
        is :attr:`shared`: then the view reads the change feed and checks once more, so a
        code issued through another worker or node a moment ago is found. ``remote``: the
        phone came through the edge, which the device must allow; every activation starts a
        new token generation (tokens of an earlier activation stop working).
        """
        plan = self._plan_redemption(mac, model, code, mic_sha256, remote)
        if isinstance(plan, Redeemed) and self.shared:  # perhaps news from another writer
            return self.settled().addCallback(
                lambda _: self._carry_out(
                    self._plan_redemption(mac, model, code, mic_sha256, remote)
                )
            )
        return self._carry_out(plan)

    def settled(self) -> Deferred[None]:
        """Fires once the view has read the change feed (at once when nobody else writes);
        a failed read is logged and the view stays as it was."""
        if not self.shared:
            return succeed(None)
        return self.follow()

    def _plan_redemption(
        self, mac: str, model: str, code: str, mic_sha256: str, remote: bool
    ) -> Redeemed | _Activation:
        """The checks of :meth:`redeem` on this view: a refusal, or what to commit."""
        now = self._clock()
        try:
            digits = normalise_code(code)
            mac = normalise_mac(mac)
            phone_model = model_info(model).name
        except RegistryError as exc:
            return Redeemed(False, str(exc))
        code_id = self._code_index.get(self._index_digest(digits))
        stored = self._codes.get(code_id) if code_id else None
        if stored is None or not hmac.compare_digest(stored.code, digits):
            return Redeemed(False, "unknown activation code")
        state = stored.effective_state(now)
        if state is not CodeState.ISSUED:
            return Redeemed(False, f"activation code is {state.value}")
        device = self._devices[stored.device_id]
        if device.is_placeholder:
            if device.model != phone_model:
                return Redeemed(False, f"code is bound to model {device.model}")
            target = "SEP" + mac
            if self._name_taken(target):
                return Redeemed(False, f"MAC {mac} already belongs to another device")
        else:
            if device.mac != mac:
                return Redeemed(False, f"code is bound to another MAC ({device.name})")
            if device.model != phone_model:
                return Redeemed(False, f"{device.name} is provisioned as model {device.model}")
            target = device.name
        if remote and not device.allow_remote:
            return Redeemed(False, f"remote activation not allowed for {device.name}")
        new = device.changed(
            now,
            name=target,
            state=DeviceState.ACTIVE,
            activated_at=now,
            mic_sha256=mic_sha256,
            token_generation=device.token_generation + 1,
        )
        used = replace(stored, state=CodeState.USED, used_at=now)
        # The code's condition first, so a lost race reads "activation code is used".
        changes: list[Change] = [
            PutCode(used, CodeExpectation(CodeState.ISSUED, digits=digits, live_at=now)),
            PutDevice(new, expect_version=device.version),
        ]
        return _Activation(changes, new, frozenset({target} if target != device.name else ()))

    def _carry_out(self, plan: Redeemed | _Activation) -> Deferred[Redeemed]:
        """A refusal at once; an activation committed, then told."""
        if isinstance(plan, Redeemed):
            return succeed(plan)
        new = plan.device
        d = self._commit(plan.changes, names=plan.names)

        def refused(failure: Failure) -> Redeemed:
            if isinstance(failure.value, Stale):
                return Redeemed(False, str(failure.value))
            failure.raiseException()
            raise AssertionError("unreachable")

        return d.addCallbacks(lambda _: Redeemed(True, "activated", new), refused)

    @_refusals_as_failures
    def autoregister(self, *, mac: str, model: str, line: Line) -> Deferred[Device]:
        """Create an active SEP record for an unknown phone (CUCM auto-registration)."""
        now = self._clock()
        device = self._new_device(
            DeviceSpec(model=model, mac=mac, lines=(line,), requires_activation=False), now
        )
        if self._name_taken(device.name):
            raise Conflict(f"a device for MAC {device.mac} already exists")
        device = replace(device, state=DeviceState.ACTIVE, activated_at=now)
        d = self._commit(
            [PutDevice(device, expect_version=ABSENT)],
            names={device.name},
            dns={line.directory_number},
        )
        return d.addCallback(lambda _: device)

    # -- other writers ---------------------------------------------------------------------

    def refresh(self) -> Deferred[int]:
        """Catch up with the change feed: apply what other writers committed.

        Fires with the number of rows that changed this view. Called periodically (and
        after a lost race); a call while one is running waits and then reads again.
        """
        if self._refreshing:
            waiter: Deferred[int] = Deferred()
            self._refresh_waiters.append(waiter)
            return waiter
        self._refreshing = True

        def done(result: int | Failure) -> int | Failure:
            self._refreshing = False
            waiters, self._refresh_waiters = self._refresh_waiters, []
            if waiters:  # they asked while this read was running: read once more for them
                self.refresh().addBoth(_fan_out, waiters)
            return result

        d = self._store.changes_since(self._seq).addCallback(self._apply_or_resync)
        return d.addBoth(done)

    def follow(self) -> Deferred[None]:
        """One poll of the change feed for a timer: a failure is logged, never raised, so
        the next poll simply tries again."""

        def failed(failure: Failure) -> None:
            log.error("change feed read failed", error=str(failure.value))

        return self.refresh().addCallbacks(lambda _: None, failed)

    def _catch_up(self) -> None:
        self.follow()

    def prune_feed(self) -> Deferred[int]:
        """One retention pass over the change feed, for a timer: delete the rows no live
        follower needs (in bounded transactions on the store thread, so writes interleave);
        fires with how many went. A failure is logged, never raised (the next pass retries)."""

        def failed(failure: Failure) -> int:
            log.error("change feed prune failed", error=str(failure.value))
            return 0

        return ensureDeferred(self._prune_feed()).addErrback(failed)

    async def _prune_feed(self) -> int:
        keep_rows, keep_seconds = self.settings.feed_keep_rows, self.settings.feed_keep_seconds
        total = 0
        for _ in range(_PRUNE_ROUNDS):
            deleted = await self._store.prune_feed(keep_rows, keep_seconds, PRUNE_CHUNK)
            total += deleted
            if deleted < PRUNE_CHUNK:
                break
        if total:
            log.info(
                "change feed: pruned old rows",
                rows=total,
                keep_rows=keep_rows,
                keep_seconds=keep_seconds,
            )
        return total

    def _apply_or_resync(self, batch: FeedBatch) -> Deferred[int]:
        """A batch as usual; a position behind the kept rows: a resync from a snapshot."""
        if batch.behind_horizon:
            return self._store.snapshot().addCallback(self._resync)
        return succeed(self._apply_feed(batch))

    def _resync(self, snapshot: Snapshot) -> int:
        """Make this view the snapshot: put what differs, delete what is gone, tell the
        listeners of each device change and the resync listeners; continue the feed from
        the snapshot's position."""
        events: list[Event] = []
        counts: Counter[str] = Counter()
        with _no_cyclic_gc():
            present: set[str] = set()
            for device in snapshot.devices:
                present.add(device.id)
                if self._devices.get(device.id) != device:
                    events += self._remember([PutDevice(device)])
                    counts["devices_changed"] += 1
            for device_id in [i for i in self._devices if i not in present]:
                events += self._remember([DeleteDevice(device_id)])
                counts["devices_deleted"] += 1
            counts["codes_changed"] = self._resync_codes(snapshot.codes)
            for model, onboarding in snapshot.defaults.items():
                if self._defaults.get(model) != onboarding:
                    self._remember([PutDefault(model, onboarding)])
                    counts["defaults_changed"] += 1
        self._seq = max(self._seq, snapshot.seq)
        log.info(
            "change feed: fell behind the kept rows; resynchronised from a snapshot",
            seq=snapshot.seq,
            devices=len(snapshot.devices),
            **{key: counts[key] for key in _RESYNC_COUNTS},
        )
        self._publish(events)
        for listener in self._resync_listeners:
            try:
                listener()
            except Exception:
                log.exception("change feed resync listener failed", listener=repr(listener))
        return sum(counts.values())

    def _resync_codes(self, codes: Iterable[ActivationCode]) -> int:
        """Each device's latest code as the snapshot has it (as a start-up load picks it)."""
        latest: dict[str, ActivationCode] = {}
        for code in sorted(codes, key=lambda c: c.issued_at):
            latest[code.device_id] = code
        changed = 0
        for device_id, code in latest.items():
            held = self._codes.get(self._code_of_device.get(device_id, ""))
            if device_id in self._devices and held != code:
                self._remember([PutCode(code)])
                changed += 1
        return changed

    def _apply_feed(self, batch: FeedBatch) -> int:
        """Merge rows as other writers left them; skip what this view already holds."""
        applied = 0
        events: list[Event] = []
        for device in batch.devices:
            if self._devices.get(device.id) != device:
                events += self._remember([PutDevice(device)])
                applied += 1
        for device_id in batch.deleted_devices:
            if device_id in self._devices:
                events += self._remember([DeleteDevice(device_id)])
                applied += 1
        for code in sorted(batch.codes, key=lambda c: c.issued_at):
            if self._is_news(code):
                self._remember([PutCode(code)])
                applied += 1
        for model, onboarding in batch.defaults.items():
            if self._defaults.get(model) != onboarding:
                self._remember([PutDefault(model, onboarding)])
                applied += 1
        self._seq = max(self._seq, batch.seq)
        self._publish(events)
        for kind, keys in batch.others.items():
            for listener in self._feed_listeners.get(kind, ()):
                listener(keys)
        return applied

    def _is_news(self, code: ActivationCode) -> bool:
        """A fed code changes the view unless it is already held or older than the current."""
        if code.device_id not in self._devices or self._codes.get(code.id) == code:
            return False
        current = self._codes.get(self._code_of_device.get(code.device_id, ""))
        return current is None or current.id == code.id or current.issued_at <= code.issued_at

    # -- internals -----------------------------------------------------------------------

    def _new_device(self, spec: DeviceSpec, now: float) -> Device:
        info = model_info(spec.model)
        name = sep_name(spec.mac) if spec.mac else self._unused_bat_name()
        lines = self._checked_lines(spec.lines)
        required = (
            spec.requires_activation
            if spec.requires_activation is not None
            else (spec.onboarding or self.onboarding(info.name))
            is not Onboarding.AUTOREGISTRATION  # code or ivr
        )
        return Device(
            id=uuid.uuid4().hex,
            name=name,
            model=info.name,
            description=spec.description,
            owner_user=spec.owner_user,
            lines=lines,
            requires_activation=required,
            state=DeviceState.AWAITING_ACTIVATION if required else DeviceState.PROVISIONED,
            created_at=now,
            updated_at=now,
            allow_remote=spec.allow_remote,
            onboarding=spec.onboarding,
        )

    @staticmethod
    def _checked_lines(lines: Iterable[Line]) -> tuple[Line, ...]:
        """Lines with well-formed, distinct directory numbers (auth name: the number)."""
        checked = tuple(
            replace(
                ln,
                directory_number=check_directory_number(ln.directory_number),
                auth_name=ln.auth_name or ln.directory_number.strip(),
            )
            for ln in lines
        )
        dns = [ln.directory_number for ln in checked]
        if len(set(dns)) != len(dns):
            raise RegistryError("a directory number appears twice on one device")
        return checked

    def _name_taken(self, name: str) -> bool:
        return name in self._by_name or self._pending_names[name] > 0

    def _unused_bat_name(self) -> str:
        while True:
            name = new_bat_name()
            if not self._name_taken(name):
                return name

    def _issue(self, device: Device, now: float) -> ActivationCode:
        while True:
            digits = new_code()
            if self._index_digest(digits) not in self._code_index:
                break
        return ActivationCode(
            id=uuid.uuid4().hex,
            device_id=device.id,
            code=digits,
            issued_at=now,
            expires_at=now + self.settings.code_ttl_hours * 3600.0,
        )

    def _void_code(self, device: Device, now: float) -> list[Change]:
        code = self.current_code(device)
        if code is None or not code.is_outstanding(now):
            return []
        return [PutCode(replace(code, state=CodeState.RELEASED), CodeExpectation())]

    def _index_digest(self, digits: str) -> bytes:
        return hmac.new(self._index_key, digits.encode(), hashlib.sha256).digest()

    def _commit(
        self,
        changes: list[Change],
        *,
        names: Collection[str] = (),
        dns: Collection[str] = (),
    ) -> Deferred[None]:
        """Write through the store; on a durable commit apply it to memory and tell listeners.

        ``names`` and ``dns`` are claimed until the store answers, so that concurrent writes
        in this process do not both take them. A failed condition becomes :class:`Stale`.
        """
        self._pending_names.update(names)
        self._pending_dns.update(dns)

        def release() -> None:
            self._pending_names.subtract(names)
            self._pending_dns.subtract(dns)
            for counter, keys in ((self._pending_names, names), (self._pending_dns, dns)):
                for key in keys:
                    if counter[key] <= 0:
                        del counter[key]

        def committed(result: Committed) -> None:
            release()
            if result.first_seq == self._seq + 1:
                # Nothing of another writer's lies between: the cursor moves past our own
                # rows (the feed leaves them out either way, so nothing is applied twice).
                self._seq = result.seq
            self._publish(self._remember(result.changes))

        def refused(failure: Failure) -> Failure:
            release()
            if isinstance(failure.value, ConditionFailed):
                self._catch_up()  # another writer got there first: read what it did
                return Failure(Stale(str(failure.value)))
            return failure

        d = self._store.apply(changes)
        return d.addCallbacks(committed, refused)

    def _publish(self, events: list[Event]) -> None:
        for old, new in events:
            for listener in self._listeners:
                try:
                    listener(old, new)
                except Exception:
                    # The change is durable already; one broken listener must not undo it.
                    log.exception("registry listener failed", listener=repr(listener))

    def _load_devices(self, devices: Iterable[Device]) -> None:
        """The start-up load into empty indexes: what ``_remember`` does for each
        ``PutDevice``, without the change objects and events (100,000 devices at start)."""
        for device in devices:
            self._put_device(device)

    def _put_device(self, new: Device) -> Device | None:
        """Hold ``new`` in place of its older version (returned), in every index."""
        old = self._devices.get(new.id)
        if old is not None:
            self._forget_device_indexes(old)
        self._devices[new.id] = new
        self._by_name[new.name] = new.id
        users = self._dn_users
        for dn in _numbers_of(new):
            users[dn] = users.get(dn, 0) + 1
        return old

    def _remember(self, changes: Iterable[Change]) -> list[Event]:
        """Apply already-stored changes to memory; return (old, new) device pairs."""
        events: list[Event] = []
        for change in changes:
            if isinstance(change, PutDevice):
                events.append((self._put_device(change.device), change.device))
            elif isinstance(change, DeleteDevice):
                old = self._devices.pop(change.device_id, None)
                if old is not None:
                    self._forget_device_indexes(old)
                    code_id = self._code_of_device.pop(old.id, None)
                    if code_id:
                        self._drop_code(code_id)
                    events.append((old, None))
            elif isinstance(change, PutCode):
                code = change.code
                previous = self._code_of_device.get(code.device_id)
                if previous and previous != code.id:
                    self._drop_code(previous)
                self._codes[code.id] = code
                self._code_of_device[code.device_id] = code.id
                digest = self._index_digest(code.code)
                if code.state is CodeState.ISSUED:
                    self._code_index[digest] = code.id
                else:
                    self._code_index.pop(digest, None)
            else:
                self._defaults[change.model] = change.onboarding
                self.defaults_version += 1
        return events

    def _drop_code(self, code_id: str) -> None:
        code = self._codes.pop(code_id, None)
        if code is not None:
            digest = self._index_digest(code.code)
            if self._code_index.get(digest) == code_id:
                del self._code_index[digest]

    def _forget_device_indexes(self, device: Device) -> None:
        if self._by_name.get(device.name) == device.id:
            del self._by_name[device.name]
        users = self._dn_users
        for dn in _numbers_of(device):
            left = users.get(dn, 0) - 1
            if left > 0:
                users[dn] = left
            else:
                users.pop(dn, None)


_PRUNE_ROUNDS = 50  # prune transactions per pass at most (a million rows a pass)
_RESYNC_COUNTS = ("devices_changed", "devices_deleted", "codes_changed", "defaults_changed")


def _numbers_of(device: Device) -> Iterable[str]:
    """The device's distinct directory numbers (each counts once in the index)."""
    lines = device.lines
    if len(lines) == 1:  # the common case, without building a dict
        return (lines[0].directory_number,)
    return dict.fromkeys(ln.directory_number for ln in lines)
