"""A registry thread keeps nothing of a finished job while it waits for the next: a bindings
flush's rows (thousands during a REGISTER storm) are freed once written."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest_twisted
from callboard.daemon.registry.store import _StoreThread
from twisted.internet import reactor


class Rows:
    """Stands for a job's data."""


def job_holding_rows() -> tuple[Callable[[], int], weakref.ref[Rows]]:
    rows = Rows()
    return (lambda: 1 if rows else 0), weakref.ref(rows)


@pytest_twisted.ensureDeferred
async def test_a_finished_job_is_not_kept_alive_by_the_waiting_thread() -> None:
    thread = _StoreThread(reactor, "test-store-thread")
    try:
        job, seen = job_holding_rows()
        assert await thread.submit(job).addTimeout(10, reactor) == 1
        del job
        gc.collect()
        assert seen() is None
    finally:
        thread.stop()
