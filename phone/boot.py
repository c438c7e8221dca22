"""The emulated phone's boot: trust list, config, activation code, config again, REGISTER.

Two halves. :class:`BootSequence` is the phone's logic as plain code: it asks for actions
(:class:`Fetch`, :class:`Activate`, :class:`Sleep`, :class:`Register`) and is fed their
results, so unit tests run every branch without a socket. :func:`boot_phone` is the Twisted
driver that performs those actions (HTTP 6970 first, TFTP as fallback, TVS over TLS with the
MIC, the SIP user agent) and fires with a :class:`BootResult`; thousands run in one reactor.

The order follows the research notes (cisco-protocols.md §2, §9, §13):
``CTLSEP<MAC>.tlv`` → ``ITLSEP<MAC>.tlv`` (else ``ITLFile.tlv``: verify, pin the TVS
certificate) → ``SEP<MAC>.cnf.xml`` (else ``XMLDefault.cnf.xml``: does my model need a code?)
→ ACTIVATE at the TVS named there → ``SEP<MAC>.cnf.xml`` → REGISTER.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Literal
from xml.etree import ElementTree as ET

from callboard.protocols import tls
from callboard.protocols.models import MODEL_IDS, model_key, normalise_mac
from callboard.protocols.tvs import client as tvs_client
from callboard.protocols.tvs.codec import (
    ActivateResponse,
    ActivateStatus,
    DeviceName,
    normalise_activation_code,
)
from callboard.protocols.tvs.itl import ITLError, Role, parse_itl
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import defer

from . import tftp_client
from .http_client import HttpFetcher

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
Transport = Literal["auto", "http", "tftp"]

DEFAULT_LOADS: dict[str, str] = {"78": "sip78xx.14-2-1", "88": "sip88xx.14-2-1"}

_MODEL_RE = re.compile(r"^[0-9A-Z]{3,8}$")


def normalise_model(raw: str) -> str:
    """``CP-8841``, ``Cisco 8841``, ``8841`` → ``8841``."""
    model = model_key(raw)
    if not _MODEL_RE.match(model):
        raise ValueError(f"model {raw!r} is not like 8841 or 8865NR")
    return model


# Identity and options -------------------------------------------------------------------


@dataclass(frozen=True)
class PhoneIdentity:
    """What a phone is: MAC, model, MIC (and, like a user at the keypad, maybe a code)."""

    mac: str
    model: str
    mic_cert: x509.Certificate
    mic_key: PrivateKey = field(repr=False)
    code: str | None = field(default=None, repr=False)
    mic_chain: tuple[x509.Certificate, ...] = ()
    load: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", normalise_mac(self.mac))
        object.__setattr__(self, "model", normalise_model(self.model))
        if self.code is not None:
            object.__setattr__(self, "code", normalise_activation_code(self.code))
        if not self.load:
            object.__setattr__(self, "load", DEFAULT_LOADS.get(self.model[:2], "sip.emulated"))

    @property
    def sep_name(self) -> str:
        return f"SEP{self.mac}"

    @property
    def device_name(self) -> str:
        """The MIC's CN and the TVS device name: ``CP-<model>-SEP<MAC>``."""
        return f"CP-{self.model}-SEP{self.mac}"

    @property
    def product(self) -> str:
        return f"Cisco {self.model}"

    @property
    def model_id(self) -> str:
        return MODEL_IDS.get(self.model, "")


@dataclass(frozen=True)
class BootOptions:
    """How the phone behaves on the network; defaults are a real phone's."""

    transport: Transport = "auto"  # auto = HTTP 6970 first, then TFTP, per server
    tftp_port: int = 69
    http_port: int = 6970
    timeout: float = 10.0  # per HTTP request, per TVS exchange; TFTP retransmits within it
    tftp_retries: int = 4
    tftp_blksize: int = tftp_client.DEFAULT_BLKSIZE
    config_retries: int = 5  # SEP<MAC>.cnf.xml polls after activation
    config_retry_delay: float = 0.5
    register: bool | None = None  # None: register when the config names a SIP server
    unregister: bool = False  # send Expires: 0 after registering (a clean shutdown)
    allow_tofu: bool = False  # send a code to a TVS not pinned by an ITL (labs only)


