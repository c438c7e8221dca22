"""Helpers for the emulated-phone end-to-end tests: a lab CA, MIC files, a phone CLI runner."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from callboard.daemon import certs
from support.harness import Daemon, run_cli


def make_lab(directory: Path, name: str = "Callboard Lab") -> certs.LabCA:
    """A lab manufacturing CA written to ``directory`` (which doubles as a trust store)."""
    lab = certs.make_lab_ca(root_cn=f"{name} Root", ca_cn=f"{name} CA")
    certs.write_lab_ca(directory, lab)
    return lab


@pytest.fixture
def lab_dir(tmp_path: Path) -> Path:
    """Where the lab manufacturing CA (and the MICs it issues) is kept."""
    return tmp_path / "lab"


@pytest.fixture
def lab(lab_dir: Path) -> certs.LabCA:
    """A lab manufacturing CA the daemon under test is told to trust."""
    return make_lab(lab_dir)


def mic_files(lab: certs.LabCA, out: Path, *, model: str, mac: str) -> tuple[Path, Path]:
    return certs.write_mic(out, certs.issue_mic(lab, model=model, mac=mac))


def boot(
    daemon: Daemon,
    mic: tuple[Path, Path],
    *,
    model: str,
    mac: str,
    extra: tuple[str, ...] = (),
    server: str = "127.0.0.1",
) -> subprocess.CompletedProcess[str]:
    """``callboard phone boot`` against ``daemon`` as a user would run it."""
    return run_cli(
        "phone", "boot", "--server", server,
        "--http-port", str(daemon.port("http")), "--tftp-port", str(daemon.port("tftp")),
        "--model", model, "--mac", mac, "--mic", str(mic[0]), "--mic-key", str(mic[1]),
        "--timeout", "5", *extra,
        timeout=120,
    )  # fmt: skip


def http_get(daemon: Daemon, name: str) -> int:
    """The HTTP status the daemon's 6970 listener gives for ``name``."""
    url = f"http://127.0.0.1:{daemon.port('http')}/{name}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


def device(daemon: Daemon, name: str) -> dict[str, object] | None:
    for d in daemon.json("device", "list"):
        if d["name"] == name:
            return dict(d)
    return None
