"""One daemon per state directory.

Two daemons on one state directory would hold two in-memory views of one registry (a code
could be redeemed twice), so ``callboard serve`` takes an exclusive lock on
``<state-dir>/callboard.lock`` before it binds anything or opens the database, and holds it
for the life of the process. The kernel drops the lock when the process dies however it dies,
so a crash never leaves a stale lock behind; the PID written in the file only names the
holder for the error message (a file left over from a dead holder is simply taken over).

``flock`` rather than POSIX record locks: a record lock is released when *any* descriptor of
the file is closed in the process, which a stray ``open(...).read()`` would do.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = "callboard.lock"


class AlreadyRunning(Exception):
    """Another process holds the state directory; the message names it (one line)."""

    def __init__(self, path: Path, holder_pid: int | None) -> None:
        self.path = path
        self.holder_pid = holder_pid
        who = f"PID {holder_pid}" if holder_pid is not None else "a process whose PID is unknown"
        super().__init__(
            f"another callboard ({who}) is running on this state directory (it holds {path})"
        )


class StateDirLock:
    """The held lock. Keep a reference for the process's life; ``release`` is for tests."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the only descriptor drops the flock


def acquire_state_lock(state_dir: Path, pid: int | None = None) -> StateDirLock:
    """Lock ``state_dir`` for this process, or raise :class:`AlreadyRunning` at once.

    Creates the directory (0700) if needed. The descriptor is close-on-exec so that nothing
    the daemon starts keeps the lock after the daemon is gone.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        raise AlreadyRunning(path, holder) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid() if pid is None else pid}\n".encode(), 0)
    return StateDirLock(path, fd)


def _read_pid(fd: int) -> int | None:
    """The holder's PID, if it has written it yet (it does right after locking)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def lock_holder(state_dir: Path) -> int | None:
    """The PID holding ``state_dir``'s lock, or ``None`` when no process holds it.

    A worker of ``callboard serve --workers N`` takes no lock of its own (its supervisor holds
    the one lock for them all); it checks with this that its supervisor really holds it.
    """
    path = state_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd)
    else:
        return None  # we could take it: nobody holds it (closing drops our shared lock)
    finally:
        os.close(fd)
