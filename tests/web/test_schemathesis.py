"""schemathesis against the running daemon's OpenAPI document: no 5xx, no schema violation.

It generates requests for every route from ``/api/openapi.json`` (valid and invalid data),
sends them with an admin token over HTTPS and checks each answer against the document.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.harness import Daemon
from web.web_support import add_user, new_token

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance,response_headers_conformance"
)


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    daemon_factory: Any, tmp_path: Path
) -> None:
    st = shutil.which("schemathesis") or shutil.which("st")
    assert st, "schemathesis is a test dependency (pip install -e '.[test]')"
    d: Daemon = daemon_factory("--web-port", "0")
    add_user(d, "alice", "correct horse battery")
    d.json("device", "add", "--model", "8841", "--user", "alice", "--line", "2001")
    d.json("device", "add", "--model", "8851", "--mac", "001122334455")
    token = new_token(d, "schemathesis-" + "x" * 40)
    url = f"https://127.0.0.1:{d.port('web')}/api/openapi.json"
    result = subprocess.run(
        [
            st, "run", url, "--tls-verify", "false",
            "-H", f"Authorization: Bearer {token}",
            "--checks", CHECKS,
            "--phases", "examples,coverage,fuzzing",
            "--max-examples", "25", "--seed", "1",
            "--generation-database", "none", "--no-color",
            "--request-timeout", "30", "--workers", "1",
            "--report", "junit", "--report-dir", str(tmp_path / "report"),
        ],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    sys.stdout.write(result.stdout[-6000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    out = result.stdout
    assert "FAILURES" not in out and re.search(r"(\d+) generated, \1 passed", out), out[-3000:]
    assert "Traceback" not in d.log()
    assert d.json("token", "list")  # the run's own token survived it
