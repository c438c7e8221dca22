"""The SIP-lite registrar: REGISTER and OPTIONS rules, bindings and their expiry (sans-I/O).

Bytes come in with a :class:`Source` (transport, address, client certificate) through
:meth:`Registrar.handle_bytes`; a :class:`Reply` (bytes and where to send them) comes out.
Time is injected (``clock`` for expiry and nonces, ``wallclock`` for the ``Date`` header) so
every rule is tested without sockets. The Twisted adapters live in ``transports``.

Who may register is not decided here: the daemon implements :class:`RegistrationPolicy`
(device exists and is active, MAC/model/line agree, or autoregistration) and the registrar
applies RFC 3261 §10.3 around it:

1. Max-Forwards 0 → 483; a Request-URI domain not served (``settings.domains``) → 404.
2. To must be a sip(s) URI (AoR = ``sip:user@host``); Contact ``*`` only alone with Expires 0.
3. The policy decides (403/404 with ``Warning: 399``); when it returns credentials, digest
   (SHA-256 and MD5, qop=auth) is required: 401 (``stale=true`` for an old nonce), 403 for a
   wrong password.
4. Per-contact expiry: ``expires`` param, else ``Expires`` header, else the default; 0 <
   e < min → 423 with Min-Expires; above max → shortened.
5. Same Call-ID with a CSeq not higher than the stored one → 400, nothing changes. All
   contacts apply or none do.
6. 200 lists every live binding of the AoR with its remaining ``expires``; adds ``Expires``
   (the keep-alive interval, 120 by default, as CUCM) when bindings were added, ``Date``,
   ``Server``, a To tag, and ``x-cisco-newreg`` on the request's contacts when the device had
   no live binding before (its first registration since the daemon started, or since it
   expired or was dropped).

Bindings are keyed per AoR by ``+sip.instance`` when present (a rebooted Cisco phone with a
new random contact user replaces its old binding) and by contact URI otherwise. They expire
through one heap swept by :meth:`Registrar.sweep` (the service calls it every second).
Retransmissions (same Via branch, sent-by and method within 32 s) get the cached reply.
Methods other than REGISTER and OPTIONS get 405 with ``Allow``; ACK is absorbed silently.
"""

from __future__ import annotations

import heapq
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from typing import Protocol

from callboard.protocols.settings import SettingError, check_choice, check_range, config_key
from callboard.protocols.sip.digest import DigestAuthenticator, Verdict
from callboard.protocols.sip.message import (
    DEFAULT_MAX_MESSAGE,
    WILDCARD,
    MessageTooLarge,
    NameAddr,
    Request,
    Response,
    SIPParseError,
    Via,
    parse_contact_list,
    parse_cseq,
    parse_message,
    parse_name_addr,
    parse_uri,
    parse_via,
    quote,
    response_to,
)
from twisted.logger import Logger

ALLOW = "REGISTER, OPTIONS"
TRANSACTION_LINGER = 32.0  # RFC 3261 Timer J for UDP (64*T1)

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
    for ``Contact: *`` and queries, which carry no Cisco parameters).
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


@dataclass(frozen=True)
class PolicyDecision:
    """The policy's answer.

    ``status`` is 200 when allowed, else 403 (known device, wrong state or mismatch) or 404
    (unknown device or number); ``warning`` is the text of the ``Warning: 399`` header
    (and the log reason). ``credentials`` = (authName, authPassword) makes digest mandatory.
    ``device_name`` is the canonical device the binding belongs to (the policy may create it,
    e.g. autoregistration).
    """

    allowed: bool
    status: int = 200
    warning: str = ""
    credentials: tuple[str, str] | None = None
    device_name: str | None = None

    @classmethod
    def allow(
        cls, device_name: str | None = None, credentials: tuple[str, str] | None = None
    ) -> PolicyDecision:
        return cls(True, 200, "", credentials, device_name)

    @classmethod
    def refuse(cls, status: int, warning: str) -> PolicyDecision:
        if status not in (403, 404):
            raise ValueError("a refusal is 403 or 404")
        return cls(False, status, warning, None, None)


