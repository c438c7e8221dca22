"""One worker of ``callboard serve --workers N``: the service tree on sockets its supervisor bound.

A worker is ``callboard serve`` run again by the supervisor (:mod:`.supervisor`) with
``CALLBOARD_WORKER`` set: it takes no state lock (it checks that its supervisor holds it),
adopts the sockets it was handed the way a socket-activated daemon adopts systemd's, tells
the supervisor ``READY=1``/``STATUS=``/``STOPPING=1`` over a pipe instead of
``NOTIFY_SOCKET``, and stops by itself if the supervisor goes away.

Every worker has its own in-memory view of the one registry and follows the store's change
feed every :data:`FEED_INTERVAL` seconds at most (the SQLite change counter; PostgreSQL
``NOTIFY`` at once), so a change made through any worker — an activation, an admin write —
is served by all of them within a second. Conditional writes in the store keep a code used
once and a MAC on one device however many workers race.

Worker 0 is the one operators talk to: it serves the admin socket, the web console,
``/metrics`` and the edge, as a single daemon does. The others serve their admin API on
``<state-dir>/workers/admin-<i>.sock`` and their own metrics on ``…/metrics-<i>.sock``;
worker 0's ``status`` asks each of them for theirs (``workers``: one entry per worker with
its PID and what it served; ``registrations`` and ``counters`` are totals), and its
``/metrics`` serves every worker's metrics with a ``worker`` label.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
from callboard.protocols.listening import ListenerSpec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from .config import Config
from .edge.settings import OFF
from .inherited import InheritedSockets
from .lock import lock_holder
from .logs import get_logger
from .metrics import metrics_resource, metrics_site
from .sdnotify import Notifier
from .service import CallboardService
from .supervisor import WORKER_ENV, stop_once_on_signals

log = get_logger("callboard.workers")

FEED_INTERVAL = 0.2  # seconds: the longest a worker waits to see another worker's change
PARENT_POLL = 0.5  # seconds between looks at whether the supervisor is still there
PEER_TIMEOUT = 2.0  # seconds worker 0 waits for another worker's status or metrics
EXIT_FAILURE = 1
# Metric families whose totals say what a worker served (status: workers[].served).
SERVED = {
    "callboard_tvs_requests": "tvs_requests",
    "callboard_transfers": "transfers",
    "callboard_sip_register_responses": "sip_register_responses",
}


@dataclass(frozen=True)
class WorkerPlan:
    """What the supervisor told a worker: which it is, its pipe, its sockets by role."""

    index: int
    count: int
    control: int
    parent: int
    fds: Mapping[str, tuple[int, ...]]


def plan_from_environ(environ: dict[str, str] | None = None) -> WorkerPlan | None:
    """The worker's plan from ``CALLBOARD_WORKER`` (removed), or ``None``: not a worker."""
    env = os.environ if environ is None else environ
    raw = env.pop(WORKER_ENV, None)
    if raw is None:
        return None
    data = json.loads(raw)
    return WorkerPlan(
        index=int(data["index"]),
        count=int(data["count"]),
        control=int(data["control"]),
        parent=int(data["parent"]),
        fds={str(role): tuple(int(fd) for fd in fds) for role, fds in data["fds"].items()},
    )


def workers_dir(state_dir: Path) -> Path:
    return state_dir / "workers"


def peer_admin_socket(state_dir: Path, index: int) -> Path:
    return workers_dir(state_dir) / f"admin-{index}.sock"


def peer_metrics_socket(state_dir: Path, index: int) -> Path:
    return workers_dir(state_dir) / f"metrics-{index}.sock"


def worker_config(config: Config, plan: WorkerPlan) -> Config:
    """The configuration as one worker runs it: the feed followed often; for workers other
    than 0, the singletons off (admin on a private socket, no metrics, web, edge or demo)."""
    config = replace(
        config,
        registry=replace(
            config.registry, feed_interval=min(config.registry.feed_interval, FEED_INTERVAL)
        ),
    )
    if plan.index == 0:
        return config
    return replace(
        config,
        admin_socket=peer_admin_socket(config.state_dir, plan.index),
        demo=False,
        metrics=replace(config.metrics, port=0),
        network=replace(config.network, web_port=-1),
        edge=replace(config.edge, port=OFF, sip_oauth_port=OFF),
    )


