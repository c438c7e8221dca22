"""Remote activation for the emulated phone: no DHCP, TFTP or TVS (``docs/REMOTE.md``).

The phone is given an activation domain (``https://HOST:PORT``), presents its MIC on every
TLS connection, redeems its code at the edge's token endpoint for OAuth tokens, fetches its
config through the edge with the access token, and registers its lines over SIP/TLS with the
same token (RFC 8898). :meth:`EdgeClient.refresh` renews the tokens (the refresh token
rotates); :func:`remote_boot` refreshes before registering again when the access token is
about to expire.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any
from urllib.parse import urlencode, urlsplit

from callboard.protocols.oauth import ACTIVATION_GRANT, FORM_TYPE, REFRESH_GRANT
from callboard.protocols.tls import client_options
from twisted.internet import defer
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from .boot import BootResult, Outcome, PhoneIdentity
from .config import ConfigError, parse_device_config
from .http_client import _Collector
from .sip_ua import SipRegistrationError, SipUserAgent

MAX_BODY = 1 << 20


class EdgeError(Exception):
    """The edge refused or could not be reached; ``outcome`` says how the boot ends."""

    def __init__(self, outcome: Outcome, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


@dataclass
class EdgeTokens:
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_at: float
    device_name: str
    config_url: str


@implementer(IPolicyForHTTPS)
class _PresentMIC:
    """Every HTTPS connection presents the MIC (the edge's certificate is not pinned here:
    a lab phone, like ``--tofu``; a product would check it against its CA bundle)."""

    def __init__(self, identity: PhoneIdentity) -> None:
        self._options = client_options((identity.mic_cert, identity.mic_key), identity.mic_chain)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return self._options


class EdgeClient:
    """The phone's side of the edge's HTTPS API."""

    def __init__(
        self,
        reactor: Any,
        origin: str,
        identity: PhoneIdentity,
        *,
        timeout: float = 10.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        parts = urlsplit(origin)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"activation domain {origin!r} is not https://HOST[:PORT]")
        self.origin = f"https://{parts.netloc}"
        self.reactor = reactor
        self.identity = identity
        self.timeout = timeout
        self.now = now
        self.agent = Agent(reactor, _PresentMIC(identity), connectTimeout=timeout)
        self.tokens: EdgeTokens | None = None

    async def _request(
        self, method: bytes, url: str, headers: dict[str, str], body: bytes | None = None
    ) -> tuple[int, bytes]:
        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        hdrs = Headers({k.encode(): [v.encode()] for k, v in headers.items()})
        try:
            d = self.agent.request(method, url.encode(), hdrs, producer)
            d.addTimeout(self.timeout, self.reactor)
            response = await d
            collector = _Collector(MAX_BODY)
            response.deliverBody(collector)
            collector.done.addTimeout(self.timeout, self.reactor)
            data: bytes = await collector.done
        except Exception as exc:
            raise EdgeError(Outcome.UNREACHABLE, f"edge {self.origin}: {exc}") from None
        return int(response.code), data

    async def _token(self, form: dict[str, str]) -> EdgeTokens:
        status, body = await self._request(
            b"POST",
            f"{self.origin}/oauth/token",
            {"Content-Type": FORM_TYPE, "Accept": "application/json"},
            urlencode(form).encode(),
        )
        try:
            doc = json.loads(body)
        except ValueError:
            raise EdgeError(Outcome.ERROR, f"token endpoint answered {status}") from None
        if status != 200:
            error = doc.get("error", "?") if isinstance(doc, dict) else "?"
            outcome = {
                "invalid_client": Outcome.CERTIFICATE_REFUSED,
                "invalid_grant": Outcome.REJECTED,
                "unauthorized_client": Outcome.REJECTED,
            }.get(error, Outcome.ERROR)
            raise EdgeError(outcome, f"token endpoint: {status} {error}")
        self.tokens = EdgeTokens(
            access_token=doc["access_token"],
            refresh_token=doc["refresh_token"],
            expires_at=self.now() + float(doc["expires_in"]),
            device_name=doc["device_name"],
            config_url=doc["config_url"],
        )
        return self.tokens

    async def activate(self, code: str) -> EdgeTokens:
        return await self._token({"grant_type": ACTIVATION_GRANT, "code": code})

    async def refresh(self) -> EdgeTokens:
        if self.tokens is None:
            raise EdgeError(Outcome.ERROR, "no refresh token yet")
        form = {"grant_type": REFRESH_GRANT, "refresh_token": self.tokens.refresh_token}
        return await self._token(form)

    async def fresh_access_token(self, margin: float = 60.0) -> str:
        """The access token, refreshed first when it expires within ``margin`` seconds."""
        if self.tokens is None:
            raise EdgeError(Outcome.ERROR, "not activated")
        if self.tokens.expires_at - self.now() < margin:
            await self.refresh()
        assert self.tokens is not None
        return self.tokens.access_token

    async def fetch(self, url: str) -> bytes:
        token = await self.fresh_access_token()
        status, body = await self._request(b"GET", url, {"Authorization": f"Bearer {token}"})
        if status != 200:
            raise EdgeError(Outcome.NOT_PROVISIONED, f"{url}: HTTP {status}")
        return body


async def remote_boot(
    reactor: Any,
    identity: PhoneIdentity,
    origin: str,
    *,
    timeout: float = 10.0,
    register: bool = True,
    unregister: bool = False,
    emit: Callable[[str], None] = lambda _line: None,
) -> BootResult:
    """Activate at the edge, fetch the config through it, register over SIP/TLS with the
    token. A boot without a code cannot activate (``CODE_REQUIRED``)."""
    started = time.monotonic()
    name = f"SEP{identity.mac}"
    steps: list[str] = []

    def step(text: str) -> None:
        steps.append(text)
        emit(text)

    def result(outcome: Outcome, reason: str, **kw: Any) -> BootResult:
        return BootResult(
            outcome, reason, name, tuple(steps), elapsed=time.monotonic() - started, **kw
        )

    if identity.code is None:
        return result(Outcome.CODE_REQUIRED, "remote activation needs --code")
    try:
        client = EdgeClient(reactor, origin, identity, timeout=timeout)
        tokens = await client.activate(identity.code)
        name = tokens.device_name
        step(f"activated at {client.origin} as {name}")
        config = parse_device_config(await client.fetch(tokens.config_url))
        step(f"config {tokens.config_url} fetched")
    except EdgeError as exc:
        return result(exc.outcome, exc.reason)
    except (ConfigError, ValueError) as exc:
        return result(Outcome.ERROR, str(exc))
    if not register or not config.call_managers or not config.lines:
        return result(Outcome.ONBOARDED, "activated", config=config)
    manager = config.call_managers[0]
    ua = SipUserAgent(
        reactor,
        manager.address,
        manager.secured_sip_port,
        transport="tls",
        device_name=name,
        mac=identity.mac,
        model=identity.model,
        lines=[(ln.name, ln.auth_name, "") for ln in config.lines],
        tls_options=client_options((identity.mic_cert, identity.mic_key), identity.mic_chain),
        send_alarm=False,
        bearer=lambda: client.tokens.access_token if client.tokens else "",
    )
    try:
        await client.fresh_access_token()
        registration = await ua.register()
        status = registration.status
        step(f"REGISTER over TLS with the bearer token: {status}")
        if unregister and registration.ok:
            await ua.unregister()
    except (SipRegistrationError, EdgeError, defer.TimeoutError, ConnectionError) as exc:
        return result(Outcome.REGISTRATION_FAILED, str(exc), config=config)
    finally:
        await ua.close()
    if not registration.ok:
        return result(
            Outcome.REGISTRATION_FAILED, f"REGISTER answered {status}", config=config,
            registration_status=status,
        )  # fmt: skip
    return result(Outcome.ONBOARDED, "registered", config=config, registration_status=status)