class RegistrationPolicy(Protocol):
    """Implemented by the daemon over its registry. Must not block (runs on the reactor)."""

    def decide(self, request: RegistrationRequest) -> PolicyDecision: ...


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
    digest_algorithms: tuple[str, ...] = ("SHA-256", "MD5")
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

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Reply:
    """Bytes to send; ``host``/``port`` matter only for UDP (streams answer in place)."""

    data: bytes
    host: str
    port: int
    close: bool = False  # streams: close after sending (unrecoverable framing)


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
class _Binding:
    aor: str
    key: str
    contact: NameAddr
    call_id: str
    cseq: int
    expires_at: float
    registered_at: float
    device_name: str | None
    transport: str
    source: str
    user_agent: str | None
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
    retransmissions: int = 0
    malformed_dropped: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class _Abort(Exception):
    """Stop processing a request and answer with this response."""

    def __init__(self, status: int, reason: str = "", **headers: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers


def _sent_by_port(transport: str) -> int:
    return 5061 if transport.upper() == "TLS" else 5060


class Registrar:
    """REGISTER/OPTIONS processing and binding state. Not thread-safe: reactor thread only."""

    log = Logger(namespace="callboard.sip.registrar")

    def __init__(
        self,
        policy: RegistrationPolicy,
        settings: RegistrarSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.settings = settings or RegistrarSettings()
        self.clock = clock
        self.wallclock = wallclock
        s = self.settings
        self.digest = DigestAuthenticator(
            s.realm, s.nonce_secret or os.urandom(32), s.nonce_lifetime, s.digest_algorithms
        )
        self.counters = Counters()
        self._bindings: dict[str, dict[str, _Binding]] = {}
        self._by_device: dict[str, set[str]] = {}  # device name → AoRs
        self._heap: list[tuple[float, str, str]] = []
        self._transactions: dict[tuple[str, str, str], tuple[float, Reply | None]] = {}

    # --- entry points ---------------------------------------------------------------------

    def handle_bytes(self, data: bytes, source: Source) -> Reply | None:
        """One datagram or one framed stream message in; the reply (if any) out."""
        self.counters.requests += 1
        try:
            msg = parse_message(data, self.settings.max_message_size)
        except MessageTooLarge as exc:
            self.counters.too_large_513 += 1
            return self.error_reply(exc.partial, 513, source, exc.reason)
        except SIPParseError as exc:
            return self.error_reply(exc.partial, 400, source, exc.reason)
        if isinstance(msg, Response):
            return None  # we send no requests; stray responses are dropped
        return self.handle_request(msg, source)

    def handle_request(self, req: Request, source: Source) -> Reply | None:
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
            return None
        branch = via.branch
        tkey: tuple[str, str, str] | None = None
        if branch and branch.startswith("z9hG4bK"):
            tkey = (branch, f"{via.host}:{via.port}", method)
            cached = self._transactions.get(tkey)
            if cached is not None:
                self.counters.retransmissions += 1
                return cached[1]
        if cseq.method.upper() != method:
            reply = self.error_reply(req, 400, source, "CSeq method does not match")
        else:
            try:
                response = self._dispatch(req, method, source)
            except _Abort as exc:
                response = self._response(req, exc.status, exc.reason)
                for k, v in exc.headers.items():
                    response.headers.add(k.replace("_", "-"), v)
            reply = self._route(req, response, source, via)
        if tkey is not None:
            self._transactions[tkey] = (self.clock() + TRANSACTION_LINGER, reply)
        return reply

    def _dispatch(self, req: Request, method: str, source: Source) -> Response:
        if method == "OPTIONS":
            self.counters.options += 1
            resp = self._response(req, 200)
            resp.headers.add("Allow", ALLOW)
            resp.headers.add("Accept", "application/sdp")
            return resp
        mf = req.headers.get("max-forwards")
        if mf is not None:
            if not mf.strip().isdigit():
                raise _Abort(400, "Bad Max-Forwards")
            if int(mf) == 0:
                self.counters.too_many_hops_483 += 1
                raise _Abort(483)
        if method == "REGISTER":
            self.counters.register += 1
            return self._register(req, source)
        self.counters.not_allowed_405 += 1
        resp = self._response(req, 405)
        resp.headers.add("Allow", ALLOW)
        return resp

    # --- REGISTER -------------------------------------------------------------------------

    def _register(self, req: Request, source: Source) -> Response:
        s = self.settings
        now = self.clock()
        try:
            ruri = parse_uri(req.uri)
            to = parse_name_addr(req.headers.get("to") or "")
            to_uri = parse_uri(to.uri)
            contacts = parse_contact_list(req.headers)
            call_id = (req.headers.get("call-id") or "").strip()
            cseq = parse_cseq(req.headers.get("cseq") or "").number
        except SIPParseError as exc:
            return self._bad(req, exc.reason)
        if s.domains and ruri.host not in s.domains:
            return self._refuse(req, 404, f"domain {ruri.host} not served here", source, None)
        if not to_uri.user:
            return self._bad(req, "To has no user part")
        aor = to_uri.aor
        header_expires: int | None = None
        raw_exp = req.headers.get("expires")
        if raw_exp is not None:
            if not raw_exp.strip().isdigit():
                return self._bad(req, "bad Expires header")
            header_expires = min(int(raw_exp.strip()), 2**32 - 1)
        if contacts == WILDCARD and header_expires != 0:
            return self._bad(req, "Contact: * requires Expires: 0")

        # The Cisco identity comes from the first contact that carries it.
        device = mac = model = instance = None
        if isinstance(contacts, list):
            for c in contacts:
                device = device or c.param("+u.sip!devicename.ccm.cisco.com")
                model = model or c.param("+u.sip!model.ccm.cisco.com")
                inst = c.param("+sip.instance")
                if inst and instance is None:
                    instance = inst
                    m = _INSTANCE_RE.match(inst.strip())
                    mac = m.group(1).lower() if m else None
        user_agent = req.headers.get("user-agent")

        # Per-contact expiry, before asking anyone anything (423 costs nothing).
        planned: list[tuple[NameAddr, int]] = []
        if isinstance(contacts, list):
            if len(contacts) > s.max_contacts:
                return self._bad(req, "too many contacts")
            for c in contacts:
                raw = c.param("expires")
                if raw is not None:
                    if not raw.isdigit():
                        return self._bad(req, "bad expires parameter")
                    exp = min(int(raw), 2**32 - 1)
                elif header_expires is not None:
                    exp = header_expires
                else:
                    exp = s.default_expires
                if 0 < exp < s.min_expires:
                    self.counters.too_brief_423 += 1
                    self.log.info(
                        "SIP REGISTER refused: interval too brief {aor} {expires}s",
                        aor=aor,
                        expires=exp,
                        source=source.address,
                    )
                    raise _Abort(423, "", Min_Expires=str(s.min_expires))
                planned.append((c, min(exp, s.max_expires)))
        is_removal = contacts == WILDCARD or (bool(planned) and all(exp == 0 for _, exp in planned))

        decision = self.policy.decide(
            RegistrationRequest(
                device_name=device,
                mac=mac,
                model_id=model,
                aor_user=to_uri.user,
                source=source.address,
                transport=source.transport,
                user_agent=user_agent,
                client_cert_fingerprint=source.client_cert_fingerprint,
                is_removal=is_removal,
                bound_devices=tuple(
                    sorted(
                        {
                            b.device_name
                            for b in self._bindings.get(aor, {}).values()
                            if b.device_name and b.expires_at > now
                        }
                    )
                ),
            )
        )
        if not decision.allowed:
            return self._refuse(req, decision.status, decision.warning, source, device)
        owner = decision.device_name or device
        if decision.credentials is not None:
            auth_name, password = decision.credentials
            verdict = self.digest.verify(
                req.headers.get_all("authorization"),
                method="REGISTER",
                username=auth_name,
                password=password,
                now=now,
            )
            if verdict is Verdict.MALFORMED:
                return self._bad(req, "malformed Authorization")
            if verdict is Verdict.WRONG:
                return self._refuse(req, 403, "bad credentials", source, owner)
            if verdict is not Verdict.OK:
                self.counters.challenged_401 += 1
                resp = self._response(req, 401)
                for value in self.digest.challenges(now, stale=verdict is Verdict.STALE):
                    resp.headers.add("WWW-Authenticate", value)
                return resp

        current = self._bindings.get(aor, {})
        live = {k: b for k, b in current.items() if b.expires_at > now}
        changed = dict(live)
        added = False
        if contacts == WILDCARD:
            for key, b in live.items():
                if b.call_id == call_id and cseq <= b.cseq:
                    continue  # RFC 3261 §10.3 step 6: this one is newer than the removal
                del changed[key]
        else:
            for c, exp in planned:
                key = instance_key(c)
                old = live.get(key)
                if old is not None and old.call_id == call_id and cseq <= old.cseq:
                    return self._bad(req, "CSeq not higher than the stored one for this Call-ID")
                if exp == 0:
                    changed.pop(key, None)
                    continue
                added = True
                contact = c.with_params(
                    [(k, v) for k, v in c.params if k.lower() not in ("expires", "x-cisco-newreg")]
                )
                changed[key] = _Binding(
                    aor=aor,
                    key=key,
                    contact=contact,
                    call_id=call_id,
                    cseq=cseq,
                    expires_at=now + exp,
                    registered_at=self.wallclock(),
                    device_name=owner,
                    transport=source.transport,
                    source=source.address,
                    user_agent=user_agent,
                    instance=c.param("+sip.instance"),
                    model_id=c.param("+u.sip!model.ccm.cisco.com"),
                    client_cert_fingerprint=source.client_cert_fingerprint,
                )
            if len(changed) > s.max_contacts:
                return self._bad(req, "too many bindings for this address")

        newreg = added and owner is not None and not self._device_has_live(owner, now)
        # Commit: from here on nothing can fail.
        removed_keys = [k for k in live if k not in changed]
        if changed:
            self._bindings[aor] = changed
        else:
            self._bindings.pop(aor, None)
        for key, b in changed.items():
            if live.get(key) is not b:
                heapq.heappush(self._heap, (b.expires_at, aor, key))
                if b.device_name:
                    self._by_device.setdefault(b.device_name, set()).add(aor)
        for key in removed_keys:
            old = live[key]
            self.counters.unregistrations += 1
            self.log.info(
                "SIP unregistered {aor} {contact} device={device}",
                aor=aor,
                contact=old.contact.uri,
                device=old.device_name,
                source=source.address,
            )
        if added:
            self.counters.registrations += 1
            self.log.info(
                "SIP registered {aor} device={device} via {transport} from {source}",
                aor=aor,
                device=owner,
                transport=source.transport,
                source=source.address,
                user_agent=user_agent,
                new_registration=newreg,
                contacts=[str(c.uri) for c, e in planned if e],
            )
        elif not planned and contacts != WILDCARD:
            self.counters.queries += 1

        self.counters.ok += 1
        resp = self._response(req, 200)
        own_keys = {instance_key(c) for c, e in planned if e} if newreg else set()
        for key, b in sorted(changed.items(), key=lambda kv: kv[1].expires_at):
            params = [*b.contact.params, ("expires", str(max(0, round(b.expires_at - now))))]
            if key in own_keys:
                params.append(("x-cisco-newreg", None))
            resp.headers.add("Contact", str(b.contact.with_params(params)))
        if added:
            resp.headers.add("Expires", str(s.keepalive_expires))
        resp.headers.add("Supported", "X-cisco-srtp-fallback")
        return resp

    # --- state views ----------------------------------------------------------------------

    def _device_has_live(self, device: str, now: float) -> bool:
        for aor in self._by_device.get(device, ()):
            for b in self._bindings.get(aor, {}).values():
                if b.device_name == device and b.expires_at > now:
                    return True
        return False

    def bindings_for_device(self, device_name: str) -> list[BindingInfo]:
        now = self.clock()
        out = []
        for aor in sorted(self._by_device.get(device_name, ())):
            for b in self._bindings.get(aor, {}).values():
                if b.device_name == device_name and b.expires_at > now:
                    out.append(self._info(b, now))
        return out

    def bindings_for_aor(self, aor: str) -> list[BindingInfo]:
        now = self.clock()
        return [
            self._info(b, now) for b in self._bindings.get(aor, {}).values() if b.expires_at > now
        ]

    def binding_count(self) -> int:
        return sum(len(v) for v in self._bindings.values())

    @staticmethod
    def _info(b: _Binding, now: float) -> BindingInfo:
        return BindingInfo(
            aor=b.aor,
            contact=str(b.contact),
            device_name=b.device_name,
            transport=b.transport,
            source=b.source,
            user_agent=b.user_agent,
            expires_at=b.expires_at,
            expires_in=max(0, round(b.expires_at - now)),
            registered_at=b.registered_at,
            call_id=b.call_id,
            cseq=b.cseq,
            instance=b.instance,
            model_id=b.model_id,
            client_cert_fingerprint=b.client_cert_fingerprint,
        )

    def drop_device(self, device_name: str) -> int:
        """Remove every binding of a device at once (it went back to awaiting activation)."""
        dropped = 0
        for aor in self._by_device.pop(device_name, set()):
            bindings = self._bindings.get(aor, {})
            for key in [k for k, b in bindings.items() if b.device_name == device_name]:
                del bindings[key]
                dropped += 1
            if not bindings:
                self._bindings.pop(aor, None)
        if dropped:
            self.counters.dropped += dropped
            self.log.info(
                "SIP bindings of {device} dropped ({count})", device=device_name, count=dropped
            )
        return dropped

    def sweep(self) -> int:
        """Expire due bindings and forget old transactions; returns bindings expired."""
        now = self.clock()
        expired = 0
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, aor, key = heapq.heappop(heap)
            bindings = self._bindings.get(aor)
            if bindings is None:
                continue
            b = bindings.get(key)
            if b is None or b.expires_at != at:
                continue  # refreshed or removed since
            del bindings[key]
            if not bindings:
                del self._bindings[aor]
            expired += 1
            self.log.info(
                "SIP binding expired {aor} {contact} device={device}",
                aor=aor,
                contact=b.contact.uri,
                device=b.device_name,
            )
            if b.device_name and not any(
                x.device_name == b.device_name for x in self._bindings.get(aor, {}).values()
            ):
                aors = self._by_device.get(b.device_name)
                if aors is not None:
                    aors.discard(aor)
                    if not aors:
                        del self._by_device[b.device_name]
        self.counters.expired += expired
        tx = self._transactions
        while tx:
            first = next(iter(tx))
            if tx[first][0] > now:
                break
            del tx[first]
        return expired

    def counters_snapshot(self) -> Mapping[str, int]:
        c = self.counters
        out = {k: v for k, v in vars(c).items() if isinstance(v, int)}
        out.update(c.extra)
        out["bindings"] = self.binding_count()
        return out

    # --- responses ------------------------------------------------------------------------

    def _response(self, req: Request, status: int, reason: str = "") -> Response:
        resp = response_to(req, status, reason, to_tag=os.urandom(4).hex())
        resp.headers.add("Date", formatdate(self.wallclock(), usegmt=True))
        resp.headers.add("Server", self.settings.server_name)
        return resp

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
        vias = req.headers.values("via")
        if top is None:
            top = parse_via(vias[0])
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
        if out != params:
            new_top = str(top.with_params(out))
            resp.headers.remove("via")
            resp.headers.add("Via", new_top)
            for v in vias[1:]:
                resp.headers.add("Via", v)
            # Keep the response's other headers after Via for readability.
            items = list(resp.headers)
            resp.headers = type(resp.headers)(
                [i for i in items if i[0] == "via"] + [i for i in items if i[0] != "via"]
            )
        if source.transport != "udp" or has_rport:
            port = source.port
        else:
            port = top.port or _sent_by_port(top.transport)
        return Reply(resp.to_bytes(), source.host, port)


def instance_key(contact: NameAddr) -> str:
    """Binding key: the ``+sip.instance`` when present, else the contact URI (normalised)."""
    inst = contact.param("+sip.instance")
    if inst:
        return "instance:" + inst.strip().strip("<>").lower()
    try:
        return "uri:" + str(parse_uri(contact.uri))
    except SIPParseError:
        return "uri:" + contact.uri
