"""Activation by voice prompts: any SIP phone redeems its code from the keypad.

A phone that may activate by voice (its SEP record waits for a code and its model's
onboarding is ``ivr``; or, with ``ivr.unknown_phones``, a MAC the registry does not know)
gets a *bootstrap config*: one line labelled "Activate" with a SIP account of its own,
``bootstrap-<mac>``. Its secret is derived, not stored: HMAC-SHA-256 under a key kept in the
state directory (``ivr.key``, 0600) over the MAC and the id of the code it waits for, so it
survives restarts, changes with every new code, and dies with the code: once the code is
used (the one durable redemption transaction) the account no longer exists.

The bootstrap account may REGISTER (digest) and call ``ivr.number``; any other call gets 403.
A call is taken only from the address the account registered from (the registration proved
the secret). The call (:class:`IVRCall`): the prompt, digits as RFC 4733 events or SIP INFO,
``*`` clears, ``#`` ends (or the inter-digit timeout), and the code is checked by the
registry's ``redeem`` (single use, expiry, MAC binding for a SEP record, model binding for a
BAT record with the model the phone gave in its REGISTER), behind the TVS throttle (the same
per-device and per-source budgets). On success the confirmation plays, the call ends (BYE)
and the phone is told to fetch its config again (NOTIFY ``check-sync``; and Cisco's
``service-control`` restart for Cisco phones). Codes never reach a log: only digit counts.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import itertools
import os
import re
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from callboard.protocols.models import MODELS
from callboard.protocols.rtp.events import EventDecoder
from callboard.protocols.rtp.g711 import encode
from callboard.protocols.rtp.packet import RTPError, parse_rtp
from callboard.protocols.rtp.stream import RTPSender
from callboard.protocols.settings import SettingError, check_range
from callboard.protocols.sip.dialog import (
    CallRefused,
    Dialog,
    DialogServer,
    IncomingCall,
    MediaAddress,
)
from callboard.protocols.sip.message import Headers, parse_uri
from callboard.protocols.sip.registrar import (
    PolicyDecision,
    Registrar,
    RegistrationPolicy,
    RegistrationRequest,
)
from callboard.protocols.tvs.activation import ManufacturingTrust, ThrottleStore
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import DatagramProtocol

from .logs import get_logger
from .registry.model import CODE_DIGITS, Device, DeviceState, Line, Onboarding
from .registry.registry import Redeemed, Registry

log = get_logger("callboard.ivr")

BOOTSTRAP_PREFIX = "bootstrap-"
PROMPTS = ("enter-code", "accepted", "rejected", "too-many")
PACKAGED_PROMPTS = Path(__file__).parent / "prompts"
MAX_DIGITS = 24  # more keys than this before # are not kept (a flood)
MIC_MARK = "ivr"  # what the redemption records instead of a MIC fingerprint
#: The bootstrap config's dial template: the hotline (served by the provisioning tree).
HOTLINE_FILE = "ivr-hotline.xml"
#: User-Agent prefixes → model name, for phones that do not send Cisco's model parameter.
USER_AGENT_MODELS: dict[str, str] = {f"Cisco-CP{name}": name for name in MODELS}


@dataclass(frozen=True)
class IVRSettings:
    """[ivr]: activation by voice prompts."""

    enabled: bool = True
    number: str = "activate"  # what the bootstrap line's hotline dials
    unknown_phones: bool = False  # bootstrap configs for MACs the registry does not know
    # Require SIP over TLS with a client certificate for the bootstrap account (the MIC): it
    # must chain to the manufacturing trust store (the TVS one) and name SEP<MAC>.
    require_mic: bool = False
    first_digit_timeout: float = 20.0
    inter_digit_timeout: float = 8.0
    answer_delay: float = 0.5  # ringing before the call is answered (CANCEL is possible)
    rtp_address: str = ""  # where RTP listens; default: the advertised address
    max_calls: int = 50

    def validate(self) -> None:
        if not self.number or not all(c.isalnum() or c in "*#+._-" for c in self.number):
            raise SettingError("number", f"{self.number!r} is not a dialable number")
        check_range("first_digit_timeout", self.first_digit_timeout, 1, 600)
        check_range("inter_digit_timeout", self.inter_digit_timeout, 1, 600)
        check_range("answer_delay", self.answer_delay, 0, 30)
        check_range("max_calls", self.max_calls, 1, 10_000)


# --- prompts --------------------------------------------------------------------------------


def load_prompt(name: str, override_dir: Path | None) -> bytes:
    """A prompt as 16-bit 8 kHz mono PCM: ``<override_dir>/<name>.wav`` if present, else ours."""
    path = PACKAGED_PROMPTS / f"{name}.wav"
    if override_dir is not None and (override_dir / f"{name}.wav").is_file():
        path = override_dir / f"{name}.wav"
    with wave.open(str(path), "rb") as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (8000, 1, 2):
            raise ValueError(f"{path}: a prompt must be 8 kHz mono 16-bit PCM WAV")
        return w.readframes(w.getnframes())


class Prompts:
    """Every prompt in both G.711 laws, encoded once at start-up."""

    def __init__(self, override_dir: Path | None = None) -> None:
        pcm = {name: load_prompt(name, override_dir) for name in PROMPTS}
        self._audio = {(n, law): encode(p, law) for n, p in pcm.items() for law in ("PCMU", "PCMA")}

    def get(self, name: str, law: str) -> bytes:
        return self._audio[(name, law)]


# --- bootstrap accounts ---------------------------------------------------------------------


def load_key(path: Path) -> bytes:
    """The bootstrap-secret key: made once (0600), then read at every start."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(32))
    data = path.read_bytes()
    if len(data) != 32:
        raise ValueError(f"{path}: expected 32 bytes")
    return data