# Parsed configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class TVSMember:
    address: str
    port: int
    priority: int = 0


@dataclass(frozen=True)
class CallManager:
    address: str
    sip_port: int
    secured_sip_port: int
    priority: int = 0


@dataclass(frozen=True)
class LineConfig:
    button: int
    name: str
    display_name: str
    auth_name: str
    auth_password: str = field(repr=False)


@dataclass(frozen=True)
class DefaultConfig:
    """What the phone reads from ``XMLDefault.cnf.xml``."""

    call_managers: tuple[CallManager, ...]
    tvs_members: tuple[TVSMember, ...]
    activation_models: tuple[tuple[str, str], ...]  # (model id, "Cisco 8841")
    activation_devices: frozenset[str] = frozenset()  # "SEP<MAC>" asked for a code one by one

    def requires_code(self, product: str, device_name: str = "") -> bool:
        """My model is listed, or I am (a per-device requirement on an auto-registering model)."""
        if device_name.upper() in self.activation_devices:
            return True
        wanted = product.casefold()
        return any(name.casefold() == wanted for _id, name in self.activation_models)


@dataclass(frozen=True)
class DeviceConfig:
    """What the phone reads from its own ``SEP<MAC>.cnf.xml``."""

    call_managers: tuple[CallManager, ...]
    tvs_members: tuple[TVSMember, ...]
    lines: tuple[LineConfig, ...]
    transport: str  # tcp, udp or tls (transportLayerProtocol 1/2/3)
    load: str
    version_stamp: str

    @property
    def sip_server(self) -> CallManager | None:
        """The first call manager with a usable SIP port, or None."""
        for cm in self.call_managers:
            port = cm.secured_sip_port if self.transport == "tls" else cm.sip_port
            if cm.address and port > 0:
                return cm
        return None


class ConfigError(ValueError):
    """A config file that is not the XML the phone expects."""


def _int(text: str | None, default: int = 0) -> int:
    try:
        return int((text or "").strip())
    except ValueError:
        return default


def _parse_xml(data: bytes, root_tag: str) -> ET.Element:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ConfigError(f"not XML: {exc}") from None
    if root.tag != root_tag:
        raise ConfigError(f"root element is <{root.tag}>, expected <{root_tag}>")
    return root


def _call_managers(members: list[ET.Element]) -> tuple[CallManager, ...]:
    out = [
        CallManager(
            address=(m.findtext("callManager/processNodeName") or "").strip(),
            sip_port=_int(m.findtext("callManager/ports/sipPort")),
            secured_sip_port=_int(m.findtext("callManager/ports/securedSipPort")),
            priority=_int(m.get("priority")),
        )
        for m in members
    ]
    return tuple(sorted(out, key=lambda c: c.priority))


def _tvs_members(root: ET.Element) -> tuple[TVSMember, ...]:
    out = [
        TVSMember(
            address=(m.findtext("address") or "").strip(),
            port=_int(m.findtext("port"), 2445),
            priority=_int(m.get("priority")),
        )
        for m in root.findall("TVS/members/member")
    ]
    return tuple(sorted((m for m in out if m.address), key=lambda m: m.priority))


def parse_default_config(data: bytes) -> DefaultConfig:
    root = _parse_xml(data, "Default")
    models = tuple(
        (m.get("id", ""), m.get("name", "")) for m in root.findall("activationCodeOnboarding/model")
    )
    devices = frozenset(
        d.get("name", "").upper() for d in root.findall("activationCodeOnboarding/device")
    )
    return DefaultConfig(
        call_managers=_call_managers(root.findall("callManagerGroup/members/member")),
        tvs_members=_tvs_members(root),
        activation_models=models,
        activation_devices=devices,
    )


