"""``callboard serve --workers N``: one supervisor process, N worker processes, one registry.

The supervisor (the process ``callboard serve`` started as) holds the state-directory lock,
binds every listening socket once, and runs the workers as child processes
(``python -m callboard.daemon.main`` with the same arguments) that *adopt* those sockets the
way a socket-activated daemon adopts systemd's (:mod:`.workers`). It serves nothing itself.

Why the parent binds, with one ``SO_REUSEPORT`` socket per worker for each IP listener:

- The kernel spreads new TCP connections and UDP datagrams over the sockets of a reuseport
  group by a hash of the peer's address and port, so each worker gets its share, and a
  phone's UDP exchange (TFTP read request and its retransmits, a SIP transaction) keeps
  landing on the same worker. One socket shared by all would hand each datagram to whichever
  worker reads first, and let one busy worker take most connections.
- The supervisor keeps every socket open for the daemon's life, so a port 0 resolves once
  for all workers, and a worker that dies leaves its socket in the group: what the kernel
  queues there meanwhile is served by its replacement instead of being reset.
- Binding only in the supervisor means no second process can join the group by accident:
  a second ``callboard serve`` is refused by the state lock before it binds anything.

Under systemd socket activation the supervisor passes the inherited sockets to every worker
as they are (shared, no reuseport group). Singletons — the web console and ``/metrics`` — go
to worker 0 only, which also serves the admin socket and aggregates the others' status and
metrics (:mod:`.workers`); the edge listeners are worker 0's too.

Start-up: worker 0 starts first and creates what a first start creates (certificates, the
database schema, keys); the others start once it is ready, so no two processes race to
create them. ``READY=1`` goes to systemd only when every worker has said ``READY=1`` to the
supervisor (each worker's ``sd_notify`` messages come over a pipe, :class:`PipeNotifier`).
``SIGHUP`` is passed to every worker (each re-reads the configuration); ``SIGTERM`` stops
every worker (each drains within ``shutdown_grace``) and the supervisor exits 0.

A worker that exits on its own after start-up is restarted (after :data:`RESTART_DELAY`);
a worker that fails before it is ready — at start-up, or :data:`MAX_FAILED_STARTS` times in
a row later — stops the daemon with exit status 1, as a single-process daemon that cannot
start does.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from .config import Config, ConfigError, EndpointsConfig
from .inherited import InheritedSockets
from .lifecycle import Supervision
from .logs import configure_logging, get_logger
from .sdnotify import Notifier, SdNotifyError, watchdog_interval

log = get_logger("callboard.supervisor")

WORKER_ENV = "CALLBOARD_WORKER"
CONTROL_FD = 3  # the worker's end of its sd_notify pipe; sockets follow from 4
FIRST_SOCKET_FD = 4
SINGLETON_ROLES = frozenset({"web", "metrics"})  # worker 0 only
RESTART_DELAY = 1.0  # seconds before a worker that died is started again
MAX_FAILED_STARTS = 3  # consecutive restarts that never got ready: give up
KILL_AFTER = 10.0  # seconds past shutdown_grace before a worker that will not stop is killed
# Meant for the supervisor; a worker pings its supervisor (WATCHDOG_USEC is passed on).
STRIPPED_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_PID")
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def check_worker_config(config: Config) -> None:
    """Refuse what several workers cannot share: ``[endpoints]`` specs other than admin
    (each would be bound by every worker); raises :class:`ConfigError` (one line)."""
    given = [
        name
        for name in EndpointsConfig.__dataclass_fields__
        if name != "admin" and getattr(config.endpoints, name)
    ]
    if config.workers > 1 and given:
        raise ConfigError(
            f"{config.source}: workers = {config.workers} cannot be combined with "
            f"[endpoints] {', '.join(given)} (only admin); use the ports, or --workers 1"
        )


# -- the sockets ------------------------------------------------------------------------------


@dataclass
class Sockets:
    """Every listening socket of the daemon, and which worker gets which (by role)."""

    count: int
    by_worker: list[dict[str, list[socket.socket]]] = field(default_factory=list)
    owned: list[socket.socket] = field(default_factory=list)  # closed when the daemon ends

    def __post_init__(self) -> None:
        if not self.by_worker:
            self.by_worker = [{} for _ in range(self.count)]

    def give(self, worker: int, role: str, sock: socket.socket) -> None:
        self.by_worker[worker].setdefault(role, []).append(sock)

    def close(self) -> None:
        for sock in self.owned:
            sock.close()
        self.owned.clear()


def bind_sockets(config: Config, count: int) -> Sockets:
    """Bind every listener the configuration asks for: one ``SO_REUSEPORT`` socket per
    worker for the shared roles, one socket for worker 0's singletons. Raises ``OSError``."""
    sockets = Sockets(count)
    net = config.network
    try:
        for host in net.listen_addresses:
            _bind_group(sockets, "tftp", socket.SOCK_DGRAM, host, net.tftp_port)
            _bind_group(sockets, "http", socket.SOCK_STREAM, host, net.http_port)
            if net.https_port:
                _bind_group(sockets, "https", socket.SOCK_STREAM, host, net.https_port)
            _bind_group(sockets, "tvs", socket.SOCK_STREAM, host, net.tvs_port)
            sip = _bind_group(sockets, "sip-tcp", socket.SOCK_STREAM, host, net.sip_port)
            # As in one process: with port 0, SIP over UDP takes the number TCP was given.
            _bind_group(sockets, "sip-udp", socket.SOCK_DGRAM, host, net.sip_port or sip)
            _bind_group(sockets, "sip-tls", socket.SOCK_STREAM, host, net.sip_tls_port)
            if net.web_port >= 0:
                _bind_one(sockets, "web", host, net.web_port)
        if config.metrics.port:
            _bind_one(sockets, "metrics", config.metrics.address, config.metrics.port)
    except BaseException:
        sockets.close()
        raise
    return sockets