@dataclass(frozen=True)
class BootstrapAccount:
    mac: str  # upper-case hex
    user: str
    password: str
    device: Device | None  # the SEP record waiting for its code; None: the BAT case


class BootstrapAccounts:
    """Who may activate by voice, and the account each such MAC gets."""

    def __init__(self, registry: Registry, key: bytes, settings: IVRSettings) -> None:
        self._registry = registry
        self._key = key
        self.settings = settings
        # For ``require_mic``: the TVS handler's manufacturing trust and its SHA-1 rule, and
        # the clock (the service sets them; no trust: every MIC is refused).
        self.trust: Callable[[], ManufacturingTrust] | None = None
        self.allow_sha1 = False
        self.now: Callable[[], float] = lambda: 0.0

    def for_mac(self, mac: str) -> BootstrapAccount | None:
        mac = mac.upper()
        device = self._registry.find("SEP" + mac)
        if device is not None:
            code = self._registry.outstanding_code(device)
            if (
                device.state is not DeviceState.AWAITING_ACTIVATION
                or code is None
                or self._registry.onboarding_of(device) is not Onboarding.IVR
            ):
                return None
            return self._account(mac, code.id, device)
        if self.settings.unknown_phones and self._bat_waiting():
            return self._account(mac, "unknown", None)
        return None

    def _bat_waiting(self) -> bool:
        """A BAT record waits for its code: an unknown phone may claim it by voice."""
        return any(
            device.is_placeholder and self._registry.onboarding_of(device) is Onboarding.IVR
            for device, _ in self._registry.outstanding_codes()
        )

    def _account(self, mac: str, salt: str, device: Device | None) -> BootstrapAccount:
        digest = hmac.new(self._key, f"{mac}:{salt}".encode(), hashlib.sha256).hexdigest()
        return BootstrapAccount(mac, BOOTSTRAP_PREFIX + mac.lower(), digest[:24], device)

    def by_user(self, user: str) -> BootstrapAccount | None:
        if not user.lower().startswith(BOOTSTRAP_PREFIX):
            return None
        mac = user[len(BOOTSTRAP_PREFIX) :]
        if len(mac) != 12 or any(c not in "0123456789abcdefABCDEF" for c in mac):
            return None
        return self.for_mac(mac)

    def mic_refusal(self, account: BootstrapAccount, certs: tuple[Any, ...]) -> str | None:
        """Why the client certificate does not prove the account's MAC, or None if it does:
        it must chain to the manufacturing trust and name ``SEP<MAC>`` (CN CP-<model>-SEP<MAC>)."""
        if not certs:
            return "a client certificate over TLS is required"
        if self.trust is None:
            return "no manufacturing trust store to check the certificate against"
        when = dt.datetime.fromtimestamp(self.now(), dt.UTC)
        verdict = self.trust().check(certs[0], certs[1:], when, allow_sha1=self.allow_sha1)
        if not verdict.ok:
            return f"client certificate refused: {verdict.reason}"
        if not (verdict.common_name or "").upper().endswith("SEP" + account.mac):
            return f"client certificate names {verdict.common_name!r}, not SEP{account.mac}"
        return None

    def config_line(self, account: BootstrapAccount) -> Line:
        return Line(account.user, "Activate", account.user, account.password)


