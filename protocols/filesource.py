"""The read-only file tree that TFTP and HTTP both serve.

The provisioning tree (rendered configs, trust lists, firmware on disk) lives in the
daemon; the transports only need to turn a requested name into bytes. Both transports
normalise names the same way here, so that a name refused over TFTP is refused over HTTP.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import functools
import os
import re
import stat
import struct
import sys
import termios
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypeAlias

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


class Requester(NamedTuple):
    """Who asked, for logging and per-client naming (a named tuple: one per request)."""

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
    def from_fd(cls, fd: int, status: os.stat_result | None = None) -> DiskBody:
        """Adopt an already opened (and checked) descriptor; the body closes it.

        ``status`` is the descriptor's ``fstat`` when the caller has it already.
        """
        body = cls.__new__(cls)
        body._fd = fd
        body._size = (status or os.fstat(fd)).st_size
        return body

    @property
    def size(self) -> int:
        return self._size

    def identity(self) -> tuple[int, ...]:
        """Device, inode, size and change times: equal while the file's bytes are the same."""
        return file_identity(os.fstat(self._fd))

    def read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class HeldBody(DiskBody):
    """A small file on disk held whole in memory, shared by the requests for it.

    A :class:`DiskBody` (with the identity of the file it was read from, for whoever caches
    by it) that has no descriptor: :class:`DirectorySource` hands the same one out while the
    file on disk keeps that identity.
    """

    def __init__(self, data: bytes, identity: tuple[int, ...]) -> None:
        self._fd = -1
        self._size = len(data)
        self.data = data
        self._identity = identity

    def identity(self) -> tuple[int, ...]:
        return self._identity

    def read_at(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def close(self) -> None:
        pass


def file_identity(status: os.stat_result) -> tuple[int, ...]:
    """Device, inode, size and change times of a ``stat``: the same while the bytes are."""
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


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
    Remembered per name up to 256 characters (a boot storm asks for a few names, each
    transport normalises them, and so does the source); refusals are not remembered.
    """
    if len(raw) <= _REMEMBERED_NAME:
        return _normalise_remembered(raw)
    return _normalise(raw)


def _normalise(raw: str) -> str:
    if _CONTROL.search(raw):
        raise AccessViolation("control character in file name")
    parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise AccessViolation("parent directory in file name")
    if not parts:
        raise FileNotFound("empty file name")
    return "/".join(parts)


_REMEMBERED_NAME = 256
_normalise_remembered = functools.lru_cache(maxsize=4096)(_normalise)


class DirectorySource:
    """Serve regular files under ``root`` (firmware, static files), read lazily from disk.

    Names are resolved component-wise under the root: symlinks are followed only while they
    stay inside it, and directories, special files and unreadable files are refused, so a
    string prefix check can never be fooled (the tftpy #110 lesson).

    A small regular file at the top of the tree (a config, a trust list: what a boot storm
    asks for) is read whole once and held (:class:`HeldBody`), and the next request gets the
    held body instead of open, fstat, read and close, for as long as it is known unchanged:

    - On Linux the root is watched with inotify (:class:`RootWatch`). Every change made in
      it (rewritten, replaced, chmod, removed, turned into a symlink — by the daemon or by
      anyone else) queues an event before the writing call returns, and each request first
      asks the kernel whether any is queued (one ``ioctl``, cheaper than a path lookup); the
      names changed are forgotten, so a change is served at once, exactly as before.
      Changes inotify cannot see (a write through a hard link outside the root, through a
      shared ``mmap``, on a network file system from another host) are caught by an
      ``lstat`` of a held file at most every ``recheck_after`` seconds.
    - Without inotify (another OS, or the per-user limit of instances reached) an ``lstat`` of
      its path on every request must show the same identity (device, inode, size, change
      times) for the held body to be served.

    Any change misses and takes the full path.
    """

    recheck_after = 1.0  # seconds: the bound for changes inotify does not report

    def __init__(
        self,
        root: str,
        *,
        hold_up_to: int = 65536,
        held_budget: int = 16 << 20,
        watch: bool = True,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._root = os.path.realpath(root)
        self._prefix = os.path.join(self._root, "")  # + a normalised name: its path
        self._hold_up_to = hold_up_to  # bytes; 0 holds nothing
        self._held_budget = held_budget  # bytes held in all, past which all are forgotten
        self._held: dict[str, HeldBody] = {}
        self._held_bytes = 0
        # With a watch: until when each held file needs no lstat (see recheck_after).
        self._fresh_until: dict[str, float] = {}
        self._now = now
        self._want_watch = watch  # the watch opens with the first request for a top name
        self._watch: RootWatch | None = None

    @property
    def root(self) -> str:
        return self._root

    def open(self, name: str, requester: Requester) -> DiskBody:
        relative = normalise_name(name)
        fd = None
        top = "/" not in relative
        if top:
            if self._want_watch:
                self._start_watch()
            # The common case, a file at the top: the root is already resolved and
            # O_NOFOLLOW refuses a symlink, so one open() is safe. A symlink takes the
            # resolving path below, which allows it only if it stays inside the root.
            held = self._held.get(relative)
            if held is not None and self._unchanged(relative, held):
                return held
            fd = self._open(self._prefix + relative, relative, symlink_ok=True)
        if fd is None:
            top = False  # a symlink: resolved each time, never held
            path = os.path.realpath(os.path.join(self._root, *relative.split("/")))
            if os.path.commonpath([self._root, path]) != self._root or path == self._root:
                raise AccessViolation("name resolves outside the served root")
            fd = self._open(path, relative, symlink_ok=False)
            assert fd is not None
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise AccessViolation("not a regular file")
        except BaseException:
            os.close(fd)
            raise
        body = DiskBody.from_fd(fd, status)
        if top and status.st_size <= self._hold_up_to:
            return self._hold(relative, body, file_identity(status))
        return body

    def _unchanged(self, relative: str, held: HeldBody) -> bool:
        """Is the held file still what is on disk? (See the class docstring.)"""
        watch = self._watch
        if watch is None:
            return held.identity() == _regular_identity(self._prefix + relative)
        if watch.pending():
            self._forget(watch.changed())
            if self._held.get(relative) is not held:
                return False
        now = self._now()
        if now < self._fresh_until.get(relative, 0.0):
            return True
        if held.identity() != _regular_identity(self._prefix + relative):
            return False
        self._fresh_until[relative] = now + self.recheck_after
        return True

    def _forget(self, names: set[str] | None) -> None:
        """Drop the held files named (None: all of them, and the watch if it has ended)."""
        if names is None:
            self._held.clear()
            self._fresh_until.clear()
            self._held_bytes = 0
            if self._watch is not None and not self._watch.alive:
                self._watch.close()
                self._watch = None  # the root itself went away: lstat each time from now on
            return
        for name in names:
            previous = self._held.pop(name, None)
            if previous is not None:
                self._held_bytes -= previous.size
                self._fresh_until.pop(name, None)

    def _start_watch(self) -> None:
        """Watch the root before the first file is held (so no change after it is missed)."""
        self._want_watch = False
        if self._hold_up_to > 0:
            self._watch = RootWatch.open(self._root)

    def _hold(self, relative: str, body: DiskBody, identity: tuple[int, ...]) -> DiskBody:
        """Read a small file whole and keep it; a failed or short read serves it lazily.

        A change between the ``fstat`` that gave ``identity`` and the read is an event the
        next request drains (or a different identity at the next ``lstat``): read again then.
        """
        try:
            data = body.read_at(0, body.size)
        except OSError:
            return body
        if len(data) != body.size:
            return body  # changing under us: serve it as read from disk, hold nothing
        body.close()
        held = HeldBody(data, identity)
        if self._held_bytes + len(data) > self._held_budget:
            self._held.clear()
            self._fresh_until.clear()
            self._held_bytes = 0
        previous = self._held.pop(relative, None)
        if previous is not None:
            self._held_bytes -= previous.size
        self._held[relative] = held
        self._held_bytes += len(data)
        self._fresh_until[relative] = self._now() + self.recheck_after
        return held

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


def _regular_identity(path: str) -> tuple[int, ...] | None:
    """The identity of a regular file at ``path`` itself (a symlink is not followed)."""
    try:
        status = os.lstat(path)
    except OSError:
        return None
    return file_identity(status) if stat.S_ISREG(status.st_mode) else None


# -- inotify, for DirectorySource ------------------------------------------------------------

_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE = 0x2, 0x4, 0x8
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF, _IN_UNMOUNT, _IN_Q_OVERFLOW, _IN_IGNORED = (
    0x400,
    0x800,
    0x2000,
    0x4000,
    0x8000,
)
_IN_ONLYDIR = 0x01000000
_WATCHED = (
    _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE
) | (_IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR)
# The watch itself is over (root removed, moved, unmounted) or events were lost.
_ALL_CHANGED = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_UNMOUNT | _IN_Q_OVERFLOW | _IN_IGNORED
_ENDED = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_UNMOUNT | _IN_IGNORED
_EVENT = struct.Struct("=iIII")  # struct inotify_event: wd, mask, cookie, len; then the name
_READ = 65536  # bytes per read of events
_LARGEST_EVENT = _EVENT.size + 256  # with a name of NAME_MAX bytes and its NUL


class RootWatch:
    """The names changed directly in one directory, from Linux inotify (no reactor needed).

    :meth:`pending` is one ``ioctl`` asking whether any event is queued; :meth:`changed`
    reads them all. The kernel queues an event before the call that changed the file
    returns, so a request that arrives after a change sees it pending.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._count = array.array("i", [0])
        self.alive = True
        # Closed with the source that holds it (sources are made by tests by the hundred;
        # a user may only have 128 inotify instances).
        self._closer = weakref.finalize(self, os.close, fd)

    @classmethod
    def open(cls, directory: str) -> RootWatch | None:
        """A watch on ``directory``, or None where inotify is unavailable or exhausted."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                return None
            if libc.inotify_add_watch(fd, os.fsencode(directory), _WATCHED) < 0:
                os.close(fd)
                return None
        except (OSError, AttributeError):
            return None
        return cls(fd)

    def pending(self) -> bool:
        """Is any event queued? (One system call, no exception when none is.)"""
        try:
            fcntl.ioctl(self._fd, termios.FIONREAD, self._count, True)
        except OSError:
            return True  # cannot tell: let changed() decide
        return self._count[0] > 0

    def changed(self) -> set[str] | None:
        """The names changed since the last call; None if anything may have (forget all)."""
        names: set[str] = set()
        everything = False
        while True:
            try:
                data = os.read(self._fd, _READ)
            except BlockingIOError:
                break
            except OSError:
                self.alive = False
                return None
            offset = 0
            while offset + _EVENT.size <= len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                name = data[offset : offset + length].rstrip(b"\0")
                offset += length
                if mask & _ENDED:
                    self.alive = False
                if mask & _ALL_CHANGED or not name:  # lost events, or the root itself
                    everything = True
                else:
                    names.add(os.fsdecode(name))
            if len(data) <= _READ - _LARGEST_EVENT:
                break  # another event would have fit: the queue was empty (no read to know)
        return None if everything else names

    def close(self) -> None:
        self._closer()