def share_inherited(inherited: InheritedSockets, count: int) -> Sockets:
    """Socket activation: every worker adopts systemd's sockets (singletons: worker 0)."""
    sockets = Sockets(count)
    for role, fds in inherited.fds.items():
        for fd in fds:
            sock = socket.socket(fileno=fd)
            sockets.owned.append(sock)
            for worker in range(1 if role in SINGLETON_ROLES else count):
                sockets.give(worker, role, sock)
    return sockets


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if host and ipaddress.ip_address(host).version == 6 else socket.AF_INET


def _new_socket(host: str, kind: socket.SocketKind, *, reuseport: bool) -> socket.socket:
    sock = socket.socket(_family(host), kind)
    if kind == socket.SOCK_STREAM:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def _bind_group(sockets: Sockets, role: str, kind: socket.SocketKind, host: str, port: int) -> int:
    """One reuseport socket per worker on ``host:port`` (port 0: the first one's); the port."""
    for worker in range(sockets.count):
        sock = _new_socket(host, kind, reuseport=True)
        sockets.owned.append(sock)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise OSError(exc.errno, f"{role} on {host}:{port}: {exc.strerror}") from None
        port = sock.getsockname()[1]
        if kind == socket.SOCK_STREAM:
            sock.listen(socket.SOMAXCONN)
        sockets.give(worker, role, sock)
    return port


def _bind_one(sockets: Sockets, role: str, host: str, port: int) -> None:
    sock = _new_socket(host, socket.SOCK_STREAM, reuseport=False)
    sockets.owned.append(sock)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise OSError(exc.errno, f"{role} on {host}:{port}: {exc.strerror}") from None
    sock.listen(socket.SOMAXCONN)
    sockets.give(0, role, sock)


def child_descriptors(
    roles: dict[str, list[socket.socket]],
) -> tuple[dict[int, int | str], dict[str, list[int]]]:
    """``childFDs`` for ``spawnProcess`` and the worker's ``{role: [fd, …]}`` (from 4 on)."""
    child_fds: dict[int, int | str] = {0: "w", 1: 1, 2: 2, CONTROL_FD: "r"}
    fds: dict[str, list[int]] = {}
    target = FIRST_SOCKET_FD
    for role, socks in roles.items():
        for sock in socks:
            child_fds[target] = sock.fileno()
            fds.setdefault(role, []).append(target)
            target += 1
    return child_fds, fds


# -- the workers ------------------------------------------------------------------------------