class BootstrapPolicy:
    """The registrar's policy: bootstrap accounts here, every other REGISTER to ``inner``."""

    def __init__(
        self, inner: RegistrationPolicy, accounts: BootstrapAccounts, *, require_mic: bool = False
    ) -> None:
        self.inner = inner
        self.accounts = accounts
        # True: the MIC is required whatever ``ivr.require_mic`` says (the edge's listener).
        self.require_mic = require_mic

    def decide(self, request: RegistrationRequest) -> PolicyDecision | Deferred[PolicyDecision]:
        if not request.aor_user.lower().startswith(BOOTSTRAP_PREFIX):
            return self.inner.decide(request)
        account = self.accounts.by_user(request.aor_user)
        if account is None:
            return PolicyDecision.refuse(403, "no bootstrap account (nothing to activate)")
        if request.mac is not None and request.mac.upper() != account.mac:
            return PolicyDecision.refuse(403, "+sip.instance MAC does not match the account")
        if self.require_mic or self.accounts.settings.require_mic:
            why = self.accounts.mic_refusal(account, request.client_certs)
            if request.transport != "tls" or why is not None:
                return PolicyDecision.refuse(403, why or "SIP over TLS is required")
        return PolicyDecision.allow(account.user, (account.user, account.password))


# --- the call -------------------------------------------------------------------------------


class RTPEndpoint(DatagramProtocol):
    """One call's RTP socket: sends the prompts, reads digits from the caller's address only."""

    def __init__(self, on_packet: Callable[[bytes], None]) -> None:
        self.on_packet = on_packet
        self.remote: tuple[str, int] | None = None
        self.ignored = 0  # datagrams from any other address

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self.remote is None or (addr[0], addr[1]) != self.remote:
            self.ignored += 1
            return
        self.on_packet(datagram)

    def send(self, data: bytes) -> None:
        if self.transport is not None and self.remote is not None:
            # An OSError is an ICMP error on an earlier datagram: the stream goes on.
            with contextlib.suppress(OSError):
                self.transport.write(data, self.remote)


