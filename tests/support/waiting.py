"""Waiting on the real reactor for something a test cannot be told about directly."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import reactor
from twisted.internet.task import deferLater


async def until(condition: Callable[[], bool], limit: float = 5.0, step: float = 0.02) -> None:
    """Return once ``condition()`` holds; fail the test after ``limit`` seconds of polling."""
    waited = 0.0
    while not condition():
        assert waited < limit, "condition not met in time"
        await deferLater(reactor, step, lambda: None)
        waited += step
