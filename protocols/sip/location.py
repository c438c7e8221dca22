"""Where each address-of-record can be reached: the SIP location service (RFC 3261 §10.3).

The registrar decides *what* the bindings of an AoR become (RFC 3261 §10.3 rules, policy,
digest); the location service only keeps them and forgets them when they expire. Keeping the
two apart lets several registrar processes share bindings later (a store-backed service)
without touching the REGISTER pipeline: :class:`LocationService` is the whole contract, and
:class:`MemoryLocationService` the one-process implementation.

Times are on the registrar's clock (the ``now`` it is given), passed in by the caller; the
service has no clock of its own.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from typing import Any, Protocol

from callboard.protocols.sip.message import parse_name_addr


class Binding:
    """One contact bound to an AoR, as the registrar accepted it. Immutable.

    ``key`` identifies the binding within its AoR (``+sip.instance`` when present, else the
    contact URI); ``contact`` is the Contact value as bound (``<uri>;params``, without
    ``expires``), kept as the one string it is sent and shown as: a parsed form costs
    several hundred bytes per binding, and is only needed when someone looks
    (:attr:`contact_uri`, :attr:`instance`, :attr:`model_id`). ``expires_at`` is on the
    registrar's clock, ``registered_at`` wall-clock epoch seconds (shown to people only).

    A registrar holds one per registered phone line for as long as the phone stays, so the
    record is compact: the contact, Call-ID and source address, read once per REGISTER at
    most, share one string (a Python string costs 40 bytes before its first character;
    ≈ 110 bytes and two objects saved per binding). The Call-ID and the source address are
    single-line tokens (a parsed header, a socket address), so the last two line breaks of
    that string always split it back. In it, the parameter names every Cisco contact repeats
    (:data:`_ABBREVIATED`) stand as one control character each, which no contact holds (the
    parser refuses them in header values): ≈ 110 bytes more.
    """

    __slots__ = (
        "_text",
        "aor",
        "client_cert_fingerprint",
        "cseq",
        "device_name",
        "expires_at",
        "key",
        "registered_at",
        "transport",
        "user_agent",
    )

    aor: str
    key: str
    _text: str
    cseq: int
    expires_at: float
    registered_at: float
    device_name: str | None
    transport: str
    user_agent: str | None
    client_cert_fingerprint: str | None

    def __init__(
        self,
        aor: str,
        key: str,
        contact: str,
        call_id: str,
        cseq: int,
        expires_at: float,
        registered_at: float,
        device_name: str | None,
        transport: str,
        source: str,
        user_agent: str | None,
        client_cert_fingerprint: str | None,
    ) -> None:
        if "\n" in call_id or "\n" in source:
            raise ValueError("a binding's Call-ID and source are single-line tokens")
        put = object.__setattr__
        put(self, "aor", aor)
        put(self, "key", key)
        put(self, "_text", f"{_abbreviated(contact)}\n{call_id}\n{source}")
        put(self, "cseq", cseq)
        put(self, "expires_at", expires_at)
        put(self, "registered_at", registered_at)
        put(self, "device_name", device_name)
        put(self, "transport", transport)
        put(self, "user_agent", user_agent)
        put(self, "client_cert_fingerprint", client_cert_fingerprint)

    @property
    def contact(self) -> str:
        return _expanded(self._text.rsplit("\n", 2)[0])

    @property
    def call_id(self) -> str:
        return self._text.rsplit("\n", 2)[1]

    @property
    def source(self) -> str:
        return self._text.rsplit("\n", 2)[2]

    def parts(self) -> tuple[str, str, str]:
        """The contact, Call-ID and source at once (one split of the string they share)."""
        contact, call_id, source = self._text.rsplit("\n", 2)
        return _expanded(contact), call_id, source

    def replace(self, **changes: Any) -> Binding:
        """A copy with some fields changed (``dataclasses.replace`` for this record)."""
        fields = self._fields()
        unknown = changes.keys() - fields.keys()
        if unknown:
            raise TypeError(f"Binding has no field {', '.join(sorted(unknown))}")
        return Binding(**{**fields, **changes})

    def _fields(self) -> dict[str, Any]:
        contact, call_id, source = self._text.rsplit("\n", 2)
        return {
            "aor": self.aor,
            "key": self.key,
            "contact": _expanded(contact),
            "call_id": call_id,
            "cseq": self.cseq,
            "expires_at": self.expires_at,
            "registered_at": self.registered_at,
            "device_name": self.device_name,
            "transport": self.transport,
            "source": source,
            "user_agent": self.user_agent,
            "client_cert_fingerprint": self.client_cert_fingerprint,
        }

    def _values(self) -> tuple[Any, ...]:
        return (
            self.aor,
            self.key,
            self._text,
            self.cseq,
            self.expires_at,
            self.registered_at,
            self.device_name,
            self.transport,
            self.user_agent,
            self.client_cert_fingerprint,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Binding):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in self._fields().items())
        return f"Binding({shown})"

    def __reduce__(self) -> tuple[type[Binding], tuple[Any, ...]]:
        """Copied and pickled through the constructor (the attributes cannot be set)."""
        return Binding, tuple(self._fields().values())

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"a Binding is immutable: cannot set {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"a Binding is immutable: cannot delete {name}")

    @property
    def contact_uri(self) -> str:
        return parse_name_addr(self.contact).uri

    @property
    def instance(self) -> str | None:
        """The contact's ``+sip.instance``, as sent."""
        return parse_name_addr(self.contact).param("+sip.instance")

    @property
    def model_id(self) -> str | None:
        """The contact's Cisco model ID (``+u.sip!model.ccm.cisco.com``)."""
        return parse_name_addr(self.contact).param("+u.sip!model.ccm.cisco.com")