class IVRCall:
    """One activation call: prompt, digits, the redemption, the goodbye."""

    def __init__(self, service: IVRService, dialog: Dialog, endpoint: RTPEndpoint, port: Any):
        self.service = service
        self.dialog = dialog
        self.endpoint = endpoint
        self.port = port
        agreement = dialog.call.agreement
        self.law = agreement.codec
        self.sender = RTPSender(endpoint.send, service.reactor, agreement.codec,
                                agreement.payload_type)  # fmt: skip
        self.decoder = EventDecoder(self.key, service.reactor.seconds)
        self.event_pt = agreement.event_payload_type
        self.digits: list[str] = []
        self.overflow = False
        self.busy = False  # a redemption is on its way, or the call is ending
        self.timer: IDelayedCall | None = None
        self.attempts = 0
        self.ended = False

    def start(self) -> None:
        self.sender.start()
        self.say("enter-code", self._wait_first)

    def say(self, prompt: str, then: Callable[[], None] | None = None) -> None:
        self.sender.play(self.service.prompts.get(prompt, self.law), then)

    def rtp(self, data: bytes) -> None:
        if self.event_pt is None:
            return
        try:
            packet = parse_rtp(data)
        except RTPError:
            return
        if packet.payload_type == self.event_pt:
            self.decoder.feed(packet)

    def key(self, digit: str) -> None:
        if self.ended or self.busy:
            return
        self.sender.interrupt()
        if digit == "*":
            self.digits.clear()
            self.overflow = False
        elif digit == "#":
            self._submit()
            return
        elif len(self.digits) < MAX_DIGITS:
            self.digits.append(digit)
        else:
            self.overflow = True
        self._arm(self.service.settings.inter_digit_timeout)

    def _wait_first(self) -> None:
        if not self.digits and not self.busy:
            self._arm(self.service.settings.first_digit_timeout)

    def _arm(self, delay: float) -> None:
        self._disarm()
        self.timer = self.service.reactor.callLater(delay, self._timed_out)

    def _disarm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        if self.digits:
            self._submit()  # the caller stopped keying: take what was keyed
        else:
            self.service.audit(self, "timeout", "no digits")
            self.goodbye("rejected")

    def _submit(self) -> None:
        self._disarm()
        code, overflow = "".join(self.digits), self.overflow
        self.digits.clear()
        self.overflow = False
        self.busy = True
        self.attempts += 1
        self.service.check(self, code, overflow).addCallback(self._checked)

    def _checked(self, verdict: str) -> None:
        if self.ended:
            return
        if verdict == "activated":
            self.say("accepted", lambda: self.service.activated(self))
            return
        if verdict == "locked":
            self.goodbye("too-many")
            return
        self.busy = False
        self.say("rejected", lambda: self.say("enter-code", self._wait_first))

    def goodbye(self, prompt: str) -> None:
        self.busy = True
        self._disarm()
        self.say(prompt, lambda: self.service.dialogs.hangup(self.dialog, prompt))

    def close(self) -> None:
        self.ended = True
        self._disarm()
        self.sender.stop()
        self.port.stopListening()


