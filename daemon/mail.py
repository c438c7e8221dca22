"""Codes by email: a user's activation code, expiry and QR code, sent over SMTP.

Twisted's own ESMTP client (``twisted.mail.smtp.sendmail``) sends it on the reactor without
blocking: STARTTLS when ``smtp.starttls`` (required then, and the server's certificate is
verified), AUTH when ``smtp.user`` is set. The message is a multipart/alternative with a
plain-text part and an HTML part whose QR code is an inline PNG (``cid:``), because mail
clients do not show inline SVG.
"""

from __future__ import annotations

import datetime as dt
import io
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

import segno
from twisted.internet.defer import Deferred
from twisted.mail.smtp import sendmail

from .registry.accounts import User
from .registry.model import ActivationCode, Device, group_code
from .web.settings import SMTPSettings


def qr_png(digits: str, scale: int = 8) -> bytes:
    """A full QR symbol (never Micro QR) for the 16 digits, as PNG bytes."""
    out = io.BytesIO()
    segno.make_qr(digits, error="m").save(out, kind="png", scale=scale, border=4)
    return out.getvalue()


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def code_message(
    sender: str, to: str, user: User, device: Device, code: ActivationCode
) -> EmailMessage:
    grouped = group_code(code.code)
    who = user.display_name or user.name
    line = ", ".join(ln.directory_number for ln in device.lines) or "-"
    text = (
        f"Hello {who},\n\n"
        f"Your new phone (Cisco {device.model}, line {line}) is ready to activate.\n\n"
        f"Activation code: {grouped}\nValid until:     {_when(code.expires_at)}\n\n"
        "Plug the phone in. When it asks for an activation code, type the 16 digits\n"
        "(or scan the QR code in this message with the phone's camera).\n"
        "The code works once, only for this phone. Do not forward this message.\n"
    )
    msg = EmailMessage()
    msg["Subject"] = f"Activation code for your phone ({device.model})"
    msg["From"] = sender
    msg["To"] = to
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    msg.set_content(text)
    cid = make_msgid(domain="callboard.invalid")
    html = (
        f"<p>Hello {_esc(who)},</p><p>Your new phone (Cisco {_esc(device.model)}, line "
        f"{_esc(line)}) is ready to activate.</p>"
        f"<p>Activation code: <strong>{grouped}</strong><br>Valid until: "
        f"{_when(code.expires_at)}</p>"
        f'<p><img src="cid:{cid[1:-1]}" alt="QR code of the activation code" '
        'width="264" height="264"></p>'
        "<p>Type the 16 digits on the phone, or scan the QR code with its camera. "
        "The code works once, only for this phone.</p>"
    )
    msg.add_alternative(html, subtype="html")
    html_part = msg.get_body(("html",))
    assert html_part is not None
    html_part.add_related(qr_png(code.code), "image", "png", cid=cid, filename="activation-qr.png")
    return msg


def _esc(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


class SMTPMailer:
    """Sends code emails through the configured SMTP server (a :class:`CodeMailer`)."""

    def __init__(self, settings: SMTPSettings, reactor: Any) -> None:
        self.settings = settings
        self.reactor = reactor

    def send_code(
        self, to: str, user: User, device: Device, code: ActivationCode
    ) -> Deferred[None]:
        s = self.settings
        message = code_message(s.sender, to, user, device, code)
        d: Deferred[Any] = sendmail(
            s.host,
            s.sender,
            [to],
            message.as_bytes(),
            senderDomainName=s.helo or None,
            port=s.port,
            reactor=self.reactor,
            username=s.user or None,
            password=s.password or None,
            requireAuthentication=bool(s.user),
            requireTransportSecurity=s.starttls,
        )
        d.addTimeout(s.timeout, self.reactor)
        return d.addCallback(lambda _: None)
