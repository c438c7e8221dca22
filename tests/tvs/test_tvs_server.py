"""TVS over real TLS on 127.0.0.1 with the Callboard client and an in-memory authority."""

from __future__ import annotations

import datetime as dt
import struct
from typing import Any

import pytest_twisted
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer

from callboard.protocols.tvs import client
from callboard.protocols.tvs.activation import TVSSettings
from callboard.protocols.tvs.codec import (
    ActivateResponse,
    ActivateStatus,
    Command,
    DeviceName,
    Frame,
    VerifyStatus,
    encode_frame,
)
from callboard.protocols.tvs.itl import Role

from .conftest import (  # type: ignore[import-not-found]
    DEVICE,
    GOOD_CODE,
    MAC,
    FakeAuthority,
    FakeClock,
    Pki,
    mic_tuple,
    reactor,
)


def _activate(
    server: Any, pki: Pki, mic: Any, *, device: DeviceName = DEVICE, code: str = GOOD_CODE
) -> defer.Deferred[ActivateResponse]:
    return client.activate(
        reactor,
        "127.0.0.1",
        server.port,
        device=device,
        code=code,
        pinned_der=pki.tvs_der,
        mic=mic_tuple(mic) if mic is not None else None,
        timeout=30,
    )


@pytest_twisted.inlineCallbacks
def test_happy_path(pki: Pki, start_server: Any) -> Any:
    server = start_server()
    server.authority.add(GOOD_CODE, mac=MAC)
    resp = yield _activate(server, pki, pki.mic)
    assert resp.status == ActivateStatus.ACTIVATED
    assert resp.device_name_assigned == f"SEP{MAC}"
    assert server.authority.calls[0]["mac"] == MAC
    assert server.authority.calls[0]["model"] == "8841"
    assert len(server.authority.calls[0]["mic"]) == 64
