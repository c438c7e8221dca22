"""A user agent server for calls that end here (RFC 3261 dialogs), sans-I/O.

The registrar hands it every request it does not answer itself (see
:class:`~callboard.protocols.sip.registrar.RequestHandler`). What happens to a call is the
:class:`CallHandler`'s business (the voice-prompt service); this module keeps the dialog rules:

- ``INVITE`` with an SDP offer (RFC 3264): the handler accepts (giving the local RTP address)
  or refuses (its status, with ``Warning: 399``); an unreadable SDP is 400, nothing in common
  488, an INVITE without an offer 488 too (we do not make offers). Accepted: 100, 180, then
  after ``answer_delay`` a 200 with our SDP answer, retransmitted over UDP (T1 doubling up to
  T2) until the ACK comes; no ACK within 64·T1 ends the call with a BYE (§13.3.1.4).
- ``CANCEL`` of a call not yet answered: 200, and 487 to the INVITE (§9.2); else 481.
- ``BYE`` either way: ours retransmitted over UDP until answered; theirs answered 200.
- A re-INVITE is refused politely: 491 while our own request is pending, else 488 (the
  dialog goes on unchanged).
- ``INFO`` ``application/dtmf-relay`` (``Signal=``) or ``application/dtmf`` carries digits;
  another INFO body 415; an INFO (or BYE) outside a dialog 481.
- Other methods: 405 with ``Allow``.

Out-of-dialog requests to a phone (the ``check-sync`` NOTIFY) go through :meth:`send_request`
on the path its call came on. Time is the injected ``IReactorTime``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from callboard.protocols.sip.message import (
    Headers,
    Request,
    Response,
    SIPParseError,
    parse_cseq,
    parse_name_addr,
    parse_uri,
    parse_via,
    quote,
    response_to,
)
from callboard.protocols.sip.registrar import Reply, Source
from callboard.protocols.sip.sdp import Agreement, SDPError, answer_sdp, negotiate, parse_sdp
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

ALLOW_METHODS = "INVITE, ACK, BYE, CANCEL, INFO"
T1, T2 = 0.5, 4.0
TIMEOUT = 64 * T1
DTMF_SIGNALS = "0123456789*#ABCD"
MAX_INFO_BODY = 512

log = Logger(namespace="callboard.sip.dialog")


class CallRefused(Exception):
    """Raised by :meth:`CallHandler.accept`: the INVITE is answered ``status`` (4xx/5xx/6xx)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


@dataclass(frozen=True)
class IncomingCall:
    """An INVITE as the handler sees it (values as the phone sent them)."""

    call_id: str
    caller: str  # the From URI
    caller_user: str | None
    callee_user: str | None  # the Request-URI's user part (the number dialled)
    source: Source
    agreement: Agreement
    user_agent: str | None


@dataclass(frozen=True)
class MediaAddress:
    """Where our RTP listens for this call (goes into the SDP answer)."""

    host: str
    port: int


class CallHandler(Protocol):
    """What the dialog layer asks and tells; must not block (runs on the reactor)."""

    def accept(self, call: IncomingCall) -> MediaAddress:
        """Take the call (open its media) or raise :class:`CallRefused`."""
        ...

    def answered(self, dialog: Dialog) -> None:
        """The ACK came: the call is up."""
        ...

    def digit(self, dialog: Dialog, digit: str) -> None:
        """A digit sent as SIP INFO."""
        ...

    def ended(self, dialog: Dialog, why: str) -> None:
        """The call is over (either side hung up, cancelled, or timed out): free its media."""
        ...


class DialogState(Enum):
    RINGING = "ringing"  # 180 sent, 200 not yet
    ANSWERED = "answered"  # 200 sent, waiting for the ACK
    CONFIRMED = "confirmed"
    ENDED = "ended"


