"""A real ``callboard serve`` subprocess for end-to-end tests, and the CLI runner."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CALLBOARD = [sys.executable, "-m", "callboard.daemon.main"]


def run_cli(
    *args: str, timeout: float = 60, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the ``callboard`` CLI as a user would; never raises on a non-zero exit."""
    result = subprocess.run(
        [*CALLBOARD, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"callboard {' '.join(args)} failed: {result.stderr}")
    return result


def serve_args(state_dir: Path, **ports: int) -> list[str]:
    """``serve`` on 127.0.0.1 with every port 0 unless given (``tvs=2445``, ``sip_tls=…``).

    HTTPS (6971) is off with port 0; turn it on with ``--set endpoints.https=tcp:0:…``.
    """
    args = ["serve", "--state-dir", str(state_dir), "--listen-address", "127.0.0.1"]
    for name in ("tftp", "http", "tvs", "sip", "sip_tls", "https"):
        args += [f"--{name.replace('_', '-')}-port", str(ports.get(name, 0))]
    return args


# Runs the daemon the way systemd socket activation does: the given descriptors become 3, 4, ...
# and LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES describe them (argv: fds, names, then serve args).
_SYSTEMD_SHIM = """
import os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
for target, fd in enumerate(fds, 3):
    os.dup2(fd, target)
os.environ.update(
    LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[2]
)
os.execv(sys.executable, [sys.executable, "-m", "callboard.daemon.main", *sys.argv[3:]])
"""


def systemd_launcher(fds: list[int], names: list[str]) -> list[str]:
    """A command prefix that hands ``fds`` to the daemon as systemd would (pass them too)."""
    return [sys.executable, "-c", _SYSTEMD_SHIM, ",".join(map(str, fds)), ":".join(names)]


class Daemon:
    """A ``callboard serve`` subprocess with its own state dir.

    ``launcher`` replaces ``python -m callboard.daemon.main`` (e.g. :func:`systemd_launcher`);
    ``pass_fds`` are descriptors the child inherits.
    """

    def __init__(
        self,
        state_dir: Path,
        *extra: str,
        socket: Path | None = None,
        launcher: list[str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.state_dir = state_dir
        self.extra = list(extra)
        self.socket = socket or state_dir / "admin.sock"
        self.launcher = launcher or CALLBOARD
        self.pass_fds = pass_fds
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = state_dir.parent / f"{state_dir.name}-daemon.log"
        self.status: dict[str, Any] = {}

    def start(self, timeout: float = 30) -> Daemon:
        args = [*self.launcher, *serve_args(self.state_dir), *self.extra]
        log = open(self.log_path, "a")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, text=True, pass_fds=self.pass_fds
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            if self.socket.exists():
                status = run_cli("--admin-socket", str(self.socket), "status", "--json")
                if status.returncode == 0:
                    self.status = json.loads(status.stdout)
                    return self
            time.sleep(0.05)
        raise AssertionError(f"daemon did not start in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run_cli("--admin-socket", str(self.socket), *args, timeout=timeout)

    def json(self, *args: str) -> Any:
        result = self.cli(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def port(self, label: str) -> int:
        places = self.status["tftp"] if label == "tftp" else self.status[label]
        return int(places[0].rsplit(":", 1)[1])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        self.proc = None
        return code
