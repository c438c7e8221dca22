"""The emulated phone's SIP user agent: REGISTER like a Cisco phone, keep it fresh, unregister.

The boot driver (``phone/driver.py``) calls this last, once the phone has its config::

    ua = SipUserAgent(reactor, "127.0.0.1", 5060, transport="tcp",
                      device_name="SEP001122334455", mac="001122334455", model_id="683",
                      model="8841", lines=[("1001", "auth1001", "secret")], load="sip88xx.14-2")
    result = await ua.register()      # RegistrationResult; 401 challenges answered
    ...
    await ua.unregister()             # Expires: 0 on every line
    await ua.close()

What it sends mirrors a real CP-8841 (protocol notes §10): User-Agent ``Cisco-CP<model>/<load>``,
one random-UUID contact user, the ``+sip.instance`` / devicename / model contact parameters,
``Expires: 3600`` and the Cisco ``Supported`` list. Each line registers on its own Call-ID over
one TCP (or TLS) connection, in order, as the phone does. Before a binding runs out (the
contact's granted ``expires`` less ``refresh_delta``) all lines are refreshed; a lost
connection is re-opened at the next refresh. It reuses the registrar's codec.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from callboard.protocols.sip.digest import build_authorization, parse_challenge
from callboard.protocols.sip.message import (
    Headers,
    Request,
    Response,
    SIPParseError,
    StreamFramer,
    parse_cseq,
    parse_message,
    parse_name_addr,
)
from twisted.internet import defer
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

CISCO_SUPPORTED = (
    "replaces,join,sdp-anat,norefersub,resource-priority,extended-refer,X-cisco-callinfo,"
    "X-cisco-serviceuri,X-cisco-escapecodes,X-cisco-service-control,X-cisco-srtp-fallback,"
    "X-cisco-monrec,X-cisco-config,X-cisco-sis-7.0.0,X-cisco-xsi-8.5.1"
)

log = Logger(namespace="callboard.phone.sip_ua")


class SipRegistrationError(Exception):
    """No response (timeout, connection lost) or an unusable one."""


@dataclass(frozen=True)
class LineRegistration:
    """How one line's REGISTER ended."""

    dn: str
    status: int
    expires: int  # granted for our contact (0 when not registered)
    keepalive: int | None  # the 200's ``Expires`` header (CUCM's keep-alive interval)
    newreg: bool  # ``x-cisco-newreg`` on our contact
    warning: str | None = None


@dataclass(frozen=True)
class RegistrationResult:
    lines: tuple[LineRegistration, ...]

    @property
    def ok(self) -> bool:
        return all(line.status == 200 for line in self.lines)

    @property
    def status(self) -> int:
        """200 when every line succeeded, else the first failing status."""
        return next((line.status for line in self.lines if line.status != 200), 200)

    @property
    def newreg(self) -> bool:
        return any(line.newreg for line in self.lines)


@dataclass
class _Line:
    dn: str
    auth_name: str
    password: str
    call_id: str
    from_tag: str
    cseq: int = 100


class _UAProtocol(Protocol):
    def __init__(self, max_size: int = 64 * 1024) -> None:
        self.framer = StreamFramer(max_size)
        self.pending: dict[tuple[str, int], defer.Deferred[Response]] = {}
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self.framer.feed(data)
        except SIPParseError as exc:
            log.warn("SIP UA: unframeable data from the registrar: {why}", why=exc.reason)
            if self.transport is not None:
                self.transport.loseConnection()
            return
        for raw in messages:
            try:
                msg = parse_message(raw)
                if not isinstance(msg, Response):
                    continue  # requests to the phone (OPTIONS, NOTIFY) are not emulated
                call_id = (msg.headers.get("call-id") or "").strip()
                key = (call_id, parse_cseq(msg.headers.get("cseq", "")).number)
            except SIPParseError as exc:
                log.warn("SIP UA: bad message dropped: {why}", why=exc.reason)
                continue
            if msg.status < 200:
                continue
            d = self.pending.pop(key, None)
            if d is not None:
                d.callback(msg)

    def connectionLost(self, reason: Failure | None = None) -> None:
        pending, self.pending = self.pending, {}
        for d in pending.values():
            d.errback(SipRegistrationError("connection to the registrar lost"))
        if not self.lost.called:
            self.lost.callback(None)


