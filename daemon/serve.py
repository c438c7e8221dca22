"""What ``callboard serve`` checks before it touches anything: inherited sockets, the lock.

Each refusal is one line on stderr and an exit status, never a traceback: a malformed
``LISTEN_FDS`` or an unknown socket name exits 2 (the unit is misconfigured); a state
directory another daemon holds exits 1, naming that daemon's PID.
"""

from __future__ import annotations

import sys

from callboard.protocols.listening import Adopt

from .config import Config
from .inherited import InheritedSockets, SocketActivationError
from .lock import AlreadyRunning, StateDirLock, acquire_state_lock

EXIT_FAILURE = 1
EXIT_CONFIG = 2


def endpoint_socket_names(config: Config) -> set[str]:
    """Names an ``[endpoints]`` ``systemd:name=…`` spec adopts (accepted besides the roles)."""
    names: set[str] = set()
    for key in ("http", "tvs", "sip", "sip_tls", "admin"):
        spec = config.endpoints.spec(key)
        if spec is not None and isinstance(spec.source, Adopt) and spec.source.systemd_name:
            names.add(spec.source.systemd_name)
    return names


def start_checks(config: Config, inherited: InheritedSockets) -> StateDirLock | int:
    """The held state-directory lock, or the exit status after saying why not."""
    try:
        inherited.check(endpoint_socket_names(config))
    except SocketActivationError as exc:
        print(f"callboard serve: socket activation: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return acquire_state_lock(config.state_dir)
    except AlreadyRunning as exc:
        print(f"callboard serve: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(
            f"callboard serve: cannot lock the state directory {config.state_dir}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
