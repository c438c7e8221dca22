"""The emulated phone's boot: trust list, config, activation code, config again, REGISTER.

:class:`BootSequence` is the phone's logic as plain code: it asks for actions (:class:`Fetch`,
:class:`Activate`, :class:`Sleep`, :class:`Register`) and is fed their results, so unit tests
run every branch without a socket. :func:`callboard.phone.driver.boot_phone` performs those
actions over the network (HTTP 6970 first, TFTP as fallback, TVS over TLS with the MIC, the
SIP user agent) and fires with a :class:`BootResult`; thousands run in one reactor. The
provisioning files are parsed by :mod:`callboard.phone.config`.

The order follows the research notes (cisco-protocols.md §2, §9, §13):
``CTLSEP<MAC>.tlv`` → ``ITLSEP<MAC>.tlv`` (else ``ITLFile.tlv``: verify, pin the TVS
certificate) → ``SEP<MAC>.cnf.xml`` (else ``XMLDefault.cnf.xml``: does my model need a code?)
→ ACTIVATE at the TVS named there → ``SEP<MAC>.cnf.xml`` → REGISTER.

Signed files (§2, §5, §16): once the installed ITL holds a TFTP-role certificate, configs are
asked for as ``<name>.sgn`` and each signature is checked against the ITL's RSA TFTP-role
certificate; an unsigned or badly signed file ends the boot (UNTRUSTED) with the reason. With
an ITL of version 1.1 and an EC TFTP-role certificate the phone first asks HTTPS 6971 for
``SEP<MAC>.cnf.xml.sgn``, which answers with the unsigned config once the server's
certificate hash matched that ITL record; HTTP 6970 (signed) is the fallback.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Literal, TypeVar

from callboard.protocols.models import MODEL_IDS, model_key, normalise_mac
from callboard.protocols.tvs.codec import (
    ActivateResponse,
    ActivateStatus,
    normalise_activation_code,
)
from callboard.protocols.tvs.itl import (
    HashAlgorithm,
    ITLError,
    ITLFile,
    KeyType,
    Role,
    certificate_hash,
    parse_itl,
)
from callboard.protocols.tvs.sgn import SgnError, find_signer, parse_sgn, verify_sgn
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .config import (
    ConfigError,
    DefaultConfig,
    DeviceConfig,
    TVSMember,
    parse_default_config,
    parse_device_config,
    parse_hotline,
)
from .tftp_client import DEFAULT_BLKSIZE as TFTP_BLKSIZE

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
    https_port: int = 6971  # SEP config over HTTPS when the ITL says 1.1; 0 = never
    timeout: float = 10.0  # per HTTP request, per TVS exchange; TFTP retransmits within it
    tftp_retries: int = 4
    tftp_blksize: int = TFTP_BLKSIZE
    config_retries: int = 5  # SEP<MAC>.cnf.xml polls after activation
    config_retry_delay: float = 0.5
    register: bool | None = None  # None: register when the config names a SIP server
    unregister: bool = False  # send Expires: 0 after registering (a clean shutdown)
    allow_tofu: bool = False  # send a code to a TVS not pinned by an ITL (labs only)
    # Keep-alive HTTP, and HTTPS kept open or resumed between a boot's fetches (a real
    # phone); False: a new connection (and a full TLS handshake) for every fetch.
    reuse_connections: bool = True
    # After falling over to another call manager, how long a refusal there (403/404) is
    # retried: the node may not have seen the failed node's last change yet (a cluster's
    # change feed takes up to a second).
    failover_settle: float = 2.0
    # Activate by voice when the server answers with a bootstrap config (an "Activate"
    # line): call its hotline and key the code (phone/ivr_call.py).
    ivr: bool = False
    ivr_timeout: float = 45.0  # the whole activation call, prompts included


# Actions and their results ----------------------------------------------------------------


Pin = tuple[int, bytes]  # (hash algorithm code, certificate hash) of an ITL record


@dataclass(frozen=True)
class Fetch:
    """Fetch ``name``; with ``pins``, over HTTPS from a server whose certificate hashes to one."""

    name: str
    pins: tuple[Pin, ...] = ()

    @property
    def secure(self) -> bool:
        return bool(self.pins)


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
    itl_signature: str | None = None  # for the DeviceTLInfo alarm: the installed ITL's
    itl_tftp_server: str | None = None


@dataclass(frozen=True)
class CallActivation:
    """Register the bootstrap line of ``config``, call ``number`` and key the code."""

    config: DeviceConfig
    number: str


Action = Fetch | Activate | Sleep | Register | CallActivation


@dataclass(frozen=True)
class Fetched:
    """A server answered: ``data`` is None for "no such file" (404 / TFTP error 1)."""

    name: str
    data: bytes | None
    via: str = "http"  # http or tftp
    server: str = ""


@dataclass(frozen=True)
class FetchFailed:
    """No server answered over any allowed transport (``untrusted``: one answered, but its
    certificate is not the ITL's)."""

    name: str
    reason: str
    untrusted: bool = False


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


@dataclass(frozen=True)
class VoiceActivated:
    """How the activation call ended (``call``: the call's own record, for tests)."""

    ok: bool
    detail: str
    call: Any = None


Feed = Fetched | FetchFailed | Activated | Slept | Registered | VoiceActivated


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
    voice: Any = None  # the activation call's record (phone/ivr_call.py), with --ivr

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.ONBOARDED

    @property
    def exit_code(self) -> int:
        return self.outcome.value


# The logic --------------------------------------------------------------------------------

T = TypeVar("T")
Step = Generator[Action, Feed, T]  # a step of the boot: yields actions, returns its value
OwnConfig = tuple[Fetched, bytes, ActivateResponse | None]  # SEP<MAC>.cnf.xml, and activation


class BootSequence:
    """The phone's boot as plain logic: :meth:`start`, then :meth:`feed` each action's result.

    Each returns the next :class:`Action`, or the final :class:`BootResult`. Every step is also
    reported as one readable line through ``emit`` (and kept in ``steps``). The steps are
    generators: a step that ends the boot returns a :class:`BootResult`, which its caller
    passes on.
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
        self.itl: ITLFile | None = None  # the installed trust list
        self._itl_data = b""  # its bytes (the key of the verified-file caches)
        self.itl_server = ""
        self.result: BootResult | None = None
        self.voice: Any = None  # the activation call's record (--ivr)
        self.activated_by_voice = False

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

    def _lost(self, failed: FetchFailed) -> BootResult:
        return self._done(Outcome.UNREACHABLE, f"provisioning server lost: {failed.reason}")

    def _fetch(self, name: str) -> Step[Fetched | FetchFailed]:
        got = yield Fetch(name)
        if not isinstance(got, Fetched | FetchFailed):
            raise TypeError(f"expected a fetch result for {name}, got {got!r}")
        if isinstance(got, FetchFailed):
            return got
        if (got.via, got.server) != self._via:
            self._via = (got.via, got.server)
            self.note("boot", f"provisioning server {got.server} answers over {got.via}")
        return got

    def _run(self) -> Step[BootResult]:
        me = self.identity
        self.note("boot", f"{me.device_name} powering up (model {me.product})")
        ended = yield from self._trust_lists()
        if ended is not None:
            return ended
        own = yield from self._own_config()
        if isinstance(own, BootResult):
            return own
        sep, data, activation = own
        if self.options.ivr and _is_bootstrap(data):
            voice = yield from self._activate_by_voice(sep, data)
            if isinstance(voice, BootResult):
                return voice
            sep, data = voice
        return (yield from self._configure(sep, data, activation))

    # Activation by voice (--ivr) --------------------------------------------------------------

    def _activate_by_voice(
        self, sep: Fetched, data: bytes
    ) -> Step[tuple[Fetched, bytes] | BootResult]:
        """The bootstrap config's hotline called, the code keyed; then the real config."""
        me = self.identity
        try:
            config = parse_device_config(data)
        except ConfigError as exc:
            return self._done(Outcome.ERROR, f"{sep.name} unusable: {exc}")
        self.note(sep.via, f'{sep.name}: {len(data)} bytes, bootstrap config (an "Activate" line)')
        if me.code is None:
            return self._done(
                Outcome.CODE_REQUIRED,
                f"activation code required for {me.sep_name}: enter it with --code",
            )
        number = yield from self._hotline(config)
        if isinstance(number, BootResult):
            return number
        self.note("sip", f"handset lifted: the hotline dials {number}")
        answer = yield CallActivation(config, number)
        if not isinstance(answer, VoiceActivated):
            raise TypeError(f"expected the activation call's result, got {answer!r}")
        self.voice = answer.call
        self.note("ivr", answer.detail)
        if not answer.ok:
            return self._done(Outcome.REJECTED, f"activation by voice failed: {answer.detail}",
                              voice=answer.call)  # fmt: skip
        return (yield from self._real_config())

    def _hotline(self, config: DeviceConfig) -> Step[str | BootResult]:
        """The number the bootstrap line dials off-hook, from its dial template."""
        if not config.dial_template:
            return self._done(Outcome.NOT_PROVISIONED, "the bootstrap config names no hotline")
        got = yield from self._fetch_config(config.dial_template)
        if isinstance(got, BootResult):
            return got
        if isinstance(got, FetchFailed):
            return self._lost(got)
        number = parse_hotline(got.data) if got.data is not None else None
        if number is None:
            return self._done(
                Outcome.NOT_PROVISIONED, f"{config.dial_template}: no hotline in the dial template"
            )
        return number

    def _real_config(self) -> Step[tuple[Fetched, bytes] | BootResult]:
        """Told to resync: ``SEP<MAC>.cnf.xml`` again, until it is no bootstrap config."""
        me = self.identity
        retries = self.options.config_retries
        for attempt in range(1, retries + 1):
            sep = yield from self._fetch_config(f"{me.sep_name}.cnf.xml")
            if isinstance(sep, BootResult):
                return sep
            if isinstance(sep, FetchFailed):
                return self._lost(sep)
            if sep.data is not None and not _is_bootstrap(sep.data):
                self.activated_by_voice = True
                return sep, sep.data
            self.note(sep.via, f"{sep.name}: still the bootstrap config (try {attempt}/{retries})")
            if attempt < retries:
                yield Sleep(self.options.config_retry_delay)
        return self._done(
            Outcome.NOT_PROVISIONED,
            f"activated by voice, but {me.sep_name}.cnf.xml stayed the bootstrap config",
            voice=self.voice,
        )

    # 1. Trust lists -----------------------------------------------------------------------

    def _trust_lists(self) -> Step[BootResult | None]:
        """CTL (only noted: Callboard runs no mixed-mode security), then the ITL and its pin.

        Returns a :class:`BootResult` if the boot ends here, else None.
        """
        me = self.identity
        got = yield from self._fetch(f"CTLSEP{me.mac}.tlv")
        if isinstance(got, FetchFailed):
            return self._done(Outcome.UNREACHABLE, f"no provisioning server answered: {got.reason}")
        self.note(got.via, f"{got.name}: {_size(got.data)}")

        itl = yield from self._fetch(f"ITLSEP{me.mac}.tlv")
        if isinstance(itl, Fetched) and itl.data is None:
            self.note(itl.via, f"{itl.name}: not found")
            itl = yield from self._fetch("ITLFile.tlv")
        if isinstance(itl, FetchFailed):
            return self._lost(itl)
        if itl.data is None:
            self.note(itl.via, f"{itl.name}: not found (no trust list: nothing pinned)")
            return None
        return self._pin_from_itl(itl, itl.data)

    def _pin_from_itl(self, itl: Fetched, data: bytes) -> BootResult | None:
        try:
            parsed = verified_itl(data)
        except ITLError as exc:
            self.note(itl.via, f"{itl.name}: {len(data)} bytes, signature BAD")
            return self._done(Outcome.UNTRUSTED, f"{itl.name} refused: {exc}")
        tvs_certs = parsed.certificates(Role.TVS)
        if tvs_certs:
            self.pinned_der = tvs_certs[0].public_bytes(serialization.Encoding.DER)
            pinned = "TVS pinned"
        else:
            pinned = "no TVS certificate in it"
        self.itl = parsed
        self._itl_data = data
        self.itl_server = itl.server.rsplit(":", 1)[0]
        if parsed.wants_signed_files:
            pinned += ", TFTP role: signed files"
            if parsed.https_provisioning:
                pinned += f", ITL {parsed.signer_version[0]}.{parsed.signer_version[1]}: HTTPS"
        self.note(itl.via, f"{itl.name}: {len(data)} bytes, signature ok, {pinned}")
        return None

    # Signed files ---------------------------------------------------------------------------

    def _https_pins(self) -> tuple[Pin, ...]:
        """The ITL's EC TFTP-role records as (hash algorithm, certificate hash), for 6971."""
        itl = self.itl
        if itl is None or not itl.https_provisioning or not self.options.https_port:
            return ()
        if self.options.transport == "tftp":
            return ()
        pins: list[Pin] = []
        for record in itl.records:
            if record.has_tftp_role and record.key_type == KeyType.EC:
                if record.hash_algorithm is not None and record.certificate_hash:
                    pins.append((record.hash_algorithm, record.certificate_hash))
                else:  # no hash in the record: hash its certificate ourselves
                    sha256 = HashAlgorithm.SHA256
                    pins.append((sha256, certificate_hash(record.certificate, sha256)))
        return tuple(pins)

    def _fetch_config(self, name: str) -> Step[Fetched | FetchFailed | BootResult]:
        """A config file: plain without a TFTP-role ITL, else ``<name>.sgn`` checked.

        ``SEP<MAC>.cnf.xml`` goes to HTTPS 6971 first when the ITL says 1.1.
        """
        itl = self.itl
        if itl is None or not itl.wants_signed_files:
            return (yield from self._fetch(name))
        signed = name + ".sgn"
        pins = self._https_pins() if name.startswith("SEP") else ()
        if pins:
            secure = yield from self._fetch_secure(signed, pins)
            if secure is not None:
                return secure
        got = yield from self._fetch(signed)
        if isinstance(got, FetchFailed) or got.data is None:
            return got
        return self._check_signed(got, got.data)

    def _fetch_secure(
        self, signed: str, pins: tuple[Pin, ...]
    ) -> Step[Fetched | BootResult | None]:
        """HTTPS 6971: the unsigned file, or None to fall back to 6970 (not answering)."""
        got = yield Fetch(signed, pins)
        if isinstance(got, FetchFailed):
            if got.untrusted:
                return self._done(Outcome.UNTRUSTED, f"HTTPS {signed}: {got.reason}")
            self.note("https", f"{signed}: {got.reason}; falling back to HTTP")
            return None
        if not isinstance(got, Fetched):
            raise TypeError(f"expected a fetch result for {signed}, got {got!r}")
        if got.data is not None:
            self.note(
                "https", f"{signed}: {len(got.data)} bytes, unsigned over TLS, server pinned by ITL"
            )
        return got

    def _check_signed(self, got: Fetched, blob: bytes) -> Fetched | BootResult:
        """The body of a ``.sgn`` signed by the ITL's RSA TFTP-role certificate, or the end."""
        assert self.itl is not None
        try:
            signer, body = verified_sgn(self._itl_data, blob, got.name.rsplit("/", 1)[-1])
        except SgnError as exc:
            return self._done(Outcome.UNTRUSTED, f"{got.name} refused: not validly signed: {exc}")
        self.note(
            got.via,
            f"{got.name}: {len(blob)} bytes, signature ok ({signer.subject.rfc4514_string()})",
        )
        return replace(got, data=body)

    # 2. My own config, else the default one (and maybe activation) ----------------------------

    def _own_config(self) -> Step[OwnConfig | BootResult]:
        """``SEP<MAC>.cnf.xml`` as (file, bytes, activation), or the :class:`BootResult`."""
        me = self.identity
        sep = yield from self._fetch_config(f"{me.sep_name}.cnf.xml")
        if isinstance(sep, BootResult):
            return sep
        if isinstance(sep, FetchFailed):
            return self._lost(sep)
        if sep.data is not None:
            return sep, sep.data, None
        self.note(sep.via, f"{sep.name}: not found")
        default = yield from self._default_config()
        if isinstance(default, BootResult):
            return default
        activation: ActivateResponse | None = None
        if default.requires_code(me.product, me.sep_name):
            accepted = yield from self._activate(default)
            if isinstance(accepted, BootResult):
                return accepted
            activation = accepted
        return (yield from self._poll_own_config(activation))

    def _default_config(self) -> Step[DefaultConfig | BootResult]:
        """``XMLDefault.cnf.xml`` parsed: does my model need a code? Or the BootResult."""
        me = self.identity
        dflt = yield from self._fetch_config("XMLDefault.cnf.xml")
        if isinstance(dflt, BootResult):
            return dflt
        if isinstance(dflt, FetchFailed):
            return self._lost(dflt)
        if dflt.data is None:
            return self._done(
                Outcome.NOT_PROVISIONED, "neither SEP config nor XMLDefault.cnf.xml is served"
            )
        try:
            default = parsed_default_config(dflt.data)
        except ConfigError as exc:
            return self._done(Outcome.ERROR, f"XMLDefault.cnf.xml unusable: {exc}")
        needs = default.requires_code(me.product, me.sep_name)
        self.note(
            dflt.via,
            f"{dflt.name}: {len(dflt.data)} bytes, {me.product} "
            + ("requires an activation code" if needs else "not listed: autoregistration"),
        )
        return default

    def _activate(self, default: DefaultConfig) -> Step[ActivateResponse | BootResult]:
        """ACTIVATE at the TVS named in XMLDefault: the accepted response, or the BootResult."""
        me = self.identity
        if me.code is None:
            return self._done(
                Outcome.CODE_REQUIRED,
                f"activation code required for {me.sep_name}: enter it with --code",
            )
        if not default.tvs_members:
            return self._done(Outcome.ERROR, "XMLDefault.cnf.xml names no TVS server")
        if self.pinned_der is None and not self.options.allow_tofu:
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
        return self._judge_activation(answer.member, answer.response)

    def _judge_activation(
        self, member: str, activation: ActivateResponse
    ) -> ActivateResponse | BootResult:
        status = _status_name(activation.status)
        self.note("tvs", f"{member}: status {activation.status} {status}: {activation.reason}")
        if activation.status != ActivateStatus.ACTIVATED:
            outcome = (
                Outcome.CERTIFICATE_REFUSED
                if activation.status == ActivateStatus.CERTIFICATE_NOT_ACCEPTED
                else Outcome.REJECTED
            )
            return self._done(
                outcome,
                f"activation refused: status {activation.status} {status}: {activation.reason}",
                activation=activation,
            )
        me = self.identity
        assigned = activation.device_name_assigned
        if assigned and assigned != me.sep_name:
            self.note("tvs", f"warning: TVS assigned {assigned}, not {me.sep_name}")
        return activation

    def _poll_own_config(self, activation: ActivateResponse | None) -> Step[OwnConfig | BootResult]:
        """3. Poll for my own config: it appears once the registry has the SEP record."""
        me = self.identity
        retries = self.options.config_retries
        for attempt in range(1, retries + 1):
            sep = yield from self._fetch_config(f"{me.sep_name}.cnf.xml")
            if isinstance(sep, BootResult):
                return sep
            if isinstance(sep, FetchFailed):
                return self._lost(sep)
            if sep.data is not None:
                return sep, sep.data, activation
            self.note(sep.via, f"{sep.name}: not found (try {attempt}/{retries})")
            if attempt < retries:
                yield Sleep(self.options.config_retry_delay)
        why = (
            "activated, but the server never served"
            if activation is not None
            else "autoregistration: the server has no"
        )
        return self._done(
            Outcome.NOT_PROVISIONED, f"{why} {me.sep_name}.cnf.xml", activation=activation
        )

    # 4. Configure, then REGISTER --------------------------------------------------------------

    def _configure(
        self, sep: Fetched, data: bytes, activation: ActivateResponse | None
    ) -> Step[BootResult]:
        try:
            config = parse_device_config(data)
        except ConfigError as exc:
            return self._done(Outcome.ERROR, f"{sep.name} unusable: {exc}", activation=activation)
        self.note(
            sep.via,
            f"{sep.name}: {len(data)} bytes, {len(config.lines)} line(s)"
            + (f", load {config.load}" if config.load else ""),
        )
        for line in config.lines:
            shown = f' "{line.display_name}"' if line.display_name else ""
            self.note("config", f"line {line.button}: {line.name}{shown} (auth {line.auth_name})")
        registration = yield from self._register(config, activation)
        if isinstance(registration, BootResult):
            return registration
        how = "activated and configured" if activation is not None else "configured"
        if self.activated_by_voice:
            how = "activated by voice and configured"
        return self._done(
            Outcome.ONBOARDED,
            f"{self.identity.sep_name} onboarded ({how}, {len(config.lines)} line(s))",
            config=config,
            activation=activation,
            registration_status=registration,
            voice=self.voice,
        )

    def _register(
        self, config: DeviceConfig, activation: ActivateResponse | None
    ) -> Step[int | BootResult | None]:
        """REGISTER when asked to or when the config names a SIP server.

        Returns the final status (None if not registered) or the failing BootResult.
        """
        opts = self.options
        server = config.sip_server
        wanted = opts.register if opts.register is not None else server is not None
        if wanted and server is None:
            return self._done(
                Outcome.REGISTRATION_FAILED,
                "asked to register, but the config names no SIP server",
                config=config,
                activation=activation,
            )
        if not wanted:
            if opts.register is None:
                self.note("sip", "not registering: the config names no SIP port")
            return None
        if not config.lines:
            self.note("sip", "no lines to register")
            return None
        itl = self.itl
        reg = yield Register(
            config,
            itl_signature=itl.signature.hex() if itl is not None else None,
            itl_tftp_server=self.itl_server if itl is not None else None,
        )
        if not isinstance(reg, Registered):
            raise TypeError(f"expected a registration result, got {reg!r}")
        self.note("sip", reg.detail)
        if not reg.ok:
            return self._done(
                Outcome.REGISTRATION_FAILED,
                f"REGISTER failed: {reg.detail}",
                config=config,
                activation=activation,
                registration_status=reg.status,
            )
        return reg.status


# Verified files, once per distinct content ---------------------------------------------------
#
# Every phone of a site gets the same ITL and XMLDefault, byte for byte, and checking an RSA
# signature or parsing XML gives the same answer for the same bytes. So the result is kept
# per process by content: each phone still fetches the file and its bytes are compared with
# the cached ones (the dict lookup), only the verification and the parse happen once. A file
# that fails is not kept (``lru_cache`` does not keep exceptions): it fails again each time.


@functools.lru_cache(maxsize=16)
def verified_itl(data: bytes) -> ITLFile:
    """``parse_itl(data, verify=True)`` (:class:`ITLError` if not validly signed)."""
    return parse_itl(data, verify=True)


@functools.lru_cache(maxsize=64)
def verified_sgn(itl_data: bytes, blob: bytes, filename: str) -> tuple[x509.Certificate, bytes]:
    """(signer, body) of ``blob``, signed by a TFTP-role certificate of the ITL ``itl_data``
    (:class:`SgnError` if not)."""
    signer = find_signer(verified_itl(itl_data), parse_sgn(blob))
    return signer, verify_sgn(blob, signer, filename=filename)


@functools.lru_cache(maxsize=16)
def parsed_default_config(data: bytes) -> DefaultConfig:
    """:func:`parse_default_config` (:class:`ConfigError` if unusable); its result is frozen."""
    return parse_default_config(data)


def _is_bootstrap(data: bytes) -> bool:
    """A bootstrap config: its only line is a ``bootstrap-<mac>`` account (daemon/ivr.py)."""
    try:
        lines = parse_device_config(data).lines
    except ConfigError:
        return False
    return len(lines) == 1 and lines[0].auth_name.startswith("bootstrap-")


def _size(data: bytes | None) -> str:
    return "not found" if data is None else f"{len(data)} bytes (no CTL support; ignored)"


def _status_name(status: int) -> str:
    try:
        return ActivateStatus(status).name.lower().replace("_", " ")
    except ValueError:
        return "unknown"
