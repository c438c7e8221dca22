"""SIP bindings shared through the registry: the daemon's adapter around the location service.

The registrar stays sans-I/O and answers every REGISTER from this process's memory
(:class:`SharedLocationService` wraps the in-memory service and only notes which AoRs
changed). :class:`BindingsSync` writes those AoRs behind, every :data:`FLUSH_INTERVAL`
seconds, to the registry's ``bindings`` table (:mod:`.registry.bindings`), off the reactor and
coalesced:

- an AoR changed ten times between two flushes is written once, as it stands;
- a refresh that changes nothing but the expiry is not written at all unless the expiry moves
  to another :data:`EXPIRY_BUCKET` (the stored expiry is rounded *up* to its bucket, so it is
  never earlier than the real one). A REGISTER storm of refreshes therefore costs at most one
  row per binding per bucket, and never a database round trip on the REGISTER path;
- one transaction per flush, however many AoRs changed; only one flush in flight.

A binding removed (unregistered, expired, or dropped when its device is re-onboarded or
deleted) is removed from the table by the next flush. When the database is away nothing on
the SIP path notices: the changed AoRs are kept and written when it returns. On a clean stop
the process removes its rows (its bindings end with it).

Reading: ``device show`` and ``status`` list this process's bindings from memory (exact) and
the rest of the cluster's from the table (within one flush of the truth), each with the node
that holds it.
"""

from __future__ import annotations

import math
import socket
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from callboard.protocols.sip.location import Binding, MemoryLocationService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from .logs import get_logger
from .registry.bindings import BindingJournal, Row, StoredBinding, open_binding_journal

log = get_logger("callboard.bindings")

FLUSH_INTERVAL = 0.5  # seconds between write-behind flushes
EXPIRY_BUCKET = 30.0  # seconds: a refresh moving the expiry within its bucket is not written
PURGE_INTERVAL = 30.0  # seconds between purges of rows dead processes left behind
PURGE_GRACE = 60.0  # seconds past their stored expiry before others' rows are purged
READ_TIMEOUT = 2.0  # seconds a `status` or `device show` waits for the table


class SharedLocationService:
    """A :class:`~callboard.protocols.sip.location.LocationService`: memory answers, and
    every AoR whose bindings change is noted for the next flush (O(1) per change)."""

    def __init__(self, memory: MemoryLocationService | None = None) -> None:
        self.memory = memory or MemoryLocationService()
        self.dirty: dict[str, None] = {}

    def lookup(self, aor: str, now: float) -> dict[str, Binding]:
        return self.memory.lookup(aor, now)

    def replace(self, aor: str, bindings: Mapping[str, Binding]) -> None:
        self.memory.replace(aor, bindings)
        self.dirty[aor] = None

    def by_device(self, device_name: str, now: float) -> list[Binding]:
        return self.memory.by_device(device_name, now)

    def remove_device(self, device_name: str) -> list[Binding]:
        removed = self.memory.remove_device(device_name)
        self.dirty.update(dict.fromkeys(b.aor for b in removed))
        return removed

    def sweep(self, now: float) -> list[Binding]:
        expired = self.memory.sweep(now)
        self.dirty.update(dict.fromkeys(b.aor for b in expired))
        return expired

    def count(self) -> int:
        return self.memory.count()

    def take_dirty(self) -> list[str]:
        dirty, self.dirty = list(self.dirty), {}
        return dirty


def bucketed(expires_at: float, bucket: float = EXPIRY_BUCKET) -> float:
    """The expiry rounded up to its bucket: what is stored, never before the real expiry."""
    return math.ceil(expires_at / bucket) * bucket


