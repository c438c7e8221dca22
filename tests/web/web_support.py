"""A small HTTPS client for the web tests (stdlib only) and helpers to set up users."""

from __future__ import annotations

import http.client
import json
import re
import ssl
import subprocess
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from support.harness import Daemon

COOKIE = "__Host-callboard"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class WebClient:
    """One browser-like client: it keeps the session cookie, as a browser does."""

    port: int
    cookie: str | None = None
    history: list[Reply] = field(default_factory=list)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        *,
        cookie: bool = True,
    ) -> Reply:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=30)
        sent = dict(headers or {})
        if cookie and self.cookie:
            sent["Cookie"] = f"{COOKIE}={self.cookie}"
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            reply = Reply(
                response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
            )
        finally:
            conn.close()
        set_cookie = reply.headers.get("set-cookie", "")
        m = re.match(rf"{re.escape(COOKIE)}=([^;]+)", set_cookie)
        if m and cookie:
            self.cookie = m.group(1)
        self.history.append(reply)
        return reply

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def post_form(self, path: str, fields: dict[str, str], **kw: Any) -> Reply:
        return self.request(
            "POST",
            path,
            urlencode(fields).encode(),
            {"Content-Type": "application/x-www-form-urlencoded"},
            **kw,
        )

    def post_multipart(self, path: str, fields: dict[str, str], files: dict[str, bytes]) -> Reply:
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in fields.items():
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                f"{value}\r\n".encode()
            )
        for name, data in files.items():
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{name}.csv"\r\nContent-Type: text/csv\r\n\r\n'.encode()
                + data
                + b"\r\n"
            )
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.request(
            "POST", path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )

    def csrf(self, path: str = "/sign-in") -> str:
        page = self.get(path)
        m = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert m, page.text[:500]
        return m.group(1)

    def sign_in(self, user: str, password: str) -> Reply:
        token = self.csrf()
        return self.post_form(
            "/sign-in", {"csrf": token, "username": user, "password": password, "next": "/"}
        )

    def api(
        self, method: str, path: str, token: str, body: Any = None, raw: bytes | None = None
    ) -> Reply:
        headers = {"Authorization": f"Bearer {token}"}
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        return self.request(method, path, data, headers, cookie=False)


def add_user(
    daemon: Daemon, name: str, password: str | None, *extra: str
) -> subprocess.CompletedProcess[str]:
    args = ["user", "add", name, *extra]
    if password is not None:
        args.append("--password-stdin")
    result = subprocess.run(
        [*_cli(daemon), *args],
        input=(password + "\n") if password is not None else "",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result


def new_token(daemon: Daemon, name: str, *extra: str) -> str:
    token: str = daemon.json("token", "create", name, *extra)["token"]
    return token


def _cli(daemon: Daemon) -> list[str]:
    from support.harness import CALLBOARD

    return [*CALLBOARD, "--admin-socket", str(daemon.socket)]


def codes_of(html: str) -> list[str]:
    return re.findall(r"\b\d{4}-\d{4}-\d{4}-\d{4}\b", html)
