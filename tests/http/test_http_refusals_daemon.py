"""Requests twisted.web cannot read get a status and a reason, never a silent close: curl
against the real daemon's provisioning HTTP (6970) and HTTPS web/REST API with a request line
or a header line over 16 KiB (414, 431; curl used to see "Empty reply from server"), and
headers over 16 KiB in all (400, which had no body). A request body over a listener's limit
is refused 413 from its Content-Length (or a chunked body's bytes) before it is read (it was
read whole, to a temporary file, before anything could refuse it: unauthenticated clients
could fill the disk). Each refusal is an RFC 9457 problem."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

LONG = "a" * 20_000


def _curl(url: str, *args: str) -> tuple[int, str, str]:
    """(status, Content-Type, body) as curl got them; status 0: no HTTP answer at all."""
    done = subprocess.run(
        ["curl", "-sk", "--max-time", "10", "-w", "\n%{http_code}\n%{content_type}", *args, url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    body, status, content_type = done.stdout.rsplit("\n", 2)
    return int(status), content_type, body


@pytest.mark.parametrize(
    ("extra", "query", "status"),
    [
        (("-H", f"X-Long: {LONG}"), "", 431),
        ((), "?" + LONG, 414),
        (("-H", f"X-A: {LONG[:10_000]}", "-H", f"X-B: {LONG[:10_000]}"), "", 400),
    ],
    ids=["header-line", "request-line", "all-headers"],
)
def test_unreadable_requests_are_answered_with_a_problem(
    daemon_factory: Any, extra: tuple[str, ...], query: str, status: int
) -> None:
    daemon = daemon_factory("--web-port", "0")
    for base in (
        f"http://127.0.0.1:{daemon.port('http')}/XMLDefault.cnf.xml",
        f"https://127.0.0.1:{daemon.port('web')}/api/v1/status",
    ):
        got, content_type, body = _curl(base + query, *extra)
        assert got == status, (base, body)
        assert content_type == "application/problem+json"
        problem = json.loads(body)
        assert problem["status"] == status and problem["detail"]
        assert _curl(base)[0] in (200, 401)  # the daemon still answers
    assert "Traceback" not in daemon.log()


def test_a_body_over_the_limit_is_refused_before_it_is_read(
    daemon_factory: Any, tmp_path: Path
) -> None:
    daemon = daemon_factory("--web-port", "0", "--edge-port", "0")
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(9 * 1024 * 1024))  # over every listener's limit (web: 8 MiB)
    for url, limit in (
        (f"http://127.0.0.1:{daemon.port('http')}/XMLDefault.cnf.xml", 65536),
        (f"https://127.0.0.1:{daemon.port('web')}/api/v1/devices", 8 * 1024 * 1024),
        (f"https://127.0.0.1:{daemon.port('edge')}/oauth/token", 65536),
    ):
        for framing in ((), ("-H", "Transfer-Encoding: chunked")):
            got, content_type, body = _curl(url, "-X", "POST", *framing, "--data-binary", f"@{big}")
            assert got == 413, (url, framing, body)
            assert content_type == "application/problem+json"
            assert json.loads(body)["detail"] == f"the request body exceeds {limit} bytes"
        # A small body still gets the answer it always got (no 413).
        assert _curl(url, "-X", "POST", "-d", "x=1")[0] in (400, 401, 405)
    assert "Traceback" not in daemon.log()


def test_absolute_form_targets_are_answered_as_their_path(daemon_factory: Any) -> None:
    """RFC 9112 §3.2.2: every HTTP listener takes ``GET http://host/path`` (as sent through a
    proxy) as a request for ``/path``; twisted.web looked the whole URI up, and found nothing."""
    daemon = daemon_factory("--web-port", "0")
    for base, path in (
        (f"http://127.0.0.1:{daemon.port('http')}", "/XMLDefault.cnf.xml"),
        (f"https://127.0.0.1:{daemon.port('web')}", "/api/v1/status"),
    ):
        as_origin = _curl(base + path)
        scheme = base.split(":", 1)[0]
        as_absolute = _curl(base + "/elsewhere", "--request-target", f"{scheme}://any.host{path}")
        assert as_origin[0] in (200, 401) and as_absolute == as_origin, (base, as_absolute)