class BindingsSync(Service):
    """Writes this process's bindings behind to the shared table, and reads the cluster's."""

    def __init__(
        self,
        location: SharedLocationService,
        journal: BindingJournal,
        node: str,
        now: Callable[[], float],
        reactor: Any,
        *,
        interval: float = FLUSH_INTERVAL,
    ) -> None:
        self.location = location
        self.journal = journal
        self.node = node
        self.holder = uuid.uuid4().hex[:16]
        self.now = now
        self.reactor = reactor
        self.interval = interval
        # What the table holds for each AoR: the hash of its rows' signatures (an int, not
        # the rows: this lives as long as the binding); None: unknown (a write failed), so
        # the AoR is written whatever it holds; absent: no rows.
        self._stored: dict[str, int | None] = {}
        self._busy = False
        self._failing = False
        self._next_purge = 0.0
        self._loop: LoopingCall | None = None

    # -- the service ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = LoopingCall(self.flush)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        d = self.journal.forget_holder(self.holder)

        def failed(failure: Failure) -> None:
            log.warning(
                "could not remove this process's bindings from the registry; they lapse"
                " at their expiry",
                error=str(failure.value)[:200],
            )

        return d.addErrback(failed)

    # -- writing behind ------------------------------------------------------------------

    def flush(self) -> Deferred[None]:
        """Write the AoRs changed since the last flush, if their stored form changed."""
        if self._busy:
            return succeed(None)
        now = self.now()
        changed: dict[str, list[Row]] = {}
        signatures: dict[str, int | None] = {}  # None: the AoR's rows go
        unstored: set[str] = set()  # no rows to delete first
        stored = self._stored
        for aor in self.location.take_dirty():
            live = self.location.memory.lookup(aor, now)
            signature: int | None = None
            if not live and aor not in stored:
                continue  # nothing held, nothing written
            rows = [self._row(b) for b in live.values()]
            if rows:
                signature = hash(tuple(map(_signature, rows)))
                if stored.get(aor) == signature:
                    continue  # written as it stands
                if aor not in stored:
                    unstored.add(aor)
            changed[aor] = rows
            signatures[aor] = signature
        purge_before = 0.0
        if now >= self._next_purge:
            self._next_purge = now + PURGE_INTERVAL
            purge_before = now - PURGE_GRACE
        if not changed and not purge_before:
            return succeed(None)
        self._busy = True
        d = self.journal.replace(self.holder, changed, purge_before, unstored)

        def written(_: object) -> None:
            for aor, signature in signatures.items():
                if signature is not None:
                    self._stored[aor] = signature
                else:
                    self._stored.pop(aor, None)
            if self._failing:
                self._failing = False
                log.info("SIP bindings written to the registry again")

        def unwritten(failure: Failure) -> None:
            for aor in changed:
                self._stored[aor] = None  # unknown now: write it whatever it holds
                self.location.dirty[aor] = None
            if not self._failing:  # once per outage, not once per flush
                self._failing = True
                log.warning(
                    "SIP bindings not written to the registry (kept in memory; retrying)",
                    error=str(failure.value)[:200],
                )

        def done(result: object) -> None:
            self._busy = False

        return d.addCallbacks(written, unwritten).addBoth(done)

    def _row(self, b: Binding) -> Row:
        """The binding's row as the table stores it (the expiry by bucket), made at once: a
        flush writes thousands of them."""
        contact, _, source = b.parts()
        return (
            self.node,
            b.aor,
            b.key,
            b.device_name or "",
            contact,
            b.transport,
            source,
            b.user_agent,
            b.registered_at,
            bucketed(b.expires_at),
            b.client_cert_fingerprint,
        )

    # -- reading the cluster's -----------------------------------------------------------

    def others_of_device(self, device_name: str) -> Deferred[list[StoredBinding]]:
        """A device's live bindings held by other processes and nodes."""
        d = self.journal.of_device(device_name, self.now(), self.holder)
        return d.addTimeout(READ_TIMEOUT, self.reactor)

    def count_by_node(self) -> Deferred[dict[str, int]]:
        return self.journal.count_by_node(self.now()).addTimeout(READ_TIMEOUT, self.reactor)


def _signature(row: Row) -> Row:
    """What a stored row shows of a binding, less its registration time (a refresh's new
    CSeq and registration time alone are not worth a write; its expiry counts by bucket).
    Kept only as part of a hash: a collision (one in 2**64) would leave a row one change
    behind until the next."""
    return row[:8] + row[9:]


def node_name(configured: str) -> str:
    """This node's name as shown beside its bindings (the host name unless configured)."""
    return configured or socket.gethostname()


# -- wiring and the admin views ------------------------------------------------------------


def wire_bindings(service: Any) -> BindingsSync:
    """Open the journal, make the shared location service, start the write-behind."""
    config = service.config
    journal = open_binding_journal(config.store.url, config.state_dir, service.reactor)
    sync = BindingsSync(
        SharedLocationService(),
        journal,
        node_name(config.store.node_name),
        service.now,
        service.reactor,
    )
    sync.setServiceParent(service)  # type: ignore[no-untyped-call]
    service._closing.append(journal.close)
    return sync


def stored_registration(
    b: StoredBinding, now: float, iso: Callable[[float], Any]
) -> dict[str, Any]:
    """Another node's binding in the shape ``device show`` gives a local one."""
    return {
        "aor": b.aor,
        "contact": b.contact,
        "transport": b.transport,
        "source": b.source,
        "user_agent": b.user_agent,
        "expires_in": max(0, round(b.expires_at - now)),
        "registered": iso(b.registered_at),
        "client_cert_sha256": b.client_cert_sha256,
        "node": b.node,
    }


def with_cluster_registrations(
    sync: BindingsSync, device_name: str, local: list[dict[str, Any]], iso: Callable[[float], Any]
) -> Deferred[list[dict[str, Any]]]:
    """This process's registrations of a device, then the rest of the cluster's; the local
    ones alone (and a log line) when the registry cannot be read."""

    def merged(others: list[StoredBinding]) -> list[dict[str, Any]]:
        now = sync.now()
        return local + [stored_registration(b, now, iso) for b in others]

    def unreadable(failure: Failure) -> list[dict[str, Any]]:
        log.warning("other nodes' bindings unreadable", error=str(failure.value)[:200])
        return local

    return sync.others_of_device(device_name).addCallbacks(merged, unreadable)


def with_cluster_status(sync: BindingsSync, status: dict[str, Any]) -> Deferred[dict[str, Any]]:
    """``status`` plus the cluster's live bindings by node (None when unreadable)."""

    def merged(by_node: dict[str, int]) -> dict[str, Any]:
        return {
            **status,
            "cluster_registrations": sum(by_node.values()),
            "registrations_by_node": dict(sorted(by_node.items())),
        }

    def unreadable(failure: Failure) -> dict[str, Any]:
        log.warning("cluster bindings unreadable", error=str(failure.value)[:200])
        return {**status, "cluster_registrations": None, "registrations_by_node": None}

    return sync.count_by_node().addCallbacks(merged, unreadable)
