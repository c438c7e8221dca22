"""Codes by email: ``callboard code send`` through a local SMTP server (aiosmtpd) the test runs,
and the REST route; failures are clear and leave the code valid."""

from __future__ import annotations

import email
import email.policy
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from support.harness import Daemon
from support.ports import free_port
from web.web_support import WebClient, add_user, new_token


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def serve_with_smtp(daemon_factory: Any, port: int) -> Daemon:
    d: Daemon = daemon_factory(
        "--web-port", "0",
        "--set", "smtp.host=127.0.0.1", "--set", f"smtp.port={port}",
        "--set", "smtp.starttls=false", "--set", "smtp.from=callboard@example.test",
        "--set", "smtp.timeout=10",
    )  # fmt: skip
    add_user(d, "alice", "correct horse battery", "--email", "alice@example.test")
    add_user(d, "bob", None)
    return d


def test_code_send_mails_the_code_and_its_qr(
    daemon_factory: Any, smtp: tuple[Inbox, int], tmp_path: Path
) -> None:
    inbox, port = smtp
    d = serve_with_smtp(daemon_factory, port)
    dev = d.json("device", "add", "--model", "8841", "--user", "alice", "--line", "2001:Alice")
    code = dev["activation_code"]["code"]
    result = d.cli("code", "send", dev["name"])
    assert result.returncode == 0, result.stderr
    assert "alice@example.test" in result.stdout
    (sender, rcpts, raw) = inbox.messages[-1]
    assert sender == "callboard@example.test" and rcpts == ["alice@example.test"]
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["To"] == "alice@example.test" and "8841" in msg["Subject"]
    text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert code in text and "Valid until" in text
    images = [p for p in msg.walk() if p.get_content_type() == "image/png"]
    assert len(images) == 1 and images[0]["Content-ID"]
    html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "cid:" + images[0]["Content-ID"].strip("<>") in html
    if shutil.which("zbarimg"):
        png = tmp_path / "qr.png"
        png.write_bytes(images[0].get_content())
        decoded = subprocess.run(
            ["zbarimg", "--quiet", "--raw", str(png)], capture_output=True, text=True, timeout=30
        )
        assert decoded.stdout.split() == [code.replace("-", "")]
    assert code not in d.log()
    # The REST route does the same.
    token = new_token(d, "ops")
    reply = WebClient(d.port("web")).api("POST", f"/api/v1/devices/{dev['name']}/code/send", token)
    assert reply.status == 200 and reply.json()["to"] == "alice@example.test"
    assert len(inbox.messages) == 2


def test_code_send_failures_are_clear_and_keep_the_code(daemon_factory: Any) -> None:
    d = serve_with_smtp(daemon_factory, free_port())  # nothing listens there
    dev = d.json("device", "add", "--model", "8841", "--user", "alice")
    failed = d.cli("code", "send", dev["name"])
    assert failed.returncode == 1 and "the code stays valid" in failed.stderr
    assert d.json("code", "show", dev["name"])["state"] == "issued"
    no_mail = d.json("device", "add", "--model", "8841", "--user", "bob")
    refused = d.cli("code", "send", no_mail["name"])
    assert refused.returncode == 1 and "has no email address" in refused.stderr
    # A device cannot be given an unknown user, so there is none to send to.
    refused = d.cli("device", "add", "--model", "8841", "--user", "ghost")
    assert refused.returncode == 1 and "no user named 'ghost'" in refused.stderr
    unowned = d.json("device", "add", "--model", "8841")
    refused = d.cli("code", "send", unowned["name"])
    assert refused.returncode == 1 and "has no user" in refused.stderr
    assert d.cli("code", "send", "SEP000000000000").returncode == 1