# Contact parameters (with their opening quote) that every Cisco phone sends, the first
# with the fixed part of its instance ID; each kept as the control character before it.
_ABBREVIATED = (
    ("\x01", ';+sip.instance="<urn:uuid:00000000-0000-0000-0000-'),
    ("\x02", ';+u.sip!devicename.ccm.cisco.com="'),
    ("\x03", ';+u.sip!model.ccm.cisco.com="'),
)


def _abbreviated(contact: str) -> str:
    for code, text in _ABBREVIATED:
        if code in contact:
            raise ValueError("a binding's contact is a header value: no control characters")
        contact = contact.replace(text, code)
    return contact


def _expanded(contact: str) -> str:
    for code, text in _ABBREVIATED:
        contact = contact.replace(code, text)
    return contact


class LocationService(Protocol):
    """The bindings store the registrar needs. Must not block (called on the reactor).

    An AoR's bindings change as a whole (:meth:`replace`): RFC 3261 §10.3 applies every
    contact of a REGISTER or none, so the registrar computes the new set and hands it over in
    one call.
    """

    def lookup(self, aor: str, now: float) -> dict[str, Binding]:
        """The live (unexpired at ``now``) bindings of ``aor`` by key, in binding order."""
        ...

    def replace(self, aor: str, bindings: Mapping[str, Binding]) -> None:
        """Make ``bindings`` the whole binding set of ``aor`` (empty: remove the AoR)."""
        ...

    def by_device(self, device_name: str, now: float) -> list[Binding]:
        """The live bindings held by a device, AoR by AoR (sorted)."""
        ...

    def remove_device(self, device_name: str) -> list[Binding]:
        """Remove every binding of a device at once; returns the removed ones."""
        ...

    def sweep(self, now: float) -> list[Binding]:
        """Remove the bindings that expired by ``now``; returns them."""
        ...

    def count(self) -> int:
        """How many bindings are held (expired ones not yet swept included)."""
        ...


