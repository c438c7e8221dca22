"""sd_notify against a real AF_UNIX datagram socket, bound by the test as systemd would."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from callboard.daemon.sdnotify import (
    Notifier,
    SdNotifyError,
    socket_address,
    watchdog,
    watchdog_interval,
)
from twisted.internet import task


class Listener:
    """The systemd side: a bound datagram socket and what the daemon sent to it."""

    def __init__(self, address: str | bytes, env_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5)
        self.env_value = env_value

    def receive(self) -> list[str]:
        return self.sock.recv(4096).decode().split("\n")

    def nothing_waiting(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5)
        return False


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listener]:
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        ls = Listener(path, path)
    else:
        name = f"callboard-test-{os.getpid()}-{os.urandom(4).hex()}"
        ls = Listener(b"\0" + name.encode(), "@" + name)
    yield ls
    ls.sock.close()


def notifier_for(ls: Listener) -> Notifier:
    return Notifier.from_environ({"NOTIFY_SOCKET": ls.env_value})


def test_ready_with_status(listener: Listener) -> None:
    n = notifier_for(listener)
    assert n.ready("listening on 6 sockets") is True
    assert listener.receive() == ["READY=1", "STATUS=listening on 6 sockets"]


def test_status_is_kept_on_one_line(listener: Listener) -> None:
    n = notifier_for(listener)
    assert n.status("loading\nregistry") is True
    assert listener.receive() == ["STATUS=loading registry"]


def test_reloading_carries_monotonic_usec(listener: Listener) -> None:
    n = notifier_for(listener)
    assert n.reloading(now_usec=lambda: 123456789)
    assert listener.receive() == ["RELOADING=1", "MONOTONIC_USEC=123456789"]
    assert n.ready()
    assert listener.receive() == ["READY=1"]


def test_reloading_uses_the_monotonic_clock(listener: Listener) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier_for(listener).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = listener.receive()
    assert lines[0] == "RELOADING=1"
    assert before <= int(lines[1].removeprefix("MONOTONIC_USEC=")) <= after


def test_stopping_watchdog_and_extend(listener: Listener) -> None:
    n = notifier_for(listener)
    assert n.stopping() and n.watchdog() and n.extend_timeout(2.5)
    assert listener.receive() == ["STOPPING=1"]
    assert listener.receive() == ["WATCHDOG=1"]
    assert listener.receive() == ["EXTEND_TIMEOUT_USEC=2500000"]


def test_watchdog_pings_from_a_looping_call(listener: Listener) -> None:
    n = notifier_for(listener)
    env = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    wd = watchdog(n, env)
    assert wd is not None and wd.interval == 2.0
    clock = task.Clock()
    loop = task.LoopingCall(wd.ping)
    loop.clock = clock
    loop.start(wd.interval)  # pings at once, then every interval
    clock.advance(2.0)
    loop.stop()
    assert [listener.receive(), listener.receive()] == [["WATCHDOG=1"], ["WATCHDOG=1"]]
    assert listener.nothing_waiting()


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier.from_environ({})
    assert not n.enabled
    assert n.ready("x") is False and n.watchdog() is False
    assert watchdog(n, {"WATCHDOG_USEC": "1000000"}) is None


def test_a_vanished_manager_is_not_an_error(tmp_path: Path) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.enabled and n.ready() is False


def test_unusable_notify_socket_is_refused() -> None:
    with pytest.raises(SdNotifyError, match="neither an absolute path"):
        Notifier.from_environ({"NOTIFY_SOCKET": "relative/path"})
    with pytest.raises(SdNotifyError):
        socket_address("@")
    assert socket_address("@x") == b"\0x"


def test_watchdog_interval_rules() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid=7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, pid=7) == 15.0
    # Meant for another process (a child inherited the environment): not ours to ping.
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, pid=7) is None
    for bad in ("0", "-5", "10s", "1.5"):
        with pytest.raises(SdNotifyError, match="WATCHDOG_USEC"):
            watchdog_interval({"WATCHDOG_USEC": bad})
    with pytest.raises(SdNotifyError, match="WATCHDOG_PID"):
        watchdog_interval({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "me"})
