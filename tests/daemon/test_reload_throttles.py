"""A reload retunes the TVS throttles the daemon actually runs: the in-memory Throttle sits
behind the metrics' wrapper and, on a shared registry, the shared budget's; the retune used to
stop at the first and leave the budget, window and lockouts of the start."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from callboard.daemon.instrument import ObservedThrottle
from callboard.daemon.reload import retune_throttles
from callboard.daemon.shared_throttle import AttemptJournal, ThrottleSync
from callboard.protocols.tvs.activation import Throttle, TVSSettings


def running(throttle: Throttle, source: Throttle) -> tuple[Any, ThrottleSync]:
    """A service shaped as the daemon wires it: observed(shared(in-memory)) throttles."""
    sync = ThrottleSync(cast(AttemptJournal, None), lambda: 0.0, window=900.0)
    handler = SimpleNamespace(
        throttle=ObservedThrottle(sync.wrap("dev:", throttle), lambda: None),
        source_throttle=ObservedThrottle(sync.wrap("src:", source), lambda: None),
    )
    tvs = SimpleNamespace(tvs=SimpleNamespace(handler=handler))
    return SimpleNamespace(tvs=tvs, throttle_sync=sync), sync


def test_a_reload_retunes_shared_observed_throttles_and_the_budget_window() -> None:
    device, source = Throttle(), Throttle()
    service, sync = running(device, source)
    device.failure("dev:SEP001122334455", 0.0)  # a strike that must survive the retune
    new = TVSSettings(
        throttle_budget=3,
        throttle_source_budget=20,
        throttle_window=120.0,
        throttle_base_lockout=30.0,
        throttle_max_lockout=600.0,
    )
    retune_throttles(service, SimpleNamespace(tvs=new))
    assert (device.budget, device.window, device.base_lockout, device.max_lockout) == (
        3, 120.0, 30.0, 600.0,
    )  # fmt: skip
    assert (source.budget, source.window) == (20, 120.0)
    assert sync.window == 120.0  # what the shared budget reads back from the registry
    device.failure("dev:SEP001122334455", 1.0)
    device.failure("dev:SEP001122334455", 2.0)
    assert device.locked_for("dev:SEP001122334455", 2.0) == 30.0  # 3 in the new window


def test_plain_throttles_are_retuned_too() -> None:
    device, source = Throttle(), Throttle()
    handler = SimpleNamespace(throttle=device, source_throttle=ObservedThrottle(source, print))
    service = SimpleNamespace(tvs=SimpleNamespace(tvs=SimpleNamespace(handler=handler)))
    retune_throttles(service, SimpleNamespace(tvs=TVSSettings(throttle_budget=7)))
    assert device.budget == 7 and source.budget == 7  # the source budget follows (0: same)
