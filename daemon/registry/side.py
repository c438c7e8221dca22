"""One database connection on a thread of its own, beside the store's writer.

The shared failure budget (``attempts``) and the cluster's SIP bindings (``bindings``) are
written often and need no group commit or change feed: each keeps its own connection, opened
lazily on its own thread so the reactor never waits on the database, and reopened after any
error (a restarted PostgreSQL, a killed backend).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads

from .store import _StoreThread

T = TypeVar("T")


class SideConnection:
    """``connect`` opens a connection (autocommit); ``submit`` runs work on it off the reactor."""

    def __init__(
        self, connect: Callable[[], Any], reactor: IReactorFromThreads, thread_name: str
    ) -> None:
        self._connect = connect
        self._db: Any = None
        self._thread = _StoreThread(reactor, thread_name)

    def submit(self, work: Callable[[Any], T]) -> Deferred[T]:
        """Run ``work(connection)`` on the thread; the Deferred fires on the reactor thread."""
        return self._thread.submit(lambda: self._run(work))

    def close(self) -> Deferred[None]:
        def shut() -> None:
            self._drop()

        d = self._thread.submit(shut)

        def stopped(result: object) -> object:
            self._thread.stop()
            return result

        return d.addBoth(stopped)

    def _run(self, work: Callable[[Any], T]) -> T:
        if self._db is None:
            self._db = self._connect()
        try:
            return work(self._db)
        except Exception:
            self._drop()  # reconnect next time
            raise

    def _drop(self) -> None:
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()
        self._db = None