class IVRService:
    """The :class:`~callboard.protocols.sip.dialog.CallHandler` of the activation number."""

    def __init__(
        self,
        registry: Registry,
        registrar: Registrar,
        accounts: BootstrapAccounts,
        prompts: Prompts,
        reactor: Any,
        *,
        rtp_address: str,
        device_throttle: ThrottleStore,
        source_throttle: ThrottleStore,
    ) -> None:
        self.registry = registry
        self.registrar = registrar
        self.accounts = accounts
        self.settings = accounts.settings
        self.prompts = prompts
        self.reactor = reactor
        self.rtp_address = rtp_address
        self.device_throttle = device_throttle
        self.source_throttle = source_throttle
        self.dialogs = DialogServer(
            self,
            reactor,
            answer_delay=self.settings.answer_delay,
            max_calls=self.settings.max_calls,
        )
        self.calls: dict[str, IVRCall] = {}  # by Call-ID
        self._pending: dict[str, dict[str, Any]] = {}  # accepted, not yet ACKed: the media
        self.counters = {"calls": 0, "activated": 0, "rejected": 0, "locked": 0}
        # (Call-ID, source address) of calls taken through the edge (daemon/edge/sip.py):
        # their redemption is remote, so the device (or BAT record) must allow it.
        self.remote_calls: set[tuple[str, str]] = set()

    # -- CallHandler -----------------------------------------------------------------------

    def accept(self, call: IncomingCall) -> MediaAddress:
        account = self.accounts.by_user(call.caller_user or "")
        if account is None:
            raise CallRefused(403, "calls are taken from bootstrap accounts only")
        if (call.callee_user or "") != self.settings.number:
            raise CallRefused(403, "a bootstrap account may call the activation number only")
        binding = self._binding(account, call.source.address)
        if binding is None:
            raise CallRefused(403, "register the bootstrap account first (from this address)")
        if self.settings.require_mic:
            why = self.accounts.mic_refusal(account, call.source.client_certs)
            if call.source.transport != "tls" or why is not None:
                raise CallRefused(403, why or "SIP over TLS is required")
        endpoint = RTPEndpoint(lambda data: None)
        endpoint.remote = (call.agreement.remote_host, call.agreement.remote_port)
        port = self.reactor.listenUDP(0, endpoint, interface=self.rtp_address)
        self._pending[call.call_id] = {"endpoint": endpoint, "port": port}
        return MediaAddress(self.rtp_address, port.getHost().port)

    def answered(self, dialog: Dialog) -> None:
        pending = self._pending.pop(dialog.call_id, None)
        if pending is None:
            self.dialogs.hangup(dialog, "no media")
            return
        call = IVRCall(self, dialog, pending["endpoint"], pending["port"])
        account = self.accounts.by_user(dialog.call.caller_user or "")
        binding = self._binding(account, dialog.call.source.address) if account else None
        # The NOTIFYs after success name the phone's registration, as Cisco's service-control
        # body does (and a tool that maps messages by Call-ID can follow them).
        dialog.extra["register_call_id"] = binding.call_id if binding else os.urandom(12).hex()
        pending["endpoint"].on_packet = call.rtp
        self.calls[dialog.call_id] = call
        self.counters["calls"] += 1
        log.info("activation call answered", account=dialog.call.caller_user,
                 source=dialog.call.source.address, codec=call.law)  # fmt: skip
        call.start()

    def digit(self, dialog: Dialog, digit: str) -> None:
        call = self.calls.get(dialog.call_id)
        if call is not None:
            call.key(digit)

    def ended(self, dialog: Dialog, why: str) -> None:
        self.remote_calls.discard((dialog.call_id, dialog.call.source.address))
        pending = self._pending.pop(dialog.call_id, None)
        if pending is not None:
            pending["port"].stopListening()
        call = self.calls.pop(dialog.call_id, None)
        if call is not None:
            if call.digits:
                self.audit(call, "abandoned", why, digits=len(call.digits))
            call.close()
        log.info("activation call ended", call_id=dialog.call_id, why=why)

    # -- checking a code ---------------------------------------------------------------------

    def check(self, call: IVRCall, code: str, overflow: bool) -> Deferred[str]:
        """'activated', 'rejected' or 'locked'; the throttle as TVS applies it."""
        now = self.reactor.seconds()
        account = self.accounts.by_user(call.dialog.call.caller_user or "")
        source = call.dialog.call.source.host
        src_key, dev_key = f"src:{source}", f"dev:SEP{account.mac if account else '?'}"
        if max(self.source_throttle.locked_for(src_key, now),
               self.device_throttle.locked_for(dev_key, now)) > 0:  # fmt: skip
            self.counters["locked"] += 1
            self.audit(call, "locked", "too many failed attempts", digits=len(code))
            return succeed("locked")
        if account is None:
            return succeed(
                self._refused(call, src_key, dev_key, now, "bootstrap account gone", code)
            )
        model = self._model(account, call)
        if overflow or len(code) != CODE_DIGITS:
            why = f"{len(code)}{'+' if overflow else ''} digits keyed"
            return succeed(self._refused(call, src_key, dev_key, now, why, code))
        if model is None:
            return succeed(self._refused(call, src_key, dev_key, now, "phone model unknown", code))
        mic = self._proven_mic(account, call.dialog.call.source)
        remote = (call.dialog.call_id, call.dialog.call.source.address) in self.remote_calls
        d = self.registry.redeem(
            mac=account.mac, model=model, code=code, mic_sha256=mic, remote=remote
        )

        def outcome(result: Redeemed) -> str:
            if result.ok and result.device is not None:
                self.counters["activated"] += 1
                call.dialog.extra["device"] = result.device.name
                call.dialog.extra["model"] = model
                self.registrar.drop_device(account.user)
                self.audit(call, "activated", result.reason, digits=len(code),
                           device=result.device.name)  # fmt: skip
                return "activated"
            return self._refused(call, src_key, dev_key, now, result.reason, code)

        def failed(failure: Any) -> str:
            log.error("activation by voice failed", error_type=type(failure.value).__name__)
            return "rejected"

        return d.addCallback(outcome).addErrback(failed)

    def _proven_mic(self, account: BootstrapAccount, source: Any) -> str:
        """What the redemption records: the SHA-256 of the call's client certificate when it
        is a MIC proving the account's MAC (SIP over TLS: the edge, or ``require_mic``), so
        the device is bound to that certificate as after TVS; else :data:`MIC_MARK`."""
        fingerprint = source.client_cert_fingerprint
        if source.transport != "tls" or not fingerprint or not source.client_certs:
            return MIC_MARK
        return MIC_MARK if self.accounts.mic_refusal(account, source.client_certs) else fingerprint

    def _refused(
        self, call: IVRCall, src_key: str, dev_key: str, now: float, why: str, code: str
    ) -> str:
        self.source_throttle.failure(src_key, now)
        self.device_throttle.failure(dev_key, now)
        locked = max(self.source_throttle.locked_for(src_key, now),
                     self.device_throttle.locked_for(dev_key, now)) > 0  # fmt: skip
        self.counters["rejected"] += 1
        self.audit(call, "rejected", why, digits=len(code), locked=locked)
        return "locked" if locked else "rejected"

    def _model(self, account: Any, call: IVRCall) -> str | None:
        """A SEP record's own model; for the BAT case the one the phone's REGISTER gave."""
        if account.device is not None:
            return str(account.device.model)
        binding = self._binding(account, call.dialog.call.source.address)
        model_id = binding.model_id if binding is not None else None
        call.dialog.extra["cisco_model_id"] = model_id
        if model_id:
            for name, info in MODELS.items():
                if info.model_id == model_id:
                    return name
        agent = (binding.user_agent if binding is not None else None) or ""
        agent = agent or (call.dialog.call.user_agent or "")
        for prefix, name in USER_AGENT_MODELS.items():
            if agent.startswith(prefix):
                return name
        return None

    def _binding(self, account: BootstrapAccount, source: str) -> Any:
        for b in self.registrar.bindings_for_device(account.user):
            if b.source == source:
                return b
        return None

    # -- after success ------------------------------------------------------------------------

    def activated(self, call: IVRCall) -> None:
        """The confirmation has played: hang up, then tell the phone to fetch its config."""
        dialog = call.dialog
        self.dialogs.hangup(dialog, "activated")
        headers = Headers()
        target = dialog.remote_target
        headers.add("From", f"<sip:callboard@{_host_of(dialog)}>;tag={os.urandom(4).hex()}")
        headers.add("To", f"<{target}>")
        register_call_id = str(dialog.extra["register_call_id"])
        headers.add("Call-ID", register_call_id)
        headers.add("CSeq", f"{_notify_cseq()} NOTIFY")
        headers.add("Event", "check-sync")
        headers.add("Subscription-State", "terminated")
        headers.add("Content-Length", "0")
        self.dialogs.send_request("NOTIFY", target, dialog.call.source, headers, own=dialog)
        if _is_cisco(call):
            cisco = Headers()
            cisco.add("From", f"<sip:callboard@{_host_of(dialog)}>;tag={os.urandom(4).hex()}")
            cisco.add("To", f"<{target}>")
            cisco.add("Call-ID", register_call_id)
            cisco.add("CSeq", f"{_notify_cseq()} NOTIFY")
            cisco.add("Event", "service-control")
            cisco.add("Subscription-State", "active")
            cisco.add("Content-Type", "text/plain")
            body = (
                f"action=restart\r\nRegisterCallId={{{register_call_id}}}\r\n"
                "ConfigVersionStamp={}\r\nDialplanVersionStamp={}\r\nSoftkeyVersionStamp={}\r\n"
            ).encode()
            self.dialogs.send_request("NOTIFY", target, dialog.call.source, cisco, body,
                                      own=dialog)  # fmt: skip

    def audit(self, call: IVRCall, outcome: str, why: str, **fields: Any) -> None:
        """One line per attempt, as TVS logs them; the digits' count, never the digits."""
        log.info(
            "activation by voice",
            outcome=outcome,
            reason=why,
            account=call.dialog.call.caller_user,
            source=call.dialog.call.source.address,
            attempt=call.attempts,
            **fields,
        )

    def stop(self) -> None:
        self.dialogs.stop()


