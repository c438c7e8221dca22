"""The TVS rules, sans-I/O: MIC chain checks, the throttle, and request handling.

Everything here is a function of its inputs: frames, the peer's certificates, the source address
and the time. The registry sits behind ``ActivationAuthority`` (asynchronous: an activation is
answered only once it is durable); failure counts sit behind ``ThrottleStore``; the manufacturing
trust store is a ``ManufacturingTrust`` built from parsed certificates (the daemon loads the files).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from callboard.protocols.settings import check_range, config_key
from callboard.protocols.tvs import codec
from callboard.protocols.tvs.codec import (
    ActivateRequest,
    ActivateResponse,
    ActivateStatus,
    Command,
    DeviceName,
    Frame,
    VerifyRequest,
    VerifyResponse,
    VerifyStatus,
)
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="callboard.tvs")


# The authority (the registry, wired by the daemon) ------------------------------------------


@dataclass(frozen=True)
class Redemption:
    activated: bool
    device_name: str | None  # "SEP<MAC>" on success
    reason: str  # for logs and the phone's screen; never contains the code


class ActivationAuthority(Protocol):
    def redeem(self, *, mac: str, model: str, code: str, mic_sha256: str) -> Deferred[Redemption]:
        """Fires with the final outcome: for an activation, once it is durable.

        A refusal may fire at once; the handler answers the phone only when it has fired.
        """
        ...


# Settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TVSSettings:
    """Every TVS knob; also the [tvs] configuration section (keys as in ``metadata``)."""

    idle_timeout: float = 10.0
    max_message: int = 64 * 1024
    max_connections: int = 1024
    allow_sha1_mic: bool = False
    # Failures per device name (and per source, unless set below) ...
    throttle_budget: int = field(default=5, metadata=config_key("failure_budget"))
    # ... per source address; 0: the same as throttle_budget. Raise it for sites behind NAT.
    throttle_source_budget: int = field(default=0, metadata=config_key("failure_budget_per_source"))
    # ... within this window; then locked out for the base lockout, doubling up to the max.
    throttle_window: float = field(default=15 * 60.0, metadata=config_key("failure_window_seconds"))
    throttle_base_lockout: float = field(default=60.0, metadata=config_key("lockout_seconds"))
    throttle_max_lockout: float = field(
        default=24 * 3600.0, metadata=config_key("max_lockout_seconds")
    )
    verify_ttl: int = 86400

    def validate(self) -> None:
        """The bounds a configuration is held to."""
        check_range("idle_timeout", self.idle_timeout, 0.1, 3600)
        check_range("max_message", self.max_message, 4096, 1 << 24)
        check_range("max_connections", self.max_connections, 1, 1_000_000)
        check_range("throttle_budget", self.throttle_budget, 1, 1_000_000)
        check_range("throttle_source_budget", self.throttle_source_budget, 0, 1_000_000)
        check_range("throttle_window", self.throttle_window, 1, 1e7)
        check_range("throttle_base_lockout", self.throttle_base_lockout, 1, 1e7)
        check_range(
            "throttle_max_lockout", self.throttle_max_lockout, self.throttle_base_lockout, 1e8
        )
        check_range("verify_ttl", self.verify_ttl, 1, 2**32 - 1)


# Manufacturing trust -------------------------------------------------------------------------


@dataclass(frozen=True)
class MicVerdict:
    """The outcome of checking one MIC's chain; computed once per connection."""

    ok: bool
    reason: str
    common_name: str | None = None
    sha256: str | None = None


def _ca_policy() -> ExtensionPolicy:
    """CA policy for manufacturing CAs: basicConstraints(CA) required, nothing else.

    Vendor manufacturing CAs were issued long before the WebPKI profile (no keyUsage, no
    AKI/SKI, basicConstraints without pathlen); the trust store is curated by the operator, so
    we only insist on what makes a certificate a CA at all. pathlen is still enforced by the
    verifier when present.
    """

    def must_be_ca(_policy: object, _cert: x509.Certificate, ext: x509.BasicConstraints) -> None:
        if not ext.ca:
            raise ValueError("basicConstraints does not say CA")

    return ExtensionPolicy.permit_all().require_present(
        x509.BasicConstraints, Criticality.AGNOSTIC, must_be_ca
    )