@dataclass
class SipUserAgent:
    """A Cisco-style SIP UA that registers the phone's lines (see the module docstring)."""

    reactor: Any
    host: str
    port: int
    transport: str = "tcp"
    device_name: str = ""
    mac: str = ""
    model_id: str = ""
    model: str = ""
    lines: list[tuple[str, str, str]] = field(default_factory=list)
    load: str = ""
    expires: int = 3600
    refresh_delta: float = 5.0
    retry_interval: float = 30.0
    response_timeout: float = 32.0  # Timer F
    tls_options: Any = None  # an IOpenSSLClientConnectionCreator for transport="tls"

    def __post_init__(self) -> None:
        if self.transport not in ("tcp", "tls"):
            raise ValueError("transport is 'tcp' or 'tls'")
        self.mac = self.mac.lower()
        self.contact_user = str(uuid.uuid4())
        self._lines = [
            _Line(
                dn,
                auth,
                pw,
                call_id=f"{self.mac[:8]}-{self.mac[8:]}{os.urandom(2).hex()}-{os.urandom(4).hex()}",
                from_tag=f"{self.mac}{os.urandom(6).hex()}",
            )
            for dn, auth, pw in self.lines
        ]
        self._proto: _UAProtocol | None = None
        self._refresh: IDelayedCall | None = None
        self._closed = False
        self.refreshes = 0
        self.last_result: RegistrationResult | None = None

    # --- public API -----------------------------------------------------------------------

    def register(self) -> defer.Deferred[RegistrationResult]:
        """Register every line; resolves when all have an answer (see ``result.ok``)."""
        return defer.Deferred.fromCoroutine(self._register_all(self.expires))

    def unregister(self) -> defer.Deferred[RegistrationResult]:
        """Stop refreshing and send ``Expires: 0`` for every line."""
        self._cancel_refresh()
        return defer.Deferred.fromCoroutine(self._register_all(0))

    def close(self) -> defer.Deferred[None]:
        """Cancel timers and close the connection (no unregister: call that first if wanted)."""
        self._closed = True
        self._cancel_refresh()
        proto, self._proto = self._proto, None
        if proto is None or proto.transport is None:
            return defer.succeed(None)
        proto.transport.loseConnection()
        return proto.lost

    @property
    def registered(self) -> bool:
        return self.last_result is not None and self.last_result.ok and self._refresh is not None

    # --- internals ------------------------------------------------------------------------

    async def _register_all(self, expires: int) -> RegistrationResult:
        results = []
        for line in self._lines:
            results.append(await self._register_line(line, expires))
        result = RegistrationResult(tuple(results))
        self.last_result = result
        if expires > 0 and result.ok and not self._closed:
            granted = min(r.expires for r in results)
            self._schedule(max(granted - self.refresh_delta, granted / 2, 1.0))
        log.info(
            "SIP UA {device} REGISTER expires={expires}: {status}",
            device=self.device_name,
            expires=expires,
            status=result.status,
        )
        return result

    def _schedule(self, delay: float) -> None:
        self._cancel_refresh()
        self._refresh = self.reactor.callLater(delay, self._on_refresh)

    def _cancel_refresh(self) -> None:
        if self._refresh is not None and self._refresh.active():
            self._refresh.cancel()
        self._refresh = None

    def _on_refresh(self) -> None:
        self._refresh = None
        self.refreshes += 1
        d = self.register()

        def failed(f: Failure) -> None:
            log.warn("SIP UA refresh failed: {err}", err=f.getErrorMessage())
            if not self._closed:
                self._schedule(self.retry_interval)

        d.addErrback(failed)

    async def _connect(self) -> _UAProtocol:
        if self._proto is not None and self._proto.transport is not None:
            return self._proto
        proto = _UAProtocol()
        if self.transport == "tls":
            ep: Any = SSL4ClientEndpoint(self.reactor, self.host, self.port, self.tls_options)
        else:
            ep = TCP4ClientEndpoint(self.reactor, self.host, self.port)
        d = connectProtocol(ep, proto)
        d.addTimeout(self.response_timeout, self.reactor)
        await d

        def forget(_: None) -> None:
            if self._proto is proto:
                self._proto = None

        proto.lost.addCallback(forget)
        self._proto = proto
        return proto

    async def _register_line(self, line: _Line, expires: int) -> LineRegistration:
        resp = await self._transact(line, expires, None)
        if resp.status == 401 and line.password:
            try:
                challenge = parse_challenge(resp.headers.get_all("www-authenticate"))
            except SIPParseError as exc:
                raise SipRegistrationError(f"unusable challenge: {exc.reason}") from None
            auth = build_authorization(
                challenge,
                method="REGISTER",
                uri=self._request_uri(),
                username=line.auth_name,
                password=line.password,
            )
            resp = await self._transact(line, expires, auth)
        granted = 0
        newreg = False
        if resp.status == 200 and expires > 0:
            granted = expires
            for value in resp.headers.values("contact"):
                try:
                    na = parse_name_addr(value)
                except SIPParseError:
                    continue
                if self.contact_user in na.uri:
                    granted = int(na.param("expires") or expires)
                    newreg = na.param("x-cisco-newreg") is not None
        keepalive = resp.headers.get("expires")
        return LineRegistration(
            line.dn,
            resp.status,
            granted,
            int(keepalive) if keepalive and keepalive.strip().isdigit() else None,
            newreg,
            resp.headers.get("warning"),
        )

    def _request_uri(self) -> str:
        return f"sip:{self.host}"

    async def _transact(self, line: _Line, expires: int, authorization: str | None) -> Response:
        proto = await self._connect()
        assert proto.transport is not None
        local: Any = proto.transport.getHost()
        line.cseq += 1
        if "@" not in line.call_id:  # the Call-ID stays the same for refreshes
            line.call_id = f"{line.call_id}@{local.host}"
        req = self._build(line, expires, authorization, f"{local.host}:{local.port}")
        d: defer.Deferred[Response] = defer.Deferred()
        proto.pending[(line.call_id, line.cseq)] = d
        d.addTimeout(self.response_timeout, self.reactor)
        proto.transport.write(req.to_bytes())
        try:
            return await d
        except defer.TimeoutError:
            proto.pending.pop((line.call_id, line.cseq), None)
            raise SipRegistrationError("no response to REGISTER") from None

    def _build(self, line: _Line, expires: int, authorization: str | None, local: str) -> Request:
        t = self.transport.upper()
        h = Headers()
        h.add("Via", f"SIP/2.0/{t} {local};branch=z9hG4bK{os.urandom(4).hex()}")
        h.add("From", f"<sip:{line.dn}@{self.host}>;tag={line.from_tag}")
        h.add("To", f"<sip:{line.dn}@{self.host}>")
        h.add("Call-ID", line.call_id)
        h.add("Max-Forwards", "70")
        h.add("Date", formatdate(usegmt=True))
        h.add("CSeq", f"{line.cseq} REGISTER")
        h.add("User-Agent", f"Cisco-CP{self.model}/{self.load}")
        h.add(
            "Contact",
            f"<sip:{self.contact_user}@{local};transport={self.transport}>"
            f';+sip.instance="<urn:uuid:00000000-0000-0000-0000-{self.mac}>"'
            f';+u.sip!devicename.ccm.cisco.com="{self.device_name}"'
            f';+u.sip!model.ccm.cisco.com="{self.model_id}"',
        )
        h.add("Supported", CISCO_SUPPORTED)
        if authorization is not None:
            h.add("Authorization", authorization)
        h.add("Expires", str(expires))
        return Request("REGISTER", self._request_uri(), h)
