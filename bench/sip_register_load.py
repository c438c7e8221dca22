"""REGISTER load: Callboard's registrar against Kamailio, with sipp, in one run (loopback, UDP).

Not a test. For each server it steps sipp's call rate up (each step a bounded number of
REGISTERs, ``tests/sipp/register_load.xml``: a fresh AoR per call, no retransmissions, a 2 s
answer timeout) and keeps the highest *achieved* rate at which every REGISTER got its 200 and
no retransmission was seen. It stops at the first failing step. Callboard runs in its own
process (allow-all policy, no auth, logging discarded); Kamailio runs ``bench/kamailio/
kamailio.cfg`` (registrar + usrloc in memory, no auth, 1 GiB shared memory: the 64 MiB default fills
up at about 65 000 bindings and then every REGISTER fails). Everything listens on 127.0.0.1 only.

    python bench/sip_register_load.py [--rates 500,1000,...] [--seconds 3] [--runs 1]

Prints a Markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "tests" / "sipp" / "register_load.xml"
KAMAILIO_CFG = ROOT / "bench" / "kamailio" / "kamailio.cfg"
DEFAULT_RATES = [2000, 4000, 6000, 8000, 10000, 12000, 16000, 20000, 25000, 30000]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve(port: int) -> None:
    """The Callboard side: one registrar on UDP, allow-all policy, no auth, no logging."""
    from callboard.protocols.sip.registrar import (
        PolicyDecision,
        Registrar,
        RegistrarSettings,
        RegistrationRequest,
    )
    from callboard.protocols.sip.transports import SIPRegistrarService
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    class AllowAll:
        def decide(self, request: RegistrationRequest) -> PolicyDecision:
            return PolicyDecision.allow(request.device_name)

    globalLogBeginner.beginLoggingTo([], discardBuffer=True, redirectStandardIO=False)
    registrar = Registrar(
        AllowAll(),
        RegistrarSettings(),
        now=reactor.seconds,  # type: ignore[attr-defined]
        wall_now=time.time,
    )
    svc = SIPRegistrarService(
        registrar, reactor, udp_port=port, tcp_port=None, tls_port=None, interface="127.0.0.1"
    )
    svc.startService()
    reactor.run()  # type: ignore[attr-defined]


@dataclass
class Step:
    rate: int
    calls: int
    ok: int
    failed: int
    retrans: int
    achieved: float

    @property
    def clean(self) -> bool:
        return self.failed == 0 and self.retrans == 0 and self.ok == self.calls


def run_step(port: int, rate: int, seconds: float, workdir: Path) -> Step:
    calls = max(100, int(rate * seconds))
    stat = workdir / f"stat_{port}_{rate}.csv"
    local = free_udp_port()
    args = [
        "sipp", f"127.0.0.1:{port}", "-sf", str(SCENARIO), "-t", "u1",
        "-i", "127.0.0.1", "-p", str(local), "-r", str(rate), "-m", str(calls),
        "-l", str(max(rate * 3, 1000)), "-timeout", f"{int(seconds * 3 + 15)}s",
        "-trace_stat", "-stf", str(stat), "-fd", "1", "-nostdin", "-timeout_error",
    ]  # fmt: skip
    start = time.monotonic()
    subprocess.run(args, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.monotonic() - start
    ok = failed = retrans = 0
    if stat.exists():
        with stat.open() as f:
            rows = list(csv.reader(f, delimiter=";"))
        if len(rows) >= 2:
            head, last = rows[0], rows[-1]
            col = {name: i for i, name in enumerate(head)}
            ok = int(last[col["SuccessfulCall(C)"]])
            failed = int(last[col["FailedCall(C)"]])
            retrans = int(last[col["Retransmissions(C)"]])
    return Step(rate, calls, ok, failed, retrans, ok / elapsed if elapsed > 0 else 0.0)


def sustained(port: int, rates: list[int], seconds: float, workdir: Path, name: str) -> float:
    best = 0.0
    for rate in rates:
        step = run_step(port, rate, seconds, workdir)
        print(
            f"  {name:9s} rate {rate:6d}/s: ok {step.ok}/{step.calls} failed {step.failed} "
            f"retrans {step.retrans} achieved {step.achieved:8.0f}/s",
            file=sys.stderr,
        )
        if not step.clean:
            break
        best = max(best, step.achieved)
        if step.achieved < rate * 0.8:
            break  # sipp or the server can no longer keep up with the offered rate
    return best


def wait_udp(port: int, timeout: float = 10.0) -> None:
    """Wait until an OPTIONS on the port gets an answer."""
    msg = (
        f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKw"
        f"{os.getpid()};rport\r\nFrom: <sip:w@127.0.0.1>;tag=1\r\nTo: <sip:w@127.0.0.1>\r\n"
        "Call-ID: wait\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.3)
        while time.monotonic() < deadline:
            s.sendto(msg, ("127.0.0.1", port))
            try:
                s.recvfrom(65536)
                return
            except TimeoutError:
                continue
    raise RuntimeError(f"nothing answers on udp 127.0.0.1:{port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def measure_callboard(rates: list[int], seconds: float, workdir: Path) -> float:
    port = free_udp_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_udp(port)
        return sustained(port, rates, seconds, workdir, "callboard")
    finally:
        stop(proc)


def measure_kamailio(rates: list[int], seconds: float, workdir: Path) -> float:
    port = free_udp_port()
    proc = subprocess.Popen(
        ["/usr/sbin/kamailio", "-f", str(KAMAILIO_CFG), "-DD", "-E", "-m", "1024",
         "-l", f"udp:127.0.0.1:{port}", "-w", str(workdir), "-P", str(workdir / "kam.pid")],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "kamailio.log").open("wb"),
    )  # fmt: skip
    try:
        wait_udp(port)
        return sustained(port, rates, seconds, workdir, "kamailio")
    finally:
        stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rates", default=",".join(map(str, DEFAULT_RATES)))
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each rate step")
    ap.add_argument("--runs", type=int, default=1, help="repeat and take medians")
    opts = ap.parse_args()
    if opts.serve:
        serve(opts.serve)
        return 0
    if shutil.which("sipp") is None:
        print("sipp not found (Debian package sip-tester)", file=sys.stderr)
        return 2
    rates = [int(r) for r in opts.rates.split(",")]
    cb: list[float] = []
    kam: list[float] = []
    with tempfile.TemporaryDirectory(prefix="sipbench") as tmp:
        work = Path(tmp)
        for i in range(opts.runs):
            print(f"run {i + 1}/{opts.runs}", file=sys.stderr)
            cb.append(measure_callboard(rates, opts.seconds, work))
            kam.append(measure_kamailio(rates, opts.seconds, work))
    c, k = statistics.median(cb), statistics.median(kam)
    print("| server | sustained REGISTER/s, zero failures (median) | runs |")
    print("|---|---|---|")
    print(f"| Callboard (Twisted, 1 process) | {c:.0f} | {', '.join(f'{x:.0f}' for x in cb)} |")
    print(f"| Kamailio 5.6 (2 UDP workers) | {k:.0f} | {', '.join(f'{x:.0f}' for x in kam)} |")
    print(f"\nratio Callboard/Kamailio: {c / k:.2f}" if k else "\nKamailio rate is 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
