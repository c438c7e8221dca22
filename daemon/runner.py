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
from twisted.internet.task import LoopingCall

from .config import Config, ConfigError
from .demo import provision_demo, trust_demo_lab
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
            if config.demo:
                trust_demo_lab(config.state_dir, config.manufacturing_trust_path)
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
        keep_trimming(reactor)
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
    heap = CHeap.of_this_process()
    if heap is not None:
        heap.trim()


TRIM_INTERVAL = 5.0  # seconds between looks at how much the C heap holds free
TRIM_SLACK = 16 << 20  # newly freed bytes in the C heap worth handing back to the system


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33 and later)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


class CHeap:
    """glibc's heap: how much it holds free, and handing the free pages back.

    glibc returns freed memory to the system only from the top of its heap. Everything the
    daemon frees in bulk (the registrar's cached answers 32 s after a REGISTER storm, a
    sweep of expired bindings, start-up's temporaries) lies between chunks that live on, so
    the process kept it resident for good: 80 MB after 100,000 phones registered at once.
    ``malloc_trim(0)`` gives those pages back (``madvise``), the chunks stay mapped.
    """

    def __init__(self, free_bytes: Callable[[], int], trim: Callable[[int], object]) -> None:
        self.free_bytes = free_bytes
        self._trim = trim

    @classmethod
    def of_this_process(cls) -> CHeap | None:
        """The C library's heap, or None where it is not glibc (nothing to do then)."""
        try:
            libc = ctypes.CDLL(None)
            trim = libc.malloc_trim
        except (AttributeError, OSError):
            return None
        try:
            mallinfo2 = libc.mallinfo2
        except AttributeError:  # glibc < 2.33: the start-up trim only
            return cls(lambda: 0, trim)
        mallinfo2.restype = _MallInfo2
        return cls(lambda: int(mallinfo2().fordblks), trim)

    def trim(self) -> None:
        self._trim(0)


class HeapTrimmer:
    """Trims the C heap once a burst of frees left ``slack`` more bytes free than the least
    seen since the last trim. Not on every look: a trim walks every free chunk (a few ms
    with 100,000 of them), and memory that is freed and reused at a steady rate (the answers
    of a steady REGISTER load) would only be faulted in again."""

    def __init__(self, heap: CHeap, slack: int = TRIM_SLACK) -> None:
        self.heap = heap
        self.slack = slack
        self._low = heap.free_bytes()

    def __call__(self) -> bool:
        """One look; True when it trimmed."""
        free = self.heap.free_bytes()
        if free - self._low < self.slack:
            self._low = min(self._low, free)
            return False
        self.heap.trim()
        self._low = free
        return True


def keep_trimming(reactor: Any, interval: float = TRIM_INTERVAL) -> LoopingCall | None:
    """Look at the C heap every ``interval`` seconds and give back what lies free (see
    :class:`CHeap`); None where the C library offers no trim."""
    heap = CHeap.of_this_process()
    if heap is None:
        return None
    loop = LoopingCall(HeapTrimmer(heap))
    loop.clock = reactor
    loop.start(interval, now=False)
    return loop


def serving(service: CallboardService) -> str:
    """The ``STATUS=`` line while serving: what systemctl status shows."""
    where = service.listening()
    listeners = sorted({"tftp"} if where.tftp else set()) + sorted(where.streams)
    return f"serving {len(service.registry)} device(s); listening: {', '.join(listeners) or 'none'}"