class WorkerProcess(ProcessProtocol):
    """One worker as the supervisor sees it: its pipe of ``sd_notify`` messages and its end."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ready = False
        self.status = ""
        self.last_ping: float | None = None  # when it last sent WATCHDOG=1
        self.pid: int | None = None
        self.ended: Deferred[None] = Deferred()
        self._buffer = b""

    def connectionMade(self) -> None:
        self.pid = self.transport.pid if self.transport is not None else None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != CONTROL_FD:
            return
        self._buffer += data
        *messages, self._buffer = self._buffer.split(b"\0")
        for message in messages:
            self.notified(dict(_assignments(message)))

    def notified(self, values: dict[str, str]) -> None:
        if "STATUS" in values:
            self.status = values["STATUS"]
        if values.get("WATCHDOG") == "1":
            self.last_ping = self.supervisor.reactor.seconds()
        if values.get("RELOADING") == "1":
            self.ready = False
        if values.get("READY") == "1":
            self.ready = True
            self.supervisor.worker_ready(self)

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.ended.callback(None)
        self.supervisor.worker_ended(self, code, getattr(reason.value, "signal", None))

    def signal(self, signum: int) -> None:
        transport: Any = self.transport
        if transport is not None and transport.pid is not None:
            with contextlib.suppress(Exception):  # already gone: processEnded follows
                transport.signalProcess(signum)


class GatedNotifier(Notifier):
    """systemd's notifier, whose ``WATCHDOG=1`` goes out only while every ready worker pings
    its supervisor too: a wedged worker reactor stops the pings, and systemd restarts us."""

    def __init__(self, inner: Notifier) -> None:
        super().__init__(inner.address)
        self.supervisor: Supervisor | None = None

    def watchdog(self) -> bool:
        if self.supervisor is not None and not self.supervisor.workers_alive():
            log.error("a worker stopped pinging; holding back the watchdog")
            return False
        return super().watchdog()


def _assignments(message: bytes) -> Iterator[tuple[str, str]]:
    for line in message.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            yield key, value


class Supervisor:
    """Starts, watches, restarts and stops the workers; speaks ``sd_notify`` for all of them."""

    def __init__(
        self,
        config: Config,
        argv: Sequence[str],
        sockets: Sockets,
        reactor: Any,
        supervision: Supervision,
    ) -> None:
        self.config = config
        self.argv = list(argv)
        self.sockets = sockets
        self.reactor = reactor
        self.supervision = supervision
        self.workers: list[WorkerProcess | None] = [None] * sockets.count
        self.failed_starts = [0] * sockets.count
        self.stopping = False
        self.all_ready = False
        self.exit_code = 0

    @property
    def count(self) -> int:
        return self.sockets.count

    def start(self) -> None:
        self.supervision.status(f"starting {self.count} workers")
        self.spawn(0)  # the rest once worker 0 is ready (it creates first-start state)

    def spawn(self, index: int) -> None:
        if self.stopping:
            return
        child_fds, fds = child_descriptors(self.sockets.by_worker[index])
        env = {k: v for k, v in os.environ.items() if k not in STRIPPED_ENV}
        env[WORKER_ENV] = json.dumps(
            {
                "index": index,
                "count": self.count,
                "control": CONTROL_FD,
                "parent": os.getpid(),
                "fds": fds,
            }
        )
        worker = WorkerProcess(self, index)
        self.workers[index] = worker
        args = [sys.executable, "-m", "callboard.daemon.main", *self.argv]
        self.reactor.spawnProcess(worker, sys.executable, args, env=env, childFDs=child_fds)
        log.info("worker started", worker=index, pid=worker.pid)

    def worker_ready(self, worker: WorkerProcess) -> None:
        self.failed_starts[worker.index] = 0
        if worker.index == 0 and any(w is None for w in self.workers[1:]) and not self.all_ready:
            for index in range(1, self.count):
                if self.workers[index] is None:
                    self.spawn(index)
        live = [w for w in self.workers if w is not None]
        if len(live) == self.count and all(w.ready for w in live):
            first = not self.all_ready
            self.all_ready = True
            pids = ", ".join(str(w.pid) for w in live)
            self.supervision.ready(f"serving with {self.count} workers (PIDs {pids})")
            if first:
                log.info("all workers ready", workers=self.count, pids=[w.pid for w in live])

    def workers_alive(self) -> bool:
        """Every ready worker pinged within the watchdog's period (when one is set)."""
        interval = watchdog_interval()
        if interval is None:
            return True
        now = self.reactor.seconds()
        return all(
            w.last_ping is not None and now - w.last_ping <= 2 * interval
            for w in self.workers
            if w is not None and w.ready
        )

    def worker_ended(self, worker: WorkerProcess, code: int | None, signum: int | None) -> None:
        if self.workers[worker.index] is worker:
            self.workers[worker.index] = None
        if self.stopping:
            if code not in (0, None) and self.exit_code == 0:
                self.exit_code = EXIT_FAILURE
            return
        log.error("worker exited", worker=worker.index, pid=worker.pid, code=code, signal=signum)
        if not worker.ready:
            self.failed_starts[worker.index] += 1
        if not self.all_ready or self.failed_starts[worker.index] >= MAX_FAILED_STARTS:
            # A worker that cannot start: the daemon cannot run as configured. A worker that
            # exited with a status has said why on stderr (one line); one killed has not.
            self.fail(
                None
                if code is not None
                else f"worker {worker.index} was killed by signal {signum} before it was ready"
            )
            return
        self.supervision.status(f"restarting worker {worker.index}")
        self.reactor.callLater(RESTART_DELAY, self.respawn, worker.index)

    def respawn(self, index: int) -> None:
        if self.workers[index] is None:
            self.spawn(index)

    def fail(self, message: str | None) -> None:
        if message is not None:
            print(f"callboard serve: {message}", file=sys.stderr)
        self.exit_code = EXIT_FAILURE
        if self.reactor.running:
            self.reactor.stop()

    def reload(self) -> None:
        """SIGHUP: every worker re-reads the configuration; ready again when all have."""
        self.supervision.reloading()
        for worker in self.workers:
            if worker is not None:
                worker.ready = False
                worker.signal(signal.SIGHUP)

    def stop(self) -> Deferred[Any]:
        """SIGTERM to every worker; fires when all have exited (killed past the grace)."""
        self.stopping = True
        self.supervision.stopping()
        live = [w for w in self.workers if w is not None]
        for worker in live:
            worker.signal(signal.SIGTERM)
        if not live:
            return succeed(None)
        kill = self.reactor.callLater(self.config.shutdown_grace + KILL_AFTER, self._kill, live)
        done = DeferredList([w.ended for w in live], consumeErrors=True)

        def stopped(result: object) -> object:
            if kill.active():
                kill.cancel()
            return result

        return done.addBoth(stopped)

    def _kill(self, workers: list[WorkerProcess]) -> None:
        for worker in workers:
            if not worker.ended.called:
                log.error("worker did not stop in time; killing it", worker=worker.index)
                worker.signal(signal.SIGKILL)
                self.exit_code = EXIT_FAILURE


