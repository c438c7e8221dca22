"""Run the service tree on the global reactor until a signal stops it.

Start-up is all or nothing: if the state cannot be opened or any listener cannot bind, the
daemon logs why, stops, and exits 1 instead of running half-started (a bad configuration
never gets this far: ``main`` exits 2). Under systemd it says ``READY=1`` only once every
listener is bound and the registry is loaded (:mod:`.lifecycle`); ``SIGHUP`` re-reads the
configuration (:mod:`.reload`); ``SIGTERM`` stops accepting, lets in-flight work finish within
``shutdown_grace`` and exits 0.
"""

from __future__ import annotations

import ctypes
import gc
import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.error import CannotListenError

from .config import Config, ConfigError
from .demo import provision_demo
from .inherited import InheritedSockets
from .lifecycle import Supervision
from .logs import configure_logging, get_logger
from .sdnotify import Notifier, SdNotifyError
from .service import CallboardService

log = get_logger("callboard.runner")

EXIT_CONFIG = 2


def run_daemon(
    config: Config,
    *,
    inherited: InheritedSockets | None = None,
    reload_config: Callable[[], Config] | None = None,
    notifier: Notifier | None = None,
    service_factory: Callable[[Config, Any, InheritedSockets | None], CallboardService] = (
        CallboardService
    ),
) -> int:
    """``notifier`` and ``service_factory`` are a worker's (:mod:`.workers`); by default
    systemd's ``NOTIFY_SOCKET`` and the plain service tree."""
    configure_logging(config.log_level, log_format=config.log_format)
    try:
        notifier = notifier or Notifier.from_environ()
    except SdNotifyError as exc:
        print(f"callboard serve: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    reactor: Any = _reactor
    supervision = Supervision(notifier, reactor)
    service = service_factory(config, reactor, inherited)  # wiring only: the I/O is later
    outcome = {"code": 0}

    def fail(code: int, message: str) -> None:
        print(f"callboard serve: {message}", file=sys.stderr)
        outcome["code"] = code
        reactor.stop()

    def started() -> None:
        supervision.status("starting: opening the registry and binding listeners")
        try:
            service.startService()
        except CannotListenError as exc:
            log.error("a listener failed to start", error=str(exc))
            fail(1, f"cannot listen: {exc}")
            return
        except Exception as exc:
            log.error("start-up failed", error=str(exc), config=config.source)
            fail(1, f"cannot start: {exc}")
            return
        settle_memory()
        where = service.listening()
        log.info(
            "callboard started",
            state_dir=str(config.state_dir),
            socket_activated=service.inherited.activated,
            tftp=[f"{h}:{p}" for h, p in where.tftp],
            **where.streams,
        )
        supervision.ready(serving(service))
        if config.demo:
            provision_demo(service, sys.stderr)

    def reload() -> None:
        supervision.reloading()
        try:
            new = reload_config() if reload_config is not None else service.config
        except ConfigError as exc:
            log.error("configuration reload refused; the running one stays", reason=str(exc))
        else:
            service.reload(new)
        supervision.ready(serving(service))

    def hang_up(_signum: int, _frame: object) -> None:
        reactor.callFromThread(reload)

    def stopping() -> Any:
        supervision.stopping()
        return service.stopService()

    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", stopping)
    signal.signal(signal.SIGHUP, hang_up)
    reactor.run()
    return outcome["code"]


def settle_memory() -> None:
    """Start-up is over: set what it built apart and give back what it threw away.

    The registry's records, templates and modules live as long as the process: the cyclic
    collector need not walk them on every full collection (``gc.freeze``). Start-up's
    temporaries (the load's row batches, certificate and template checks) left free pages in
    the C heap that glibc keeps for reuse; ``malloc_trim`` hands them back to the system
    (a few MB of resident memory; a no-op where the C library lacks it).
    """
    gc.freeze()
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return
    trim(0)


def serving(service: CallboardService) -> str:
    """The ``STATUS=`` line while serving: what systemctl status shows."""
    where = service.listening()
    listeners = sorted({"tftp"} if where.tftp else set()) + sorted(where.streams)
    return f"serving {len(service.registry)} device(s); listening: {', '.join(listeners) or 'none'}"