_TRANSPORTS = {"1": "tcp", "2": "udp", "3": "tls"}


def parse_device_config(data: bytes) -> DeviceConfig:
    root = _parse_xml(data, "device")
    lines = tuple(
        LineConfig(
            button=_int(line.get("button"), i),
            name=(line.findtext("name") or "").strip(),
            display_name=(line.findtext("displayName") or "").strip(),
            auth_name=(line.findtext("authName") or "").strip(),
            auth_password=line.findtext("authPassword") or "",
        )
        for i, line in enumerate(root.findall("sipProfile/sipLines/line"), start=1)
        if (line.findtext("featureID") or "9").strip() == "9"
    )
    return DeviceConfig(
        call_managers=_call_managers(root.findall("devicePool/callManagerGroup/members/member")),
        tvs_members=_tvs_members(root),
        lines=lines,
        transport=_TRANSPORTS.get((root.findtext("transportLayerProtocol") or "1").strip(), "tcp"),
        load=(root.findtext("loadInformation") or "").strip(),
        version_stamp=(root.findtext("versionStamp") or "").strip(),
    )


# Actions and their results ----------------------------------------------------------------


@dataclass(frozen=True)
class Fetch:
    name: str


@dataclass(frozen=True)
class Activate:
    members: tuple[TVSMember, ...]
    pinned_der: bytes | None


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Register:
    config: DeviceConfig


Action = Fetch | Activate | Sleep | Register


@dataclass(frozen=True)
class Fetched:
    """A server answered: ``data`` is None for "no such file" (404 / TFTP error 1)."""

    name: str
    data: bytes | None
    via: str = "http"  # http or tftp
    server: str = ""


@dataclass(frozen=True)
class FetchFailed:
    """No server answered over any allowed transport."""

    name: str
    reason: str


@dataclass(frozen=True)
class Activated:
    """The TVS answered (``response``) or could not be reached/trusted (``error``)."""

    response: ActivateResponse | None
    member: str = ""
    error: str | None = None
    untrusted: bool = False


@dataclass(frozen=True)
class Slept:
    pass


@dataclass(frozen=True)
class Registered:
    ok: bool
    status: int | None
    detail: str


Feed = Fetched | FetchFailed | Activated | Slept | Registered


class Outcome(Enum):
    """How a boot ended; each has its own exit code (see ``callboard phone boot --help``)."""

    ONBOARDED = 0
    ERROR = 1
    CODE_REQUIRED = 3
    REJECTED = 4
    CERTIFICATE_REFUSED = 5
    UNTRUSTED = 6
    UNREACHABLE = 7
    NOT_PROVISIONED = 8
    REGISTRATION_FAILED = 9


@dataclass(frozen=True)
class BootResult:
    outcome: Outcome
    reason: str
    device_name: str
    steps: tuple[str, ...] = ()
    config: DeviceConfig | None = None
    activation: ActivateResponse | None = None
    registration_status: int | None = None
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.ONBOARDED

    @property
    def exit_code(self) -> int:
        return self.outcome.value


# The logic --------------------------------------------------------------------------------