_notify_counter = itertools.count(1000)


def _notify_cseq() -> int:
    return next(_notify_counter)


def _host_of(dialog: Dialog) -> str:
    uri = parse_uri(dialog.invite.uri)
    return f"{uri.host}:{uri.port}" if uri.port else uri.host


def _is_cisco(call: IVRCall) -> bool:
    """Cisco firmware: its User-Agent says so, or its REGISTER carried Cisco's model id."""
    return (call.dialog.call.user_agent or "").startswith("Cisco") or bool(
        call.dialog.extra.get("cisco_model_id")
    )


def hotline_dial_template(number: str) -> bytes:
    """The hotline as a Cisco dial template: an empty pattern with a timeout of 0 dials
    ``rewrite`` as soon as the handset is lifted (a PLAR line; usecallmanager.nz "Dial
    Templates", "Hotline"). Cisco firmware dials digits: give ``ivr.number`` as digits for
    Cisco phones; other SIP phones are set up by hand or their own provisioning (README)."""
    stamp = hashlib.sha256(number.encode()).hexdigest()[:32]
    return (
        "<dialTemplate>\n"
        f"  <versionStamp>{stamp}</versionStamp>\n"
        f'  <TEMPLATE match="" timeout="0" rewrite="{_xml_attr(number)}" />\n'
        "</dialTemplate>\n"
    ).encode()


