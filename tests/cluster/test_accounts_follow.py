"""Users and API tokens follow the change feed: added or deleted on node A, effective on B.

Two real ``callboard serve`` nodes with their HTTPS front doors on one PostgreSQL registry
(and two processes on one SQLite file); users and tokens are made with node A's CLI, used
against node B's web sign-in and REST API.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.harness import Daemon
from web.web_support import WebClient, add_user, new_token

PASSWORD = "correct horse battery"


def within(seconds: float, check: Callable[[], bool], what: str) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < seconds, f"{what} not within {seconds}s"
        time.sleep(0.02)
    return time.monotonic() - start


def signs_in(node: Daemon, user: str) -> bool:
    reply = WebClient(node.port("web")).sign_in(user, PASSWORD)
    return reply.status == 303 and not reply.headers.get("location", "").startswith("/sign-in")


def api_status(node: Daemon, token: str, path: str = "/api/v1/devices") -> int:
    return WebClient(node.port("web")).api("GET", path, token).status


@pytest.mark.parametrize("engine", ["postgresql", "sqlite"])
def test_a_user_and_a_token_made_on_node_a_work_on_node_b_within_a_second(
    daemon_factory: Any, tmp_path: Path, engine: str, request: pytest.FixtureRequest
) -> None:
    url = (
        request.getfixturevalue("pg_dsn")
        if engine == "postgresql"
        else f"sqlite://{tmp_path}/shared.sqlite3"
    )
    a, b = (
        daemon_factory(
            "--registry", url, "--web-port", "0", "--set", "registry.feed_interval=0.2",
            # Polling sign-ins fail until the user arrives: not a password guesser.
            "--set", "web.failure_budget=100000",
            state_dir=tmp_path / f"node-{name}",
        )
        for name in ("a", "b")
    )  # fmt: skip
    admin = new_token(b, "admin-b")  # B's own service token: asks B about carol, quickly
    assert api_status(b, admin, "/api/v1/users/carol") == 404
    add_user(a, "carol", PASSWORD, "--admin")
    took = within(1.0, lambda: api_status(b, admin, "/api/v1/users/carol") == 200, "carol on B")
    assert signs_in(b, "carol")  # her password works on node B
    token = new_token(a, "carol-api", "--user", "carol")
    within(1.0, lambda: api_status(b, token) == 200, "carol's token on node B")
    # Deleted on A: refused on B within a second (the token acting as carol goes too).
    assert a.cli("user", "delete", "carol").returncode == 0
    within(1.0, lambda: api_status(b, token) == 401, "carol's token refused on node B")
    assert api_status(b, admin, "/api/v1/users/carol") == 404
    assert not signs_in(b, "carol")
    # A service token revoked on A stops working on B.
    service = new_token(a, "monitor", "--read-only")
    within(1.0, lambda: api_status(b, service) == 200, "the service token on node B")
    assert a.cli("token", "revoke", "monitor").returncode == 0
    within(1.0, lambda: api_status(b, service) == 401, "the revoked token on node B")
    print(f"{engine}: user usable on node B after {took:.2f}s")
