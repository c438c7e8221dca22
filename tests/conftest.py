"""Shared test fixtures.

pytest-twisted runs one global reactor for the session; tests that need the network use
real loopback sockets on ports the kernel picks (port 0), never fixed ports.

``daemon`` starts the real ``callboard serve`` in a subprocess on 127.0.0.1 with port 0
everywhere and learns the bound ports from the admin API, so end-to-end tests exercise
exactly what ops run.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.harness import Daemon


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Daemon] = []

    def make(*extra: str, state_dir: Path | None = None, **options: Any) -> Daemon:
        d = Daemon(state_dir or tmp_path / "state", *extra, **options)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        if d.proc is not None:
            d.stop(signal.SIGKILL)


@pytest.fixture
def daemon(daemon_factory: Any) -> Daemon:
    return daemon_factory()  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def _no_admin_socket_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CALLBOARD_ADMIN_SOCKET", raising=False)
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
