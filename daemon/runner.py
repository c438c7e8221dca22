"""Run the service tree on the global reactor until a signal stops it.

Start-up is all or nothing: if the state cannot be opened or any listener cannot bind, the
daemon logs why, stops, and exits 1 instead of running half-started (a bad configuration
never gets this far: ``main`` exits 2).
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.error import CannotListenError

from .config import Config
from .demo import provision_demo
from .logs import configure_logging, get_logger
from .service import CallboardService

log = get_logger("callboard.runner")


def run_daemon(config: Config) -> int:
    configure_logging(config.log_level)
    reactor: Any = _reactor
    service = CallboardService(config, reactor)  # wiring only: the I/O is in startService
    outcome = {"code": 0}

    def started() -> None:
        try:
            service.startService()
        except CannotListenError as exc:
            log.error("a listener failed to start", error=str(exc))
            print(f"callboard serve: cannot listen: {exc}", file=sys.stderr)
            outcome["code"] = 1
            reactor.stop()
            return
        except Exception as exc:
            log.error("start-up failed", error=str(exc), config=config.source)
            print(f"callboard serve: cannot start: {exc}", file=sys.stderr)
            outcome["code"] = 1
            reactor.stop()
            return
        where = service.listening()
        log.info(
            "callboard started",
            state_dir=str(config.state_dir),
            tftp=[f"{h}:{p}" for h, p in where.tftp],
            **where.streams,
        )
        if config.demo:
            provision_demo(service, sys.stderr)

    def hang_up(_signum: int, _frame: object) -> None:
        reactor.callFromThread(service.reload)

    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    signal.signal(signal.SIGHUP, hang_up)
    reactor.run()
    return outcome["code"]