class BootSequence:
    """The phone's boot as plain logic: :meth:`start`, then :meth:`feed` each action's result.

    Each returns the next :class:`Action`, or the final :class:`BootResult`. Every step is also
    reported as one readable line through ``emit`` (and kept in ``steps``).
    """

    def __init__(
        self,
        identity: PhoneIdentity,
        options: BootOptions | None = None,
        emit: Callable[[str], None] | None = None,
    ) -> None:
        self.identity = identity
        self.options = options or BootOptions()
        self.steps: list[str] = []
        self._emit = emit
        self._gen = self._run()
        self._via: tuple[str, str] | None = None
        self.pinned_der: bytes | None = None
        self.result: BootResult | None = None

    def start(self) -> Action | BootResult:
        return self._advance(None)

    def feed(self, result: Feed) -> Action | BootResult:
        return self._advance(result)

    def _advance(self, value: Feed | None) -> Action | BootResult:
        if self.result is not None:
            return self.result
        try:
            return self._gen.send(value)  # type: ignore[arg-type]
        except StopIteration as stop:
            result: BootResult = stop.value
            self.result = replace(result, steps=tuple(self.steps))
            return self.result

    def note(self, tag: str, text: str) -> None:
        line = f"[{tag}] {text}"
        self.steps.append(line)
        if self._emit is not None:
            self._emit(line)

    def _done(self, outcome: Outcome, reason: str, **extra: Any) -> BootResult:
        tag = "ok" if outcome is Outcome.ONBOARDED else "fail"
        self.note(tag, reason)
        return BootResult(outcome, reason, self.identity.sep_name, **extra)

    def _fetch(self, name: str) -> Generator[Action, Feed, Fetched | FetchFailed]:
        got = yield Fetch(name)
        if not isinstance(got, Fetched | FetchFailed):
            raise TypeError(f"expected a fetch result for {name}, got {got!r}")
        if isinstance(got, FetchFailed):
            return got
        if (got.via, got.server) != self._via:
            self._via = (got.via, got.server)
            self.note("boot", f"provisioning server {got.server} answers over {got.via}")
        return got

    def _run(self) -> Generator[Action, Feed, BootResult]:
        me = self.identity
        opts = self.options
        self.note("boot", f"{me.device_name} powering up (model {me.product})")

        # 1. Trust lists. A CTL is only noted: Callboard runs no mixed-mode security.
        got = yield from self._fetch(f"CTLSEP{me.mac}.tlv")
        if isinstance(got, FetchFailed):
            return self._done(Outcome.UNREACHABLE, f"no provisioning server answered: {got.reason}")
        self.note(got.via, f"{got.name}: {_size(got.data)}")

        itl = yield from self._fetch(f"ITLSEP{me.mac}.tlv")
        if isinstance(itl, Fetched) and itl.data is None:
            self.note(itl.via, f"{itl.name}: not found")
            itl = yield from self._fetch("ITLFile.tlv")
        if isinstance(itl, FetchFailed):
            return self._done(Outcome.UNREACHABLE, f"provisioning server lost: {itl.reason}")
        if itl.data is None:
            self.note(itl.via, f"{itl.name}: not found (no trust list: nothing pinned)")
        else:
            try:
                parsed = parse_itl(itl.data, verify=True)
            except ITLError as exc:
                self.note(itl.via, f"{itl.name}: {len(itl.data)} bytes, signature BAD")
                return self._done(Outcome.UNTRUSTED, f"{itl.name} refused: {exc}")
            tvs_certs = parsed.certificates(Role.TVS)
            if tvs_certs:
                self.pinned_der = tvs_certs[0].public_bytes(serialization.Encoding.DER)
                pinned = "TVS pinned"
            else:
                pinned = "no TVS certificate in it"
            self.note(itl.via, f"{itl.name}: {len(itl.data)} bytes, signature ok, {pinned}")

        # 2. My own config, else the default one.
        sep = yield from self._fetch(f"{me.sep_name}.cnf.xml")
        if isinstance(sep, FetchFailed):
            return self._done(Outcome.UNREACHABLE, f"provisioning server lost: {sep.reason}")
        activation: ActivateResponse | None = None
        if sep.data is None:
            self.note(sep.via, f"{sep.name}: not found")
            dflt = yield from self._fetch("XMLDefault.cnf.xml")
            if isinstance(dflt, FetchFailed):
                return self._done(Outcome.UNREACHABLE, f"provisioning server lost: {dflt.reason}")
            if dflt.data is None:
                return self._done(
                    Outcome.NOT_PROVISIONED, "neither SEP config nor XMLDefault.cnf.xml is served"
                )
            try:
                default = parse_default_config(dflt.data)
            except ConfigError as exc:
                return self._done(Outcome.ERROR, f"XMLDefault.cnf.xml unusable: {exc}")
            needs = default.requires_code(me.product, me.sep_name)
            self.note(
                dflt.via,
                f"{dflt.name}: {len(dflt.data)} bytes, {me.product} "
                + ("requires an activation code" if needs else "not listed: autoregistration"),
            )

            if needs:
                if me.code is None:
                    return self._done(
                        Outcome.CODE_REQUIRED,
                        f"activation code required for {me.sep_name}: enter it with --code",
                    )
                if not default.tvs_members:
                    return self._done(Outcome.ERROR, "XMLDefault.cnf.xml names no TVS server")
                if self.pinned_der is None and not opts.allow_tofu:
                    return self._done(
                        Outcome.UNTRUSTED,
                        "no TVS certificate pinned from an ITL: the code is not sent "
                        "to an unauthenticated server",
                    )
                self.note("tvs", "code entered; activating with the MIC " + me.device_name)
                answer = yield Activate(default.tvs_members, self.pinned_der)
                if not isinstance(answer, Activated):
                    raise TypeError(f"expected an activation result, got {answer!r}")
                if answer.response is None:
                    outcome = Outcome.UNTRUSTED if answer.untrusted else Outcome.UNREACHABLE
                    return self._done(outcome, f"TVS: {answer.error}")
                activation = answer.response
                status = _status_name(activation.status)
                self.note(
                    "tvs",
                    f"{answer.member}: status {activation.status} {status}: {activation.reason}",
                )
                if activation.status != ActivateStatus.ACTIVATED:
                    outcome = (
                        Outcome.CERTIFICATE_REFUSED
                        if activation.status == ActivateStatus.CERTIFICATE_NOT_ACCEPTED
                        else Outcome.REJECTED
                    )
                    return self._done(
                        outcome,
                        f"activation refused: status {activation.status} {status}: "
                        f"{activation.reason}",
                        activation=activation,
                    )
                assigned = activation.device_name_assigned
                if assigned and assigned != me.sep_name:
                    self.note("tvs", f"warning: TVS assigned {assigned}, not {me.sep_name}")

            # 3. Poll for my own config: it appears once the registry has the SEP record.
            for attempt in range(1, opts.config_retries + 1):
                sep = yield from self._fetch(f"{me.sep_name}.cnf.xml")
                if isinstance(sep, FetchFailed):
                    return self._done(
                        Outcome.UNREACHABLE, f"provisioning server lost: {sep.reason}"
                    )
                if sep.data is not None:
                    break
                self.note(sep.via, f"{sep.name}: not found (try {attempt}/{opts.config_retries})")
                if attempt < opts.config_retries:
                    yield Sleep(opts.config_retry_delay)
            if sep.data is None:
                why = (
                    "activated, but the server never served"
                    if activation is not None
                    else "autoregistration: the server has no"
                )
                return self._done(
                    Outcome.NOT_PROVISIONED, f"{why} {me.sep_name}.cnf.xml", activation=activation
                )

        try:
            config = parse_device_config(sep.data)
        except ConfigError as exc:
            return self._done(Outcome.ERROR, f"{sep.name} unusable: {exc}", activation=activation)
        self.note(
            sep.via,
            f"{sep.name}: {len(sep.data)} bytes, {len(config.lines)} line(s)"
            + (f", load {config.load}" if config.load else ""),
        )
        for line in config.lines:
            shown = f' "{line.display_name}"' if line.display_name else ""
            self.note("config", f"line {line.button}: {line.name}{shown} (auth {line.auth_name})")

        # 4. REGISTER, when asked to or when the config names a SIP server.
        registration: int | None = None
        server = config.sip_server
        wanted = opts.register if opts.register is not None else server is not None
        if wanted and server is None:
            return self._done(
                Outcome.REGISTRATION_FAILED,
                "asked to register, but the config names no SIP server",
                config=config,
                activation=activation,
            )
        if wanted and not config.lines:
            self.note("sip", "no lines to register")
        elif wanted:
            reg = yield Register(config)
            if not isinstance(reg, Registered):
                raise TypeError(f"expected a registration result, got {reg!r}")
            registration = reg.status
            self.note("sip", reg.detail)
            if not reg.ok:
                return self._done(
                    Outcome.REGISTRATION_FAILED,
                    f"REGISTER failed: {reg.detail}",
                    config=config,
                    activation=activation,
                    registration_status=registration,
                )
        elif opts.register is None:
            self.note("sip", "not registering: the config names no SIP port")

        how = "activated and configured" if activation is not None else "configured"
        return self._done(
            Outcome.ONBOARDED,
            f"{me.sep_name} onboarded ({how}, {len(config.lines)} line(s))",
            config=config,
            activation=activation,
            registration_status=registration,
        )