@dataclass
class Dialog:
    """One call from a phone; the handler reads it and calls :meth:`DialogServer.hangup`."""

    call: IncomingCall
    invite: Request
    respond: Callable[[Response], None]
    local_tag: str
    remote_tag: str
    local_uri: str  # the INVITE's To, our side of the dialog
    remote_uri: str  # the INVITE's From (with its tag), their side
    remote_target: str  # their Contact URI
    invite_branch: str
    media: MediaAddress
    state: DialogState = DialogState.RINGING
    remote_cseq: int = 0
    local_cseq: int = 0
    timer: IDelayedCall | None = None
    pending_request: str | None = None  # the method of our request not yet answered
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def call_id(self) -> str:
        return self.call.call_id


@dataclass
class _Outgoing:
    """A request we sent, retransmitted over UDP until a final answer (Timer E/F)."""

    data: bytes
    source: Source
    host: str
    port: int
    interval: float
    deadline: float
    timer: IDelayedCall | None = None
    on_final: Callable[[int], None] | None = None


@dataclass
class Counters:
    invites: int = 0
    answered: int = 0
    refused: int = 0
    cancelled: int = 0
    byes_received: int = 0
    byes_sent: int = 0
    no_ack: int = 0
    reinvites_refused: int = 0
    info_digits: int = 0
    no_dialog_481: int = 0
    bad_sdp_400: int = 0
    no_codec_488: int = 0
    not_allowed_405: int = 0


