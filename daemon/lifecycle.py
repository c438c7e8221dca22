"""The daemon's life under a supervisor: readiness, watchdog, reload and a graceful stop.

:class:`Supervision` speaks ``sd_notify`` (:mod:`.sdnotify`; silent without
``NOTIFY_SOCKET``) at each step: ``STATUS=`` while starting, ``READY=1`` once every listener is
bound and the registry loaded, ``WATCHDOG=1`` from a reactor timer when ``WatchdogSec=`` is
set, ``RELOADING=1`` … ``READY=1`` around a reload and ``STOPPING=1`` at shutdown.

:func:`drain` is the first half of a stop: listeners close (nothing new is accepted), then
in-flight TFTP transfers and TVS requests get up to ``shutdown_grace`` seconds to finish
before the rest of the tree stops and the registry closes.
"""

from __future__ import annotations

from typing import Any

from callboard.protocols.listening import ListenerService, listeners_in
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.task import LoopingCall, deferLater

from .logs import get_logger
from .sdnotify import Notifier, watchdog

log = get_logger("callboard.lifecycle")

DRAIN_POLL = 0.05  # seconds between looks at the in-flight work while draining
FLUSH = 0.05  # a last moment for the final replies to leave the sockets


def in_flight(service: Any) -> dict[str, int]:
    """Work that a stop should let finish: TFTP transfers and TVS requests awaiting the registry."""
    tftp = getattr(service, "tftp", None)
    authority = getattr(service, "authority", None)
    return {
        "tftp_transfers": tftp.live_transfers if tftp is not None else 0,
        "tvs_requests": authority.in_flight if authority is not None else 0,
    }


def drain(service: Any, grace: float) -> Deferred[None]:
    """Stop every listener, then wait (at most ``grace`` seconds) for in-flight work."""
    reactor = service.reactor
    listeners = [listener for listener in listeners_in(service) if listener.running]
    stops = [maybeDeferred(ListenerService.stopService, listener) for listener in listeners]
    done: Deferred[None] = Deferred()
    deadline = reactor.seconds() + grace

    def look() -> None:
        work = in_flight(service)
        if not any(work.values()):
            finish()
        elif reactor.seconds() >= deadline:
            log.warning("shutdown grace elapsed; abandoning in-flight work", grace=grace, **work)
            finish()

    poll = LoopingCall(look)
    poll.clock = reactor

    def finish() -> None:
        if poll.running:
            poll.stop()
        if not done.called:
            deferLater(reactor, FLUSH, lambda: None).chainDeferred(done)

    def closed(_: object) -> None:
        work = in_flight(service)
        if not any(work.values()):
            done.callback(None)  # nothing to wait for (and no timer: test clocks need none)
            return
        log.info("stopped accepting; letting in-flight work finish", grace=grace, **work)
        poll.start(DRAIN_POLL, now=True)

    DeferredList(stops, consumeErrors=True).addCallback(closed)
    return done


class Supervision:
    """sd_notify for one daemon run (every call a no-op without ``NOTIFY_SOCKET``)."""

    def __init__(self, notifier: Notifier, reactor: Any) -> None:
        self.notifier = notifier
        self.reactor = reactor
        self._watchdog: LoopingCall | None = None

    def status(self, text: str) -> None:
        self.notifier.status(text)

    def ready(self, status: str) -> None:
        """Every listener is bound and the registry loaded; start pinging if asked to."""
        self.notifier.ready(status)
        dog = watchdog(self.notifier)
        if dog is not None and self._watchdog is None:
            self._watchdog = LoopingCall(dog.ping)
            self._watchdog.clock = self.reactor
            self._watchdog.start(dog.interval, now=True)

    def reloading(self) -> None:
        self.notifier.reloading()

    def stopping(self) -> None:
        self.notifier.stopping()
        self.notifier.status("stopping: letting in-flight work finish")
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