class PipeNotifier(Notifier):
    """``sd_notify`` to the supervisor: each message a NUL-terminated write to the pipe."""

    def __init__(self, fd: int) -> None:
        super().__init__(None)
        self.fd: int | None = fd
        os.set_blocking(fd, False)

    @property
    def enabled(self) -> bool:
        return self.fd is not None

    def send(self, *assignments: str) -> bool:
        if self.fd is None:
            return False
        try:
            os.write(self.fd, "\n".join(assignments).encode() + b"\0")
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


class WorkerService(CallboardService):
    """The service tree of one worker: its private sockets, and worker 0's aggregate views."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        inherited: InheritedSockets | None,
        plan: WorkerPlan,
    ) -> None:
        super().__init__(config, reactor, inherited)
        self.plan = plan

    @property
    def aggregates(self) -> bool:
        """Worker 0 of several answers for them all."""
        return self.plan.index == 0 and self.plan.count > 1

    def _open_state(self) -> None:
        workers_dir(self.config.state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        super()._open_state()

    def _wire(self) -> None:
        super()._wire()
        if self.plan.index > 0:
            path = peer_metrics_socket(self.config.state_dir, self.plan.index)
            spec = ListenerSpec.unix(str(path), mode=0o600, lockfile=True)
            self._add_listener("worker-metrics", spec, metrics_site(self.metrics.registry))
        watch = TimerService(PARENT_POLL, self._check_supervisor)
        watch.clock = self.reactor
        watch.setServiceParent(self)

    def startService(self) -> None:
        stop_once_on_signals(self.reactor)  # after the reactor's own handlers: replaces them
        super().startService()

    def _metrics_site(self) -> Site:
        if not self.aggregates:
            return super()._metrics_site()
        root = metrics_resource(self.metrics.registry)
        root.putChild(b"metrics", AllWorkersMetrics(self))
        site = Site(root)
        site.displayTracebacks = False
        site.noisy = False
        return site

    def _check_supervisor(self) -> None:
        """An orphaned worker stops: its sockets must not outlive the daemon's lock."""
        if os.getppid() != self.plan.parent and self.reactor.running:
            log.error("the supervisor is gone; stopping", worker=self.plan.index)
            os.kill(os.getpid(), signal.SIGTERM)  # the one way this process stops

    # -- status --------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """This worker in a status report: who it is and what it has served."""
        served = dict.fromkeys(SERVED.values(), 0)
        for family in self.metrics.registry.collect():
            key = SERVED.get(family.name)
            if key is not None:
                served[key] = int(sum(s.value for s in family.samples if s.name.endswith("_total")))
        return {"index": self.plan.index, "pid": os.getpid(), "served": served}

    def status(self) -> Any:
        own = super().status()
        own["worker"] = self.identity()
        if not self.aggregates:
            return own
        own["supervisor_pid"] = self.plan.parent
        asks = [
            fetch_unix(self.reactor, peer_admin_socket(self.config.state_dir, i), b"/v1/status")
            for i in range(1, self.plan.count)
        ]
        return DeferredList(asks, consumeErrors=True).addCallback(
            lambda answers: aggregate_status(own, answers)
        )


def _summary(status: Mapping[str, Any]) -> dict[str, Any]:
    return {
        **status["worker"],
        "uptime_seconds": status.get("uptime_seconds"),
        "registrations": status.get("registrations", 0),
    }


def aggregate_status(own: dict[str, Any], answers: list[tuple[bool, Any]]) -> dict[str, Any]:
    """Worker 0's status with every worker's entry; registrations and counters summed."""
    workers = [_summary(own)]
    for index, (ok, body) in enumerate(answers, 1):
        if ok:
            workers.append(_summary(json.loads(body)))
        else:
            workers.append({"index": index, "error": f"no answer: {body.getErrorMessage()}"})
    answering = [w for w in workers if "error" not in w]
    counters: dict[str, int] = {}
    for status in [own, *(json.loads(body) for ok, body in answers if ok)]:
        for key, value in status.get("counters", {}).items():
            counters[key] = counters.get(key, 0) + int(value)
    return {
        **own,
        "registrations": sum(int(w["registrations"]) for w in answering),
        "counters": counters,
        "workers": workers,
        "workers_answering": len(answering),
    }


