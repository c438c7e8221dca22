"""Fixtures the phone end-to-end tests share: a lab manufacturing CA the daemon trusts."""

from __future__ import annotations

from pathlib import Path

import pytest
from callboard.daemon import certs
from e2e.phone_e2e_support import make_lab


@pytest.fixture
def lab_dir(tmp_path: Path) -> Path:
    return tmp_path / "lab"


@pytest.fixture
def lab(lab_dir: Path) -> certs.LabCA:
    return make_lab(lab_dir)
