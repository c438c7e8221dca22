"""Talking to the edge as a remote phone would: curl with the MIC, SIP over TLS with ssl."""

from __future__ import annotations

import json
import secrets
import socket
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACTIVATION = "urn:callboard:params:oauth:grant-type:activation-code"


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


def curl(url: str, *args: str, mic: tuple[Path, Path] | None = None, timeout: float = 30) -> Reply:
    """One request with the real curl; ``mic`` is (certificate, key) presented as the client."""
    command = ["curl", "-sS", "-k", "-i", "--max-time", str(timeout), *args]
    if mic is not None:
        command += ["--cert", str(mic[0]), "--key", str(mic[1])]
    result = subprocess.run([*command, url], capture_output=True, timeout=timeout + 10, check=False)
    assert result.returncode == 0, result.stderr.decode()
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(int(lines[0].split()[1]), headers, body)


def token_request(base: str, mic: tuple[Path, Path] | None, **form: str) -> Reply:
    args: list[str] = []
    for key, value in form.items():
        args += ["--data-urlencode", f"{key}={value}"]
    return curl(f"{base}/oauth/token", *args, mic=mic)


def activate(base: str, mic: tuple[Path, Path] | None, code: str) -> Reply:
    return token_request(base, mic, grant_type=ACTIVATION, code=code)


def get_config(base: str, name: str, mic: tuple[Path, Path] | None, token: str | None) -> Reply:
    args = ["-H", f"Authorization: Bearer {token}"] if token is not None else []
    return curl(f"{base}/config/{name}", *args, mic=mic)


def sip_register(
    port: int,
    mic: tuple[Path, Path] | None,
    *,
    aor: str = "1000",
    authorization: tuple[str, str] | None = None,
    expires: int = 3600,
    host: str = "127.0.0.1",
    timeout: float = 10,
) -> tuple[int, dict[str, list[str]]]:
    """One REGISTER over TLS with Python's ssl; (status, headers) of the answer."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if mic is not None:
        context.load_cert_chain(str(mic[0]), str(mic[1]))
    lines = [
        f"REGISTER sip:{host} SIP/2.0",
        f"Via: SIP/2.0/TLS {host}:5061;branch=z9hG4bK{secrets.token_hex(8)}",
        "Max-Forwards: 70",
        f"From: <sip:{aor}@{host}>;tag={secrets.token_hex(4)}",
        f"To: <sip:{aor}@{host}>",
        f"Call-ID: {secrets.token_hex(8)}@edge-test",
        "CSeq: 1 REGISTER",
        f"Contact: <sip:{aor}@{host}:5061;transport=tls>",
        f"Expires: {expires}",
    ]
    if authorization is not None:
        lines.append(f"{authorization[0]}: {authorization[1]}")
    lines += ["Content-Length: 0", "", ""]
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall("\r\n".join(lines).encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
    head = data.partition(b"\r\n\r\n")[0].decode()
    first, *rest = head.split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in rest:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(first.split()[1]), headers
