"""The ``sd_notify`` protocol: tell systemd when the daemon is ready, busy, alive or stopping.

A ``Type=notify`` service is "started" only when it sends ``READY=1``; systemd hands the
service the address of a datagram socket in ``NOTIFY_SOCKET`` (a path, or ``@name`` for the
abstract namespace) and each message is one datagram of newline-separated ``KEY=value``
lines. That is the whole protocol, so it is a few lines here rather than a dependency.

Without ``NOTIFY_SOCKET`` (a terminal, a test, another supervisor) every call does nothing.
Sending never blocks and never raises: a message systemd cannot take is dropped (``False``),
because a daemon must not stall its reactor or die because its supervisor went away.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple

NOTIFY_SOCKET = "NOTIFY_SOCKET"


class SdNotifyError(ValueError):
    """The environment names a notify socket or watchdog we cannot use (one-line message)."""


def socket_address(value: str) -> str | bytes:
    """``NOTIFY_SOCKET`` as a ``sendto`` address: a path, or an abstract name as bytes.

    ``@name`` is Linux's abstract namespace, spelt with a leading NUL on the wire.
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise SdNotifyError(
        f"NOTIFY_SOCKET={value!r} is neither an absolute path nor an '@' abstract name"
    )


def _one_line(text: str) -> str:
    """A value cannot span lines: a newline would start a new assignment."""
    return " ".join(text.splitlines())


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, the clock systemd compares ``RELOADING=1`` with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends notifications to one address; with ``address=None`` every call is a no-op."""

    def __init__(self, address: str | bytes | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for, or a silent one when ``NOTIFY_SOCKET`` is unset.

        Raises :class:`SdNotifyError` when the variable is set to something unusable, so that
        start-up can say so instead of timing out in ``systemctl start``.
        """
        env = os.environ if environ is None else environ
        value = env.get(NOTIFY_SOCKET, "")
        return cls(socket_address(value) if value else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; ``True`` when the kernel took it."""
        if self.address is None:
            return False
        payload = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(payload, self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Every listener is bound and the registry loaded: systemd may call us started."""
        lines = ["READY=1"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        return self.send(*lines)

    def status(self, text: str) -> bool:
        """A free-form line shown by ``systemctl status``."""
        return self.send(f"STATUS={_one_line(text)}")

    def reloading(self, now_usec: Callable[[], int] = monotonic_usec) -> bool:
        """A reload has begun; ``ready()`` ends it. ``MONOTONIC_USEC`` dates the start
        (systemd 253+ uses it for ``Type=notify-reload``; older versions ignore it)."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={now_usec()}")

    def stopping(self) -> bool:
        """Shutdown has begun; systemd stops expecting watchdog pings."""
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        """One keep-alive ping for ``WatchdogSec=``."""
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time to start or stop (``EXTEND_TIMEOUT_USEC``)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={round(seconds * 1_000_000)}")

    def close(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()


class Watchdog(NamedTuple):
    """How often to ping and what to call: ``LoopingCall(w.ping).start(w.interval)``."""

    interval: float
    ping: Callable[[], None]


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between pings (half of ``WATCHDOG_USEC``, as systemd advises), or ``None``.

    ``None`` when no watchdog is set, or it is meant for another process (``WATCHDOG_PID``
    names a different PID). A malformed value raises :class:`SdNotifyError`.
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC", "")
    if not raw:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner:
        if not owner.isdigit():
            raise SdNotifyError(f"WATCHDOG_PID={owner!r} is not a process id")
        if int(owner) != (os.getpid() if pid is None else pid):
            return None
    if not raw.isdigit() or int(raw) == 0:
        raise SdNotifyError(f"WATCHDOG_USEC={raw!r} is not a positive number of microseconds")
    return int(raw) / 2_000_000


def watchdog(
    notifier: Notifier, environ: Mapping[str, str] | None = None, pid: int | None = None
) -> Watchdog | None:
    """The reactor-side watchdog, or ``None`` when systemd expects no pings from us.

    Pinging from a ``LoopingCall`` on the reactor is the point: a wedged reactor stops
    pinging and systemd restarts the service.
    """
    interval = watchdog_interval(environ, pid)
    if interval is None or not notifier.enabled:
        return None

    def ping() -> None:
        notifier.watchdog()

    return Watchdog(interval, ping)
