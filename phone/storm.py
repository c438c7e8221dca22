"""A boot storm: many emulated phones in one reactor, with bounded concurrency.

After a power cut every phone on a site boots at once; this measures how many the daemon
onboards per second through the whole path (trust list, XMLDefault, TVS ACTIVATE, own config,
REGISTER). Codes come from the CSV that ``callboard codes export`` writes; MICs are issued in
memory from a lab CA directory (``callboard certs lab-ca``), as a factory would. The command
line (``callboard phone storm``) is in :mod:`callboard.phone.cli`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from callboard.protocols.models import normalise_mac
from callboard.protocols.tvs import labpki
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import defer

from .boot import (
    Action,
    Activate,
    BootOptions,
    BootResult,
    CallActivation,
    Fetch,
    PhoneIdentity,
    Register,
    normalise_model,
)
from .driver import boot_phone
from .http_client import HttpFetcher
from .remote import remote_boot

STEPS = ("trust list", "XMLDefault", "TVS activate", "SEP config", "REGISTER")
"""The steps a storm times separately, in boot order."""

_TRUST_FILES = ("CTLSEP", "ITLSEP", "ITLFile")


def step_of(action: Action) -> str:
    """Which of :data:`STEPS` an action belongs to (the polls' sleeps count as SEP config)."""
    if isinstance(action, Activate):
        return "TVS activate"
    if isinstance(action, Register):
        return "REGISTER"
    if isinstance(action, CallActivation):
        return "IVR call"  # --ivr: the bootstrap line's REGISTER and the activation call
    if isinstance(action, Fetch):
        if action.name.startswith(_TRUST_FILES):
            return "trust list"
        if action.name.removesuffix(".sgn") == "XMLDefault.cnf.xml":  # signed once the ITL
            return "XMLDefault"  # names a TFTP-role certificate
    return "SEP config"


_MAC_IN_TEXT = re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{12}(?![0-9A-Fa-f])")


def reason_class(reason: str) -> str:
    """A failure reason with the phone's own MAC taken out, so that like failures group."""
    return _MAC_IN_TEXT.sub("<MAC>", reason)


@dataclass(frozen=True)
class PhoneRecord:
    """One phone's boot in a storm: how long each step took, and where and why it failed."""

    device: str
    ok: bool
    elapsed: float
    steps: dict[str, float] = field(default_factory=dict)
    failed_step: str = ""
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device, "ok": self.ok, "elapsed": self.elapsed, "steps": self.steps,
            "failed_step": self.failed_step, "reason": self.reason,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PhoneRecord:
        return cls(
            device=str(data["device"]), ok=bool(data["ok"]), elapsed=float(data["elapsed"]),
            steps={str(k): float(v) for k, v in data["steps"].items()},
            failed_step=str(data["failed_step"]), reason=str(data["reason"]),
        )  # fmt: skip


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


@dataclass(frozen=True)
class StormReport:
    """What a storm achieved; ``failures`` holds (device, reason) for every phone not onboarded.

    ``records`` (when the storm kept them) has every phone's per-step times.
    """

    phones: int
    onboarded: int
    elapsed: float
    durations: tuple[float, ...]
    failures: tuple[tuple[str, str], ...] = field(default=())
    records: tuple[PhoneRecord, ...] = field(default=(), repr=False)

    @classmethod
    def of(cls, records: Sequence[PhoneRecord], elapsed: float) -> StormReport:
        return cls(
            phones=len(records),
            onboarded=sum(r.ok for r in records),
            elapsed=elapsed,
            durations=tuple(r.elapsed for r in records if r.ok),
            failures=tuple((r.device, r.reason) for r in records if not r.ok),
            records=tuple(records),
        )

    @property
    def rate(self) -> float:
        """Phones onboarded per second of wall time."""
        return self.onboarded / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, q: float) -> float:
        return percentile(self.durations, q)

    def summary(self) -> str:
        return (
            f"{self.onboarded}/{self.phones} phones onboarded in {self.elapsed:.2f} s: "
            f"{self.rate:.1f} phones/s, {len(self.failures)} failure(s), "
            f"per phone p50 {self.percentile(50) * 1000:.0f} ms, "
            f"p95 {self.percentile(95) * 1000:.0f} ms"
        )

    def step_times(self) -> dict[str, list[float]]:
        """Seconds each step took, per step, over the phones that onboarded."""
        times: dict[str, list[float]] = {step: [] for step in STEPS}
        for record in self.records:
            if record.ok:
                for step, seconds in record.steps.items():
                    times.setdefault(step, []).append(seconds)
        return times

    def failure_groups(self) -> list[tuple[str, str, int]]:
        """(step, reason, how many) for every kind of failure, most frequent first."""
        counts: dict[tuple[str, str], int] = {}
        if self.records:
            for r in self.records:
                if not r.ok:
                    key = (r.failed_step or "start", reason_class(r.reason))
                    counts[key] = counts.get(key, 0) + 1
        else:
            for _device, reason in self.failures:
                key = ("?", reason_class(reason))
                counts[key] = counts.get(key, 0) + 1
        return sorted(((s, r, n) for (s, r), n in counts.items()), key=lambda g: (-g[2], g[0]))

    def final_line(self) -> str:
        """The machine-readable last line of ``callboard phone storm``."""
        return (
            f"phones={self.phones} ok={self.onboarded} failed={self.phones - self.onboarded} "
            f"phones_per_s={self.rate:.1f} p50_ms={self.percentile(50) * 1000:.1f} "
            f"p95_ms={self.percentile(95) * 1000:.1f} p99_ms={self.percentile(99) * 1000:.1f}"
        )

    def report_lines(self) -> list[str]:
        """The full end-of-storm report; its last line is :meth:`final_line`."""
        lines = [self.summary(), "per step (phones that onboarded): p50 / p95 / p99 ms"]
        for step, times in self.step_times().items():
            if times:
                ms = [percentile(times, q) * 1000 for q in (50, 95, 99)]
                lines.append(f"  {step:<13} {ms[0]:8.1f} {ms[1]:8.1f} {ms[2]:8.1f}  ({len(times)})")
            else:
                lines.append(f"  {step:<13} {'-':>8} {'-':>8} {'-':>8}  (0)")
        groups = self.failure_groups()
        if groups:
            lines.append("failures by step and reason:")
            lines += [f"  {n:6d}  {step}: {reason}" for step, reason, n in groups]
        lines.append(self.final_line())
        return lines


