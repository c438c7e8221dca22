"""Wiring :mod:`.metrics` into a running service tree, through the protocols' own hooks.

The protocols know nothing of Prometheus: each exposes an optional callback (TFTP's
``on_transfer_end``, once per transfer; HTTP's ``on_finish``; TVS's ``on_connection`` and
``on_response``; the registrar's ``on_register_answer``) or an interface the daemon already
fills (the activation authority, the throttle stores). This module plugs
:class:`~.metrics.CallboardMetrics` into them and points the scrape-time gauges at the live
registry and registrar. It is also where the daemon learns how much work is in flight, for a
graceful stop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from callboard.protocols.tvs import codec
from callboard.protocols.tvs.activation import ActivationAuthority, Redemption, ThrottleStore
from twisted.internet.defer import Deferred

from .metrics import CallboardMetrics, http_outcome

__all__ = ["CountingAuthority", "ObservedThrottle", "instrument", "tvs_answer"]


class CountingAuthority:
    """An activation authority that counts redemptions in flight and activations made."""

    def __init__(self, inner: ActivationAuthority) -> None:
        self._inner = inner
        self.in_flight = 0
        self.on_activated: Callable[[], None] | None = None

    def redeem(self, *, mac: str, model: str, code: str, mic_sha256: str) -> Deferred[Redemption]:
        self.in_flight += 1
        d = self._inner.redeem(mac=mac, model=model, code=code, mic_sha256=mic_sha256)

        def done(result: Any) -> Any:
            self.in_flight -= 1
            if isinstance(result, Redemption) and result.activated and self.on_activated:
                self.on_activated()
            return result

        return d.addBoth(done)


class ObservedThrottle:
    """A throttle store that reports each lockout it starts (``scope``: device or source)."""

    def __init__(self, inner: ThrottleStore, on_lockout: Callable[[], None]) -> None:
        self._inner = inner
        self._on_lockout = on_lockout
        self.lockouts = 0

    def locked_for(self, key: str, now: float) -> float:
        return self._inner.locked_for(key, now)

    def failure(self, key: str, now: float) -> None:
        was_locked = self._inner.locked_for(key, now) > 0
        self._inner.failure(key, now)
        if not was_locked and self._inner.locked_for(key, now) > 0:
            self.lockouts += 1
            self._on_lockout()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)  # the settings a reload adjusts


def tvs_answer(data: bytes) -> tuple[str, int | str]:
    """(command, status) of a TVS response frame as sent; ``malformed`` when unreadable."""
    try:
        frame, _ = codec.decode_frame(data)
        if frame.command == codec.Command.VERIFY_RESPONSE:
            status = codec.VerifyResponse.from_frame(frame).status
            return "verify", "malformed" if status == codec.ActivateStatus.MALFORMED else status
        return "activate", codec.ActivateResponse.from_frame(frame).status
    except (codec.CodecError, ValueError):
        return "activate", "malformed"


def instrument(service: Any, metrics: CallboardMetrics) -> None:
    """Hook ``metrics`` into every part of a wired :class:`~.service.CallboardService`."""
    tftp = getattr(service, "tftp", None)
    if tftp is not None:
        tftp.on_transfer_end = metrics.record_tftp_transfer  # once per transfer: no lambda
    service.http_resource.on_finish = lambda name, status, seconds, size: metrics.record_transfer(
        "http", name, http_outcome(status), seconds, size
    )
    tvs = service.tvs.tvs
    tvs.on_connection = metrics.tvs_connections.inc
    tvs.on_response = lambda data: metrics.record_tvs_request(*tvs_answer(data))
    metrics.tvs_connections_open.set_function(lambda: float(tvs.active))
    handler = tvs.handler
    handler.throttle = ObservedThrottle(handler.throttle, lambda: metrics.record_lockout("device"))
    handler.source_throttle = ObservedThrottle(
        handler.source_throttle, lambda: metrics.record_lockout("source")
    )
    service.authority.on_activated = metrics.record_activation
    service.registrar.on_register_answer = metrics.record_register
    service.admin_app.on_change = metrics.record_admin_change
    registry = service.registry
    metrics.watch(
        codes_outstanding=lambda: float(len(registry.outstanding_codes())),
        registrations=lambda: float(service.registrar.binding_count()),
        devices_by_state=lambda: Counter(d.state.value for d in registry.devices()),
    )


def lockouts(service: Any) -> int:
    """Lockouts started since the daemon started (for ``callboard status``)."""
    handler = service.tvs.tvs.handler
    return sum(
        getattr(store, "lockouts", 0) for store in (handler.throttle, handler.source_throttle)
    )
