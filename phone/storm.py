"""A boot storm: many emulated phones in one reactor, with bounded concurrency.

After a power cut every phone on a site boots at once; this measures how many the daemon
onboards per second through the whole path (trust list, XMLDefault, TVS ACTIVATE, own config,
REGISTER). Codes come from the CSV that ``callboard codes export`` writes; MICs are issued in
memory from a lab CA directory (``callboard certs lab-ca``), as a factory would. The command
line (``callboard phone storm``) is in :mod:`callboard.phone.cli`.
"""

from __future__ import annotations

import csv
import io
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from callboard.protocols.models import normalise_mac
from callboard.protocols.tvs import labpki
from twisted.internet import defer

from .boot import BootOptions, BootResult, PhoneIdentity, normalise_model
from .driver import boot_phone
from .http_client import HttpFetcher


@dataclass(frozen=True)
class StormReport:
    """What a storm achieved; ``failures`` holds (device, reason) for every phone not onboarded."""

    phones: int
    onboarded: int
    elapsed: float
    durations: tuple[float, ...]
    failures: tuple[tuple[str, str], ...] = field(default=())

    @property
    def rate(self) -> float:
        """Phones onboarded per second of wall time."""
        return self.onboarded / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, q: float) -> float:
        if not self.durations:
            return 0.0
        ordered = sorted(self.durations)
        index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
        return ordered[index]

    def summary(self) -> str:
        return (
            f"{self.onboarded}/{self.phones} phones onboarded in {self.elapsed:.2f} s: "
            f"{self.rate:.1f} phones/s, {len(self.failures)} failure(s), "
            f"per phone p50 {self.percentile(50) * 1000:.0f} ms, "
            f"p95 {self.percentile(95) * 1000:.0f} ms"
        )


def run_storm(
    reactor: Any,
    phones: Sequence[PhoneIdentity],
    servers: Sequence[str],
    options: BootOptions,
    *,
    concurrency: int = 64,
    on_result: Callable[[BootResult], None] | None = None,
) -> defer.Deferred[StormReport]:
    """Boot every phone, at most ``concurrency`` at a time, over one shared HTTP pool."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")

    async def run() -> StormReport:
        http = HttpFetcher(reactor, connect_timeout=options.timeout, max_per_host=concurrency)
        semaphore = defer.DeferredSemaphore(concurrency)
        results: list[BootResult] = []

        def one(phone: PhoneIdentity) -> defer.Deferred[None]:
            def start() -> defer.Deferred[None]:
                d = boot_phone(reactor, phone, servers, options, http=http)

                def keep(result: BootResult) -> None:
                    results.append(result)
                    if on_result is not None:
                        on_result(result)

                return d.addCallback(keep)

            return semaphore.run(start)

        started = time.monotonic()
        try:
            await defer.gatherResults([one(p) for p in phones], consumeErrors=True)
        finally:
            await http.close()
        elapsed = time.monotonic() - started
        return StormReport(
            phones=len(phones),
            onboarded=sum(r.ok for r in results),
            elapsed=elapsed,
            durations=tuple(r.elapsed for r in results if r.ok),
            failures=tuple((r.device_name, r.reason) for r in results if not r.ok),
        )

    return defer.Deferred.fromCoroutine(run())


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