# -- talking to the other workers -------------------------------------------------------------


class _UNIXSocket:
    """An ``IAgentEndpointFactory``: every request goes to one UNIX socket."""

    def __init__(self, reactor: Any, path: Path) -> None:
        self.reactor = reactor
        self.path = path

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return UNIXClientEndpoint(self.reactor, str(self.path), timeout=PEER_TIMEOUT)


def fetch_unix(reactor: Any, path: Path, target: bytes) -> Deferred[bytes]:
    """``GET target`` over the UNIX socket at ``path``: the body, or a failure in time."""
    agent = Agent.usingEndpointFactory(reactor, _UNIXSocket(reactor, path))
    headers = Headers({b"X-Callboard-User": [b"callboard-worker-0"]})
    d: Deferred[Any] = agent.request(b"GET", b"http://worker" + target, headers)

    def body(response: Any) -> Deferred[bytes]:
        if response.code != 200:
            raise ValueError(f"{path.name} answered {response.code}")
        read: Deferred[bytes] = readBody(response)
        return read

    d.addCallback(body)
    d.addTimeout(PEER_TIMEOUT, reactor)
    return d


class _Families:
    """A collector over families already gathered (for ``generate_latest``)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merged_exposition(texts: list[tuple[int, str | None]]) -> bytes:
    """Every worker's exposition as one: each sample labelled ``worker``; plus
    ``callboard_worker_up`` (1: the worker answered this scrape)."""
    families: dict[str, Metric] = {}
    up = GaugeMetricFamily(
        "callboard_worker_up", "1 when the worker answered this scrape", labels=["worker"]
    )
    for index, text in texts:
        up.add_metric([str(index)], 0 if text is None else 1)
        for family in text_string_to_metric_families(text or ""):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type)
            )
            merged.samples.extend(
                Sample(s.name, {**s.labels, "worker": str(index)}, s.value, s.timestamp)
                for s in family.samples
            )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([up, *families.values()]))
    return generate_latest(registry)


class AllWorkersMetrics(Resource):
    """Worker 0's ``/metrics``: its own and every other worker's, asked at scrape time."""

    isLeaf = True

    def __init__(self, service: WorkerService) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.service = service

    def render_GET(self, request: Request) -> Any:
        service = self.service
        own = generate_latest(service.metrics.registry).decode()
        state_dir = service.config.state_dir
        asks = [
            fetch_unix(service.reactor, peer_metrics_socket(state_dir, i), b"/metrics")
            for i in range(1, service.plan.count)
        ]
        finished: list[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))

        def answer(answers: list[tuple[bool, Any]]) -> None:
            texts: list[tuple[int, str | None]] = [(0, own)]
            texts += [(i, body.decode() if ok else None) for i, (ok, body) in enumerate(answers, 1)]
            output = merged_exposition(texts)
            if finished:
                return
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            request.write(output)
            request.finish()

        def failed(failure: Failure) -> None:
            log.error("metrics of the workers not gathered", error=str(failure.value))
            if not finished:
                request.setResponseCode(500)
                request.finish()

        DeferredList(asks, consumeErrors=True).addCallback(answer).addErrback(failed)
        return NOT_DONE_YET


# -- running ------------------------------------------------------------------------------------


def run_worker(config: Config, plan: WorkerPlan, reload_config: Callable[[], Config]) -> int:
    """Run this worker until its supervisor stops it; the exit status."""
    holder = lock_holder(config.state_dir)
    if holder != plan.parent:
        print(
            f"callboard serve: worker {plan.index}: the state directory is not held by its "
            f"supervisor (PID {plan.parent}; held by {holder or 'nobody'})",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    from .runner import run_daemon

    structlog.contextvars.bind_contextvars(worker=plan.index)  # on every line it logs

    def service(config: Config, reactor: Any, inherited: InheritedSockets | None) -> Any:
        return WorkerService(config, reactor, inherited, plan)

    return run_daemon(
        worker_config(config, plan),
        inherited=InheritedSockets(dict(plan.fds)),
        reload_config=lambda: worker_config(reload_config(), plan),
        notifier=PipeNotifier(plan.control),
        service_factory=service,
    )
