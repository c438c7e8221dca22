"""Provisioning a storm's phones through a daemon's admin socket (``storm --provision``).

The emulated phone does not import the daemon: this is a small client of the documented admin
API (JSON over HTTP on the owner-only UNIX socket), the same calls the ``callboard import`` and
``callboard codes export`` commands make. One bulk import adds the N BAT devices; one export
reads their codes back.
"""

from __future__ import annotations

import http.client
import json
import secrets
import socket
from pathlib import Path
from typing import Any

from .boot import normalise_model

MAX_DEVICES = 100_000


class ProvisionError(Exception):
    """The daemon refused or could not be reached; the message says why in one line."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def admin_call(
    socket_path: Path, method: str, path: str, body: Any = None, *, timeout: float = 600.0
) -> Any:
    """One JSON call to ``/v1/<path>`` on the admin socket; :class:`ProvisionError` if refused."""
    conn = _UnixHTTPConnection(str(socket_path), timeout)
    payload = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", "X-Callboard-User": "phone-storm"}
    try:
        conn.request(method, "/v1/" + path, body=payload, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    except OSError as exc:
        raise ProvisionError(f"cannot reach the daemon at {socket_path}: {exc}") from None
    finally:
        conn.close()
    try:
        result = json.loads(raw) if raw else None
    except ValueError:
        raise ProvisionError(f"the daemon answered {response.status} with non-JSON") from None
    if response.status >= 400:
        error = result.get("error") if isinstance(result, dict) else None
        raise ProvisionError(f"{method} /v1/{path}: {error or response.status}")
    return result


def bat_rows(model: str, count: int, dn_prefix: str) -> list[dict[str, Any]]:
    """Import rows for ``count`` BAT devices of ``model`` (no MAC), one line each."""
    rows = []
    for i in range(count):
        cells = {
            "mac": "",
            "model": model,
            "description": f"storm {i}",
            "user": "",
            "directory_number": f"{dn_prefix}{i:06d}",
            "display_name": f"Storm {i}",
            "requires_activation": "true",
        }
        rows.append({"line": i + 2, "cells": cells})
    return rows


def provision_bat(
    socket_path: Path, *, model: str, count: int, allow_remote: bool = False
) -> list[str]:
    """Add ``count`` BAT devices of ``model`` in one bulk import; return their codes.
    ``allow_remote``: each may then activate through the edge too (one call per device).

    Directory numbers are a fresh random prefix and a counter, so runs against the same
    daemon (which remove nothing) do not share lines.
    """
    if not 1 <= count <= MAX_DEVICES:
        raise ProvisionError(f"count must be 1..{MAX_DEVICES}")
    model = normalise_model(model)
    prefix = "7" + "".join(secrets.choice("0123456789") for _ in range(5))
    imported = admin_call(
        socket_path,
        "POST",
        "import",
        {"rows": bat_rows(model, count, prefix), "dummy_mac": True},
    )
    names = set(imported.get("devices", [])) if isinstance(imported, dict) else set()
    if len(names) != count:
        raise ProvisionError(f"the daemon imported {len(names)} of {count} devices")
    for name in sorted(names) if allow_remote else ():
        admin_call(socket_path, "POST", f"devices/{name}/allow-remote", {"allowed": True})
    exported = admin_call(socket_path, "GET", "codes")
    codes = [
        str(row["activation_code"]).lstrip("'")
        for row in exported
        if isinstance(row, dict) and row.get("device") in names and row.get("activation_code")
    ]
    if len(codes) != count:
        raise ProvisionError(f"the daemon shows codes for {len(codes)} of {count} new devices")
    return codes