def _xml_attr(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def with_hotline(config: bytes, dial_template: str = HOTLINE_FILE) -> bytes:
    """``config`` with its ``<dialTemplate>`` naming ``dial_template``: the site's replaced,
    or one added at the end of ``<sipProfile>`` when the template has none (any template,
    the packaged one or a site's, gets the hotline)."""
    element = f"<dialTemplate>{dial_template}</dialTemplate>".encode()
    replaced, count = re.subn(rb"<dialTemplate>[^<]*</dialTemplate>", element, config, count=1)
    if count:
        return replaced
    return config.replace(b"</sipProfile>", b"  " + element + b"\n  </sipProfile>", 1)


def bootstrap_config(
    render: Callable[[Device], bytes], accounts: BootstrapAccounts, mac: str
) -> bytes | None:
    """The bootstrap config of a MAC that may activate by voice: one "Activate" line, and
    the hotline dial template (:data:`HOTLINE_FILE`) that dials ``ivr.number`` off-hook."""
    account = accounts.for_mac(mac)
    if account is None:
        return None
    device = Device(
        id=f"{BOOTSTRAP_PREFIX}{account.mac}:{account.password[:8]}",
        name="SEP" + account.mac,
        model=account.device.model if account.device is not None else "",
        description=f"Activate: dial {accounts.settings.number}",
        lines=(accounts.config_line(account),),
    )
    return with_hotline(render(device))


class IVRLifecycle(Service):
    """Stopping the daemon hangs up the calls in progress and stops their timers."""

    def __init__(self, ivr: IVRService) -> None:
        self.ivr = ivr

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self.ivr.stop()
