"""Run the service tree on the global reactor until a signal stops it.

Start-up is all or nothing: if any listener fails to bind, the daemon logs why, stops,
and exits non-zero instead of running half-started.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.python.failure import Failure

from .config import Config
from .demo import provision_demo
from .logs import configure_logging, get_logger
from .service import CallboardService

log = get_logger("callboard.runner")


def run_daemon(config: Config) -> int:
    configure_logging(config.log_level)
    reactor: Any = _reactor
    try:
        service = CallboardService(config, reactor)
    except Exception as exc:
        log.error("start-up failed", error=str(exc), config=config.source)
        print(f"callboard serve: {exc}", file=sys.stderr)
        return 1
    outcome = {"code": 0}

    def started() -> None:
        try:
            service.startService()  # type: ignore[no-untyped-call]
        except Exception as exc:
            log.error("start-up failed", error=str(exc))
            print(f"callboard serve: cannot start: {exc}", file=sys.stderr)
            outcome["code"] = 1
            reactor.stop()
            return
        d = service.ready()

        def announce(_: object) -> None:
            where = service.listening()
            log.info(
                "callboard started",
                state_dir=str(config.state_dir),
                tftp=[f"{h}:{p}" for h, p in where.tftp],
                **where.streams,
            )
            if config.demo:
                provision_demo(service, sys.stderr)

        def failed(failure: Failure) -> None:
            reason = failure.value
            inner = getattr(reason, "subFailure", None)
            if inner is not None:
                reason = inner.value
            log.error("a listener failed to start", error=str(reason))
            print(f"callboard serve: cannot listen: {reason}", file=sys.stderr)
            outcome["code"] = 1
            reactor.stop()

        d.addCallbacks(announce, failed)

    def hang_up(_signum: int, _frame: object) -> None:
        reactor.callFromThread(service.reload)

    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    signal.signal(signal.SIGHUP, hang_up)
    reactor.run()
    return outcome["code"]
