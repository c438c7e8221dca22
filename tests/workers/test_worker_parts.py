"""The parts of ``--workers`` that need no process: plans, configs, sockets, aggregation, lock."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from callboard.daemon.config import ConfigError, load_config
from callboard.daemon.lock import acquire_state_lock, lock_holder
from callboard.daemon.supervisor import (
    CONTROL_FD,
    WORKER_ENV,
    bind_sockets,
    check_worker_config,
    child_descriptors,
)
from callboard.daemon.workers import (
    PipeNotifier,
    aggregate_status,
    merged_exposition,
    plan_from_environ,
    worker_config,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.python.failure import Failure


def config(tmp_path: Path, **overrides: object) -> object:
    base = {
        "state_dir": str(tmp_path / "state"),
        "network.listen_addresses": ["127.0.0.1"],
        "network.tftp_port": 0,
        "network.http_port": 0,
        "network.tvs_port": 0,
        "network.sip_port": 0,
        "network.sip_tls_port": 0,
        "network.https_port": 0,
        "workers": 2,
    }
    return load_config(None, {**base, **overrides})


def test_the_plan_comes_from_the_environment_once(tmp_path: Path) -> None:
    env = {
        WORKER_ENV: json.dumps(
            {"index": 1, "count": 2, "control": 3, "parent": 42, "fds": {"tftp": [4, 5]}}
        )
    }
    plan = plan_from_environ(env)
    assert plan is not None and plan.index == 1 and plan.fds == {"tftp": (4, 5)}
    assert WORKER_ENV not in env and plan_from_environ(env) is None


def test_workers_other_than_0_leave_the_singletons_to_worker_0(tmp_path: Path) -> None:
    cfg = config(tmp_path, **{"metrics.port": 9100, "network.web_port": 8443})
    env = {WORKER_ENV: json.dumps({"index": 0, "count": 2, "control": 3, "parent": 1, "fds": {}})}
    first = plan_from_environ(env)
    assert first is not None
    zero = worker_config(cfg, first)  # type: ignore[arg-type]
    assert zero.metrics.port == 9100 and zero.network.web_port == 8443
    assert zero.registry.feed_interval <= 0.2
    other = worker_config(cfg, first.__class__(1, 2, 3, 1, {}))  # type: ignore[arg-type]
    assert other.metrics.port == 0 and other.network.web_port == -1
    assert other.admin_socket == tmp_path / "state" / "workers" / "admin-1.sock"


def test_worker_counts_and_endpoints_are_checked(tmp_path: Path) -> None:
    for count in (0, 65):
        with pytest.raises(ConfigError, match="between 1 and 64"):
            config(tmp_path, workers=count)
    with pytest.raises(ConfigError, match=r"\[endpoints\] http"):
        check_worker_config(config(tmp_path, **{"endpoints.http": "tcp:0"}))  # type: ignore[arg-type]
    check_worker_config(config(tmp_path, **{"endpoints.admin": "unix:address=/tmp/a"}))  # type: ignore[arg-type]


def test_each_worker_gets_its_own_reuseport_socket_on_one_port(tmp_path: Path) -> None:
    sockets = bind_sockets(config(tmp_path), 3)  # type: ignore[arg-type]
    try:
        ports = {
            role: {s.getsockname()[1] for w in sockets.by_worker for s in w[role]}
            for role in sockets.by_worker[0]
        }
        assert set(ports) == {"tftp", "http", "tvs", "sip-tcp", "sip-udp", "sip-tls"}
        assert all(len(p) == 1 and 0 not in p for p in ports.values()), ports
        assert ports["sip-udp"] == ports["sip-tcp"]  # port 0: UDP takes TCP's number
        fds = {s.fileno() for w in sockets.by_worker for s in w["http"]}
        assert len(fds) == 3  # one socket per worker, not one shared
        child, named = child_descriptors(sockets.by_worker[1])
        assert child[CONTROL_FD] == "r" and min(fd for fds in named.values() for fd in fds) == 4
        assert all(isinstance(child[fd], int) for fds in named.values() for fd in fds)
    finally:
        sockets.close()


def test_status_aggregates_answering_workers_and_names_the_silent_one() -> None:
    own = {
        "registrations": 2,
        "counters": {"sip_register": 5},
        "uptime_seconds": 3.0,
        "worker": {"index": 0, "pid": 10, "served": {"tvs_requests": 1}},
    }
    peer = dict(own, registrations=3, worker={"index": 1, "pid": 11, "served": {}})
    answers = [
        (True, json.dumps(peer).encode()),
        (False, Failure(ConnectionRefusedError("refused"))),
    ]
    status = aggregate_status(own, answers)
    assert status["registrations"] == 5 and status["counters"] == {"sip_register": 10}
    assert [w["pid"] for w in status["workers"][:2]] == [10, 11]
    assert status["workers"][2]["index"] == 2 and "no answer" in status["workers"][2]["error"]
    assert status["workers_answering"] == 2


def test_metrics_of_every_worker_are_one_exposition_with_a_worker_label() -> None:
    text = (
        "# HELP callboard_transfers_total Files.\n# TYPE callboard_transfers_total counter\n"
        'callboard_transfers_total{protocol="tftp"} 3.0\n'
    )
    merged = merged_exposition([(0, text), (1, text.replace("3.0", "4.0")), (2, None)]).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(merged)
        for s in f.samples
    }
    assert samples[("callboard_transfers_total", (("protocol", "tftp"), ("worker", "0")))] == 3
    assert samples[("callboard_transfers_total", (("protocol", "tftp"), ("worker", "1")))] == 4
    assert samples[("callboard_worker_up", (("worker", "2"),))] == 0
    assert merged.count("# TYPE callboard_transfers_total counter") == 1


def test_a_worker_tells_its_supervisor_over_a_pipe() -> None:
    read, write = os.pipe()
    notifier = PipeNotifier(write)
    try:
        assert notifier.enabled and notifier.ready("serving")
        assert os.read(read, 100) == b"READY=1\nSTATUS=serving\0"
    finally:
        notifier.close()
        os.close(read)
    assert not notifier.send("READY=1")  # closed: dropped, never raised


def test_the_lock_holder_is_named_only_while_the_lock_is_held(tmp_path: Path) -> None:
    assert lock_holder(tmp_path) is None
    lock = acquire_state_lock(tmp_path, pid=4242)
    try:
        assert lock_holder(tmp_path) == 4242
    finally:
        lock.release()
    assert lock_holder(tmp_path) is None


def test_a_port_in_use_is_refused_before_any_worker_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"http on 127.0.0.1:{port}"):
            bind_sockets(config(tmp_path, **{"network.http_port": port}), 2)  # type: ignore[arg-type]