def _size(data: bytes | None) -> str:
    return "not found" if data is None else f"{len(data)} bytes (no CTL support; ignored)"


def _status_name(status: int) -> str:
    try:
        return ActivateStatus(status).name.lower().replace("_", " ")
    except ValueError:
        return "unknown"


# The Twisted driver -----------------------------------------------------------------------


def _describe(failure: BaseException) -> str:
    text = str(failure) or type(failure).__name__
    if isinstance(failure, defer.TimeoutError | defer.CancelledError):
        return "timed out"
    return text.splitlines()[0][:200]


class _Fetcher:
    """Server and transport selection: option-150 order, first that answers is kept."""

    def __init__(
        self,
        reactor: Any,
        servers: Sequence[str],
        options: BootOptions,
        http: HttpFetcher,
    ) -> None:
        self.reactor = reactor
        self.options = options
        self.http = http
        vias = ("http", "tftp") if options.transport == "auto" else (options.transport,)
        self.candidates = [(server, via) for server in servers for via in vias]
        self.current: tuple[str, str] | None = None

    def _port(self, via: str) -> int:
        return self.options.http_port if via == "http" else self.options.tftp_port

    def _get(self, server: str, via: str, name: str) -> defer.Deferred[bytes | None]:
        opts = self.options
        if via == "http":
            return self.http.fetch(server, opts.http_port, name, timeout=opts.timeout)
        interval = max(0.05, min(1.0, opts.timeout / (opts.tftp_retries + 1)))
        return tftp_client.fetch(
            self.reactor,
            server,
            opts.tftp_port,
            name,
            blksize=opts.tftp_blksize,
            timeout=interval,
            max_retries=opts.tftp_retries,
        )

    async def fetch(self, name: str) -> Fetched | FetchFailed:
        order = list(self.candidates)
        if self.current is not None:
            order.remove(self.current)
            order.insert(0, self.current)
        errors: list[str] = []
        for server, via in order:
            try:
                data = await self._get(server, via, name)
            except Exception as exc:
                errors.append(f"{via} {server}:{self._port(via)}: {_describe(exc)}")
                continue
            self.current = (server, via)
            return Fetched(name, data, via, f"{server}:{self._port(via)}")
        return FetchFailed(name, "; ".join(errors) or "no servers given")


