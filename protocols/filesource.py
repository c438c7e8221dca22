"""The read-only file tree that TFTP and HTTP both serve.

The provisioning tree (rendered configs, trust lists, firmware on disk) lives in the
daemon; the transports only need to turn a requested name into bytes. Both transports
normalise names the same way here, so that a name refused over TFTP is refused over HTTP.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from twisted.internet.defer import Deferred


class FileSourceError(Exception):
    """A request the file source refuses; the transport maps it to its own error."""


class FileNotFound(FileSourceError):
    """No such file (TFTP error 1, HTTP 404)."""


class AccessViolation(FileSourceError):
    """A name that may never be served: traversal, control bytes (TFTP error 2, HTTP 403)."""


class FileBody(Protocol):
    """An open file: its size is known up front (for tsize and Content-Length)."""

    @property
    def size(self) -> int: ...

    def read_at(self, offset: int, length: int) -> bytes:
        """Return up to ``length`` bytes from ``offset``; fewer only at the end."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Requester:
    """Who asked, for logging and per-client naming."""

    host: str
    port: int
    transport: str  # "tftp" or "http"


Opened: TypeAlias = FileBody | Deferred[FileBody]
"""What :meth:`FileSource.open` gives: a body now, or later (a file still being signed)."""


class FileSource(Protocol):
    """What TFTP and HTTP need from the daemon."""

    def open(self, name: str, requester: Requester) -> Opened:
        """Open a normalised name (see :func:`normalise_name`).

        Most names answer at once with a body. A file that takes work off the reactor thread
        first (a ``.sgn`` not yet signed) answers with a Deferred that fires with the body or
        fails with the same errors. Raises (or fails with) :class:`FileNotFound` or
        :class:`AccessViolation`.
        """
        ...


@dataclass(frozen=True)
class MemoryBody:
    """A file already rendered to bytes (configs, trust lists)."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def read_at(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def close(self) -> None:
        pass


class DiskBody:
    """A file on disk read lazily with ``pread``, never wholly into memory."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._size = os.fstat(self._fd).st_size

    @classmethod
    def from_fd(cls, fd: int) -> DiskBody:
        """Adopt an already opened (and checked) descriptor; the body closes it."""
        body = cls.__new__(cls)
        body._fd = fd
        body._size = os.fstat(fd).st_size
        return body

    @property
    def size(self) -> int:
        return self._size

    def identity(self) -> tuple[int, ...]:
        """Device, inode, size and change times: equal while the file's bytes are the same."""
        st = os.fstat(self._fd)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable_name(name: str) -> str:
    """A client-supplied name made safe for logs: no control bytes, bounded length."""
    if name.isascii() and name.isprintable():
        return name[:200]
    return "".join(ch if 0x20 <= ord(ch) < 0x7F else f"\\x{ord(ch):02x}" for ch in name)[:200]


def normalise_name(raw: str) -> str:
    """Turn a requested name into a relative path under the served root.

    Phones send both ``\\`` and a leading ``/``; both are normalised first. Empty
    components and ``.`` are dropped. ``..``, NUL and other control characters are
    refused with :class:`AccessViolation`, so no caller ever sees an escaping path.
    """
    if _CONTROL.search(raw):
        raise AccessViolation("control character in file name")
    parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise AccessViolation("parent directory in file name")
    if not parts:
        raise FileNotFound("empty file name")
    return "/".join(parts)


class DirectorySource:
    """Serve regular files under ``root`` (firmware, static files), read lazily from disk.

    Names are resolved component-wise under the root: symlinks are followed only while they
    stay inside it, and directories, special files and unreadable files are refused, so a
    string prefix check can never be fooled (the tftpy #110 lesson).
    """

    def __init__(self, root: str) -> None:
        self._root = os.path.realpath(root)

    @property
    def root(self) -> str:
        return self._root

    def open(self, name: str, requester: Requester) -> DiskBody:
        relative = normalise_name(name)
        fd = None
        if "/" not in relative:
            # The common case, a file at the top: the root is already resolved and
            # O_NOFOLLOW refuses a symlink, so one open() is safe. A symlink takes the
            # resolving path below, which allows it only if it stays inside the root.
            fd = self._open(os.path.join(self._root, relative), relative, symlink_ok=True)
        if fd is None:
            path = os.path.realpath(os.path.join(self._root, *relative.split("/")))
            if os.path.commonpath([self._root, path]) != self._root or path == self._root:
                raise AccessViolation("name resolves outside the served root")
            fd = self._open(path, relative, symlink_ok=False)
            assert fd is not None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise AccessViolation("not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return DiskBody.from_fd(fd)

    @staticmethod
    def _open(path: str, relative: str, *, symlink_ok: bool) -> int | None:
        """Open without following a final symlink; None if it was one and ``symlink_ok``."""
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        flags |= getattr(os, "O_NOFOLLOW", 0)
        try:
            return os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP and symlink_ok:
                return None
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise FileNotFound(relative) from None
            raise AccessViolation(f"cannot open: {exc.strerror}") from None