class DialogServer:
    """The UAS: implements the registrar's ``RequestHandler`` interface."""

    allow = ALLOW_METHODS

    def __init__(
        self,
        handler: CallHandler,
        clock: IReactorTime,
        *,
        answer_delay: float = 0.5,
        server_name: str = "Callboard",
        max_calls: int = 100,
    ) -> None:
        self.handler = handler
        self.clock = clock
        self.answer_delay = answer_delay
        self.server_name = server_name
        self.max_calls = max_calls
        self.dialogs: dict[tuple[str, str], Dialog] = {}  # (Call-ID, our tag) → dialog
        self._outgoing: dict[str, _Outgoing] = {}  # Via branch → request awaiting an answer
        self.counters = Counters()

    # --- the registrar's interface ----------------------------------------------------------

    def handle_request(
        self, req: Request, source: Source, respond: Callable[[Response], None]
    ) -> Response | None:
        method = req.method.upper()
        try:
            if method == "INVITE":
                return self._invite(req, source, respond)
            if method == "ACK":
                self._ack(req)
                return None
            if method == "CANCEL":
                return self._cancel(req)
            if method == "BYE":
                return self._bye(req)
            if method == "INFO":
                return self._info(req)
        except SIPParseError as exc:
            return self._warned(req, 400, exc.reason)
        self.counters.not_allowed_405 += 1
        resp = self._response(req, 405)
        resp.headers.add("Allow", ALLOW_METHODS)
        return resp

    def handle_response(self, resp: Response, source: Source) -> None:
        """A response to a BYE or NOTIFY we sent: stop retransmitting on a final one."""
        try:
            branch = parse_via(resp.headers.values("via")[0]).branch
        except (SIPParseError, IndexError):
            return
        out = self._outgoing.get(branch or "")
        if out is None or resp.status < 200:
            return
        self._forget_outgoing(branch or "")
        if out.on_final is not None:
            out.on_final(resp.status)

    # --- INVITE --------------------------------------------------------------------------

    def _invite(
        self, req: Request, source: Source, respond: Callable[[Response], None]
    ) -> Response | None:
        to = parse_name_addr(req.headers.get("to") or "")
        if to.param("tag"):
            return self._reinvite(req, to.param("tag") or "")
        self.counters.invites += 1
        call_id = (req.headers.get("call-id") or "").strip()
        if len(self.dialogs) >= self.max_calls:
            return self._warned(req, 486, "too many calls", reason="Busy Here")
        content_type = (req.headers.get("content-type") or "").split(";")[0].strip().lower()
        if not req.body or content_type != "application/sdp":
            self.counters.no_codec_488 += 1
            return self._warned(req, 488, "an SDP offer is required", reason=_REASON[488])
        try:
            agreement = negotiate(parse_sdp(req.body))
        except SDPError as exc:
            if exc.status == 488:
                self.counters.no_codec_488 += 1
            else:
                self.counters.bad_sdp_400 += 1
            return self._warned(req, exc.status, exc.reason, reason=_REASON.get(exc.status, ""))
        caller = parse_name_addr(req.headers.get("from") or "")
        caller_uri = parse_uri(caller.uri)
        contacts = req.headers.values("contact")
        remote_target = parse_name_addr(contacts[0]).uri if contacts else caller.uri
        call = IncomingCall(
            call_id=call_id,
            caller=caller.uri,
            caller_user=caller_uri.user,
            callee_user=parse_uri(req.uri).user,
            source=source,
            agreement=agreement,
            user_agent=req.headers.get("user-agent"),
        )
        try:
            media = self.handler.accept(call)
        except CallRefused as exc:
            self.counters.refused += 1
            return self._warned(req, exc.status, exc.why, reason=_REASON.get(exc.status, ""))
        local_tag = os.urandom(6).hex()
        dialog = Dialog(
            call=call,
            invite=req,
            respond=respond,
            local_tag=local_tag,
            remote_tag=caller.param("tag") or "",
            local_uri=f"{req.headers.get('to')};tag={local_tag}",
            remote_uri=req.headers.get("from") or "",
            remote_target=remote_target,
            invite_branch=parse_via(req.headers.values("via")[0]).branch or "",
            media=media,
            remote_cseq=parse_cseq(req.headers.get("cseq") or "").number,
        )
        self.dialogs[(call_id, local_tag)] = dialog
        respond(self._response(req, 100, tag=None))
        respond(self._response(req, 180, tag=local_tag, reason="Ringing"))
        dialog.timer = self.clock.callLater(self.answer_delay, self._answer, dialog)
        return None

    def _answer(self, dialog: Dialog) -> None:
        dialog.timer = None
        if dialog.state is not DialogState.RINGING:
            return
        dialog.state = DialogState.ANSWERED
        self.counters.answered += 1
        ok = self._response(dialog.invite, 200, tag=dialog.local_tag)
        ok.headers.add("Contact", self._own_contact(dialog))
        ok.headers.add("Allow", ALLOW_METHODS)
        ok.headers.add("Content-Type", "application/sdp")
        ok.body = answer_sdp(
            dialog.call.agreement, dialog.media.host, dialog.media.port, int(self.clock.seconds())
        )
        dialog.extra["ok"] = ok
        self._send_ok(dialog, T1)

    def _send_ok(self, dialog: Dialog, interval: float) -> None:
        """Send the 200 (again); over UDP keep at it until the ACK (RFC 3261 §13.3.1.4)."""
        if dialog.state is not DialogState.ANSWERED:
            return
        ok = dialog.extra["ok"]
        assert isinstance(ok, Response)
        dialog.respond(ok)
        if dialog.call.source.transport != "udp":
            interval = TIMEOUT  # reliable: only wait for the ACK
        waited = float(dialog.extra.get("waited", 0.0))  # type: ignore[arg-type]
        if waited >= TIMEOUT:
            self.counters.no_ack += 1
            log.info("SIP call {call_id}: no ACK; hanging up", call_id=dialog.call_id)
            dialog.state = DialogState.CONFIRMED  # a dialog exists even without the ACK
            self.hangup(dialog, "no ACK")
            return
        dialog.extra["waited"] = waited + interval
        dialog.timer = self.clock.callLater(interval, self._send_ok, dialog, min(interval * 2, T2))

    def _ack(self, req: Request) -> None:
        dialog = self._dialog_of(req)
        if dialog is None or dialog.state is not DialogState.ANSWERED:
            return  # the ACK of a non-2xx final response, or a retransmitted ACK
        self._cancel_timer(dialog)
        dialog.state = DialogState.CONFIRMED
        self.handler.answered(dialog)

    def _reinvite(self, req: Request, tag: str) -> Response:
        dialog = self.dialogs.get(((req.headers.get("call-id") or "").strip(), tag))
        if dialog is None or dialog.state is DialogState.ENDED:
            self.counters.no_dialog_481 += 1
            return self._response(req, 481)
        self.counters.reinvites_refused += 1
        if dialog.pending_request is not None:
            resp = self._response(req, 491, reason="Request Pending")
            return resp
        return self._warned(req, 488, "the session cannot be changed", reason=_REASON[488])

    # --- CANCEL, BYE, INFO ----------------------------------------------------------------

    def _cancel(self, req: Request) -> Response:
        call_id = (req.headers.get("call-id") or "").strip()
        branch = parse_via(req.headers.values("via")[0]).branch or ""
        for dialog in list(self.dialogs.values()):
            if dialog.call_id == call_id and dialog.invite_branch == branch:
                if dialog.state is DialogState.RINGING:
                    self.counters.cancelled += 1
                    dialog.respond(self._response(dialog.invite, 487, tag=dialog.local_tag,
                                                  reason="Request Terminated"))  # fmt: skip
                    self._end(dialog, "cancelled")
                return self._response(req, 200)
        self.counters.no_dialog_481 += 1
        return self._response(req, 481)

    def _bye(self, req: Request) -> Response:
        dialog = self._dialog_of(req)
        if dialog is None:
            self.counters.no_dialog_481 += 1
            return self._response(req, 481)
        self.counters.byes_received += 1
        self._end(dialog, "caller hung up")
        return self._response(req, 200)

    def _info(self, req: Request) -> Response:
        dialog = self._dialog_of(req)
        if dialog is None:
            self.counters.no_dialog_481 += 1
            return self._response(req, 481)
        content_type = (req.headers.get("content-type") or "").split(";")[0].strip().lower()
        if content_type not in ("application/dtmf-relay", "application/dtmf"):
            resp = self._response(req, 415)
            resp.headers.add("Accept", "application/dtmf-relay, application/dtmf")
            return resp
        digit = _info_digit(req.body, content_type)
        if digit is None:
            return self._warned(req, 400, "no DTMF signal in the INFO body")
        self.counters.info_digits += 1
        if dialog.state is DialogState.CONFIRMED:
            self.handler.digit(dialog, digit)
        return self._response(req, 200)

    def _dialog_of(self, req: Request) -> Dialog | None:
        tag = parse_name_addr(req.headers.get("to") or "").param("tag") or ""
        dialog = self.dialogs.get(((req.headers.get("call-id") or "").strip(), tag))
        if dialog is None or dialog.state is DialogState.ENDED:
            return None
        return dialog

    # --- our requests ---------------------------------------------------------------------

    def hangup(self, dialog: Dialog, why: str) -> None:
        """End the call from our side: BYE once answered, else a 480 to the INVITE."""
        if dialog.state is DialogState.ENDED:
            return
        if dialog.state is DialogState.RINGING:
            dialog.respond(self._response(dialog.invite, 480, tag=dialog.local_tag,
                                          reason="Temporarily Unavailable"))  # fmt: skip
        else:
            self.counters.byes_sent += 1
            dialog.local_cseq += 1
            headers = Headers()
            headers.add("From", dialog.local_uri)
            headers.add("To", dialog.remote_uri)
            headers.add("Call-ID", dialog.call_id)
            headers.add("CSeq", f"{dialog.local_cseq} BYE")
            self.send_request("BYE", dialog.remote_target, dialog.call.source, headers, own=dialog)
        self._end(dialog, why)

    def send_request(
        self,
        method: str,
        target: str,
        path: Source,
        headers: Headers,
        body: bytes = b"",
        *,
        own: Dialog | None = None,
        on_final: Callable[[int], None] | None = None,
    ) -> None:
        """Send a request to a phone along ``path`` (the flow its messages came on).

        ``headers`` carries From, To, Call-ID and CSeq (and any others); Via, Max-Forwards
        and Content-Length are added here. Over UDP it is retransmitted until a final
        response or the 32 s timeout; the datagram goes to where the phone sent from.
        """
        if path.send is None:
            return
        branch = "z9hG4bK" + os.urandom(8).hex()
        sent_by = self._sent_by(own, target)
        req = Request(method, target)
        req.headers.add("Via", f"SIP/2.0/{path.transport.upper()} {sent_by};branch={branch};rport")
        req.headers.add("Max-Forwards", "70")
        for name, value in headers:
            req.headers.add(name, value)
        req.headers.add("User-Agent", self.server_name)
        req.body = body
        data = req.to_bytes()
        out = _Outgoing(data, path, path.host, path.port, T1, self.clock.seconds() + TIMEOUT,
                        on_final=on_final)  # fmt: skip
        path.send(Reply(data, path.host, path.port))
        if path.transport == "udp":
            self._outgoing[branch] = out
            out.timer = self.clock.callLater(T1, self._retransmit, branch)

    def _retransmit(self, branch: str) -> None:
        out = self._outgoing.get(branch)
        if out is None:
            return
        if self.clock.seconds() >= out.deadline:
            self._forget_outgoing(branch)
            if out.on_final is not None:
                out.on_final(408)
            return
        assert out.source.send is not None
        out.source.send(Reply(out.data, out.host, out.port))
        out.interval = min(out.interval * 2, T2)
        out.timer = self.clock.callLater(out.interval, self._retransmit, branch)

    def _forget_outgoing(self, branch: str) -> None:
        out = self._outgoing.pop(branch, None)
        if out is not None and out.timer is not None and out.timer.active():
            out.timer.cancel()

    def _sent_by(self, dialog: Dialog | None, target: str) -> str:
        """Our host:port for Via and Contact: where the phone reached us (its Request-URI)."""
        if dialog is not None:
            uri = parse_uri(dialog.invite.uri)
            return f"{uri.host}:{uri.port}" if uri.port else uri.host
        return "callboard.invalid"

    def _own_contact(self, dialog: Dialog) -> str:
        transport = dialog.call.source.transport
        return f"<sip:{self._sent_by(dialog, '')};transport={transport}>"

    def stop(self) -> None:
        """Shutting down: hang up every call, stop every timer."""
        for dialog in list(self.dialogs.values()):
            self.hangup(dialog, "server stopping")
        for branch in list(self._outgoing):
            self._forget_outgoing(branch)

    # --- helpers --------------------------------------------------------------------------

    def _end(self, dialog: Dialog, why: str) -> None:
        if dialog.state is DialogState.ENDED:
            return
        self._cancel_timer(dialog)
        dialog.state = DialogState.ENDED
        self.dialogs.pop((dialog.call_id, dialog.local_tag), None)
        self.handler.ended(dialog, why)

    @staticmethod
    def _cancel_timer(dialog: Dialog) -> None:
        if dialog.timer is not None and dialog.timer.active():
            dialog.timer.cancel()
        dialog.timer = None

    def _response(
        self, req: Request, status: int, tag: str | None = "", reason: str = ""
    ) -> Response:
        """A response to ``req``; ``tag`` "" draws a fresh To tag, None adds none."""
        to_tag = os.urandom(4).hex() if tag == "" else tag
        resp = response_to(req, status, reason or _REASON.get(status, ""), to_tag=to_tag)
        resp.headers.add("Server", self.server_name)
        return resp

    def _warned(self, req: Request, status: int, why: str, reason: str = "") -> Response:
        resp = self._response(req, status, reason=reason)
        resp.headers.add("Warning", f"399 callboard {quote(why)}")
        log.info("SIP {method} answered {status}: {why}", method=req.method, status=status,
                 why=why, call_id=req.headers.get("call-id"))  # fmt: skip
        return resp


_REASON = {
    180: "Ringing",
    403: "Forbidden",
    404: "Not Found",
    480: "Temporarily Unavailable",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
}


def _info_digit(body: bytes, content_type: str) -> str | None:
    """The digit of an INFO: ``Signal=5`` (dtmf-relay) or the bare digit (application/dtmf)."""
    if len(body) > MAX_INFO_BODY:
        return None
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        return None
    if content_type == "application/dtmf":
        value = text.strip()
    else:
        value = ""
        for line in text.splitlines():
            name, sep, rest = line.partition("=")
            if sep and name.strip().lower() == "signal":
                value = rest.strip()
                break
    value = value.upper()
    if value == "10":
        value = "*"
    elif value == "11":
        value = "#"
    return value if len(value) == 1 and value in DTMF_SIGNALS else None