def run_storm(
    reactor: Any,
    phones: Sequence[PhoneIdentity],
    servers: Sequence[str],
    options: BootOptions,
    *,
    concurrency: int = 64,
    on_result: Callable[[BootResult], None] | None = None,
    on_record: Callable[[PhoneRecord], None] | None = None,
    time_limit: float | None = None,
    activation_domain: str | None = None,
) -> defer.Deferred[StormReport]:
    """Boot every phone, at most ``concurrency`` at a time, over one shared HTTP pool.

    With ``time_limit`` (seconds), phones not started by then are not booted and count as
    failed; phones already booting stop by their own per-step timeouts. With
    ``activation_domain`` (``https://HOST:PORT``) the phones activate remotely at that edge
    (:func:`callboard.phone.remote.remote_boot`) instead of the LAN path.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")

    async def run() -> StormReport:
        http = HttpFetcher(
            reactor, connect_timeout=options.timeout, max_per_host=concurrency,
            persistent=options.reuse_connections,
        )  # fmt: skip
        semaphore = defer.DeferredSemaphore(concurrency)
        records: list[PhoneRecord] = []
        started = time.monotonic()

        def one(phone: PhoneIdentity) -> defer.Deferred[None]:
            def start() -> defer.Deferred[None]:
                if time_limit is not None and time.monotonic() - started > time_limit:
                    keep_record(
                        PhoneRecord(phone.sep_name, False, 0.0, {}, "start", "storm time limit")
                    )
                    return defer.succeed(None)
                steps: dict[str, float] = {}
                last: list[str] = ["trust list"]

                def observe(action: Action, seconds: float) -> None:
                    step = step_of(action)
                    steps[step] = steps.get(step, 0.0) + seconds
                    last[0] = step

                if activation_domain is not None:
                    d = _remote(reactor, phone, activation_domain, options, steps, last)
                else:
                    d = boot_phone(reactor, phone, servers, options, http=http, observe=observe)

                def keep(result: BootResult) -> None:
                    if on_result is not None:
                        on_result(result)
                    failed_step = "" if result.ok else last[0]
                    keep_record(
                        PhoneRecord(
                            result.device_name, result.ok, result.elapsed, steps, failed_step,
                            "" if result.ok else result.reason,
                        )
                    )  # fmt: skip

                return d.addCallback(keep)

            return semaphore.run(start)

        def keep_record(record: PhoneRecord) -> None:
            records.append(record)
            if on_record is not None:
                on_record(record)

        try:
            await defer.gatherResults([one(p) for p in phones], consumeErrors=True)
        finally:
            await http.close()
        return StormReport.of(records, time.monotonic() - started)

    return defer.Deferred.fromCoroutine(run())


_REMOTE_STEPS = (("activated", "TVS activate"), ("config", "SEP config"), ("REGISTER", "REGISTER"))
"""What each of remote_boot's step lines times, as the storm's steps (activation: the token)."""


def _remote(
    reactor: Any,
    phone: PhoneIdentity,
    origin: str,
    options: BootOptions,
    steps: dict[str, float],
    last: list[str],
) -> defer.Deferred[BootResult]:
    """One phone through the edge; each step line closes the step it names."""
    mark = [time.monotonic()]
    last[0] = "TVS activate"

    def emit(text: str) -> None:
        now = time.monotonic()
        step = next((s for prefix, s in _REMOTE_STEPS if text.startswith(prefix)), last[0])
        steps[step] = steps.get(step, 0.0) + now - mark[0]
        mark[0] = now
        index = [s for _, s in _REMOTE_STEPS].index(step)
        last[0] = _REMOTE_STEPS[min(index + 1, len(_REMOTE_STEPS) - 1)][1]

    return defer.Deferred.fromCoroutine(
        remote_boot(
            reactor, phone, origin, timeout=options.timeout,
            register=options.register is not False, unregister=options.unregister, emit=emit,
        )
    )  # fmt: skip


# Inputs: codes and MICs ----------------------------------------------------------------------


def read_bat_codes(text: str, model: str) -> list[str]:
    """Codes of BAT (model-bound) devices of ``model`` from a ``callboard codes export`` CSV."""
    wanted = f"model:{normalise_model(model)}"
    codes = []
    for row in csv.DictReader(io.StringIO(text, newline="")):
        bound = (row.get("bound_to") or "").lstrip("'")
        code = (row.get("activation_code") or "").lstrip("'")
        if bound == wanted and code:
            codes.append(code)
    return codes


def sequential_macs(first: str, count: int) -> list[str]:
    start = int(normalise_mac(first), 16)
    if start + count > 1 << 48:
        raise ValueError("the MAC range runs past FF:FF:FF:FF:FF:FF")
    return [f"{start + i:012X}" for i in range(count)]


def issue_storm_mic(issuer: labpki.Issuer, *, model: str, mac: str) -> labpki.CertKeyPair:
    """A lab MIC with the real layout, EC P-256, ten years; serial ``STORM`` + 6 hex digits."""
    return labpki.issue_mic(
        issuer, model=model, mac=mac, serial=f"STORM{secrets.token_hex(3).upper()}"
    )


def storm_phones(
    issuer: labpki.Issuer, model: str, macs: Sequence[str], codes: Sequence[str]
) -> list[PhoneIdentity]:
    """One phone per (MAC, code), each with a fresh MIC from ``issuer``."""
    phones = []
    for mac, code in zip(macs, codes, strict=False):
        mic = issue_storm_mic(issuer, model=model, mac=mac)
        identity = PhoneIdentity(
            mac=mac, model=model, mic_cert=mic.cert, mic_key=mic.key, code=code
        )
        phones.append(identity)
    return phones


# The MIC cache: one PEM (certificate, then key) per model and MAC, per issuing CA -----------


class MicCache:
    """Lab MICs kept on disk by model and MAC, so a storm run again reuses them.

    One sub-directory per issuing CA (named by its certificate's SHA-256), so MICs from
    another lab CA are never taken for this one's. Lab keys only: files are owner-only.
    """

    def __init__(self, root: Path, issuer: labpki.Issuer) -> None:
        fingerprint = hashlib.sha256(issuer.ca.public_bytes(serialization.Encoding.DER))
        self.directory = root / fingerprint.hexdigest()[:32]
        self.issuer = issuer
        self.issued = 0
        self.reused = 0

    def path(self, model: str, mac: str) -> Path:
        return self.directory / f"{normalise_model(model)}-{normalise_mac(mac)}.pem"

    def ensure(self, model: str, mac: str) -> Path:
        """The MIC file for ``model``/``mac``, issued and written if not cached yet."""
        path = self.path(model, mac)
        if path.exists():
            self.reused += 1
            return path
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        mic = issue_storm_mic(self.issuer, model=model, mac=mac)
        pem = mic.cert.public_bytes(serialization.Encoding.PEM) + mic.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        os.replace(partial, path)
        self.issued += 1
        return path


def default_mic_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "callboard" / "storm-mics"


def load_cached_phone(path: Path, *, mac: str, model: str, code: str | None) -> PhoneIdentity:
    """A phone from a cached MIC file (:class:`ValueError` if the file is unusable)."""
    data = path.read_bytes()
    cert = x509.load_pem_x509_certificate(data)
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an RSA or EC key")
    return PhoneIdentity(mac=mac, model=model, mic_cert=cert, mic_key=key, code=code)
