"""The SIP-lite registrar: the RFC 3261 REGISTER pipeline, OPTIONS and Cisco's alarm REFER
(sans-I/O).

Bytes come in with a :class:`Source` (transport, address, client certificate) through
:meth:`Registrar.handle_bytes` (or, already framed and parsed, :meth:`Registrar.handle_message`);
a :class:`Reply` (bytes and where to send them) comes out, or a Deferred of one when the policy
answers later. Time is injected (``now`` for expiry, nonces and transactions, ``wall_now`` for
what people read: the ``Date`` header and ``registered_at``) so every rule is tested without
sockets. The bindings live in a :class:`~callboard.protocols.sip.location.LocationService`; the
Twisted adapters live in ``transports``.

Who may register is not decided here: the daemon implements :class:`RegistrationPolicy`
(device exists and is active, MAC/model/line agree, or autoregistration) and the registrar
applies RFC 3261 §10.3 around it, one named step each:

1. Read (:meth:`Registrar._read_register`): Max-Forwards 0 → 483; a Request-URI domain not
   served (``settings.domains``) → 404; To must be a sip(s) URI (AoR = ``sip:user@host``);
   Contact ``*`` only alone with Expires 0; per-contact expiry: ``expires`` param, else
   ``Expires`` header, else the default; 0 < e < min → 423 with Min-Expires; above max →
   shortened. The body's Cisco remotecc parts (``multipart/mixed``: bulkregisterreq,
   optionsind) are read, an unreadable body → 400; a ``Reason`` cisco-alarm is read for the
   log. Nothing is asked or changed yet. A keep-alive to a backup node (every contact
   ``expires=0;cisco-keep-alive``) is answered 200 here and changes nothing.
2. Ask the policy (403/404 with ``Warning: 399``). It may answer now or with a Deferred (when
   it writes, e.g. autoregistration): the REGISTERs of one AoR are then processed in the order
   received, a later one waiting until the earlier is answered; retransmissions meanwhile are
   absorbed.
3. Authenticate: when the policy returns credentials, digest (qop=auth; MD5 by default, the
   one algorithm Cisco phones speak, SHA-256 configurable) is required: 401 (``stale=true``
   for an old nonce), 403 for a wrong password.
4. Plan the bindings: same Call-ID with a CSeq not higher than the stored one → 400, nothing
   changes. All contacts apply or none do.
5. Apply the new set to the location service, then answer 200 listing every live binding of
   the AoR with its remaining ``expires``; adds ``Expires`` (the keep-alive interval, 120 by
   default, as CUCM) when bindings were added, ``Date``, ``Server``, a To tag, and
   ``x-cisco-newreg`` on the request's contacts when the device had no live binding before
   (its first registration since the daemon started, or since it expired or was dropped: not
   a refresh, not its other lines), CUCM's ``Supported``, and the optionsind response body
   (``application/x-cisco-remotecc-response+xml``) when the phone sent an optionsind.

The common REGISTER (a phone binding or refreshing its one contact, no credentials, no body)
is answered by a lean path over the datagram's lines (:mod:`~callboard.protocols.sip.lean`),
its 200 made by concatenation; it hands anything else to these steps, before anything is
counted or asked, or with the policy's answer when it was asked (once per REGISTER). Both
give the same bytes and leave the same state (``tests/sip/test_sip_lean.py``).

Bindings are keyed per AoR by ``+sip.instance`` when present (a rebooted Cisco phone with a
new random contact user replaces its old binding) and by contact URI otherwise. They expire
through :meth:`Registrar.sweep` (the service calls it every second).
Retransmissions over UDP (same Via branch, sent-by and method within 32 s) get the cached reply.
The out-of-dialog ``REFER`` carrying an ``application/x-cisco-alarm+xml`` body, which Cisco
phones send before registering, gets ``202 Accepted``; its alarm is logged and counted (and
not trusted for anything). Other methods get 405 with ``Allow``; ACK is absorbed silently.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from itertools import islice
from typing import Any, Protocol, TypeAlias

from callboard.protocols.settings import SettingError, check_choice, check_range, config_key
from callboard.protocols.sip.cisco import (
    ALARM,
    CUCM_SUPPORTED,
    KEEPALIVE_PARAM,
    REMOTECC_RESPONSE,
    CiscoAlarm,
    CiscoBodyError,
    ReasonAlarm,
    RemoteccRequest,
    optionsind_response,
    parse_alarm,
    parse_reason_alarm,
    read_remotecc_request,
    shown,
)
from callboard.protocols.sip.digest import DigestAuthenticator, Verdict
from callboard.protocols.sip.lean import (
    COPIED,
    RegisterLines,
    read_plain_contact,
    read_plain_to,
    scan_register,
)
from callboard.protocols.sip.location import Binding, LocationService, MemoryLocationService
from callboard.protocols.sip.message import (
    DEFAULT_MAX_MESSAGE,
    WILDCARD,
    Message,
    MessageTooLarge,
    NameAddr,
    Request,
    Response,
    SIPParseError,
    Via,
    format_params,
    is_number,
    params_by_name,
    parse_contact_list,
    parse_cseq,
    parse_message,
    parse_name_addr,
    parse_uri,
    parse_via,
    quote,
    response_to,
)
from callboard.protocols.sip.multipart import MultipartError, body_parts, parse_media_type
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

ALLOW = "REGISTER, OPTIONS, REFER"
#: The only option a REFER may require: no implicit subscription (RFC 4488), as Cisco sends.
REFER_EXTENSIONS = frozenset({"norefersub"})
TRANSACTION_LINGER = 32.0  # RFC 3261 Timer J for UDP (64*T1)
#: REGISTERs of one AoR that may wait behind one whose policy answer is pending; more → 503.
MAX_WAITING_PER_AOR = 8

_INSTANCE_RE = re.compile(r"^<?urn:uuid:00000000-0000-0000-0000-([0-9a-fA-F]{12})>?$")


# --- the interface the daemon implements -------------------------------------------------


@dataclass(frozen=True)
class RegistrationRequest:
    """What the policy sees about one REGISTER (values as the phone sent them).

    ``device_name``/``mac``/``model_id`` come from the Cisco contact parameters
    (``+u.sip!devicename.ccm.cisco.com``, ``+sip.instance``'s last 12 hex digits, lower case,
    ``+u.sip!model.ccm.cisco.com``); ``None`` when absent. ``aor_user`` is the user part of
    the To URI (the directory number). ``source`` is ``"host:port"``; ``transport`` is
    ``"udp"``, ``"tcp"`` or ``"tls"``; ``client_cert_fingerprint`` is the SHA-256 of the TLS
    client certificate (hex) when the phone presented one. ``is_removal`` is True for a
    REGISTER that only removes bindings (a policy may let a phone unregister more easily).
    ``bound_devices`` names the devices that currently hold live bindings on this AoR (useful
    for ``Contact: *`` and queries, which carry no Cisco parameters). ``authorization``
    holds the ``Authorization`` and ``Proxy-Authorization`` headers as (lower-case name,
    value), for a policy that authenticates by itself (bearer tokens, RFC 8898).
    """

    device_name: str | None
    mac: str | None
    model_id: str | None
    aor_user: str
    source: str
    transport: str
    user_agent: str | None = None
    client_cert_fingerprint: str | None = None
    is_removal: bool = False
    bound_devices: tuple[str, ...] = ()
    authorization: tuple[tuple[str, str], ...] = ()
    client_certs: tuple[Any, ...] = ()  # the leaf, then the presented chain (TLS only)


@dataclass(frozen=True)
class PolicyDecision:
    """The policy's answer.

    ``status`` is 200 when allowed, else 403 (known device, wrong state or mismatch) or 404
    (unknown device or number); ``warning`` is the text of the ``Warning: 399`` header
    (and the log reason). ``credentials`` = (authName, authPassword) makes digest mandatory.
    ``device_name`` is the canonical device the binding belongs to (the policy may create it,
    e.g. autoregistration). A policy that authenticated the request itself may refuse with
    401 or 407 and the ``challenge`` headers to send, and cap the bindings' lifetime at
    ``max_expires`` seconds (a bearer token's remaining life).
    """

    allowed: bool
    status: int = 200
    warning: str = ""
    credentials: tuple[str, str] | None = None
    device_name: str | None = None
    challenge: tuple[tuple[str, str], ...] = ()
    max_expires: int | None = None

    @classmethod
    def allow(
        cls, device_name: str | None = None, credentials: tuple[str, str] | None = None
    ) -> PolicyDecision:
        return cls(True, 200, "", credentials, device_name)

    @classmethod
    def challenge_with(
        cls, status: int, warning: str, headers: tuple[tuple[str, str], ...]
    ) -> PolicyDecision:
        """401 or 407 with the policy's own challenge (e.g. ``WWW-Authenticate: Bearer``)."""
        if status not in (401, 407):
            raise ValueError("a challenge is 401 or 407")
        return cls(False, status, warning, None, None, headers)

    @classmethod
    def refuse(cls, status: int, warning: str) -> PolicyDecision:
        if status not in (403, 404):
            raise ValueError("a refusal is 403 or 404")
        return cls(False, status, warning, None, None)


class RegistrationPolicy(Protocol):
    """Implemented by the daemon over its registry. Must not block (runs on the reactor).

    The answer is immediate, or a Deferred when deciding means a write (autoregistration
    creating the device): the REGISTER is then answered when it fires.
    """

    def decide(self, request: RegistrationRequest) -> PolicyDecision | Deferred[PolicyDecision]: ...


class RequestHandler(Protocol):
    """Takes the requests the registrar does not answer itself (INVITE, ACK, BYE, CANCEL,
    INFO, ...) and the responses to requests it sent; a user agent server implements it.

    ``respond`` sends a response to ``req`` back the way RFC 3261 §18.2.2 says (Via
    received/rport), now or later (provisional then final). A response returned instead is
    sent and kept for the request's retransmissions; None means nothing more to send now.
    """

    allow: str  # the methods it answers, for the registrar's ``Allow``

    def handle_request(
        self, req: Request, source: Source, respond: Callable[[Response], None]
    ) -> Response | None: ...

    def handle_response(self, resp: Response, source: Source) -> None: ...


# --- settings, sources, replies ----------------------------------------------------------


@dataclass(frozen=True)
class RegistrarSettings:
    """Tunables; defaults follow CUCM/Kamailio practice."""

    default_expires: int = 3600
    min_expires: int = 60
    max_expires: int = 7200
    keepalive_expires: int = 120  # the ``Expires`` header of a 200 (CUCM's keep-alive)
    max_message_size: int = DEFAULT_MAX_MESSAGE
    realm: str = "callboard"
    server_name: str = "Callboard"
    nonce_lifetime: float = 300.0
    # None: random per start. Not a configuration key: a secret has no place in a TOML file.
    nonce_secret: bytes | None = field(default=None, metadata=config_key(None))
    #: Offered in this order, one challenge each. Cisco's SIP stack reads one challenge and
    #: speaks MD5 (protocol notes §16); SHA-256, first or alone, is for other phones.
    digest_algorithms: tuple[str, ...] = ("MD5",)
    domains: frozenset[str] = frozenset()  # Request-URI hosts served; empty = any
    max_contacts: int = 10  # per AoR
    warning_host: str = "callboard"  # the warn-agent of ``Warning: 399``
    sweep_interval: float = 1.0

    def validate(self) -> None:
        """The bounds a configuration is held to (the registrar part of [sip])."""
        check_range("min_expires", self.min_expires, 1, 86400)
        check_range("max_expires", self.max_expires, self.min_expires, 7 * 86400)
        check_range("default_expires", self.default_expires, self.min_expires, self.max_expires)
        check_range("keepalive_expires", self.keepalive_expires, 1, 86400)
        check_range("max_message_size", self.max_message_size, 1024, 1 << 20)
        check_range("nonce_lifetime", self.nonce_lifetime, 1, 86400)
        check_range("max_contacts", self.max_contacts, 1, 1000)
        check_range("sweep_interval", self.sweep_interval, 0.01, 3600)
        if not self.digest_algorithms:
            raise SettingError("digest_algorithms", "at least one algorithm is needed")
        for algorithm in self.digest_algorithms:
            check_choice("digest_algorithms", algorithm, ("SHA-256", "MD5"))
        # Each is written into a header: a quote or a line break would forge another.
        for name in ("realm", "server_name", "warning_host"):
            value = getattr(self, name)
            if not value or not value.isprintable() or '"' in value:
                raise SettingError(name, f"{value!r} cannot go into a SIP header")
        if " " in self.warning_host:
            raise SettingError("warning_host", f"{self.warning_host!r} is not a host name")
        for domain in self.domains:
            if not domain or not domain.isprintable() or " " in domain:
                raise SettingError("domains", f"{domain!r} is not a host name")


@dataclass(frozen=True)
class Source:
    """Where a message came from."""

    transport: str  # "udp", "tcp" or "tls"
    host: str
    port: int
    client_cert_fingerprint: str | None = None
    client_cert_subject: str | None = None
    #: How to send to this peer later (the transport fills it in): a UDP reply goes to the
    #: Reply's host and port, a stream writes on the connection the message came on.
    send: Callable[[Reply], None] | None = field(default=None, compare=False, repr=False)
    #: The TLS client's certificates as ``cryptography`` objects: the leaf first, then the
    #: chain it presented; for a policy that checks the chain itself (a MIC's).
    client_certs: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    @property
    def address(self) -> str:
        """``host:port`` (``[host]:port`` for IPv6). Made when asked: a source lives for one
        datagram, and ``functools.cached_property`` takes a lock to fill itself in (3.11),
        which costs more than the few times a REGISTER asks."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Reply:
    """Bytes to send; ``host``/``port`` matter only for UDP (streams answer in place)."""

    data: bytes
    host: str
    port: int
    close: bool = False  # streams: close after sending (unrecoverable framing)


#: What the registrar hands a transport: a reply now, one later, or nothing to send.
Answer: TypeAlias = "Reply | Deferred[Reply] | None"


@dataclass(frozen=True)
class BindingInfo:
    """One live binding, as shown by ``callboard device show`` and the admin API."""

    aor: str
    contact: str
    device_name: str | None
    transport: str
    source: str
    user_agent: str | None
    expires_at: float  # on the registrar's clock
    expires_in: int
    registered_at: float  # wall clock (epoch seconds)
    call_id: str
    cseq: int
    instance: str | None
    model_id: str | None
    client_cert_fingerprint: str | None


@dataclass
class Counters:
    requests: int = 0
    register: int = 0
    options: int = 0
    ok: int = 0
    registrations: int = 0
    unregistrations: int = 0
    queries: int = 0
    expired: int = 0
    dropped: int = 0
    refused_403: int = 0
    refused_404: int = 0
    challenged_401: int = 0
    too_brief_423: int = 0
    bad_request_400: int = 0
    too_large_513: int = 0
    too_many_hops_483: int = 0
    not_allowed_405: int = 0
    unsupported_415: int = 0
    bad_extension_420: int = 0
    keepalives: int = 0  # keep-alive REGISTERs (``cisco-keep-alive``) answered 200
    remotecc_answers: int = 0  # 200s carrying an optionsind response
    refer: int = 0
    alarms: int = 0  # alarm REFERs accepted (202)
    policy_failed_500: int = 0
    busy_503: int = 0
    retransmissions: int = 0
    malformed_dropped: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class _Reject(Exception):
    """Stop processing a request: ``response`` is the answer (errors carry the reply)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


@dataclass(slots=True)
class CiscoIdentity:
    """Who a Cisco phone says it is, from the first contact that carries each parameter."""

    device_name: str | None
    mac: str | None  # the last 12 hex digits of ``+sip.instance``, lower case
    model_id: str | None

    @classmethod
    def of(cls, contacts: list[NameAddr]) -> CiscoIdentity:
        return cls.of_params([params_by_name(c.params) for c in contacts])

    @classmethod
    def of_params(cls, contacts: list[dict[str, str]]) -> CiscoIdentity:
        """The same, from each contact's :func:`params_by_name`."""
        device = model = instance = None
        for c in contacts:
            device = device or c.get("+u.sip!devicename.ccm.cisco.com")
            model = model or c.get("+u.sip!model.ccm.cisco.com")
            instance = instance or c.get("+sip.instance")
        m = _INSTANCE_RE.match(instance.strip()) if instance else None
        return cls(device, m.group(1).lower() if m else None, model)


@dataclass(slots=True)
class _Register:
    """A REGISTER read and checked before anyone is asked anything (step 1)."""

    req: Request
    source: Source
    aor: str
    aor_user: str
    call_id: str
    cseq: int
    wildcard: bool  # ``Contact: *`` (with Expires 0): remove every binding
    planned: tuple[tuple[NameAddr, int], ...]  # each contact with its granted expiry (0 removes)
    identity: CiscoIdentity
    keys: tuple[str, ...]  # each planned contact's binding key (:func:`instance_key`)
    user_agent: str | None
    keepalive: bool = False  # every contact says ``cisco-keep-alive``: a backup node's probe
    remotecc: RemoteccRequest | None = None  # the body's remotecc parts, when any
    alarm: ReasonAlarm | None = None  # the ``Reason`` cisco-alarm, when any

    @property
    def is_removal(self) -> bool:
        return self.wildcard or (bool(self.planned) and all(e == 0 for _, e in self.planned))


@dataclass(slots=True)
class _LeanRegister:
    """A common REGISTER read by the lean path (one contact that binds, no body, no
    credentials); everything the general path's step 1 would check has passed."""

    lines: RegisterLines
    via: Via
    tkey: str | None  # its transaction (:func:`_transaction_key`)
    aor: str
    aor_user: str
    contact: str  # as bound (:func:`_bound_contact`)
    key: str  # its binding key (:func:`instance_key`)
    expires: int  # the granted expiry (> 0)
    identity: CiscoIdentity
    user_agent: str | None


#: What the lean path hands the general one when the policy's answer is not the common one:
#: that answer, when it was asked, and the AoR's live bindings it was asked with.
_Decided: TypeAlias = "tuple[PolicyDecision | Deferred[PolicyDecision], float, dict[str, Binding]]"


@dataclass(slots=True)
class _Change:
    """What a REGISTER does to its AoR's bindings (step 4), before it is applied."""

    before: dict[str, Binding]  # the live bindings
    after: dict[str, Binding]
    added: bool
    newreg: bool  # the owner had no live binding anywhere: ``x-cisco-newreg``
    bound_keys: frozenset[str] = frozenset()  # the keys this REGISTER's contacts bound


def _sent_by_port(transport: str) -> int:
    return 5061 if transport.upper() == "TLS" else 5060


#: What a typical answer to a Cisco phone's REGISTER looks like: the preset dictionary the
#: cached answers are deflated against (only the text they share matters, not its values).
_TYPICAL_ANSWER = (
    "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK;rport=5060;received=\r\n"
    "From: <sip:@>;tag=\r\nTo: <sip:@>;tag=\r\nCall-ID: @\r\nCSeq: 1 REGISTER\r\n"
    "Date: Mon, 01 Jan 2027 00:00:00 GMT\r\nServer: Callboard\r\n"
    'Contact: <sip:@:5060;transport=udp>;+sip.instance="<urn:uuid:00000000-0000-0000-0000-00>"'
    ';+u.sip!devicename.ccm.cisco.com="SEP";+u.sip!model.ccm.cisco.com="";expires=3600'
    f";x-cisco-newreg\r\nExpires: 120\r\nSupported: {CUCM_SUPPORTED}\r\n"
    "Content-Length: 0\r\n\r\n"
).encode()
_DEFLATE_WINDOW = -10  # raw deflate, 1 KiB window: an answer is smaller than that
#: Cached answers are deflated once this many are alive: ~590 bytes saved each (~56 MB at
#: 100,000), for ~0.01 ms of CPU per REGISTER measured in the daemon at 3,000/s.
DEFLATE_ANSWERS_FROM = 8192


class AnswerCache:
    """The answers a UDP retransmission gets again (RFC 3261 §17.2.1: Timer J, 32 s).

    Each keeps only what a retransmission needs, in one bytes object: the answer and where
    it went. Under load tens of thousands are alive at once: past ``deflate_from`` entries,
    answers are also deflated against :data:`_TYPICAL_ANSWER` (a 200 to a Cisco REGISTER:
    ~600 bytes → ~120; see :data:`DEFLATE_ANSWERS_FROM` for what it costs). None
    marks an answer still pending (its retransmissions are absorbed). Entries are kept in
    arrival order and expire by the whole second they were stored in (at least ``linger``
    later), a batch at a time: no deadline of their own, no scan of what was removed.
    """

    __slots__ = ("_answers", "_counts", "_due", "deflate_from", "linger")

    def __init__(self, linger: float, deflate_from: int = DEFLATE_ANSWERS_FROM) -> None:
        self.linger = linger
        self.deflate_from = deflate_from
        self._answers: dict[str, bytes | None] = {}
        self._due: deque[float] = deque()  # the expiry seconds, in arrival order
        self._counts: deque[int] = deque()  # how many entries were stored in each

    def __len__(self) -> int:
        return len(self._answers)

    def __contains__(self, key: str) -> bool:
        return key in self._answers

    def get(self, key: str) -> Reply | None:
        """The answer kept for ``key``: None while pending (only call it for a key held)."""
        packed = self._answers[key]
        return None if packed is None else _unpack(packed)

    def keep(self, key: str, reply: Reply | None, now: float) -> None:
        """Keep ``reply`` (None: pending) for ``key``, stored now; a pending entry that gets
        its answer keeps its place (it expires ``linger`` after the request came)."""
        answers = self._answers
        known = key in answers
        if reply is None:
            answers[key] = None
        else:
            answers[key] = _pack(reply, len(answers) >= self.deflate_from)
        if known:
            return
        due = float(math.ceil(now + self.linger))
        if self._due and self._due[-1] == due:
            self._counts[-1] += 1
        else:
            self._due.append(due)
            self._counts.append(1)

    def expire(self, now: float) -> None:
        """Forget the entries stored in every second that is due."""
        answers, due, counts = self._answers, self._due, self._counts
        n = 0
        while due and due[0] <= now:
            due.popleft()
            n += counts.popleft()
        for key in list(islice(answers, n)):
            del answers[key]

    def clear(self) -> None:
        self._answers.clear()
        self._due.clear()
        self._counts.clear()


#: A compressor that has read :data:`_TYPICAL_ANSWER`: each answer deflates with a copy.
_PRIMED = zlib.compressobj(1, zlib.DEFLATED, _DEFLATE_WINDOW, 1, zdict=_TYPICAL_ANSWER)


def _pack(reply: Reply, deflate: bool) -> bytes:
    """``reply`` as one bytes object: its data (deflated or not), then ``FCport host`` (F:
    deflated, C: close, as 0/1), then that trailer's length in two bytes."""
    data = reply.data
    if deflate:
        compressor = _PRIMED.copy()
        data = compressor.compress(data) + compressor.flush()
    where = f"{int(deflate)}{int(reply.close)}{reply.port} {reply.host}".encode()
    return b"".join((data, where, len(where).to_bytes(2, "big")))


def _unpack(packed: bytes) -> Reply:
    size = int.from_bytes(packed[-2:], "big")
    where = packed[-2 - size : -2].decode()
    port, _, host = where[2:].partition(" ")
    data = packed[: -2 - size]
    if where[0] == "1":
        inflate = zlib.decompressobj(_DEFLATE_WINDOW, zdict=_TYPICAL_ANSWER)
        data = inflate.decompress(data) + inflate.flush()
    return Reply(data, host, int(port), close=where[1] == "1")


class Registrar:
    """REGISTER/OPTIONS processing. Not thread-safe: reactor thread only.

    ``now`` gives seconds on the clock timers run on (the daemon passes the reactor's);
    ``wall_now`` gives epoch seconds for what is shown to people. ``location`` keeps the
    bindings (in this process's memory unless another service is given).
    """

    log: Logger

    def __init__(
        self,
        policy: RegistrationPolicy,
        settings: RegistrarSettings | None = None,
        *,
        now: Callable[[], float],
        wall_now: Callable[[], float],
        location: LocationService | None = None,
        lean: bool = True,
    ) -> None:
        # One logger, its source this registrar: as a class attribute, Twisted's Logger
        # makes a new one each time ``self.log`` is read (once per REGISTER).
        self.log = Logger(namespace="callboard.sip.registrar", source=self)
        self.policy = policy
        #: Whether common REGISTERs take the lean path (False: every one the general path,
        #: which the tests compare it with).
        self.lean = lean
        self.settings = settings or RegistrarSettings()
        self.now = now
        self.wall_now = wall_now
        self.location: LocationService = location or MemoryLocationService()
        s = self.settings
        self.digest = DigestAuthenticator(
            s.realm, s.nonce_secret or os.urandom(32), s.nonce_lifetime, s.digest_algorithms
        )
        self.counters = Counters()
        self._date_second, self._date_text = -1, ""
        self._tag_pool, self._tag_at = b"", 0
        # Told the status of every REGISTER answer (metrics); not of retransmitted ones.
        self.on_register_answer: Callable[[int], None] | None = None
        # "METHOD sent-by branch" (one string: compact, as thousands live 32 s each) → the
        # reply (UDP only).
        self._transactions = AnswerCache(TRANSACTION_LINGER)
        # AoR → REGISTERs waiting behind one whose policy answer is pending (key present while
        # one is pending), each with the Deferred its answer goes to.
        self._waiting: dict[str, deque[tuple[_Register, Deferred[Response]]]] = {}
        self._shared_values: dict[str, str] = {}
        self._uri_hosts: dict[str, str] = {}  # Request-URI → its host (lean path)
        #: Methods other than REGISTER, OPTIONS and REFER go here; None: 405.
        self.request_handler: RequestHandler | None = None

    # --- entry points ---------------------------------------------------------------------

    def handle_bytes(self, data: bytes, source: Source) -> Answer:
        """One datagram or one framed stream message in; the reply (if any) out.

        The common REGISTER takes the lean path (:meth:`_lean_register`); anything else, or
        anything it meets that is not common, the general one."""
        self.counters.requests += 1
        if self.lean:
            lines = scan_register(data, self.settings.max_message_size)
            lean = None if lines is None else self._read_lean(lines, source)
            if lean is not None:
                return self._lean_register(lean, data, source)
        return self._parse_and_handle(data, source)

    def _parse_and_handle(
        self, data: bytes, source: Source, decided: _Decided | None = None
    ) -> Answer:
        """The general path: parse, then answer (``decided``: the policy was asked already)."""
        try:
            msg = parse_message(data, self.settings.max_message_size)
        except MessageTooLarge as exc:
            self.counters.too_large_513 += 1
            return self.error_reply(exc.partial, 513, source, exc.reason)
        except SIPParseError as exc:
            return self.error_reply(exc.partial, exc.status, source, exc.reason)
        if isinstance(msg, Response):
            return self._handle(msg, source)
        return self.handle_request(msg, source, decided)

    def handle_message(self, msg: Message, source: Source) -> Answer:
        """One message a stream framer has already cut and parsed."""
        self.counters.requests += 1
        return self._handle(msg, source)

    def _handle(self, msg: Message, source: Source) -> Answer:
        if isinstance(msg, Response):
            if self.request_handler is not None:
                self.request_handler.handle_response(msg, source)
            return None  # responses to what the handler sent; stray ones are dropped
        return self.handle_request(msg, source)

    def handle_request(
        self, req: Request, source: Source, decided: _Decided | None = None
    ) -> Answer:
        """Answer one request (``decided``: a REGISTER the lean path has asked the policy about,
        with what it answered)."""
        try:
            via = parse_via(req.headers.values("via")[0])
            cseq = parse_cseq(req.headers.get("cseq") or "")
            if not req.headers.get("call-id") or "from" not in req.headers:
                raise SIPParseError("missing Call-ID or From")
            if "to" not in req.headers:
                raise SIPParseError("missing To")
        except (SIPParseError, IndexError) as exc:
            reason = exc.reason if isinstance(exc, SIPParseError) else "missing Via"
            return self.error_reply(req, 400, source, reason)
        method = req.method.upper()
        if method == "ACK":
            if self.request_handler is not None:
                self.request_handler.handle_request(req, source, self._responder(req, source, via))
            return None
        tkey = _transaction_key(method, via, source)
        if tkey is not None and tkey in self._transactions:
            self.counters.retransmissions += 1
            return self._transactions.get(tkey)  # None while pending: absorbed
        answer: Answer
        if cseq.method.upper() != method:
            answer = self.error_reply(req, 400, source, "CSeq method does not match")
        else:
            answer = self._answer(req, method, source, via, cseq.number, decided)
        if tkey is not None:
            self._remember(tkey, answer)
        return answer

    def _answer(
        self,
        req: Request,
        method: str,
        source: Source,
        via: Via,
        cseq: int,
        decided: _Decided | None = None,
    ) -> Answer:
        try:
            response = self._dispatch(req, method, source, cseq, decided)
        except _Reject as exc:
            response = exc.response
        if isinstance(response, Deferred):
            return response.addCallback(lambda resp: self._route(req, resp, source, via))
        if response is None:
            return None
        return self._route(req, response, source, via)

    def _remember(self, tkey: str, answer: Answer) -> None:
        """Cache the reply for retransmissions; while it is pending, absorb them."""
        if not isinstance(answer, Deferred):
            self._transactions.keep(tkey, answer, self.now())
            return
        self._transactions.keep(tkey, None, self.now())

        def answered(reply: Reply) -> Reply:
            self._transactions.keep(tkey, reply, self.now())
            return reply

        answer.addCallback(answered)

    def _dispatch(
        self, req: Request, method: str, source: Source, cseq: int, decided: _Decided | None
    ) -> Response | Deferred[Response] | None:
        if method in ("OPTIONS", "REGISTER") and req.headers.values("require"):
            # RFC 3261 §8.2.2.3: no extension is supported here, so one required is refused.
            self.counters.bad_extension_420 += 1
            resp = self._response(req, 420)
            resp.headers.add("Unsupported", ", ".join(req.headers.values("require")))
            return resp
        if method == "OPTIONS":
            self.counters.options += 1
            resp = self._response(req, 200)
            resp.headers.add("Allow", self._allow())
            resp.headers.add("Accept", "application/sdp")
            return resp
        mf = req.headers.get("max-forwards")
        if mf is not None:
            if not is_number(mf.strip()):
                raise _Reject(self._response(req, 400, "Bad Max-Forwards"))
            if int(mf) == 0:
                self.counters.too_many_hops_483 += 1
                raise _Reject(self._response(req, 483))
        if method == "REGISTER":
            self.counters.register += 1
            return self._register(req, source, cseq, decided)
        if method == "REFER":
            self.counters.refer += 1
            return self._refer(req, source)
        if self.request_handler is not None:
            via = parse_via(req.headers.values("via")[0])
            respond = self._responder(req, source, via)
            answer = self.request_handler.handle_request(req, source, respond)
            if answer is not None and answer.status == 405:
                answer.headers.remove("allow")  # every method answered, not the handler's
                answer.headers.add("Allow", self._allow())
            return answer
        self.counters.not_allowed_405 += 1
        resp = self._response(req, 405)
        resp.headers.add("Allow", ALLOW)
        return resp

    def _allow(self) -> str:
        """Every method answered here: the registrar's, then its request handler's."""
        handler = self.request_handler
        return f"{ALLOW}, {handler.allow}" if handler else ALLOW

    def _responder(self, req: Request, source: Source, via: Via) -> Callable[[Response], None]:
        """Send a response to ``req`` later, routed as an immediate reply would be."""

        def respond(resp: Response) -> None:
            if source.send is not None:
                source.send(self._route(req, resp, source, via))

        return respond

    # --- REGISTER: the pipeline -----------------------------------------------------------

    def _register(
        self, req: Request, source: Source, cseq: int, decided: _Decided | None = None
    ) -> Response | Deferred[Response]:
        """RFC 3261 §10.3, one named step at a time; asynchronous only when the policy is.

        ``decided``: the lean path asked the policy already (it is asked once per REGISTER),
        and hands over what it answered, when, and the AoR's live bindings it was asked with."""
        reg = self._read_register(req, source, cseq)
        if reg.keepalive:
            return self._keepalive_ok(reg)
        waiting = self._waiting.get(reg.aor)
        if waiting is None:
            outcome = self._decide(reg, decided)
            if not isinstance(outcome, Deferred):
                return outcome  # the fast path: the policy answered at once
            self._waiting[reg.aor] = deque()
            return self._then_next(reg.aor, outcome)
        if len(waiting) >= MAX_WAITING_PER_AOR:
            return self._busy(reg)
        turn: Deferred[Response] = Deferred()
        waiting.append((reg, turn))
        return turn

    def _decide(
        self, reg: _Register, decided: _Decided | None = None
    ) -> Response | Deferred[Response]:
        """Steps 2 to 5: ask the policy (unless ``decided``), then finish when it has answered."""
        if decided is None:
            now = self.now()
            live = self.location.lookup(reg.aor, now)
            decision = self.policy.decide(self._policy_request(reg, live))
        else:
            decision, now, live = decided
        if isinstance(decision, Deferred):
            d = decision.addCallback(self._after_policy, reg)
            return d.addErrback(self._policy_failed, reg)
        return self._after_policy(decision, reg, (now, live))

    def _after_policy(
        self,
        decision: PolicyDecision,
        reg: _Register,
        looked_up: tuple[float, dict[str, Binding]] | None = None,
    ) -> Response:
        """Steps 3 to 5: authenticate, plan the bindings, apply them and answer 200.

        ``looked_up``: the time and the AoR's live bindings the policy was asked with, when it
        answered at once (nothing can have changed since); else they are looked up again."""
        now, live = looked_up if looked_up is not None else (self.now(), None)
        try:
            if not decision.allowed:
                device = reg.identity.device_name
                why = decision.warning
                if decision.status in (401, 407):
                    raise _Reject(self._policy_challenge(reg, decision))
                raise _Reject(self._refuse(reg.req, decision.status, why, reg.source, device))
            if decision.max_expires is not None:
                reg = _capped(reg, decision.max_expires)
            owner = decision.device_name or reg.identity.device_name
            self._authenticate(reg, decision.credentials, owner, now)
            if live is None:
                live = self.location.lookup(reg.aor, now)
            change = self._plan_bindings(reg, owner, now, live)
        except _Reject as exc:
            return exc.response
        self._apply(reg, change, owner)
        return self._ok(reg, change, now)

    def _read_register(self, req: Request, source: Source, cseq: int) -> _Register:
        """Step 1: parse and check everything that needs no state and no policy."""
        try:
            ruri = parse_uri(req.uri)
            to_uri = parse_uri(parse_name_addr(req.headers.get("to") or "").uri)
            contacts = parse_contact_list(req.headers)
            call_id = (req.headers.get("call-id") or "").strip()
        except SIPParseError as exc:
            raise _Reject(self._bad(req, exc.reason)) from None
        domains = self.settings.domains
        if domains and ruri.host not in domains:
            why = f"domain {ruri.host} not served here"
            raise _Reject(self._refuse(req, 404, why, source, None))
        if not to_uri.user:
            raise _Reject(self._bad(req, "To has no user part"))
        header_expires = self._header_expires(req)
        wildcard = contacts == WILDCARD
        if wildcard and header_expires != 0:
            raise _Reject(self._bad(req, "Contact: * requires Expires: 0"))
        listed = contacts if isinstance(contacts, list) else []
        named = [params_by_name(c.params) for c in listed]
        planned = self._plan_expiries(req, source, to_uri.aor, listed, named, header_expires)
        return _Register(
            req=req,
            source=source,
            aor=to_uri.aor,
            aor_user=to_uri.user,
            call_id=call_id,
            cseq=cseq,
            wildcard=wildcard,
            planned=planned,
            identity=CiscoIdentity.of_params(named),
            keys=tuple(_instance_key(c.uri, n) for c, n in zip(listed, named, strict=True)),
            user_agent=self._shared(req.headers.get("user-agent")),
            keepalive=bool(listed) and all(KEEPALIVE_PARAM in n for n in named),
            remotecc=self._read_remotecc(req),
            alarm=parse_reason_alarm(req.headers.get_all("reason")),
        )

    def _shared(self, value: str | None) -> str | None:
        """One copy of a value thousands of bindings repeat (the user agent: a few firmware
        builds across every phone), instead of one per binding."""
        if value is None:
            return None
        found = self._shared_values.get(value)
        if found is None:
            if len(self._shared_values) < 1024:
                self._shared_values[value] = value
            return value
        return found

    def _read_remotecc(self, req: Request) -> RemoteccRequest | None:
        """The remotecc parts of the body (Cisco's bulkregisterreq and optionsind); other
        bodies are ignored, as before; one that cannot be read is a 400."""
        try:
            return read_remotecc_request(body_parts(req.headers.get("content-type"), req.body))
        except (MultipartError, CiscoBodyError) as exc:
            raise _Reject(self._bad(req, f"REGISTER body: {exc.reason}")) from None

    def _header_expires(self, req: Request) -> int | None:
        raw = req.headers.get("expires")
        if raw is None:
            return None
        if not is_number(raw.strip()):
            raise _Reject(self._bad(req, "bad Expires header"))
        return min(int(raw.strip()), 2**32 - 1)

    def _plan_expiries(
        self,
        req: Request,
        source: Source,
        aor: str,
        contacts: list[NameAddr],
        named: list[dict[str, str]],
        header_expires: int | None,
    ) -> tuple[tuple[NameAddr, int], ...]:
        """Each contact's expiry, before asking anyone anything (a 423 costs nothing)."""
        s = self.settings
        if len(contacts) > s.max_contacts:
            raise _Reject(self._bad(req, "too many contacts"))
        planned: list[tuple[NameAddr, int]] = []
        for c, params in zip(contacts, named, strict=True):
            raw = params.get("expires")
            if raw is not None:
                if not is_number(raw):
                    raise _Reject(self._bad(req, "bad expires parameter"))
                exp = min(int(raw), 2**32 - 1)
            elif header_expires is not None:
                exp = header_expires
            else:
                exp = s.default_expires
            if 0 < exp < s.min_expires:
                raise _Reject(self._too_brief(req, source, aor, exp))
            planned.append((c, min(exp, s.max_expires)))
        return tuple(planned)

    def _policy_request(self, reg: _Register, live: dict[str, Binding]) -> RegistrationRequest:
        authorization = tuple(
            (name, value)
            for name in ("authorization", "proxy-authorization")
            for value in reg.req.headers.get_all(name)
        )
        return _registration_request(
            reg.identity, reg.aor_user, reg.source, reg.user_agent, reg.is_removal, live,
            authorization,
        )  # fmt: skip

    def _authenticate(
        self,
        reg: _Register,
        credentials: tuple[str, str] | None,
        owner: str | None,
        now: float,
    ) -> None:
        """Step 3: digest when the policy gave credentials; 400, 403 or 401 otherwise."""
        if credentials is None:
            return
        auth_name, password = credentials
        verdict = self.digest.verify(
            reg.req.headers.get_all("authorization"),
            method="REGISTER",
            username=auth_name,
            password=password,
            now=now,
        )
        if verdict is Verdict.OK:
            return
        if verdict is Verdict.MALFORMED:
            raise _Reject(self._bad(reg.req, "malformed Authorization"))
        if verdict is Verdict.WRONG:
            raise _Reject(self._refuse(reg.req, 403, "bad credentials", reg.source, owner))
        raise _Reject(self._challenge(reg.req, now, stale=verdict is Verdict.STALE))

    def _plan_bindings(
        self, reg: _Register, owner: str | None, now: float, live: dict[str, Binding]
    ) -> _Change:
        """Step 4: the AoR's new binding set (``live``: its bindings now); a stale CSeq or too
        many bindings change nothing."""
        after = dict(live)
        added = False
        bound: list[str] = []
        if reg.wildcard:
            for key, b in live.items():
                if b.call_id == reg.call_id and reg.cseq <= b.cseq:
                    continue  # RFC 3261 §10.3 step 6: this one is newer than the removal
                del after[key]
        else:
            for (c, exp), key in zip(reg.planned, reg.keys, strict=True):
                old = live.get(key)
                if old is not None and old.call_id == reg.call_id and reg.cseq <= old.cseq:
                    why = "CSeq not higher than the stored one for this Call-ID"
                    raise _Reject(self._bad(reg.req, why))
                if exp == 0:
                    after.pop(key, None)
                    continue
                added = True
                bound.append(key)
                after[key] = self._binding(
                    reg.aor, key, _bound_contact(c), reg.call_id, reg.cseq, now + exp, owner,
                    reg.source, reg.user_agent,
                )  # fmt: skip
            if len(after) > self.settings.max_contacts:
                raise _Reject(self._bad(reg.req, "too many bindings for this address"))
        newreg = added and owner is not None and not self._holds_binding(owner, live, now)
        return _Change(live, after, added, newreg, frozenset(bound))

    def _holds_binding(self, device: str, live: dict[str, Binding], now: float) -> bool:
        """Whether ``device`` has a live binding anywhere: on this AoR (a refresh: no need to
        ask the location service), or on another."""
        return any(b.device_name == device for b in live.values()) or bool(
            self.location.by_device(device, now)
        )

    def _binding(
        self,
        aor: str,
        key: str,
        contact: str,
        call_id: str,
        cseq: int,
        expires_at: float,
        owner: str | None,
        source: Source,
        user_agent: str | None,
    ) -> Binding:
        return Binding(
            aor=aor,
            key=key,
            contact=contact,
            call_id=call_id,
            cseq=cseq,
            expires_at=expires_at,
            registered_at=self.wall_now(),
            device_name=owner,
            transport=source.transport,
            source=source.address,
            user_agent=user_agent,
            client_cert_fingerprint=source.client_cert_fingerprint,
        )

    def _apply(self, reg: _Register, change: _Change, owner: str | None) -> None:
        """Step 5a: hand the new set to the location service; count and log what changed."""
        self.location.replace(reg.aor, change.after)
        for key, old in change.before.items():
            if key in change.after:
                continue
            self.counters.unregistrations += 1
            self.log.info(
                "SIP unregistered {aor} {contact} device={device}",
                aor=reg.aor,
                contact=old.contact_uri,
                device=old.device_name,
                source=reg.source.address,
            )
        if change.added:
            self.counters.registrations += 1
            fresh = any(key not in change.before for key in change.after)
            self._log_registered(reg.aor, owner, reg.source, fresh, change.newreg)
            if reg.alarm is not None:
                self._log_reason_alarm(reg, owner, reg.alarm)
        elif not reg.planned and not reg.wildcard:
            self.counters.queries += 1

    def _log_registered(
        self, aor: str, owner: str | None, source: Source, fresh: bool, newreg: bool
    ) -> None:
        """A new binding is news for operators; a refresh of one (every phone, every few
        minutes) is not: it is counted, and logged at debug level only."""
        emit = self.log.info if fresh else self.log.debug
        emit(
            "SIP registered {aor} device={device} via {transport} from {source}",
            aor=aor,
            device=owner,
            transport=source.transport,
            source=source.address,
            new_registration=newreg,
        )

    def _log_reason_alarm(self, reg: _Register, owner: str | None, alarm: ReasonAlarm) -> None:
        """What the phone says about itself in ``Reason`` (information only: the device is the
        policy's ``owner``, whatever ``Name=`` claims)."""
        self.log.info(
            "SIP {device} reports cisco-alarm {alarm_code}: name={name} active_load={active_load} "
            "inactive_load={inactive_load} last={last}",
            device=owner,
            alarm_code=shown(alarm.code, 8),
            name=shown(alarm.name),
            active_load=shown(alarm.active_load),
            inactive_load=shown(alarm.inactive_load),
            last=shown(alarm.last),
            aor=reg.aor,
            source=reg.source.address,
        )

    def _ok(self, reg: _Register, change: _Change, now: float) -> Response:
        """Step 5b: the 200 listing every live binding of the AoR."""
        self.counters.ok += 1
        resp = self._response(reg.req, 200)
        own_keys = change.bound_keys if change.newreg else frozenset()
        for value in _contact_values(change.after, now, own_keys):
            resp.headers.add("Contact", value)
        if change.added:
            resp.headers.add("Expires", str(self.settings.keepalive_expires))
        resp.headers.add("Supported", CUCM_SUPPORTED)
        if reg.remotecc is not None and reg.remotecc.optionsind is not None:
            self.counters.remotecc_answers += 1
            resp.headers.add("Content-Type", REMOTECC_RESPONSE)
            resp.body = optionsind_response(reg.remotecc.optionsind)
        return resp

    def _keepalive_ok(self, reg: _Register) -> Response:
        """A backup node's keep-alive (``expires=0;cisco-keep-alive``): 200, nothing removed.

        Answered before the policy, as the usecallmanager patch does: it changes nothing and
        tells nothing but that this node is up (as OPTIONS does).
        """
        self.counters.keepalives += 1
        self.counters.ok += 1
        self.log.debug(
            "SIP keep-alive REGISTER {aor} device={device}",
            aor=reg.aor,
            device=shown(reg.identity.device_name),
            source=reg.source.address,
        )
        return self._response(reg.req, 200)

    # --- REGISTER: the lean path ---------------------------------------------------------
    #
    # Nearly every REGISTER is a phone binding or refreshing its one contact: read from the
    # datagram's lines (:func:`~callboard.protocols.sip.lean.scan_register`), answered by
    # concatenating them, with no message, header map or response object built. Whatever is
    # not that shape goes to the general pipeline before anything is counted or asked; a
    # policy answer other than "allowed, no credentials" goes there with the answer (the
    # policy is asked once per REGISTER). ``tests/sip/test_sip_lean.py`` holds both paths
    # to the same bytes and the same state.

    def _read_lean(self, lines: RegisterLines, source: Source) -> _LeanRegister | None:
        """Step 1 for the common shape: None for anything the general path must see (an
        error to answer, a removal, a keep-alive, an AoR waiting on its policy...)."""
        s = self.settings
        host = self._uri_host(lines.uri)
        if not host or (s.domains and host not in s.domains):
            return None
        try:
            via = parse_via(lines.via)
            to = read_plain_to(lines.to)
            if to is None:
                to_uri = parse_uri(parse_name_addr(lines.to).uri)
                to = (to_uri.user or "", to_uri.aor)
            plain = read_plain_contact(lines.contact)
            if plain is not None:
                uri, named = plain
                bound = lines.contact  # as sent: what ``str()`` of its address gives
                if not named.keys().isdisjoint(_UNBOUND_PARAMS):
                    bound = _bound_contact(parse_name_addr(lines.contact))
            else:
                contact = parse_name_addr(lines.contact)
                uri, named = contact.uri, params_by_name(contact.params)
                bound = _bound_contact(contact)
        except SIPParseError:
            return None
        aor_user, aor = to
        if not aor_user:
            return None
        raw = named.get("expires")
        if raw is None:
            expires = s.default_expires if lines.expires is None else lines.expires
        elif is_number(raw):
            expires = min(int(raw), 2**32 - 1)
        else:
            return None
        if expires < s.min_expires or KEEPALIVE_PARAM in named or aor in self._waiting:
            return None
        return _LeanRegister(
            lines=lines,
            via=via,
            tkey=_transaction_key("REGISTER", via, source),
            aor=aor,
            aor_user=aor_user,
            contact=bound,
            key=_instance_key(uri, named),
            expires=min(expires, s.max_expires),
            identity=CiscoIdentity.of_params([named]),
            user_agent=self._shared(lines.user_agent),
        )

    def _uri_host(self, uri: str) -> str:
        """The host of a Request-URI ("": not a SIP URI). Phones send the few this registrar
        answers at, each read once."""
        host = self._uri_hosts.get(uri)
        if host is None:
            try:
                host = parse_uri(uri).host
            except SIPParseError:
                host = ""
            if len(self._uri_hosts) < 64:
                self._uri_hosts[uri] = host
        return host

    def _lean_register(self, lean: _LeanRegister, data: bytes, source: Source) -> Answer:
        """A retransmission gets its answer again; else the policy is asked, and the
        REGISTER answered here when it is allowed as it stands, else by the general path."""
        tkey = lean.tkey
        if tkey is not None and tkey in self._transactions:
            self.counters.retransmissions += 1
            return self._transactions.get(tkey)
        now = self.now()
        live = self.location.lookup(lean.aor, now)
        request = _registration_request(
            lean.identity, lean.aor_user, source, lean.user_agent, False, live
        )
        decision = self.policy.decide(request)
        reply = None
        if _plain(decision):
            assert isinstance(decision, PolicyDecision)
            reply = self._lean_ok(lean, decision.device_name, source, now, live)
        if reply is None:
            return self._parse_and_handle(data, source, (decision, now, live))
        if tkey is not None:
            self._transactions.keep(tkey, reply, now)  # answered now: nothing pending
        return reply

    def _lean_ok(
        self,
        lean: _LeanRegister,
        device_name: str | None,
        source: Source,
        now: float,
        live: dict[str, Binding],
    ) -> Reply | None:
        """Steps 4 and 5 for the common case: bind, count, log, answer 200. None (nothing
        changed) when the binding cannot be made as asked (a stale CSeq, too many)."""
        lines = lean.lines
        old = live.get(lean.key)
        if old is not None and old.call_id == lines.call_id and lines.cseq <= old.cseq:
            return None
        owner = device_name or lean.identity.device_name
        after = dict(live)
        after[lean.key] = self._binding(
            lean.aor, lean.key, lean.contact, lines.call_id, lines.cseq, now + lean.expires,
            owner, source, lean.user_agent,
        )  # fmt: skip
        if len(after) > self.settings.max_contacts:
            return None
        newreg = owner is not None and not self._holds_binding(owner, live, now)
        c = self.counters
        c.register += 1
        self.location.replace(lean.aor, after)
        c.registrations += 1
        self._log_registered(lean.aor, owner, source, lean.key not in live, newreg)
        c.ok += 1
        if self.on_register_answer is not None:
            self.on_register_answer(200)
        stamped, port = _stamped_via(lean.via, source)
        own = frozenset((lean.key,)) if newreg else frozenset()
        text = self._lean_answer(lines, stamped, _contact_values(after, now, own))
        return Reply(text.encode(), source.host, port)

    def _lean_answer(self, lines: RegisterLines, stamped: str | None, contacts: list[str]) -> str:
        """The 200, by concatenation, as ``_ok`` and ``_route`` make it: the request's Via
        (first when stamped), From, To (tagged), Call-ID and CSeq lines in their order, then
        ours."""
        out = ["SIP/2.0 200 OK"]
        if stamped is not None:
            out.append("Via: " + stamped)
        tag = self._to_tag()
        for key, value in lines.fields.items():
            if key not in COPIED:
                continue
            if key == "via":
                if stamped is None:
                    out.append("Via: " + value)
            elif key == "to" and ";tag=" not in value.replace(" ", "").lower():
                out.append(f"To: {value};tag={tag}")
            else:
                out.append(COPIED[key] + value)
        out.append("Date: " + self._date())
        out.append("Server: " + self.settings.server_name)
        out.extend("Contact: " + value for value in contacts)
        out.append(f"Expires: {self.settings.keepalive_expires}")
        out.append("Supported: " + CUCM_SUPPORTED)
        out.append("Content-Length: 0\r\n\r\n")
        return "\r\n".join(out)

    # --- REFER: the alarm Cisco phones send before registering -----------------------------

    def _refer(self, req: Request, source: Source) -> Response:
        """The out-of-dialog alarm REFER (protocol notes §16): 202, logged and counted.

        Nothing is referred anywhere, so nothing but an alarm is accepted, checked in RFC 3261
        §8.2 order: an extension other than ``norefersub`` required → 420; another body → 415
        (with ``Accept``); no single ``Refer-To`` naming the body (``cid:``), or an alarm that
        cannot be read → 400. The alarm's device name is what the phone claims, no more.
        """
        required = [o for o in req.headers.values("require") if o.lower() not in REFER_EXTENSIONS]
        if required:
            self.counters.bad_extension_420 += 1
            resp = self._response(req, 420)
            resp.headers.add("Unsupported", ", ".join(required))
            return resp
        if self._media_type(req) != ALARM:
            self.counters.unsupported_415 += 1
            resp = self._response(req, 415)
            resp.headers.add("Accept", ALARM)
            why = f"only Cisco alarm REFERs ({ALARM}) are accepted"
            resp.headers.add("Warning", f"399 {self.settings.warning_host} {quote(why)}")
            return resp
        refer_to = req.headers.get_all("refer-to")
        if len(refer_to) != 1:
            raise _Reject(self._bad(req, "REFER needs exactly one Refer-To"))
        if not refer_to[0].strip().lstrip("<").lower().startswith("cid:"):
            raise _Reject(self._bad(req, "Refer-To must name the alarm body (cid:)"))
        try:
            alarm = parse_alarm(req.body)
            own = self._own_contact(req, source)
        except CiscoBodyError as exc:
            raise _Reject(self._bad(req, f"alarm body: {exc.reason}")) from None
        except SIPParseError as exc:
            raise _Reject(self._bad(req, exc.reason)) from None
        self.counters.alarms += 1
        self._log_alarm(req, source, alarm)
        resp = self._response(req, 202)
        resp.headers.add("Contact", own)
        return resp

    @staticmethod
    def _media_type(req: Request) -> str | None:
        value = req.headers.get("content-type")
        try:
            return parse_media_type(value).type if value else None
        except MultipartError:
            return None

    @staticmethod
    def _own_contact(req: Request, source: Source) -> str:
        """Where we answered from, as CUCM's 202 says it: the Request-URI's host and port."""
        ruri = parse_uri(req.uri)
        port = ruri.port or _sent_by_port(source.transport)
        return f"<sip:{ruri.host}:{port};transport={source.transport}>"

    def _log_alarm(self, req: Request, source: Source, alarm: CiscoAlarm) -> None:
        """One line per alarm: its name, the device it names (or the Contact's devicename),
        and what it carried that matters (status, reason, loads); every value made printable
        and short, since the phone wrote it."""
        contact_device = None
        try:
            contacts = parse_contact_list(req.headers)
            if isinstance(contacts, list):
                contact_device = CiscoIdentity.of(contacts).device_name
        except SIPParseError:
            pass
        status, reason = shown(alarm.status), shown(alarm.reason)
        loads = " ".join(f"{shown(k, 32)}={shown(v)}" for k, v in alarm.loads[:4]) or None
        said = [f"{k}={v}" for k, v in (("status", status), ("reason", reason)) if v]
        said += [loads] if loads else []
        self.log.info(
            "SIP alarm {alarm} from {device}: {summary}",
            alarm=shown(alarm.name),
            device=shown(alarm.device_name or contact_device),
            summary=" ".join(said) or f"{len(alarm.params)} parameters",
            status=status,
            reason=reason,
            loads=loads,
            parameters=len(alarm.params),
            contact_device=shown(contact_device),
            source=source.address,
            user_agent=shown(req.headers.get("user-agent")),
        )

    # --- REGISTER: one AoR at a time while a policy answer is pending ---------------------

    def _then_next(self, aor: str, outcome: Deferred[Response]) -> Deferred[Response]:
        """A Deferred of ``outcome``'s response; the REGISTERs waiting on ``aor`` start after
        it has been answered (so their answers also leave in order)."""
        answer: Deferred[Response] = Deferred()
        outcome.chainDeferred(answer)
        outcome.addBoth(lambda _: self._next_in_turn(aor))
        return answer

    def _next_in_turn(self, aor: str) -> None:
        waiting = self._waiting[aor]
        while waiting:
            reg, turn = waiting.popleft()
            try:
                outcome = self._decide(reg)
            except Exception:
                turn.errback(Failure())
                continue
            if isinstance(outcome, Deferred):
                outcome.chainDeferred(turn)
                outcome.addBoth(lambda _: self._next_in_turn(aor))
                return
            turn.callback(outcome)
        del self._waiting[aor]

    # --- state views ----------------------------------------------------------------------

    def bindings_for_device(self, device_name: str) -> list[BindingInfo]:
        now = self.now()
        return [self._info(b, now) for b in self.location.by_device(device_name, now)]

    def bindings_for_aor(self, aor: str) -> list[BindingInfo]:
        now = self.now()
        return [self._info(b, now) for b in self.location.lookup(aor, now).values()]

    def binding_count(self) -> int:
        return self.location.count()

    @staticmethod
    def _info(b: Binding, now: float) -> BindingInfo:
        contact = parse_name_addr(b.contact)
        return BindingInfo(
            aor=b.aor,
            contact=b.contact,
            device_name=b.device_name,
            transport=b.transport,
            source=b.source,
            user_agent=b.user_agent,
            expires_at=b.expires_at,
            expires_in=max(0, round(b.expires_at - now)),
            registered_at=b.registered_at,
            call_id=b.call_id,
            cseq=b.cseq,
            instance=contact.param("+sip.instance"),
            model_id=contact.param("+u.sip!model.ccm.cisco.com"),
            client_cert_fingerprint=b.client_cert_fingerprint,
        )

    def drop_device(self, device_name: str) -> int:
        """Remove every binding of a device at once (it went back to awaiting activation)."""
        dropped = len(self.location.remove_device(device_name))
        if dropped:
            self.counters.dropped += dropped
            self.log.info(
                "SIP bindings of {device} dropped ({count})", device=device_name, count=dropped
            )
        return dropped

    def sweep(self) -> int:
        """Expire due bindings and forget old transactions; returns bindings expired."""
        now = self.now()
        expired = self.location.sweep(now)
        for b in expired:
            self.log.info(
                "SIP binding expired {aor} {contact} device={device}",
                aor=b.aor,
                contact=b.contact_uri,
                device=b.device_name,
            )
        self.counters.expired += len(expired)
        self._transactions.expire(now)
        return len(expired)

    def counters_snapshot(self) -> Mapping[str, int]:
        c = self.counters
        out = {k: v for k, v in vars(c).items() if isinstance(v, int)}
        out.update(c.extra)
        out["bindings"] = self.binding_count()
        return out

    # --- responses ------------------------------------------------------------------------

    def _response(self, req: Request, status: int, reason: str = "") -> Response:
        resp = response_to(req, status, reason, to_tag=self._to_tag())
        resp.headers.add("Date", self._date())
        resp.headers.add("Server", self.settings.server_name)
        return resp

    def _to_tag(self) -> str:
        """32 random bits (RFC 3261 §19.3), from a pool of OS randomness drawn 4 KiB at a
        time: one system call per 1,024 answers, not one per answer."""
        at = self._tag_at
        if at + 4 > len(self._tag_pool):
            self._tag_pool, at = os.urandom(4096), 0
        self._tag_at = at + 4
        return self._tag_pool[at : at + 4].hex()

    def _date(self) -> str:
        """The ``Date`` value, formatted once per second (not once per answer)."""
        second = int(self.wall_now())
        if second != self._date_second:
            self._date_second, self._date_text = second, formatdate(second, usegmt=True)
        return self._date_text

    def _bad(self, req: Request, why: str) -> Response:
        self.counters.bad_request_400 += 1
        self.log.info("SIP bad request: {why}", why=why, call_id=req.headers.get("call-id"))
        resp = self._response(req, 400)
        resp.headers.add("Warning", f"399 {self.settings.warning_host} {quote(why)}")
        return resp

    def _refuse(
        self, req: Request, status: int, why: str, source: Source, device: str | None
    ) -> Response:
        if status == 404:
            self.counters.refused_404 += 1
        else:
            self.counters.refused_403 += 1
        self.log.info(
            "SIP REGISTER refused {status}: {why}",
            status=status,
            why=why,
            device=device,
            to=req.headers.get("to"),
            source=source.address,
        )
        resp = self._response(req, status)
        resp.headers.add("Warning", f"399 {self.settings.warning_host} {quote(why)}")
        return resp

    def _too_brief(self, req: Request, source: Source, aor: str, expires: int) -> Response:
        self.counters.too_brief_423 += 1
        self.log.info(
            "SIP REGISTER refused: interval too brief {aor} {expires}s",
            aor=aor,
            expires=expires,
            source=source.address,
        )
        resp = self._response(req, 423)
        resp.headers.add("Min-Expires", str(self.settings.min_expires))
        return resp

    def _challenge(self, req: Request, now: float, stale: bool) -> Response:
        self.counters.challenged_401 += 1
        resp = self._response(req, 401)
        for value in self.digest.challenges(now, stale=stale):
            resp.headers.add("WWW-Authenticate", value)
        return resp

    def _policy_challenge(self, reg: _Register, decision: PolicyDecision) -> Response:
        """The policy's own 401/407 (a bearer challenge), logged like a refusal."""
        self.counters.challenged_401 += 1
        self.log.info(
            "SIP REGISTER challenged {status}: {why}",
            status=decision.status,
            why=decision.warning,
            to=reg.req.headers.get("to"),
            source=reg.source.address,
        )
        resp = self._response(reg.req, decision.status)
        for name, value in decision.challenge:
            resp.headers.add(name, value)
        return resp

    def _policy_failed(self, failure: Failure, reg: _Register) -> Response:
        """The policy's Deferred failed (its store write did): 500, so the phone retries."""
        self.counters.policy_failed_500 += 1
        self.log.failure(
            "SIP registration policy failed for {aor}",
            failure,
            aor=reg.aor,
            source=reg.source.address,
        )
        return self._response(reg.req, 500)

    def _busy(self, reg: _Register) -> Response:
        """Too many REGISTERs of one AoR already wait on a pending policy answer."""
        self.counters.busy_503 += 1
        self.log.info(
            "SIP REGISTER refused 503: {aor} busy", aor=reg.aor, source=reg.source.address
        )
        resp = self._response(reg.req, 503)
        resp.headers.add("Retry-After", "1")
        return resp

    def error_reply(
        self, req: Request | None, status: int, source: Source, why: str
    ) -> Reply | None:
        """400/513 when the request is readable enough to answer, else drop."""
        try:
            has_via = req is not None and bool(req.headers.values("via"))
        except SIPParseError:
            has_via = False
        if req is None or not has_via or req.method.upper() == "ACK":
            self.counters.malformed_dropped += 1
            self.log.debug("SIP dropped unreadable message: {why}", why=why, source=source.address)
            return None
        if status == 400:
            self.counters.bad_request_400 += 1
        resp = self._response(req, status)
        resp.headers.add("Warning", f"399 {self.settings.warning_host} {quote(why)}")
        try:
            reply = self._route(req, resp, source)
        except SIPParseError:
            return Reply(resp.to_bytes(), source.host, source.port, close=status == 513)
        return replace(reply, close=status == 513)

    def _route(self, req: Request, resp: Response, source: Source, top: Via | None = None) -> Reply:
        """RFC 3261 §18.2.2 + RFC 3581: stamp received/rport on the top Via and pick the port."""
        if self.on_register_answer is not None and req.method.upper() == "REGISTER":
            self.on_register_answer(resp.status)
        if top is None:
            top = parse_via(req.headers.values("via")[0])
        stamped, port = _stamped_via(top, source)
        if stamped is not None:
            # The Via list first, one value a line, then the response's other headers.
            rest = req.headers.values("via")[1:]
            resp.headers.put_first("via", [stamped, *rest])
        return Reply(resp.to_bytes(), source.host, port)


def _stamped_via(top: Via, source: Source) -> tuple[str | None, int]:
    """RFC 3261 §18.2.2 + RFC 3581: the top Via with received/rport stamped (None: it stays
    as it came), and the port the reply goes to."""
    params = list(top.params)
    has_rport = False
    out: list[tuple[str, str | None]] = []
    for k, v in params:
        lk = k.lower()
        if lk == "rport":
            has_rport = True
            continue
        if lk == "received":
            continue
        out.append((k, v))
    if top.host.strip("[]") != source.host:
        out.append(("received", source.host))
    if has_rport:
        out.append(("rport", str(source.port)))
    stamped = _via_text(top, out) if out != params else None
    if source.transport != "udp" or has_rport:
        return stamped, source.port
    return stamped, top.port or _sent_by_port(top.transport)


def _transaction_key(method: str, via: Via, source: Source) -> str | None:
    """What a retransmission of this request repeats (method, sent-by, branch); None when
    nothing is kept for it: only UDP retransmits (on TCP/TLS Timer J is 0, RFC 3261
    §17.2.2), and only an RFC 3261 branch identifies a transaction."""
    branch = via.branch
    if branch and branch.startswith("z9hG4bK") and source.transport == "udp":
        return f"{method} {via.host}:{via.port} {branch}"
    return None


def _contact_values(after: Mapping[str, Binding], now: float, own: frozenset[str]) -> list[str]:
    """The Contact values of a 200: every live binding, soonest expiry first, with its
    remaining ``expires`` (and ``x-cisco-newreg`` on the ``own`` keys). The bound contact is
    kept formatted: its parameters, then these, as text."""
    out: list[str] = []
    items = after.items()
    ordered = sorted(items, key=lambda kv: kv[1].expires_at) if len(after) > 1 else items
    for key, b in ordered:
        value = f"{b.contact};expires={max(0, round(b.expires_at - now))}"
        out.append(value + ";x-cisco-newreg" if key in own else value)
    return out


def _registration_request(
    identity: CiscoIdentity,
    aor_user: str,
    source: Source,
    user_agent: str | None,
    is_removal: bool,
    live: Mapping[str, Binding],
    authorization: tuple[tuple[str, str], ...] = (),
) -> RegistrationRequest:
    """What the policy is told about a REGISTER (the same from either path)."""
    return RegistrationRequest(
        device_name=identity.device_name,
        mac=identity.mac,
        model_id=identity.model_id,
        aor_user=aor_user,
        source=source.address,
        transport=source.transport,
        user_agent=user_agent,
        client_cert_fingerprint=source.client_cert_fingerprint,
        client_certs=source.client_certs,
        is_removal=is_removal,
        bound_devices=(
            tuple(sorted({b.device_name for b in live.values() if b.device_name})) if live else ()
        ),
        authorization=authorization,
    )


def _via_text(via: Via, params: list[tuple[str, str | None]]) -> str:
    """``str(via.with_params(params))``, without making that Via."""
    hostport = via.host if via.port is None else f"{via.host}:{via.port}"
    return f"SIP/2.0/{via.transport} {hostport}{format_params(params)}"


_UNBOUND_PARAMS = ("expires", "x-cisco-newreg")  # said to the phone, not part of a binding


def _bound_contact(c: NameAddr) -> str:
    """The Contact value a binding keeps: as sent, less ``expires`` and ``x-cisco-newreg``."""
    params = c.params
    if any(k.lower() in _UNBOUND_PARAMS for k, _ in params):
        params = tuple((k, v) for k, v in params if k.lower() not in _UNBOUND_PARAMS)
        c = NameAddr(c.display, c.uri, params)
    return str(c)


def _plain(decision: PolicyDecision | Deferred[PolicyDecision]) -> bool:
    """Allowed now, as it stands: no credentials to check, no cap on the expiry."""
    return (
        isinstance(decision, PolicyDecision)
        and decision.allowed
        and decision.credentials is None
        and decision.max_expires is None
    )


def _capped(reg: _Register, seconds: int) -> _Register:
    """The REGISTER with every granted expiry at most ``seconds`` (removals stay 0)."""
    cap = max(1, seconds)
    return replace(reg, planned=tuple((c, min(e, cap)) for c, e in reg.planned))


def instance_key(contact: NameAddr) -> str:
    """Binding key: the ``+sip.instance`` when present, else the contact URI (normalised)."""
    return _instance_key(contact.uri, params_by_name(contact.params))


def _instance_key(uri: str, params: dict[str, str]) -> str:
    """:func:`instance_key`, given the contact's URI and :func:`params_by_name`."""
    inst = params.get("+sip.instance")
    if inst:
        return "instance:" + inst.strip().strip("<>").lower()
    try:
        return "uri:" + str(parse_uri(uri))
    except SIPParseError:
        return "uri:" + uri