async def _activate(
    reactor: Any, identity: PhoneIdentity, action: Activate, options: BootOptions
) -> Activated:
    assert identity.code is not None
    device = DeviceName(identity.model, identity.mac)
    context = tls.client_options(
        (identity.mic_cert, identity.mic_key), identity.mic_chain
    )
    errors: list[str] = []
    for member in action.members:
        where = f"{member.address}:{member.port}"
        try:
            response = await tvs_client.activate(
                reactor,
                member.address,
                member.port,
                device=device,
                code=identity.code,
                pinned_der=action.pinned_der,
                timeout=options.timeout,
                context=context,
            )
        except tvs_client.PinMismatch:
            return Activated(
                None,
                where,
                f"{where} presented a certificate that is not the ITL's TVS certificate",
                untrusted=True,
            )
        except Exception as exc:
            errors.append(f"{where}: {_describe(exc)}")
            continue
        return Activated(response, where)
    return Activated(None, "", "no TVS server answered: " + "; ".join(errors))


async def _register(
    reactor: Any, identity: PhoneIdentity, config: DeviceConfig, options: BootOptions
) -> Registered:
    from .sip_ua import SipRegistrationError, SipUserAgent

    server = config.sip_server
    assert server is not None
    transport = "tls" if config.transport == "tls" else "tcp"  # the UA speaks TCP and TLS
    port = server.secured_sip_port if transport == "tls" else server.sip_port
    tls_options = None
    if transport == "tls":
        tls_options = tls.client_options(
            (identity.mic_cert, identity.mic_key), identity.mic_chain
        )
    ua = SipUserAgent(
        reactor,
        server.address,
        port,
        transport=transport,
        device_name=identity.sep_name,
        mac=identity.mac,
        model_id=identity.model_id,
        model=identity.model,
        lines=[(ln.name, ln.auth_name or ln.name, ln.auth_password) for ln in config.lines],
        load=config.load or identity.load,
        response_timeout=options.timeout,
        tls_options=tls_options,
    )
    where = f"{transport}:{server.address}:{port}"
    try:
        try:
            result = await ua.register()
        except SipRegistrationError as exc:
            return Registered(False, None, f"REGISTER to {where}: {exc}")
        dns = ", ".join(f"{ln.dn}={ln.status}" for ln in result.lines)
        detail = f"REGISTER to {where}: {dns}" + (" (x-cisco-newreg)" if result.newreg else "")
        if result.ok and options.unregister:
            await ua.unregister()
            detail += "; unregistered"
        return Registered(result.ok, result.status, detail)
    finally:
        await ua.close()


