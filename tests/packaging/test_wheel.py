"""The wheel installs under one namespace and runs in a clean virtual environment."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_wheel_installs_in_a_clean_venv_and_reports_its_version(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = dist.glob("callboard-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        top = {name.split("/")[0] for name in zf.namelist()}
        names = set(zf.namelist())
    # Only our namespace lands in site-packages: no generic top-level `daemon` module.
    assert top == {"callboard", wheel.name.split("-py3")[0] + ".dist-info"}, top
    assert "callboard/daemon/templates/XMLDefault.cnf.xml" in names
    assert "callboard/daemon/web/templates/self_care.html" in names
    assert "callboard/protocols/tftp/codec.py" in names and "callboard/phone/__init__.py" in names

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(wheel)],
        check=True,
        capture_output=True,
        timeout=900,
    )
    result = subprocess.run(
        [str(env_dir / "bin" / "callboard"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "callboard 0.1.0"
