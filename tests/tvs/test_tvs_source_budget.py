"""Per-source and per-device failure budgets are separate (a site behind NAT shares one)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from callboard.protocols.tvs import codec
from callboard.protocols.tvs.activation import PeerContext, TVSHandler, TVSSettings
from callboard.protocols.tvs.codec import ActivateRequest, ActivateResponse, DeviceName

NOW = dt.datetime.now(dt.UTC).timestamp()


class RefuseAll:
    def redeem(self, *, mac: str, model: str, code: str, mic_sha256: str) -> Any:
        raise AssertionError("a mismatched MIC never reaches the authority")


def statuses(handler: TVSHandler, pki: Any, count: int) -> list[int]:
    """``count`` attempts from one address, each for another phone (CN mismatch: status 2)."""
    peer = PeerContext("192.0.2.1", pki.mic.cert, [])
    out = []
    for i in range(count):
        device = DeviceName("8841", f"0000000000{i:02X}")
        frame = codec.decode_frame(ActivateRequest(i, device, "1" * 16).encode())[0]
        outcome = handler.handle(frame, peer, NOW + i)
        out.append(ActivateResponse.from_frame(codec.decode_frame(outcome.response)[0]).status)
    return out


def test_the_source_budget_defaults_to_the_device_budget(pki: Any) -> None:
    handler = TVSHandler(
        trust=pki.trust,
        authority=RefuseAll(),
        role_certs=[],
        settings=TVSSettings(throttle_budget=5),
    )
    assert statuses(handler, pki, 7) == [2, 2, 2, 2, 2, 3, 3]


def test_a_larger_source_budget_lets_a_nat_site_keep_trying(pki: Any) -> None:
    handler = TVSHandler(
        trust=pki.trust,
        authority=RefuseAll(),
        role_certs=[],
        settings=TVSSettings(throttle_budget=5, throttle_source_budget=20),
    )
    assert statuses(handler, pki, 21) == [2] * 20 + [3]