def boot_phone(
    reactor: Any,
    identity: PhoneIdentity,
    servers: Sequence[str],
    options: BootOptions | None = None,
    *,
    http: HttpFetcher | None = None,
    emit: Callable[[str], None] | None = None,
) -> defer.Deferred[BootResult]:
    """Boot one emulated phone against ``servers`` (option-150 order); never errbacks.

    Pass one shared :class:`HttpFetcher` when booting many phones; without it the phone makes
    its own and closes it at the end. ``emit`` receives each step line as it happens.
    """
    opts = options or BootOptions()
    own_http = http is None
    fetcher_http = http if http is not None else HttpFetcher(reactor, connect_timeout=opts.timeout)
    fetcher = _Fetcher(reactor, servers, opts, fetcher_http)
    sequence = BootSequence(identity, opts, emit)
    started = time.monotonic()

    async def run() -> BootResult:
        step = sequence.start()
        try:
            while not isinstance(step, BootResult):
                feed: Feed
                if isinstance(step, Fetch):
                    feed = await fetcher.fetch(step.name)
                elif isinstance(step, Activate):
                    feed = await _activate(reactor, identity, step, opts)
                elif isinstance(step, Sleep):
                    await defer.Deferred.fromCoroutine(_sleep(reactor, step.seconds))
                    feed = Slept()
                else:
                    feed = await _register(reactor, identity, step.config, opts)
                step = sequence.feed(feed)
        except Exception as exc:  # a bug or an unexpected failure: still a result, not a crash
            sequence.note("fail", f"internal error: {type(exc).__name__}: {exc}")
            step = BootResult(
                Outcome.ERROR, f"internal error: {exc}", identity.sep_name, tuple(sequence.steps)
            )
        finally:
            if own_http:
                await fetcher_http.close()
        return replace(step, elapsed=time.monotonic() - started)

    return defer.Deferred.fromCoroutine(run())


async def _sleep(reactor: Any, seconds: float) -> None:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d
