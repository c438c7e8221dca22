"""The emulated phone's SIP user agent: REGISTER like a Cisco phone, keep it fresh, unregister.

The boot driver (``phone/driver.py``) calls this last, once the phone has its config::

    ua = SipUserAgent(reactor, "127.0.0.1", 5060, transport="tcp",
                      device_name="SEP001122334455", mac="001122334455", model_id="683",
                      model="8841", lines=[("1001", "auth1001", "secret")], load="sip88xx.14-2")
    result = await ua.register()      # RegistrationResult; 401 challenges answered
    ...
    await ua.unregister()             # Expires: 0 on every line
    await ua.close()

What it sends mirrors TechNote 214535's 7821 on 12.1.1 (protocol notes §10, §16): first the
out-of-dialog alarm ``REFER`` (``application/x-cisco-alarm+xml``, DeviceTLInfo: the trust lists
it holds; ``Require: norefersub``, ``Refer-To: cid:…``), not waited for; then the REGISTERs:
User-Agent ``Cisco-CP<model>/<load>``, ``Session-ID``, ``Date``, one random-UUID contact user
with the ``+sip.instance`` / devicename / model contact parameters, the long Cisco
``Supported`` list and ``Expires: 3600``. The first REGISTER after a restart (the first line's,
its digest retry included) also carries ``Reason: SIP;cause=200;text="cisco-alarm:23 Name=…
ActiveLoad=… InactiveLoad=… Last=…"`` and the ``multipart/mixed`` body of bulkregisterreq and
optionsind; refreshes and the other lines do not. Each line registers on its own Call-ID over
one TCP (or TLS) connection, in order, as the phone does.

From the 200 it reads the contact's granted ``expires``, ``x-cisco-newreg`` (a new
registration: the server had none from this phone), the ``Expires`` header (CUCM's keep-alive
interval) and the ``x-cisco-remotecc-response`` body (the options the server took). As SIPCC
does, it refreshes at the lowest of the granted expiry, that ``Expires`` and its own, less
``refresh_delta``; a lost connection is re-opened at the next refresh. It reuses the
registrar's codec.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from callboard.protocols.sip.cisco import (
    ALARM,
    PHONE_SUPPORTED,
    REMOTECC_RESPONSE,
    CiscoBodyError,
    RemoteccResponse,
    device_tl_info_alarm,
    format_reason_alarm,
    parse_remotecc_response,
    remotecc_register_body,
)
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
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .endpoints import client_endpoint, connect_protocol

CISCO_SUPPORTED = PHONE_SUPPORTED
#: What a 7821 says it accepts, on its REFER (TechNote 214535).
CISCO_ALLOW = "ACK,BYE,CANCEL,INVITE,NOTIFY,OPTIONS,REFER,REGISTER,UPDATE,SUBSCRIBE"

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
    remotecc: RemoteccResponse | None = None  # the 200's optionsind answer, when it had one


@dataclass(frozen=True)
class RegistrationResult:
    lines: tuple[LineRegistration, ...]
    alarm_status: int | None = None  # the answer to the alarm REFER sent before (202), if any

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
        #: Requests to the phone (BYE, NOTIFY); None: not emulated, dropped.
        self.on_request: Callable[[Request], None] | None = None

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
                    if self.on_request is not None:  # a call in progress (phone/ivr_call.py)
                        self.on_request(msg)
                    continue  # otherwise requests to the phone are not emulated
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
    inactive_load: str = ""  # the other firmware partition's load ("" = the active one)
    last_restart: str = "initialized"  # ``Last=`` of the Reason alarm
    itl_signature: str | None = None  # DeviceTLInfo: hex bytes of the installed ITL's signature
    itl_tftp_server: str | None = None
    send_alarm: bool = True  # the DeviceTLInfo REFER before the first REGISTER
    # The current OAuth access token (remote phones: SIP over TLS with bearer, RFC 8898).
    bearer: Callable[[], str] | None = None

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
        self._announced = False  # a first REGISTER (Reason, remotecc body) was answered 200
        self._alarm_sent = False
        self._alarm: defer.Deferred[Response | None] | None = None  # its answer, awaited later
        self.session_id = f"{os.urandom(4).hex()}00105000a000{self.mac}"
        self.refreshes = 0
        self.last_result: RegistrationResult | None = None
        self._on_request: Callable[[Request], None] | None = None

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

    def request(self, req: Request) -> defer.Deferred[Response]:
        """Send ``req`` on the registration's connection; fires with its final response.

        For the activation call (phone/ivr_call.py): the call goes on the flow the bootstrap
        account registered on, as the IVR takes calls only from there."""
        call_id = (req.headers.get("call-id") or "").strip()
        number = parse_cseq(req.headers.get("cseq", "")).number

        async def send() -> Response:
            proto = await self._connect()
            return await self._send(proto, req, call_id, number)

        return defer.Deferred.fromCoroutine(send())

    def send_message(self, message: Request | Response) -> None:
        """Write a message that gets no response (an ACK, our answer to the server's BYE)."""
        proto = self._proto
        if proto is not None and proto.transport is not None:
            proto.transport.write(message.to_bytes())

    def set_request_handler(self, handler: Callable[[Request], None] | None) -> None:
        """Requests the server sends on our connection (BYE, NOTIFY) go to ``handler``."""
        self._on_request = handler
        if self._proto is not None:
            self._proto.on_request = handler

    @property
    def local_address(self) -> tuple[str, int] | None:
        """Our end of the connection to the registrar (host, port), once connected."""
        proto = self._proto
        if proto is None or proto.transport is None:
            return None
        local: Any = proto.transport.getHost()
        return str(local.host), int(local.port)

    @property
    def line_users(self) -> list[tuple[str, str]]:
        """(name, From tag) of each line, for requests in the name of a line."""
        return [(line.dn, line.from_tag) for line in self._lines]

    @property
    def registered(self) -> bool:
        return self.last_result is not None and self.last_result.ok and self._refresh is not None

    # --- internals ------------------------------------------------------------------------

    async def _register_all(self, expires: int) -> RegistrationResult:
        if self.send_alarm and not self._alarm_sent and expires > 0 and self._lines:
            self._alarm_sent = True
            self._alarm = await self._send_alarm()
        results = []
        for i, line in enumerate(self._lines):
            first = i == 0 and expires > 0 and not self._announced
            results.append(await self._register_line(line, expires, first))
        result = RegistrationResult(tuple(results), await self._alarm_status())
        self.last_result = result
        if expires > 0 and result.ok and not self._closed:
            # SIPCC refreshes at the lowest of what it asked, was granted and the keep-alive.
            interval = min(self.expires, *(r.expires for r in results))
            interval = min(interval, *(r.keepalive for r in results if r.keepalive))
            self._schedule(max(interval - self.refresh_delta, interval / 2, 1.0))
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
        proto.on_request = self._on_request
        ep = client_endpoint(self.reactor, self.host, self.port, self.response_timeout)
        if self.transport == "tls":
            ep = wrapClientTLS(self.tls_options, ep)
        d = connect_protocol(ep, proto)
        d.addTimeout(self.response_timeout, self.reactor)
        await d

        def forget(_: None) -> None:
            if self._proto is proto:
                self._proto = None

        proto.lost.addCallback(forget)
        self._proto = proto
        return proto

    async def _register_line(self, line: _Line, expires: int, first: bool) -> LineRegistration:
        bearer = f"Bearer {self.bearer()}" if self.bearer is not None else None
        resp = await self._transact(line, expires, bearer, first)
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
            resp = await self._transact(line, expires, auth, first)
        if first and resp.status == 200:
            self._announced = True
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
            self._remotecc(resp),
        )

    def _remotecc(self, resp: Response) -> RemoteccResponse | None:
        """The options the server took, from a 200's remotecc body (ignored when unreadable,
        as the phone would)."""
        content_type = (resp.headers.get("content-type") or "").split(";")[0].strip().lower()
        if resp.status != 200 or content_type != REMOTECC_RESPONSE:
            return None
        try:
            return parse_remotecc_response(resp.body)
        except CiscoBodyError as exc:
            log.warn("SIP UA: unreadable remotecc response: {why}", why=exc.reason)
            return None

    def _request_uri(self) -> str:
        return f"sip:{self.host}"

    async def _transact(
        self, line: _Line, expires: int, authorization: str | None, first: bool
    ) -> Response:
        proto = await self._connect()
        assert proto.transport is not None
        local: Any = proto.transport.getHost()
        line.cseq += 1
        if "@" not in line.call_id:  # the Call-ID stays the same for refreshes
            line.call_id = f"{line.call_id}@{local.host}"
        req = self._build(line, expires, authorization, f"{local.host}:{local.port}", first)
        try:
            return await self._send(proto, req, line.call_id, line.cseq)
        except defer.TimeoutError:
            raise SipRegistrationError("no response to REGISTER") from None

    def _send(
        self, proto: _UAProtocol, req: Request, call_id: str, cseq: int
    ) -> defer.Deferred[Response]:
        """Write a request; its final response (or a timeout) fires the Deferred."""
        assert proto.transport is not None
        d: defer.Deferred[Response] = defer.Deferred()
        proto.pending[(call_id, cseq)] = d

        def forget(failure: Failure) -> Failure:
            proto.pending.pop((call_id, cseq), None)
            return failure

        d.addTimeout(self.response_timeout, self.reactor)
        d.addErrback(forget)
        proto.transport.write(req.to_bytes())
        return d

    def _contact(self, local: str) -> str:
        return f"<sip:{self.contact_user}@{local};transport={self.transport}>"

    def _common_headers(self, h: Headers) -> None:
        h.add("Session-ID", f"{self.session_id};remote=" + "0" * 32)
        h.add("Date", formatdate(usegmt=True))

    def _build(
        self, line: _Line, expires: int, authorization: str | None, local: str, first: bool
    ) -> Request:
        t = self.transport.upper()
        h = Headers()
        h.add("Via", f"SIP/2.0/{t} {local};branch=z9hG4bK{os.urandom(4).hex()}")
        h.add("From", f"<sip:{line.dn}@{self.host}>;tag={line.from_tag}")
        h.add("To", f"<sip:{line.dn}@{self.host}>")
        h.add("Call-ID", line.call_id)
        h.add("Max-Forwards", "70")
        self._common_headers(h)
        h.add("CSeq", f"{line.cseq} REGISTER")
        h.add("User-Agent", f"Cisco-CP{self.model}/{self.load}")
        h.add(
            "Contact",
            self._contact(local) + f';+sip.instance="<urn:uuid:00000000-0000-0000-0000-{self.mac}>"'
            f';+u.sip!devicename.ccm.cisco.com="{self.device_name}"'
            f';+u.sip!model.ccm.cisco.com="{self.model_id}"',
        )
        h.add("Supported", CISCO_SUPPORTED)
        if authorization is not None:
            h.add("Authorization", authorization)
        body = b""
        if first:
            h.add(
                "Reason",
                format_reason_alarm(
                    self.device_name,
                    self.load,
                    self.inactive_load or self.load,
                    self.last_restart,
                ),
            )
        h.add("Expires", str(expires))
        if first:
            content_type, body = remotecc_register_body()
            h.add("Content-Type", content_type)
            h.add("Mime-Version", "1.0")
        return Request("REGISTER", self._request_uri(), h, body)

    # --- the alarm REFER ------------------------------------------------------------------

    async def _send_alarm(self) -> defer.Deferred[Response | None] | None:
        """Send the DeviceTLInfo REFER; its answer is collected after the REGISTERs (the phone
        does not wait for it either). None when it could not even be sent."""
        try:
            proto = await self._connect()
        except Exception as exc:  # REGISTER will report the connection problem itself
            log.warn("SIP UA: alarm REFER not sent: {err}", err=exc)
            return None
        assert proto.transport is not None
        local: Any = proto.transport.getHost()
        req, call_id = self._build_alarm(local.host, f"{local.host}:{local.port}")
        # A lost answer only leaves the status unknown.
        return self._send(proto, req, call_id, 1000).addErrback(lambda _: None)

    async def _alarm_status(self) -> int | None:
        d, self._alarm = self._alarm, None
        if d is None:
            return None
        resp = await d
        if resp is None:
            log.warn("SIP UA {device}: no answer to the alarm REFER", device=self.device_name)
            return None
        if resp.status != 202:
            log.warn(
                "SIP UA {device}: alarm REFER answered {status}",
                device=self.device_name,
                status=resp.status,
            )
        return resp.status

    def _build_alarm(self, local_host: str, local: str) -> tuple[Request, str]:
        dn = self._lines[0].dn
        call_id = f"{self.mac[:8]}-{self.mac[8:]}{os.urandom(2).hex()}-{os.urandom(4).hex()}"
        call_id += f"@{local_host}"
        cid = f"{os.urandom(4).hex()}@{local_host}"
        h = Headers()
        h.add(
            "Via", f"SIP/2.0/{self.transport.upper()} {local};branch=z9hG4bK{os.urandom(4).hex()}"
        )
        h.add("From", f'"{dn}" <sip:{dn}@{local_host}>;tag={self.mac}{os.urandom(6).hex()}')
        h.add("To", f"<sip:{self.host}>")
        h.add("Call-ID", call_id)
        self._common_headers(h)
        h.add("CSeq", "1000 REFER")
        h.add("User-Agent", f"Cisco-CP{self.model}/{self.load}")
        h.add("Expires", "10")
        h.add("Max-Forwards", "70")
        h.add(
            "Contact",
            self._contact(local) + f';+u.sip!devicename.ccm.cisco.com="{self.device_name}"',
        )
        h.add("Require", "norefersub")
        h.add("Referred-By", f'"{dn}" <sip:{dn}@{local_host}>')
        h.add("Refer-To", f"cid:{cid}")
        h.add("Content-Id", f"<{cid}>")
        h.add("Allow", CISCO_ALLOW)
        h.add("Content-Type", ALARM)
        h.add("Content-Disposition", "session;handling=required")
        body = device_tl_info_alarm(
            self.device_name,
            local_host,
            itl_signature=self.itl_signature,
            itl_tftp_server=self.itl_tftp_server,
        )
        return Request("REFER", self._request_uri(), h, body), call_id
