"""An independent TLS peer: `openssl s_client` completes the handshake with and without a MIC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from callboard.daemon import certs
from callboard.protocols.tvs.codec import ActivateRequest, ActivateResponse, decode_frame
from twisted.internet.utils import getProcessOutputAndValue

from .conftest import DEVICE, GOOD_CODE, MAC, Pki, reactor  # type: ignore[import-not-found]


async def _s_client(port: int, extra: list[str], stdin: bytes = b"") -> tuple[bytes, bytes, int]:
    args = ["s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2", "-ign_eof", "-quiet", *extra]
    d = getProcessOutputAndValue("openssl", args, env={"PATH": "/usr/bin:/bin"}, reactor=reactor)
    d.addTimeout(30, reactor)
    # -ign_eof keeps reading after stdin ends; the server's idle timeout closes the connection.
    out, err, code = await d
    return out, err, code


@pytest_twisted.ensureDeferred
async def test_openssl_s_client_without_mic(pki: Pki, start_server: Any) -> None:
    from callboard.protocols.tvs.activation import TVSSettings

    server = start_server(TVSSettings(idle_timeout=0.5))
    _out, err, _ = await _s_client(server.port, ["-brief"])
    assert b"CONNECTION ESTABLISHED" in err or b"Verification" in err, err


@pytest_twisted.ensureDeferred
async def test_openssl_s_client_with_lab_mic(pki: Pki, start_server: Any, tmp_path: Path) -> None:
    from callboard.protocols.tvs.activation import TVSSettings

    server = start_server(TVSSettings(idle_timeout=0.5))
    server.authority.add(GOOD_CODE, mac=MAC)
    cert_path, key_path = certs.write_mic(tmp_path, pki.mic)
    request = tmp_path / "request.bin"
    request.write_bytes(ActivateRequest(42, DEVICE, GOOD_CODE).encode())
    d = getProcessOutputAndValue(
        "sh",
        [
            "-c",
            f"openssl s_client -connect 127.0.0.1:{server.port} -quiet -ign_eof "
            f"-cert {cert_path} -key {key_path} < {request}",
        ],
        env={"PATH": "/usr/bin:/bin"},
        reactor=reactor,
    )
    d.addTimeout(30, reactor)
    out, _err, _ = await d
    frame, _ = decode_frame(out)
    resp = ActivateResponse.from_frame(frame)
    assert resp.session_id == 42
    assert resp.status == 0, resp.reason
    assert resp.device_name_assigned == f"SEP{MAC}"
