"""What a test learns from a running daemon as a phone would: its TVS pin and file answers."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

from callboard.protocols.tvs.itl import Role, parse_itl
from cryptography.hazmat.primitives import serialization


def tvs_pin(daemon: Any) -> bytes:
    """The TVS certificate as a phone learns it: from the signed ITL the daemon serves."""
    url = f"http://127.0.0.1:{daemon.port('http')}/ITLSEP00AABBCCDDEE.tlv"
    with urllib.request.urlopen(url, timeout=10) as response:
        parsed = parse_itl(response.read())
    (record,) = [r for r in parsed.records if r.role == Role.TVS]
    return record.certificate.public_bytes(serialization.Encoding.DER)


def http_status(daemon: Any, name: str) -> int:
    """The HTTP status of ``name`` on the daemon's provisioning port."""
    url = f"http://127.0.0.1:{daemon.port('http')}/{name}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