def stop_once_on_signals(reactor: Any) -> None:
    """``SIGTERM``/``SIGINT`` stop the reactor once: under systemd (``KillMode=control-group``)
    or from a terminal every process of the daemon gets the signal, and a worker gets its
    supervisor's too; a second one must not try to stop a reactor already stopping."""
    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        if not stopping:
            stopping.append(signum)
            log.info("stopping", signal=signal.Signals(signum).name)
            reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def run_supervisor(config: Config, argv: Sequence[str], inherited: InheritedSockets) -> int:
    """Run ``config.workers`` workers until a signal stops the daemon; the exit status."""
    configure_logging(config.log_level, log_format=config.log_format)
    try:
        check_worker_config(config)
        notifier = GatedNotifier(Notifier.from_environ())
        watchdog_interval()  # a malformed WATCHDOG_USEC is refused now, not at the first ping
    except (ConfigError, SdNotifyError) as exc:
        print(f"callboard serve: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if inherited.activated:
            sockets = share_inherited(inherited, config.workers)
        else:
            sockets = bind_sockets(config, config.workers)
    except OSError as exc:
        print(f"callboard serve: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    reactor: Any = _reactor
    supervisor = Supervisor(config, argv, sockets, reactor, Supervision(notifier, reactor))
    notifier.supervisor = supervisor

    def hang_up(_signum: int, _frame: object) -> None:
        reactor.callFromThread(supervisor.reload)

    reactor.callWhenRunning(stop_once_on_signals, reactor)
    reactor.callWhenRunning(supervisor.start)
    reactor.addSystemEventTrigger("before", "shutdown", supervisor.stop)
    signal.signal(signal.SIGHUP, hang_up)
    try:
        reactor.run()
    finally:
        sockets.close()
    return supervisor.exit_code
