"""A boot storm: many emulated phones in one reactor, with bounded concurrency.

After a power cut every phone on a site boots at once; this measures how many the daemon
onboards per second through the whole path (trust list, XMLDefault, TVS ACTIVATE, own config,
REGISTER). Codes come from the CSV that ``callboard codes export`` writes; MICs are issued in
memory from a lab CA directory (``callboard certs lab-ca``), as a factory would.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from callboard.protocols.models import normalise_mac
from callboard.protocols.tvs import labpki
from twisted.internet import defer

from .boot import (
    BootOptions,
    BootResult,
    PhoneIdentity,
    boot_phone,
    normalise_model,
)
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


# CLI -----------------------------------------------------------------------------------------


def cmd_storm(args: argparse.Namespace) -> int:
    from twisted.internet import task

    from .cli import _options

    try:
        codes = read_bat_codes(Path(args.codes).read_text(encoding="utf-8-sig"), args.model)
        issuer = labpki.load_issuing_ca(Path(args.lab_ca))
        count = args.count if args.count is not None else len(codes)
        if count > len(codes):
            raise ValueError(f"{args.codes} holds {len(codes)} BAT code(s) for {args.model}")
        macs = sequential_macs(args.first_mac, count)
    except (OSError, ValueError, labpki.CertError) as exc:
        print(f"callboard phone storm: {exc}", file=sys.stderr)
        return 2
    phones = []
    for mac, code in zip(macs, codes, strict=False):
        mic = issue_storm_mic(issuer, model=args.model, mac=mac)
        phones.append(
            PhoneIdentity(mac=mac, model=args.model, mic_cert=mic.cert, mic_key=mic.key, code=code)
        )
    print(f"storm: {len(phones)} phone(s) of model {args.model}, {args.concurrency} in flight")
    reports: list[StormReport] = []

    def show(result: BootResult) -> None:
        if not result.ok:
            print(f"  {result.device_name}: {result.reason}", flush=True)

    async def main(reactor: Any) -> None:
        report = await run_storm(
            reactor, phones, args.server, _options(args), concurrency=args.concurrency,
            on_result=show,
        )  # fmt: skip
        reports.append(report)

    with contextlib.suppress(SystemExit):  # task.react always exits; we report first
        task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)), [])
    report = reports[0]
    print(report.summary())
    return 0 if report.onboarded == report.phones else 1


def register_cli(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], net: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "storm",
        parents=[net],
        help="boot many phones at once (BAT codes from a CSV)",
        description="Boot N phones with sequential MACs against BAT codes exported by "
        "`callboard codes export`, MICs issued from a lab CA; report phones/s.",
    )
    p.add_argument("--model", required=True, help="the BAT devices' model, e.g. 8841")
    p.add_argument("--codes", required=True, help="CSV written by `callboard codes export`")
    p.add_argument("--lab-ca", required=True, help="directory made by `callboard certs lab-ca`")
    p.add_argument("--count", type=int, help="how many phones (default: one per code)")
    p.add_argument("--first-mac", default="0A0000000000", help="first MAC; the rest follow")
    p.add_argument("--concurrency", type=int, default=64, help="phones booting at once")
    p.set_defaults(func=cmd_storm)