class MemoryLocationService:
    """Bindings in this process's memory; expiry through a calendar (not a timer per binding).

    An AoR with one binding (nearly every phone line) holds the :class:`Binding` itself, not a
    one-entry dict (~180 bytes per registered line saved); more bindings, a dict by key.

    The calendar files each AoR under a whole second at or before the expiry of each of its
    bindings: one list slot per binding (a heap of ``(expiry, aor, key)`` tuples cost 72
    bytes). A refresh to a later expiry files nothing: the AoR's earlier entry stays valid,
    and when its second comes the sweep files the AoR again under its next expiry. So a
    storm of refreshes does not grow the calendar, where a heap grew by one entry for each
    REGISTER until the old expiry. Entries may be stale (a binding refreshed or removed
    since): the sweep looks at what the AoR holds then.
    """

    def __init__(self) -> None:
        self._bindings: dict[str, Binding | dict[str, Binding]] = {}
        # Device name → the AoR it holds bindings on, or a tuple of several (a set would cost
        # ~200 bytes per registered phone, a one-item tuple ~50).
        self._by_device: dict[str, str | tuple[str, ...]] = {}
        self._due: dict[int, list[str]] = {}  # whole second → AoRs to look at then
        self._seconds: list[int] = []  # the seconds of ``_due``, a heap

    def _held(self, aor: str) -> Mapping[str, Binding]:
        """The stored bindings of ``aor`` by key, expired ones included (do not change it)."""
        held = self._bindings.get(aor)
        if held is None:
            return {}
        if isinstance(held, Binding):
            return {held.key: held}
        return held

    def _store(self, aor: str, bindings: Mapping[str, Binding]) -> None:
        """Make ``bindings`` the stored set of ``aor``, in its compact form."""
        if not bindings:
            self._bindings.pop(aor, None)
            return
        if len(bindings) == 1:
            ((key, only),) = bindings.items()
            if key == only.key:
                self._bindings[aor] = only
                return
        self._bindings[aor] = dict(bindings)

    def lookup(self, aor: str, now: float) -> dict[str, Binding]:
        held = self._bindings.get(aor)
        if held is None:
            return {}
        if isinstance(held, Binding):
            return {held.key: held} if held.expires_at > now else {}
        return {k: b for k, b in held.items() if b.expires_at > now}

    def replace(self, aor: str, bindings: Mapping[str, Binding]) -> None:
        if len(bindings) == 1 and self._replace_single(aor, bindings):
            return
        before = self._held(aor)
        self._store(aor, bindings)
        for key, b in bindings.items():
            old = before.get(key)
            if old is None or b.expires_at < old.expires_at:
                self._file(aor, b.expires_at)  # else: filed at or before the old expiry
        devices = {b.device_name for b in (*before.values(), *bindings.values())}
        for device in devices:
            if device is not None:
                self._index(device, aor)

    def _replace_single(self, aor: str, bindings: Mapping[str, Binding]) -> bool:
        """:meth:`replace` for the usual change, an AoR held by at most one binding getting
        one (a phone line binding or refreshing): what the general steps do, without their
        dicts and sets. False (nothing done) for any other change."""
        held = self._bindings.get(aor)
        if held is not None and not isinstance(held, Binding):
            return False
        ((key, new),) = bindings.items()
        if key != new.key:
            return False
        self._bindings[aor] = new
        if held is None or held.key != key or new.expires_at < held.expires_at:
            self._file(aor, new.expires_at)  # else: filed at or before the old expiry
        device = new.device_name
        if held is not None and held.device_name != device and held.device_name is not None:
            self._index(held.device_name, aor)  # that device's binding here is gone
        if device is not None and (held is None or held.device_name != device):
            self._index(device, aor)  # else: indexed here already, with the old binding
        return True

    def _file(self, aor: str, expires_at: float) -> None:
        """Look at ``aor`` again in the second ``expires_at`` falls in."""
        second = math.floor(expires_at)
        due = self._due.get(second)
        if due is None:
            self._due[second] = [aor]
            heapq.heappush(self._seconds, second)
        else:
            due.append(aor)

    def _aors_of(self, device_name: str) -> tuple[str, ...]:
        aors = self._by_device.get(device_name, ())
        return (aors,) if isinstance(aors, str) else aors

    def by_device(self, device_name: str, now: float) -> list[Binding]:
        return [
            b
            for aor in sorted(self._aors_of(device_name))
            for b in self._held(aor).values()
            if b.device_name == device_name and b.expires_at > now
        ]

    def remove_device(self, device_name: str) -> list[Binding]:
        removed: list[Binding] = []
        aors = self._aors_of(device_name)
        self._by_device.pop(device_name, None)
        for aor in sorted(aors):
            kept: dict[str, Binding] = {}
            for key, b in self._held(aor).items():
                if b.device_name == device_name:
                    removed.append(b)
                else:
                    kept[key] = b
            self._store(aor, kept)
        return removed

    def sweep(self, now: float) -> list[Binding]:
        expired: list[Binding] = []
        seconds = self._seconds
        unfinished: list[str] = []  # the current second's AoRs whose expiry is still ahead
        while seconds and seconds[0] <= now:
            second = heapq.heappop(seconds)
            for aor in dict.fromkeys(self._due.pop(second)):  # once each, in filing order
                nxt = self._expire(aor, now, expired)
                if nxt is None:
                    continue
                if math.floor(nxt) > second:
                    self._file(aor, nxt)
                else:  # later in this very second: ``now`` is inside it, it is the last
                    unfinished.append(aor)
        for aor in unfinished:
            self._file(aor, now)
        expired.sort(key=lambda b: (b.expires_at, b.aor, b.key))
        return expired

    def _expire(self, aor: str, now: float, expired: list[Binding]) -> float | None:
        """Remove the bindings of ``aor`` that expired by ``now`` (appended to ``expired``);
        the earliest expiry among those left (None: none left)."""
        held = self._held(aor)
        gone = [b for b in held.values() if b.expires_at <= now]
        if gone:
            self._store(aor, {k: b for k, b in held.items() if b.expires_at > now})
            for device in {b.device_name for b in gone}:
                if device is not None:
                    self._index(device, aor)
            expired.extend(gone)
            held = self._held(aor)
        return min((b.expires_at for b in held.values()), default=None)

    def count(self) -> int:
        return sum(1 if isinstance(v, Binding) else len(v) for v in self._bindings.values())

    def _index(self, device_name: str, aor: str) -> None:
        """Keep ``aor`` under ``device_name`` exactly while the device holds a binding there."""
        holds = any(b.device_name == device_name for b in self._held(aor).values())
        aors = self._aors_of(device_name)
        if holds:
            if aor not in aors:
                self._by_device[device_name] = (*aors, aor) if aors else aor
        elif aor in aors:
            rest = tuple(a for a in aors if a != aor)
            if len(rest) > 1:
                self._by_device[device_name] = rest
            elif rest:
                self._by_device[device_name] = rest[0]
            else:
                del self._by_device[device_name]
