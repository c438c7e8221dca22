"""Windows go out with UDP segmentation offload (Linux, as here and in CI), or one by one.

Both paths must deliver the same bytes to a real client (atftp, windowsize 16).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from callboard.protocols.filesource import DirectorySource
from callboard.protocols.tftp import server as tftp_server
from callboard.protocols.tftp.server import TFTPService, TFTPSettings
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

CONTENT = random.Random(11).randbytes(2 * 1024 * 1024 + 1001)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[TFTPService]:
    (tmp_path / "image.loads").write_bytes(CONTENT)
    svc = TFTPService(DirectorySource(str(tmp_path)), ["127.0.0.1"], 0, TFTPSettings())
    svc.startService()
    yield svc
    pytest_twisted.blockon(svc.stopService())


async def fetch_with_window_16(svc: TFTPService, out: Path) -> bytes:
    port = str(svc.ports[0].getHost().port)  # type: ignore[attr-defined]
    args = [
        "--get",
        "-r",
        "image.loads",
        "-l",
        str(out),
        "--option",
        "blksize 1468",
        "--option",
        "windowsize 16",
        "127.0.0.1",
        port,
    ]
    d = getProcessOutputAndValue("/usr/bin/atftp", args, env=dict(os.environ))
    d.addTimeout(60, reactor)
    _, err, code = await d
    assert code == 0, err
    return out.read_bytes()


@pytest_twisted.ensureDeferred
async def test_segmentation_offload_delivers_identical_bytes(
    service: TFTPService, tmp_path: Path
) -> None:
    assert await fetch_with_window_16(service, tmp_path / "out") == CONTENT
    assert tftp_server._gso_works  # the kernel took the segmented sends


@pytest_twisted.ensureDeferred
async def test_without_offload_each_packet_goes_alone(
    service: TFTPService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tftp_server, "_gso_works", False)
    assert await fetch_with_window_16(service, tmp_path / "out") == CONTENT