def _is_self_issued(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer


def _common_name(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _is_sha1(cert: x509.Certificate) -> bool:
    try:
        return isinstance(cert.signature_hash_algorithm, hashes.SHA1)
    except UnsupportedAlgorithm:
        return False


def _signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Raw signature check that, unlike the verifier, also accepts SHA-1 (legacy path only)."""
    key = issuer.public_key()
    algo = child.signature_hash_algorithm
    if algo is None:
        return False
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(child.signature, child.tbs_certificate_bytes, padding.PKCS1v15(), algo)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(child.signature, child.tbs_certificate_bytes, ec.ECDSA(algo))
        else:
            return False
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        return False
    return True


def _within(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


@dataclass(frozen=True)
class _VerifiedIssuer:
    """An issuing CA whose path to the trust store was verified (for one MIC it signed).

    ``anchor`` holds just that CA, so a later MIC from it costs one signature check;
    ``not_before``/``not_after`` bound where the path above it stays valid.
    """

    anchor: Store
    not_before: dt.datetime
    not_after: dt.datetime


def _issuer_key(cert: x509.Certificate) -> tuple[bytes, bytes | None]:
    """The issuer's name (DER) and key identifier as the certificate names them."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        key_id = aki.key_identifier
    except x509.ExtensionNotFound:
        key_id = None
    return cert.issuer.public_bytes(), key_id


def _has_name_constraints(cert: x509.Certificate) -> bool:
    try:
        cert.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        return False
    return True


class ManufacturingTrust:
    """The parsed manufacturing trust store: self-issued roots anchor, the rest help build paths.

    Build it once per (re)load; ``check`` is called once per connection. A storm's MICs share
    a few issuing CAs, so once a MIC's path is verified its issuer is remembered (by name and
    key identifier): the next MIC from it is verified against that issuer alone, within the
    validity of the path above it. A reload builds a new instance, which forgets them all.
    """

    MAX_DEPTH = 6
    MAX_CACHED_ISSUERS = 1024

    def __init__(self, certificates: Iterable[x509.Certificate]) -> None:
        seen: set[bytes] = set()
        roots: list[x509.Certificate] = []
        intermediates: list[x509.Certificate] = []
        for cert in certificates:
            fp = cert.fingerprint(hashes.SHA256())
            if fp in seen:
                continue
            seen.add(fp)
            (roots if _is_self_issued(cert) else intermediates).append(cert)
        self.roots: tuple[x509.Certificate, ...] = tuple(roots)
        self.intermediates: tuple[x509.Certificate, ...] = tuple(intermediates)
        self._store = Store(list(roots)) if roots else None
        self._root_fps = frozenset(r.fingerprint(hashes.SHA256()) for r in roots)
        self._ca_policy = _ca_policy()
        self._ee_policy = ExtensionPolicy.permit_all()
        self._issuers: dict[tuple[bytes, bytes | None], _VerifiedIssuer] = {}
        self.issuer_cache_hits = 0

    def __len__(self) -> int:
        return len(self.roots) + len(self.intermediates)

    def check(
        self,
        leaf: x509.Certificate | None,
        presented: Sequence[x509.Certificate],
        now: dt.datetime,
        *,
        allow_sha1: bool,
    ) -> MicVerdict:
        """Check a MIC chain; the reason says exactly why it was refused."""
        if leaf is None:
            return MicVerdict(False, "no client certificate (MIC) presented")
        cn = _common_name(leaf)
        sha = leaf.fingerprint(hashes.SHA256()).hex()
        if now < leaf.not_valid_before_utc:
            return MicVerdict(False, f"MIC not valid before {leaf.not_valid_before_utc:%Y-%m-%d}")
        if now > leaf.not_valid_after_utc:
            return MicVerdict(False, f"MIC expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
        if _is_sha1(leaf) and not allow_sha1:
            return MicVerdict(False, "MIC is signed with SHA-1 and SHA-1 MICs are not allowed")
        if self._store is None:
            return MicVerdict(False, "manufacturing trust store is empty")
        ok = MicVerdict(True, "MIC chains to the manufacturing trust", cn, sha)
        key = _issuer_key(leaf)
        if self._from_known_issuer(leaf, key, now):
            return ok
        pool = [c for c in presented if c != leaf] + list(self.intermediates)
        try:
            verified = self._verifier(self._store, now).verify(leaf, pool)
        except VerificationError as exc:
            if allow_sha1:
                legacy = self._legacy_check(leaf, pool, now)
                if legacy is not None:
                    return MicVerdict(True, legacy, cn, sha)
            issuer = name_of(leaf.issuer)
            return MicVerdict(
                False, f"MIC (issuer {issuer}) does not chain to the manufacturing trust: {exc}"
            )
        self._remember_issuer(key, verified.chain)
        return ok

    def _verifier(self, store: Store, now: dt.datetime) -> Any:
        return (
            PolicyBuilder()
            .store(store)
            .time(now)
            .max_chain_depth(self.MAX_DEPTH)
            .extension_policies(ca_policy=self._ca_policy, ee_policy=self._ee_policy)
            .build_client_verifier()
        )

    def _from_known_issuer(
        self, leaf: x509.Certificate, key: tuple[bytes, bytes | None], now: dt.datetime
    ) -> bool:
        """True if a remembered issuer signed ``leaf`` and its path is valid at ``now``.

        The leaf itself still gets the verifier's every check (signature, validity, profile);
        False means "not known": the full check decides, with its own reason.
        """
        known = self._issuers.get(key)
        if known is None or not known.not_before <= now <= known.not_after:
            return False
        try:
            self._verifier(known.anchor, now).verify(leaf, [])
        except VerificationError:
            return False
        self.issuer_cache_hits += 1
        return True

    def _remember_issuer(
        self, key: tuple[bytes, bytes | None], chain: Sequence[x509.Certificate]
    ) -> None:
        above = list(chain[1:])
        # Name constraints above the issuer apply to each leaf's names: always walk those.
        if not above or any(_has_name_constraints(c) for c in above):
            return
        if len(self._issuers) >= self.MAX_CACHED_ISSUERS:
            self._issuers.pop(next(iter(self._issuers)))
        self._issuers[key] = _VerifiedIssuer(
            anchor=Store([above[0]]),
            not_before=max(c.not_valid_before_utc for c in above),
            not_after=min(c.not_valid_after_utc for c in above),
        )

    def _legacy_check(
        self, leaf: x509.Certificate, pool: Sequence[x509.Certificate], now: dt.datetime
    ) -> str | None:
        """Path building by hand for SHA-1-signed chains, which the verifier refuses outright.

        Used only when ``allow_sha1_mic`` is on and only accepts a chain that really involves
        SHA-1; anything else keeps the verifier's verdict.
        """
        cert = leaf
        used_sha1 = _is_sha1(leaf)
        candidates = list(self.roots) + list(pool)
        for _ in range(self.MAX_DEPTH):
            issuer = next(
                (c for c in candidates if c.subject == cert.issuer and _signed_by(cert, c)), None
            )
            if issuer is None or not _within(issuer, now):
                return None
            try:
                bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                return None
            if not bc.ca:
                return None
            used_sha1 = used_sha1 or _is_sha1(issuer)
            if issuer.fingerprint(hashes.SHA256()) in self._root_fps:
                if not used_sha1:
                    return None
                return "MIC chains to the manufacturing trust (SHA-1 allowed)"
            cert = issuer
        return None


def name_of(name: x509.Name) -> str:
    return name.rfc4514_string()


# Throttle ------------------------------------------------------------------------------------


class ThrottleStore(Protocol):
    """Failed attempts per key and the lockouts they earn.

    :class:`Throttle` keeps them in this process's memory; a store shared by several
    processes (or nodes) can stand in for it behind the same two calls.
    """

    def locked_for(self, key: str, now: float) -> float:
        """Seconds the key stays locked (0 when it may try)."""
        ...

    def failure(self, key: str, now: float) -> None:
        """Count one failed attempt for the key at ``now``."""
        ...


@dataclass
class _Entry:
    failures: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0
    strikes: int = 0
    last_failure: float = 0.0


class Throttle:
    """The in-memory :class:`ThrottleStore`: failed attempts per key (source address, device
    name) with a doubling lockout.

    ``budget`` failures inside ``window`` seconds lock the key for ``base_lockout``, then twice
    that on the next lock, up to ``max_lockout``; strikes are forgotten after a quiet window.
    Pure: the caller passes the time. Memory is bounded by ``max_keys`` (oldest evicted).
    """

    def __init__(
        self,
        budget: int = 5,
        window: float = 900.0,
        base_lockout: float = 60.0,
        max_lockout: float = 86400.0,
        max_keys: int = 100_000,
    ) -> None:
        self.budget = budget
        self.window = window
        self.base_lockout = base_lockout
        self.max_lockout = max_lockout
        self.max_keys = max_keys
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def locked_for(self, key: str, now: float) -> float:
        """Seconds the key stays locked (0 when it may try)."""
        entry = self._entries.get(key)
        if entry is None or entry.locked_until <= now:
            return 0.0
        return entry.locked_until - now

    def failure(self, key: str, now: float) -> None:
        entry = self._entries.get(key)
        if entry is None:
            entry = _Entry()
            self._entries[key] = entry
            while len(self._entries) > self.max_keys:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        quiet_since = max(entry.last_failure, entry.locked_until)
        if entry.strikes and now - quiet_since > self.window:
            entry.strikes = 0
        entry.last_failure = now
        failures = entry.failures
        failures.append(now)
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if len(failures) >= self.budget:
            lockout = min(self.base_lockout * (2**entry.strikes), self.max_lockout)
            entry.strikes += 1
            entry.locked_until = now + lockout
            failures.clear()


# Request handling ----------------------------------------------------------------------------


@dataclass
class PeerContext:
    """What the TLS layer knows about one connection; the verdict is cached here."""

    source: str
    leaf: x509.Certificate | None = None
    chain: Sequence[x509.Certificate] = ()
    verdict: MicVerdict | None = None


@dataclass(frozen=True)
class Outcome:
    response: bytes
    close: bool = False


Answer = Outcome | Deferred[Outcome]
"""What :meth:`TVSHandler.handle` returns: an outcome now, or later once the authority answers."""


GENERIC_REJECTION = "activation code not accepted"


def role_index(role_certs: Iterable[tuple[int, x509.Certificate]]) -> dict[bytes, tuple[int, ...]]:
    """SHA-256 of each DER certificate -> the roles it holds (VERIFY's lookup)."""
    index: dict[bytes, list[int]] = {}
    for role, cert in role_certs:
        der = cert.public_bytes(serialization.Encoding.DER)
        roles = index.setdefault(hashlib.sha256(der).digest(), [])
        if role not in roles:
            roles.append(role)
    return {k: tuple(v) for k, v in index.items()}


class TVSHandler:
    """Answers one decoded frame at a time for one listener (shared by its connections)."""

    def __init__(
        self,
        *,
        trust: ManufacturingTrust,
        authority: ActivationAuthority,
        role_certs: Iterable[tuple[int, x509.Certificate]],
        settings: TVSSettings,
        device_throttle: ThrottleStore | None = None,
        source_throttle: ThrottleStore | None = None,
    ) -> None:
        self.trust = trust
        self.authority = authority
        self.settings = settings
        self.roles: Mapping[bytes, tuple[int, ...]] = role_index(role_certs)
        self.throttle: ThrottleStore = device_throttle or Throttle(
            settings.throttle_budget,
            settings.throttle_window,
            settings.throttle_base_lockout,
            settings.throttle_max_lockout,
        )
        # Per source address: its own budget, since a whole site may share one NAT address.
        self.source_throttle: ThrottleStore = source_throttle or Throttle(
            settings.throttle_source_budget or settings.throttle_budget,
            settings.throttle_window,
            settings.throttle_base_lockout,
            settings.throttle_max_lockout,
        )

    def set_trust(self, trust: ManufacturingTrust) -> None:
        """Swap the manufacturing trust (SIGHUP); connections check against it from now on."""
        self.trust = trust

    def malformed(self, command: int | None, session_id: int, why: str) -> Outcome:
        """Status 4 in the response family of the request, then close."""
        if command == Command.VERIFY_REQUEST:
            verify = VerifyResponse(session_id, ActivateStatus.MALFORMED)
            return Outcome(verify.encode(), close=True)
        resp = ActivateResponse(session_id, ActivateStatus.MALFORMED, f"malformed: {why}")
        return Outcome(resp.encode(), close=True)

    def handle(self, frame: Frame, peer: PeerContext, now: float) -> Answer:
        """Answer one frame: at once, or (when the authority is asked) through a Deferred
        that never fails. Frames of one connection must be answered in order."""
        try:
            if frame.command == Command.VERIFY_REQUEST:
                return Outcome(self._verify(VerifyRequest.from_frame(frame)))
            if frame.command == Command.ACTIVATE_REQUEST:
                request = ActivateRequest.from_frame(frame)
            else:
                raise codec.BadElements(f"unknown command {frame.command:#x}")
        except codec.CodecError as exc:
            log.info("TVS malformed request from {source}: {why}", source=peer.source, why=str(exc))
            return self.malformed(frame.command, frame.session_id, str(exc))
        answer = self._activate(request, peer, now)
        if isinstance(answer, bytes):
            return Outcome(answer)
        return answer.addCallback(Outcome)

    def _verify(self, request: VerifyRequest) -> bytes:
        roles = self.roles.get(hashlib.sha256(request.certificate_der).digest())
        if roles is None:
            return VerifyResponse(request.session_id, VerifyStatus.NOT_TRUSTED).encode()
        return VerifyResponse(
            request.session_id, VerifyStatus.TRUSTED, roles, self.settings.verify_ttl
        ).encode()

    def _activate(
        self, request: ActivateRequest, peer: PeerContext, now: float
    ) -> bytes | Deferred[bytes]:
        device = request.device
        sid = request.session_id
        src_key = f"src:{peer.source}"
        dev_key = f"dev:{device.name}"
        wait = max(
            self.source_throttle.locked_for(src_key, now), self.throttle.locked_for(dev_key, now)
        )
        if wait > 0:
            reason = f"too many failed attempts; retry in {int(wait) + 1} s"
            self._log(device, peer, ActivateStatus.RATE_LIMITED, reason)
            return ActivateResponse(sid, ActivateStatus.RATE_LIMITED, reason).encode()

        if peer.verdict is None:
            peer.verdict = self.trust.check(
                peer.leaf,
                peer.chain,
                dt.datetime.fromtimestamp(now, dt.UTC),
                allow_sha1=self.settings.allow_sha1_mic,
            )
        verdict = peer.verdict
        reason = verdict.reason
        ok = verdict.ok
        if ok and verdict.common_name != device.name:
            ok = False
            reason = f"MIC CN {verdict.common_name!r} does not match device name {device.name!r}"
        if not ok or verdict.sha256 is None:
            self._fail(src_key, dev_key, now)
            self._log(device, peer, ActivateStatus.CERTIFICATE_NOT_ACCEPTED, reason)
            return ActivateResponse(
                sid, ActivateStatus.CERTIFICATE_NOT_ACCEPTED, f"certificate not accepted: {reason}"
            ).encode()

        try:
            pending = self.authority.redeem(
                mac=device.mac, model=device.model, code=request.code, mic_sha256=verdict.sha256
            )
        except Exception as exc:
            return self._unavailable(device, sid, exc)

        def answer(result: Redemption) -> bytes:
            if result.activated and result.device_name:
                self._log(device, peer, ActivateStatus.ACTIVATED, result.reason)
                return ActivateResponse(
                    sid, ActivateStatus.ACTIVATED, result.reason or "activated", result.device_name
                ).encode()
            self._fail(src_key, dev_key, now)
            self._log(device, peer, ActivateStatus.REJECTED, result.reason)
            # One status and one wording for every refusal, so a guesser learns nothing.
            return ActivateResponse(sid, ActivateStatus.REJECTED, GENERIC_REJECTION).encode()

        def failed(failure: Failure) -> bytes:
            error = failure.value
            return self._unavailable(device, sid, error if error is not None else Exception())

        return pending.addCallbacks(answer, failed)

    def _unavailable(self, device: DeviceName, sid: int, error: BaseException) -> bytes:
        """The registry failed: refuse, never leak details or the code."""
        log.error(
            "TVS activation authority failed for {device}: {error_type}",
            device=device.name,
            error_type=type(error).__name__,
        )
        return ActivateResponse(
            sid, ActivateStatus.REJECTED, "activation service unavailable"
        ).encode()

    def _fail(self, src_key: str, dev_key: str, now: float) -> None:
        self.source_throttle.failure(src_key, now)
        self.throttle.failure(dev_key, now)

    def _log(self, device: DeviceName, peer: PeerContext, status: int, reason: str) -> None:
        log.info(
            "TVS activate {device} from {source}: {outcome} ({reason})",
            device=device.name,
            source=peer.source,
            outcome=ActivateStatus(status).name.lower(),
            status=int(status),
            reason=reason,
        )
